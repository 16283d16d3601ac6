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

    python benchmarks/bench_passes.py --reuse

What a second read from cache saves: pass 2 over buffers of 0.26M to 4.2M floats, after a write
of 64 MiB (its four inputs come from memory), right after pass 1 over the same buffers (the
step's order: pass 1 has just read ``g, h_prev, v``), and right after itself (all four warm).
Splitting the step into layouts small enough for the cache could at best turn the first time
into the second; :func:`split` times what the split itself costs: both passes over 4.2M floats
as 1 to 16 compiled calls.
"""

from __future__ import annotations

import statistics
import sys
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


FLUSHED, AFTER_PASS1, WARM = "after 64 MiB written", "right after pass 1", "right after itself"
FLUSH_FLOATS = 16 << 20  # 64 MiB of float32, larger than the last-level cache here


def reuse(rows_list=(128, 512, 2048), reps: int = REPS, chunk: int = 2048) -> list[dict]:
    """Per buffer size (``rows`` of ``chunk`` floats), the median ms of pass 2 in the three
    situations of the module docstring, and each over the first."""
    pass1, pass2 = torch.compile(_pass1, fullgraph=True), torch.compile(_pass2, fullgraph=True)
    flush = torch.empty(FLUSH_FLOATS)
    out = []
    for rows in rows_list:
        gen = torch.Generator().manual_seed(0)
        bufs = [torch.randn(rows, chunk, generator=gen) * 0.05 for _ in range(4)]
        cf = torch.tensor([0.9, 0.05, 0.01, 1e-3, 1e-3, 1.0]).expand(rows, 6).contiguous()
        for _ in range(2):  # compile, warm
            pass1(*bufs)
            pass2(*bufs, cf)
        times: dict[str, list[float]] = {FLUSHED: [], AFTER_PASS1: [], WARM: []}
        for _ in range(reps):
            for name in times:
                if name == FLUSHED:
                    flush.add_(1.0)
                elif name == AFTER_PASS1:
                    flush.add_(1.0)
                    pass1(*bufs)
                t = time.perf_counter()
                pass2(*bufs, cf)
                times[name].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = {"floats": rows * chunk, **ms}
        row |= {f"x {k}": ms[k] / ms[FLUSHED] for k in ms}
        out.append(row)
    return out


def _segment_step(theta, g, v, h):
    """Both passes over one segment of rows, one block: pass 1, coefficients from its sums
    (bounded, so that repeated calls stay finite), pass 2."""
    s = _pass1(theta, g, v, h).sum(-2, keepdim=True)
    k = 1.0 / (1.0 + s[..., 0] + s[..., 3].abs())
    one = torch.ones_like(k)
    cf = torch.stack([0.9 * one, 0.05 * k, 0.01 * k, 1e-3 * k, 1e-3 * k, one], -1)
    _pass2(theta, g, v, h, cf.expand(theta.shape[0], 6))


def split(rows: int = 2048, parts=(1, 2, 4, 8, 16), reps: int = REPS, chunk: int = 2048) -> dict:
    """Median ms of both passes over ``rows`` rows of ``chunk`` floats as ``k`` compiled calls
    over ``rows / k`` rows each, for ``k`` in ``parts``, interleaved, each after 64 MiB written;
    and each over one call."""
    step = torch.compile(_segment_step, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randn(rows, chunk, generator=gen) * 0.01 for _ in range(4)]
    flush = torch.empty(FLUSH_FLOATS)
    calls = {}
    for k in parts:
        n = rows // k
        segments = [tuple(b[i : i + n] for b in bufs) for i in range(0, rows, n)]
        calls[k] = lambda segments=segments: [step(*seg) for seg in segments]
        calls[k]()  # compile (one graph per segment size), warm
        calls[k]()
    times: dict[int, list[float]] = {k: [] for k in calls}
    for _ in range(reps):
        for k, fn in calls.items():
            flush.add_(1.0)
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"floats": rows * chunk, "ms": ms, "x_one": {k: ms[k] / ms[parts[0]] for k in ms}}


def main(argv: list[str] | None = None) -> None:
    if "--reuse" in (sys.argv[1:] if argv is None else argv):
        print(f"pass 2, median of {REPS} rounds, {torch.get_num_threads()} threads")
        for r in reuse():
            cells = ", ".join(
                f"{k} {r[k]:.3f} ms ({r['x ' + k]:.2f})" for k in (FLUSHED, AFTER_PASS1, WARM)
            )
            print(f"{r['floats'] / 1e6:5.2f}M floats: {cells}")
        sp = split()
        print(f"both passes over {sp['floats'] / 1e6:.2f}M floats, after 64 MiB written:")
        for k, ms in sp["ms"].items():
            print(f"  {k:2d} compiled calls: {ms:.3f} ms ({sp['x_one'][k]:.2f})")
        return
    res = run()
    print(
        f"median of {res['reps']} interleaved rounds, {torch.get_num_threads()} threads, "
        f"packed buffers {res['shape']}"
    )
    for k, ms in res["ms"].items():
        print(f"{k:32s} {ms:6.2f} ms  {res['x_adam'][k]:5.2f}x Adam  ({res['traffic'][k]})")


if __name__ == "__main__":
    main()
