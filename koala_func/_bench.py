"""A minimal in-package micro-benchmark for ``koala-func bench`` when the full suite
(``benchmarks/`` in a checkout) is not importable: the KOALA++ steps of this package against
``torch.optim.Adam`` on an MLP-shaped parameter set, as ratios measured side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from tensordict import TensorDict

from koala_func.fused import fused_step_
from koala_func.koala_pp import koala_pp
from koala_func.koala_v import koala_v

SHAPES = {
    "l1.w": (512, 784),
    "l1.b": (512,),
    "l2.w": (512, 512),
    "l2.b": (512,),
    "l3.w": (10, 512),
    "l3.b": (10,),
}
BASE = "torch.optim.Adam(fused=True)"


def _cases(params: TensorDict, grads: TensorDict, loss: torch.Tensor, compile: bool) -> dict:
    cases: dict[str, Callable[[], object]] = {}
    for name, kw in (
        (BASE, {"fused": True}),
        ("torch.optim.Adam(foreach=False)", {"foreach": False}),
    ):
        tensors = [p.clone().requires_grad_(True) for p in params.values()]
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        adam = torch.optim.Adam(tensors, lr=1e-3, **kw)
        cases[name] = adam.step
    opt = koala_pp(lr=1e-3)
    if compile:
        popt = opt.packed(params)
        flat, flat_g = popt.pack(params), popt.pack(grads)
        pstate = popt.init(flat)
        step_ = torch.compile(popt.step_, fullgraph=True)
        cases["KOALA++ packed in-place (compiled)"] = lambda: step_(flat, flat_g, loss, pstate)
    mine = params.clone()
    fstate = opt.init(mine)
    cases["KOALA++ fused_step_ (eager)"] = lambda: fused_step_(opt, mine, grads, loss, fstate)
    for name, o in (("KOALA++ reference step (eager)", opt), ("KOALA-V step (eager)", koala_v())):
        state = o.init(params)
        cases[name] = lambda o=o, state=state: o.step(params, grads, loss, state)
    return cases


def micro_benchmark(repeats: int = 20, compile: bool = True) -> str:
    """Median step time of each optimizer, interleaved, as a Markdown table with the ratio
    to ``torch.optim.Adam(fused=True)``. Timings on a shared machine are noisy: trust ratios."""
    gen = torch.Generator().manual_seed(0)
    params = TensorDict({k: torch.randn(s, generator=gen) for k, s in SHAPES.items()})
    grads = params.apply(lambda p: torch.randn(p.shape, generator=gen) * 1e-2)
    loss = torch.rand(64, generator=gen)
    cases = _cases(params, grads, loss, compile)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for f in cases.values():  # warm-up (and compile)
        f()
        f()
    for _ in range(repeats):
        for name, f in cases.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times[BASE])
    n = sum(p.numel() for p in params.values())
    lines = [
        f"MLP-shaped parameters: {len(SHAPES)} tensors, {n} floats; median of {repeats}, "
        f"interleaved; threads {torch.get_num_threads()}",
        "",
        f"| step | median ms | ratio to {BASE} |",
        "|---|---:|---:|",
    ]
    for name, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {name} | {1e3 * med:.2f} | {med / base:.2f} |")
    return "\n".join(lines)
