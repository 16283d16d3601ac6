"""What bounds the packed step on this machine: arrays read or arrays written?

    python benchmarks/bench_passes.py

Times, interleaved in one run on ResNet-18-sized buffers ([5744, 2048] float32), compiled
stand-ins for the two passes of the packed step: the reduction pass (reads g, h_prev, v), the
update pass writing 3 arrays back (theta, v, h_prev) or 2 (theta, v: what a step that kept
no copy of ``H`` would write), an Adam-like pass (reads 4, writes 3) and a plain copy.
"""

from __future__ import annotations

import statistics
import time

import torch

N, C, REPS = 5744, 2048, 40


def reduction(g, h, v):
    products = [g * g, g * h, g * v, h * h, h * v]
    return torch.stack([p.sum(1) for p in products], 1)


def update_3w(theta, g, h, v, coef):
    a, c, b, s = coef.unsqueeze(-1).unbind(1)
    v_new = a * v + c * g + b * h
    theta.copy_(theta - s * (v_new + 0.1 * g))
    v.copy_(v_new)
    h.copy_(g)


def update_2w(theta, g, h, v, coef):
    a, c, b, s = coef.unsqueeze(-1).unbind(1)
    v_new = a * v + c * g + b * h
    theta.copy_(theta - s * (v_new + 0.1 * g))
    v.copy_(v_new)


def adam_like(theta, g, m, v):
    m.copy_(0.9 * m + 0.1 * g)
    v.copy_(0.99 * v + 0.01 * g * g)
    theta.copy_(theta - 1e-3 * m / (v.sqrt() + 1e-8))


def run(reps: int = REPS) -> dict:
    """Median ms of each pass over ``reps`` interleaved calls (report.py's pass table)."""
    g, h, v, theta = (torch.randn(N, C) for _ in range(4))
    coef = torch.rand(N, 4) * 0.1
    fns = {
        "reduction: read 3": (torch.compile(reduction), (g, h, v)),
        "update: read 4, write 3": (torch.compile(update_3w), (theta, g, h, v, coef)),
        "update: read 4, write 2": (torch.compile(update_2w), (theta, g, h, v, coef)),
        "Adam-like: read 4, write 3": (torch.compile(adam_like), (theta, g, h, v)),
        "copy: read 1, write 1": (lambda a, b: a.copy_(b), (theta, g)),
    }
    for fn, args in fns.values():
        fn(*args)
        fn(*args)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, (fn, args) in fns.items():
            t = time.perf_counter()
            fn(*args)
            times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(ts) * 1e3 for k, ts in times.items()}
    return {"shape": f"[{N}, {C}]", "reps": reps, "ms": ms}


def main() -> None:
    res = run()
    print(f"median of {res['reps']} interleaved calls, {torch.get_num_threads()} threads")
    for k, ms in res["ms"].items():
        print(f"{k:28s} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
