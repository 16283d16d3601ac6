"""Step timings: ``koala-func bench`` (the optimizer step alone) and the training-step times
of the reproduction (forward, backward and step, KOALA++ against Adam/AdamW, each through its
fastest door). Timings on a shared machine are noisy: the cases run interleaved, and the ratios
are what to trust.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from koala_func import KoalaPP, ensemble_init, ensemble_train_step, koala_pp, koala_v, stack_params
from koala_func.baselines import adamw

__all__ = ["BASE", "SHAPES", "interleaved_medians", "micro_benchmark", "train_step_times"]

#: The parameter shapes of :func:`micro_benchmark` (an MLP 784-512-512-10).
SHAPES = {
    "l1.w": (512, 784),
    "l1.b": (512,),
    "l2.w": (512, 512),
    "l2.b": (512,),
    "l3.w": (10, 512),
    "l3.b": (10,),
}
#: The baseline every ratio of :func:`micro_benchmark` is relative to.
BASE = "torch.optim.Adam(fused=True)"


def interleaved_medians(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2
) -> dict[str, float]:
    """The median seconds of each case, the cases run in turn (so that a busy spell of the
    machine hits all of them alike) after ``warmup`` untimed calls each (compiles).

    Examples:
        >>> t = interleaved_medians({"noop": lambda: None}, repeats=3)
        >>> list(t), t["noop"] >= 0
        (['noop'], True)
    """
    for f in cases.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, f in cases.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _step_cases(params: TensorDict, grads: TensorDict, loss: torch.Tensor, compile: bool):
    cases: dict[str, Callable[[], object]] = {}
    for name, kw in ((BASE, {"fused": True}), ("torch.optim.Adam(foreach=False)", {})):
        tensors = [p.clone().requires_grad_(True) for p in params.values()]
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = g.clone()
        cases[name] = torch.optim.Adam(tensors, lr=1e-3, **kw).step
    tensors = [p.clone().requires_grad_(True) for p in params.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    kpp = KoalaPP(tensors, lr=1e-3)
    cases["KoalaPP.step (torch.optim door)"] = lambda: kpp.step(loss=loss)
    opt = koala_pp(lr=1e-3)
    state = opt.init(params)
    cases["koala_pp step (functional, eager)"] = lambda: opt.step(params, grads, loss, state)
    if compile:
        step = torch.compile(opt.step, fullgraph=True)
        cases["koala_pp step (functional, compiled)"] = lambda: step(params, grads, loss, state)
    vopt = koala_v()
    vstate = vopt.init(params)
    cases["KOALA-V step (eager)"] = lambda: vopt.step(params, grads, loss, vstate)
    return cases


def micro_benchmark(repeats: int = 20, compile: bool = True) -> str:
    """Median step time of each optimizer on MLP-shaped parameters, interleaved, as a
    Markdown table with the ratio to ``torch.optim.Adam(fused=True)``.

    Examples:
        >>> table = micro_benchmark(repeats=2, compile=False)
        >>> "| KoalaPP.step (torch.optim door) |" in table and "ratio to" in table
        True
    """
    gen = torch.Generator().manual_seed(0)
    params = TensorDict({k: torch.randn(s, generator=gen) for k, s in SHAPES.items()})
    grads = params.apply(lambda p: torch.randn(p.shape, generator=gen) * 1e-2)
    loss = torch.rand(64, generator=gen)
    medians = interleaved_medians(_step_cases(params, grads, loss, compile), repeats)
    base = medians[BASE]
    n = sum(p.numel() for p in params.values())
    lines = [
        f"MLP-shaped parameters: {len(SHAPES)} tensors, {n} floats; median of {repeats}, "
        f"interleaved; threads {torch.get_num_threads()}",
        "",
        f"| step | median ms | ratio to {BASE} |",
        "|---|---:|---:|",
    ]
    for name, med in medians.items():
        lines.append(f"| {name} | {1e3 * med:.2f} | {med / base:.2f} |")
    return "\n".join(lines)


def train_step_times(
    make_module: Callable[[], torch.nn.Module],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    koala_kwargs: dict,
    adamw_kwargs: dict,
    members: int = 5,
    repeats: int = 30,
    compile: bool = True,
) -> dict[str, float]:
    """Median seconds of one training step (forward, backward and optimizer step) of:

    - ``KoalaPP`` (the ``torch.optim`` door) against ``torch.optim.AdamW(fused=True)`` on one
      model (per-sample cross-entropy losses, gradients of their mean);
    - ``members`` models at once: the compiled KOALA++ ensemble training step
      (:func:`koala_func.ensemble_train_step`) against the same vmapped step with the
      functional AdamW (``compile`` for both).

    Examples:
        >>> t = train_step_times(lambda: torch.nn.Linear(4, 3),
        ...                      (torch.randn(8, 4), torch.randint(3, (8,))),
        ...                      koala_kwargs={}, adamw_kwargs={}, members=2, repeats=2,
        ...                      compile=False)
        >>> sorted(t)  # doctest: +NORMALIZE_WHITESPACE
        ['ensemble: KOALA++', 'ensemble: functional AdamW', 'single: KoalaPP',
         'single: torch.optim.AdamW(fused=True)']
    """
    x, y = batch

    def ce(out, target):
        return F.cross_entropy(out, target, reduction="none")

    cases: dict[str, Callable[[], object]] = {}
    torch.manual_seed(0)
    for name, build in (
        ("single: KoalaPP", lambda ps: KoalaPP(ps, **koala_kwargs)),
        (
            "single: torch.optim.AdamW(fused=True)",
            lambda ps: torch.optim.AdamW(ps, fused=True, **adamw_kwargs),
        ),
    ):
        module = make_module()
        opt = build(module.parameters())
        koala = isinstance(opt, KoalaPP)

        def one(module=module, opt=opt, koala=koala):
            opt.zero_grad(set_to_none=True)
            losses = ce(module(x), y)
            losses.mean().backward()
            if koala:
                opt.step(loss=losses.detach())
            else:
                opt.step()

        cases[name] = one

    modules = [make_module() for _ in range(members)]
    kopt = koala_pp(**koala_kwargs)
    aopt = adamw(**adamw_kwargs)
    for name, opt in (("ensemble: KOALA++", kopt), ("ensemble: functional AdamW", aopt)):
        params = stack_params(modules)
        if opt is kopt:
            state = ensemble_init(kopt, params)
            step = ensemble_train_step(kopt, modules[0], ce, compile=compile)
        else:
            state = torch.vmap(aopt.init)(params)
            step = ensemble_train_step(aopt.step, modules[0], ce, compile=compile)
        box = [params, state]

        def one(step=step, box=box):
            box[0], box[1], _ = step(box[0], box[1], x, y)

        cases[name] = one
    return interleaved_medians(cases, repeats, warmup=3)
