"""The benchmark machinery shared by report.py, cold_compile.py, bench_step.py and the smoke test.

A *case* is one way to take an optimizer step (a door of ``koala_func`` or a peer), built on its
own copy of a parameter set, with fixed gradients and a fixed loss, as a zero-argument closure.
Cases of one group are timed interleaved (one call of each per round), so a noisy shared machine
affects all alike; medians are quoted. Only public names of ``koala_func`` are used.

Modes:

- ``step``: the gradients are written once (into ``p.grad`` in place, where the optimizer already
  holds one) and the closure is the optimizer step alone, as ``adam.step()`` is timed.
- ``zero_grad + backward + step``: ``opt.zero_grad()``, a backward pass of the cheapest loss
  with the same gradients (``sum_i <p_i, g_i>``), then the step. This is what a training step
  pays for the gradients beyond the forward pass (accumulating into a kept gradient buffer,
  or a fresh gradient tensor that the optimizer must copy).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tensordict import TensorDict, TensorDictBase

import koala_func as kf
from koala_func.engine.layout import SPARE

from .authors_style import AuthorsStyleKoalaPP
from .sets import ENSEMBLE_SIZES, SETS, ensemble_member, grads_of, module_of

LR, LOSS = 1e-3, 0.5
SLOW_S, SLOW_REPS = 0.15, 10  # cases slower than SLOW_S a call are timed SLOW_REPS times
ENSEMBLE_LR = 0.5

STEP, TRAIN = "step", "zero_grad + backward + step"

ADAM = "Adam(fused=True)"
ADAMW = "AdamW(fused=True)"
ADAM_LOOP = "Adam(foreach=False)"
KOALA = "KoalaPP"
KOALA_REPLACED = "KoalaPP, grads replaced each step"
KOALA_REF = 'KoalaPP(impl="reference")'
KOALA_EAGER = "KoalaPP(compile=False)"
FUNC = "torch.compile(opt.step) over a TensorDict"
AUTHORS = "authors-shaped loop (eager)"
COPY = "copy (read 1, write 1 array)"
ENS = "ensemble_step, one call"
ENS_INPLACE = "ensemble_step(inplace=True), one call"
ENS_ADAM = "Adam(fused=True), one step over stacked [E, ...]"
ENS_ADAMW = "AdamW(fused=True), one step over stacked [E, ...]"
ENS_LOOP = "loop of E Adam(fused=True) steps"

METHODS = (ADAM, KOALA, KOALA_REPLACED, KOALA_EAGER, KOALA_REF, FUNC, AUTHORS, COPY)
TRAIN_METHODS = (ADAM, KOALA, AUTHORS)
ENSEMBLE_METHODS = (ENS, ENS_INPLACE, ENS_ADAM, ENS_LOOP, ENS_ADAMW)


@dataclass
class Case:
    """One timed closure, with what the memory measurement needs."""

    method: str
    mode: str = STEP
    fn: Callable[[], object] | None = None
    first_s: float | None = None  # the first call (compiles, builds buffers)
    warm_s: float | None = None  # the second call
    error: str | None = None
    roots: Callable[[], list] = lambda: []  # objects holding the optimizer's state
    own: Callable[[], list] = lambda: []  # params and grads: not counted as state
    extra: dict = field(default_factory=dict)


def _set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Write ``grads`` into ``p.grad`` in place where one exists (the optimizer's buffer)."""
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def _backward(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The cheapest backward giving ``p.grad == g``: of ``sum_i <p_i, g_i>``."""
    flat = [g.reshape(-1) for g in grads]
    sum(torch.dot(p.reshape(-1), g) for p, g in zip(params, flat, strict=True)).backward()


def _params_and_grads(shapes, device):
    model = module_of(shapes, device=device)
    return model, list(model.parameters()), grads_of(shapes, device=device)


def _torch_optim_case(method, mode, shapes, wd, device) -> Case:
    model, params, grads = _params_and_grads(shapes, device)
    loss = torch.tensor(LOSS, device=device)
    if method in (ADAM, ADAMW, ADAM_LOOP):
        kw = {"foreach": False} if method == ADAM_LOOP else {"fused": True}
        cls = torch.optim.AdamW if method == ADAMW else torch.optim.Adam
        opt = cls(params, lr=LR, weight_decay=wd, **kw)
        do_step = opt.step
    elif method == AUTHORS:
        opt = AuthorsStyleKoalaPP(params, lr=LR, weight_decay=wd)

        def do_step():
            opt.update(loss)
    else:
        kw = {KOALA_REF: {"impl": "reference"}, KOALA_EAGER: {"compile": False}}.get(method, {})
        opt = kf.KoalaPP(params, lr=LR, weight_decay=wd, **kw)

        def do_step():
            opt.step(loss=loss)

    if mode == TRAIN:

        def zero_grad():
            if hasattr(opt, "zero_grad"):
                opt.zero_grad()
            else:  # the authors' class has none: what torch.optim's default does
                for p in params:
                    p.grad = None

        def fn():
            zero_grad()
            _backward(params, grads)
            do_step()
    elif method == KOALA_REPLACED:
        # two preallocated gradient sets, assigned in turn: the allocation is not timed
        sets = [[g.clone() for g in grads], [g.clone() for g in grads]]

        def fn():
            sets.reverse()
            for p, g in zip(params, sets[0], strict=True):
                p.grad = g
            do_step()
    else:
        _set_grads(params, grads)
        fn = do_step

    return Case(
        method,
        mode,
        fn,
        roots=lambda: [opt],
        own=lambda: [*params, *(p.grad for p in params if p.grad is not None)],
        extra={"model": model},
    )


def _float_items(td: TensorDictBase):
    return [(k, v) for k, v in td.items(True, True) if v.is_floating_point()]


def _functional_case(shapes, wd, device) -> Case:
    model = module_of(shapes, device=device)
    params = TensorDict.from_module(model)  # nested keys, integer buffers mixed in
    keys = [k for k, _ in _float_items(params)]
    grads = TensorDict(dict(zip(keys, grads_of(shapes, device=device), strict=True)))
    opt = kf.koala_pp(lr=LR, weight_decay=wd)
    box = {"params": params, "state": opt.init(params)}
    step = torch.compile(opt.step, fullgraph=True)
    loss = torch.tensor(LOSS, device=device)

    def fn():
        box["params"], box["state"] = step(box["params"], grads, loss, box["state"])

    return Case(
        FUNC,
        STEP,
        fn,
        roots=lambda: [box["state"], opt],
        own=lambda: (
            [v for _, v in box["params"].items(True, True)]
            + [v for _, v in grads.items(True, True)]
        ),
    )


def _copy_case(shapes, device) -> Case:
    n = sum(math.prod(s) for s in shapes)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return Case(COPY, STEP, lambda: dst.copy_(src), own=lambda: [src, dst])


def ensemble_models(members: int, sizes=ENSEMBLE_SIZES, device="cpu"):
    torch.manual_seed(0)
    return [ensemble_member(sizes).to(device) for _ in range(members)]


def through_guards(case: Case) -> Case:
    """``case`` (an ensemble door's) with its graph called through Dynamo's guard check, as
    before ``koala_func._precompiled``: what the guards cost, by comparison."""
    case.extra["door"]._fast = None
    return case


def _ensemble_case(method, members, wd, device, sizes=ENSEMBLE_SIZES) -> Case:
    models = ensemble_models(members, sizes, device)
    params = kf.stack_params(models)
    g = torch.Generator().manual_seed(1)
    grads = params.apply(lambda p: (torch.randn(p.shape, generator=g) * 1e-2).to(p.device))
    if method in (ENS, ENS_INPLACE):
        opt = kf.koala_pp(lr=ENSEMBLE_LR, weight_decay=wd)
        losses = torch.rand(members, generator=g).to(device) + 0.5
        box = {"params": params, "state": kf.ensemble_init(opt, params)}
        step = kf.ensemble_step(opt, inplace=method == ENS_INPLACE)

        def fn():
            box["params"], box["state"] = step(box["params"], grads, losses, box["state"])

        return Case(
            method,
            STEP,
            fn,
            roots=lambda: [box["state"], opt, step],  # the step keeps a gradient buffer
            own=lambda: [*box["params"].values(True, True), *grads.values(True, True)],
            extra={"door": step},
        )
    keys = list(params.keys(True, True))
    if method in (ENS_ADAM, ENS_ADAMW):
        groups = [[torch.nn.Parameter(params.get(k).clone()) for k in keys]]
        gs = [[grads.get(k).clone() for k in keys]]
    else:  # one optimizer per member, on its own contiguous tensors
        split = range(members)
        groups = [[torch.nn.Parameter(params.get(k)[e].clone()) for k in keys] for e in split]
        gs = [[grads.get(k)[e].clone() for k in keys] for e in split]
    opts = []
    for ps, gg in zip(groups, gs, strict=True):
        _set_grads(ps, gg)
        cls = torch.optim.AdamW if method == ENS_ADAMW else torch.optim.Adam
        opts.append(cls(ps, lr=1e-3, weight_decay=wd, fused=True))

    def fn():
        for o in opts:
            o.step()

    return Case(
        method,
        STEP,
        fn,
        roots=lambda: opts,
        own=lambda: [t for ps in groups for p in ps for t in (p, p.grad)],
    )


def build_case(method: str, mode: str, shapes, wd: float, device="cpu", members=64) -> Case:
    """Build a case and call it twice (compiles, warms); a failure is kept as ``error``."""
    pooled = set(SPARE.keys())  # before building: stack_params already packs
    try:
        if method in ENSEMBLE_METHODS:
            case = _ensemble_case(method, members, wd, device)
        elif method == FUNC:
            case = _functional_case(shapes, wd, device)
        elif method == COPY:
            case = _copy_case(shapes, device)
        else:
            case = _torch_optim_case(method, mode, shapes, wd, device)
        t = time.perf_counter()
        case.fn()
        _sync(device)
        case.first_s = time.perf_counter() - t
        t = time.perf_counter()
        case.fn()
        _sync(device)
        case.warm_s = time.perf_counter() - t
        # The spare packed buffers this case added to the CPU pool are memory its door keeps.
        mine = [k for k in SPARE.keys() if k not in pooled]
        roots = case.roots
        case.roots = lambda: [*roots(), SPARE.buffers(mine)]
        return case
    except Exception as e:  # a door that fails is reported, not fatal
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{os.path.basename(last.filename)}:{last.lineno}"
        msg = (str(e).splitlines() or [""])[0][:160]
        return Case(method, mode, error=f"{type(e).__name__}: {msg} ({where})")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, reps: int, device="cpu", reps_of=None) -> dict[object, list]:
    """Seconds per call of each function, one call of each per round (``reps_of[k]``: fewer
    rounds for ``k``, the first ones). Odd rounds run in the reverse order: what ran just
    before a call changes its time (caches, allocator), by up to 0.4x in the ensemble's ratio
    to Adam on this project's machine when the order was fixed."""
    out: dict[object, list[float]] = {k: [] for k in fns}
    reps_of = reps_of or {}
    order = list(fns.items())
    for i in range(reps):
        for k, fn in order if i % 2 == 0 else order[::-1]:
            if i >= reps_of.get(k, reps):
                continue
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out[k].append(time.perf_counter() - t)
    return out


# ---------------------------------------------------------------------------------- memory
def _walk(obj, depth=0, seen=None):
    """Tensors reachable from ``obj`` through containers, TensorDicts, tensorclasses and the
    attributes of koala_func / benchmark objects (not through compiled functions' closures)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, TensorDictBase):
        yield from obj.values(include_nested=True, leaves_only=True)
    elif hasattr(obj, "_tensordict") and isinstance(obj._tensordict, TensorDictBase):
        yield from obj._tensordict.values(include_nested=True, leaves_only=True)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from _walk(v, depth + 1, seen)
    elif isinstance(obj, torch.optim.Optimizer) or type(obj).__module__.split(".")[0] in (
        "koala_func",
        "benchmarks",
    ):
        for name in getattr(type(obj), "__slots__", ()):
            yield from _walk(getattr(obj, name, None), depth + 1, seen)
        for v in getattr(obj, "__dict__", {}).values():
            yield from _walk(v, depth + 1, seen)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def state_bytes(case: Case) -> int:
    """Bytes of the distinct storages reachable from the optimizer that are not a parameter's
    or a gradient's (so flat buffers that the parameters are views of do not count)."""
    own = {_storage(t)[0] for t in case.own() if t is not None}
    found = {}
    for root in case.roots():
        for t in _walk(root):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
                continue
            ptr, n = _storage(t)
            if ptr not in own:
                found[ptr] = n
    return sum(found.values())


def step_peak_bytes(fn: Callable[[], object], device="cpu") -> int | None:
    """Peak bytes allocated during one call above what was allocated before it: the step's
    temporaries and new outputs. CUDA: ``max_memory_allocated``. CPU: the running sum of the
    CPU allocator's events recorded by ``torch.profiler`` with ``profile_memory=True``."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a private API: no figure rather than a crash
        return None
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ------------------------------------------------------------------------------ groups
def run_group(
    set_name: str, wd: float, plan, reps: int, device="cpu", members=64, log=print
) -> list[dict]:
    """Build every ``(method, mode)`` of ``plan`` on one set, time them interleaved, measure
    their memory; one row each."""
    shapes = SETS[set_name]() if set_name != "ensemble" else []
    log(f"[{set_name}, weight_decay={wd:g}] building {len(plan)} cases")
    torch._dynamo.reset()  # fresh Dynamo caches: no recompile limit shared across groups
    cases = [build_case(m, mode, shapes, wd, device, members) for m, mode in plan]
    for c in cases:
        if c.error:
            log(f"  {c.method} [{c.mode}]: {c.error}")
    ok = {i: c.fn for i, c in enumerate(cases) if c.fn is not None}
    # a slow eager path gets the first SLOW_REPS rounds only
    few = {
        i: min(reps, SLOW_REPS)
        for i, c in enumerate(cases)
        if c.method in (KOALA_REF, KOALA_EAGER) and (c.warm_s or 0) > SLOW_S
    }
    times = time_interleaved(ok, reps, device, few)
    if set_name == "ensemble":
        member = list(ensemble_member().parameters())
        n_tensors, floats = len(member), members * sum(p.numel() for p in member)
    else:
        n_tensors, floats = len(shapes), sum(math.prod(s) for s in shapes)
    rows = []
    for i, c in enumerate(cases):
        row = {
            "set": set_name,
            "tensors": n_tensors,
            "floats": floats,
            "weight_decay": wd,
            "method": c.method,
            "mode": c.mode,
            "median_s": None,
            "min_s": None,
            "reps": 0,
            "first_s": c.first_s,
            "state_bytes": None,
            "step_peak_bytes": None,
            "error": c.error,
        }
        if i in times:
            ts = times[i]
            row.update(median_s=statistics.median(ts), min_s=min(ts), reps=len(ts), times_s=ts)
            row["state_bytes"] = state_bytes(c)
            row["step_peak_bytes"] = step_peak_bytes(c.fn, device)
        rows.append(row)
    del cases
    return rows


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import tensordict

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "tensordict": tensordict.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load average (1 min, at start)": f"{load:.2f}",
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
