"""What bounds the packed step on this machine: the engine's two passes, timed one by one.

    python benchmarks/bench_passes.py

On ResNet-18 parameter shapes (float32, weight decay 0), interleaved in one process: the whole
``KoalaPP`` step, the engine's own pass 1 (``koala_func.engine.passes.partial_sums``: reads
``g, h_prev, v``) and pass 2 (``write_update``: reads ``theta, g, v, h_prev``, writes
``theta, v, h_prev``), each compiled alone over a packed layout of the same shapes,
``Adam(fused=True)`` (reads four arrays, writes three), an inductor-compiled pass with Adam's
traffic, and a copy (reads one, writes one). Two rows split reads from writes: pass 2 without
its write of ``h_prev`` (the engine's ``_updated``, two of its three results stored), and a
compiled sum that reads seven arrays and writes none, the step's reads alone. A ratio is the
median over rounds of the per-round ratio to ``Adam(fused=True)``.
"""

from __future__ import annotations

import statistics
import time

import torch

import koala_func as kf
from koala_func.engine import Buffers, Layout
from koala_func.engine.passes import _updated, partial_sums, write_update

try:
    from benchmarks.sets import grads_of, module_of, resnet18
except ImportError:  # run as a script: python benchmarks/bench_passes.py
    from sets import grads_of, module_of, resnet18  # type: ignore[no-redef]

REPS = 40
STEP, PASS1, PASS2 = "KoalaPP step", "pass 1: block sums", "pass 2: update"
SUM = "pass 1 + pass 2"
ADAM, ADAM_LIKE, COPY = "Adam(fused=True)", "inductor pass, Adam's traffic", "copy"
PASS2_NO_H, READS = "pass 2, h_prev not written", "sum of 7 arrays (the step's reads)"
#: What each row reads and writes, in arrays of the parameters' size.
TRAFFIC = {
    STEP: "reads 7, writes 3",
    PASS1: "reads 3 (g, h_prev, v)",
    PASS2: "reads 4, writes 3",
    SUM: "reads 7, writes 3",
    PASS2_NO_H: "reads 4, writes 2",
    READS: "reads 7, writes 0",
    ADAM: "reads 4, writes 3",
    ADAM_LIKE: "reads 4, writes 3",
    COPY: "reads 1, writes 1",
}


def _pass1(theta, g, v, h):
    return partial_sums(Buffers(theta, g, v, h), None, None, torch.float32)


def _pass2(theta, g, v, h, cf):
    write_update(Buffers(theta, g, v, h), None, cf, None, (theta, v, h))


def _pass2_no_h(theta, g, v, h, cf):
    new_theta, new_v, _ = _updated(Buffers(theta, g, v, h), None, cf, None, torch.float32)
    theta.copy_(new_theta.view(theta.shape))
    v.copy_(new_v.view(v.shape))


def _reads(theta, g, v, h, a, b, c):
    return theta.sum() + g.sum() + v.sum() + h.sum() + a.sum() + b.sum() + c.sum()


def _adam_like(theta, g, m, v):
    m.copy_(0.9 * m + 0.1 * g)
    v.copy_(0.99 * v + 0.01 * g * g)
    theta.copy_(theta - 1e-3 * m / (v.sqrt() + 1e-8))


def run(reps: int = REPS, shapes: list[tuple[int, ...]] | None = None) -> dict:
    """Median ms of each row over ``reps`` interleaved rounds, and its median ratio to
    ``Adam(fused=True)`` (report.py's pass table); ``shapes``: the parameters' (ResNet-18's)."""
    shapes = shapes or resnet18()
    loss = torch.tensor(1.0)
    model = module_of(shapes)
    params = list(model.parameters())
    opt = kf.KoalaPP(params, lr=1e-3, weight_decay=0.0)
    for p, g in zip(params, grads_of(shapes), strict=True):
        p.grad = g
    adam_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(adam_params, grads_of(shapes), strict=True):
        p.grad = g
    adam = torch.optim.Adam(adam_params, lr=1e-3, fused=True)

    layout = Layout(shapes, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    theta, g, v, h = (
        layout.pack([torch.randn(s, generator=gen) * 0.05 for s in shapes]) for _ in range(4)
    )
    # pass 2's per-chunk coefficients a, c, b, scale, scale * q, ok: a contraction, so that
    # repeated calls keep the values bounded
    cf = torch.tensor([0.9, 0.05, 0.01, 1e-3, 1e-3, 1.0]).expand(theta.shape[0], 6).contiguous()
    m1, m2 = torch.zeros_like(theta), torch.ones_like(theta)
    pass1, pass2 = torch.compile(_pass1, fullgraph=True), torch.compile(_pass2, fullgraph=True)
    pass2_no_h = torch.compile(_pass2_no_h, fullgraph=True)
    reads = torch.compile(_reads, fullgraph=True)
    adam_like = torch.compile(_adam_like, fullgraph=True)
    dst = torch.empty_like(theta)
    # three more arrays of the same size, so that the seven reads are of seven arrays
    more = [layout.pack([torch.randn(s, generator=gen) for s in shapes]) for _ in range(3)]
    fns = {
        STEP: lambda: opt.step(loss=loss),
        PASS1: lambda: pass1(theta, g, v, h),
        PASS2: lambda: pass2(theta, g, v, h, cf),
        PASS2_NO_H: lambda: pass2_no_h(theta, g, v, h, cf),
        READS: lambda: reads(theta, g, v, h, *more),
        ADAM: adam.step,
        ADAM_LIKE: lambda: adam_like(dst, g, m1, m2),
        COPY: lambda: dst.copy_(g),
    }
    for fn in fns.values():  # compile, warm
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    times[SUM] = [a + b for a, b in zip(times[PASS1], times[PASS2], strict=True)]
    order = [STEP, PASS1, PASS2, SUM, PASS2_NO_H, READS, ADAM, ADAM_LIKE, COPY]
    ms = {k: statistics.median(times[k]) * 1e3 for k in order}
    x_adam = {
        k: statistics.median(a / b for a, b in zip(times[k], times[ADAM], strict=True))
        for k in order
    }
    shape = f"[{theta.shape[0]}, {theta.shape[1]}]"
    return {"shape": shape, "reps": reps, "ms": ms, "x_adam": x_adam, "traffic": TRAFFIC}


def main() -> None:
    res = run()
    print(
        f"median of {res['reps']} interleaved rounds, {torch.get_num_threads()} threads, "
        f"packed buffers {res['shape']}"
    )
    for k, ms in res["ms"].items():
        print(f"{k:32s} {ms:6.2f} ms  {res['x_adam'][k]:5.2f}x Adam  ({res['traffic'][k]})")


if __name__ == "__main__":
    main()
