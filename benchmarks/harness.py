"""The benchmark machinery shared by report.py, bench_step.py and the smoke test.

Every method is a zero-argument closure doing one optimizer step on its own copy of a parameter
set, with fixed random gradients and a fixed loss. Times are interleaved (one step of each
method per round) so that a noisy shared machine affects all methods alike; medians are quoted.
"""

from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from collections.abc import Callable

import torch
from tensordict import TensorDict

from koala_func import koala_pp
from koala_func.fused import fused_step_
from koala_func.packed import packed

from .authors_style import AuthorsStyleKoalaPP
from .sets import SETS, make_params

ADOPT = "packed in-place, grads adopted (compiled)"  # weight_decay=0 only
METHODS = (
    "packed in-place (compiled)",
    ADOPT,
    "packed functional (compiled)",
    "packed in-place + pack grads (compiled)",
    "reference (eager)",
    "fused fallback (eager)",
    "authors-style loop (eager)",
    "Adam(fused=True)",
    "Adam(foreach=False)",
)
LR, LOSS = 1e-3, 0.5


def _grads_like(params: TensorDict) -> TensorDict:
    return make_params([t.shape for t in params.values()], seed=1).apply(lambda t: t * 0.1)


def build_method(name: str, shapes, weight_decay: float) -> Callable[[], object]:
    """A closure doing one step of ``name`` (compiled methods are warmed up here)."""
    params = make_params(shapes)
    grads = _grads_like(params)
    loss = torch.tensor(LOSS)
    opt = koala_pp(lr=LR, weight_decay=weight_decay)

    if name.startswith("packed"):
        popt = packed(opt, params, adopt_grads=name == ADOPT)
        flat = popt.pack(params)
        flat_g = popt.pack(grads)
        box = {"state": popt.init(flat), "flat": flat}
        if "in-place" in name:
            fn = torch.compile(popt.step_, fullgraph=True)
            if name == ADOPT:
                # The gradient becomes h_prev, so each step needs a fresh one, as backward
                # gives; two preallocated buffers keep the allocation (backward's) out.
                gs = [flat_g, popt.pack(grads)]

                def step():
                    gs.reverse()
                    box["state"] = fn(flat, gs[0], loss, box["state"])
            elif "pack grads" in name:

                def step():
                    fn(flat, popt.pack(grads, out=flat_g), loss, box["state"])
            else:

                def step():
                    fn(flat, flat_g, loss, box["state"])
        else:
            fn = torch.compile(popt.step, fullgraph=True)

            def step():
                box["flat"], box["state"] = fn(box["flat"], flat_g, loss, box["state"])

        floats = 10 + popt.decay - popt.adopt_grads  # per packed element, see report.py
        step.bytes_moved = floats * flat.numel() * flat.element_size()
    elif name == "reference (eager)":
        box = {"params": params, "state": opt.init(params)}

        def step():
            box["params"], box["state"] = opt.step(box["params"], grads, loss, box["state"])
    elif name == "fused fallback (eager)":  # in place, like the authors' loop
        state = opt.init(params)

        def step():
            fused_step_(opt, params, grads, loss, state)
    else:
        leaves = [torch.nn.Parameter(t) for t in params.values()]
        for p, g in zip(leaves, grads.values(), strict=True):
            p.grad = g
        if name.startswith("authors"):
            aopt = AuthorsStyleKoalaPP(leaves, lr=LR, weight_decay=weight_decay)

            def step():
                aopt.update(loss)
        else:
            kw = {"fused": True} if "fused" in name else {"foreach": False}
            adam = torch.optim.Adam(leaves, lr=LR, weight_decay=weight_decay, **kw)
            step = adam.step
    step()
    step()
    return step


def time_interleaved(fns: dict[str, Callable], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def copy_fn(n_floats: int) -> Callable[[], object]:
    """A plain tensor copy (read n, write n floats): the machine's practical bandwidth."""
    src = torch.randn(n_floats)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    fn.bytes_moved = 2 * n_floats * 4
    fn()
    return fn


def state_bytes(shapes) -> dict[str, int]:
    """Optimizer state bytes: packed KOALA++ (v, h_prev with padding, scalars) and Adam."""
    params = make_params(shapes)
    popt = packed(koala_pp(), params)
    st = popt.init(popt.pack(params))
    koala = sum(
        t.numel() * t.element_size() for t in st.values(include_nested=True, leaves_only=True)
    )
    leaves = [torch.nn.Parameter(t) for t in params.values()]
    for p in leaves:
        p.grad = torch.zeros_like(p)
    adam = torch.optim.Adam(leaves, fused=True)
    adam.step()
    adam_b = sum(t.numel() * t.element_size() for s in adam.state.values() for t in s.values())
    return {"packed KOALA++": koala, "Adam": adam_b}


def cold_compile_seconds(n_tensors: int, inplace: bool = True) -> float:
    """First-call time minus a warm call, with Dynamo reset and an empty inductor cache."""
    shapes = SETS["tiny500"](n_tensors, seed=n_tensors)
    params = make_params(shapes)
    popt = packed(koala_pp(weight_decay=1e-4), params)
    flat = popt.pack(params)
    g = popt.pack(_grads_like(params))
    state = popt.init(flat)
    torch._dynamo.reset()
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp
        try:
            with torch._inductor.config.patch(fx_graph_cache=False):
                fn = torch.compile(popt.step_ if inplace else popt.step, fullgraph=True)
                t = time.perf_counter()
                fn(flat, g, torch.tensor(LOSS), state)
                first = time.perf_counter() - t
                t = time.perf_counter()
                fn(flat, g, torch.tensor(LOSS), state)
                warm = time.perf_counter() - t
        finally:
            if old is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
    torch._dynamo.reset()
    return first - warm


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
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load average (1 min, at start)": f"{load:.2f}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_sets(
    set_names, reps: int, weight_decays=(5e-4, 0.0), methods=METHODS, log=print
) -> list[dict]:
    """Step-time rows: one per (set, weight decay, method), plus a copy row per set."""
    rows = []
    for set_name in set_names:
        shapes = SETS[set_name]()
        n_floats = sum(math.prod(s) for s in shapes)
        for wd in weight_decays:
            log(f"[{set_name}, weight_decay={wd}] building {len(methods)} methods")
            # every packed optimizer is one more cache entry on PackedKoalaPP.step/step_
            torch._dynamo.reset()
            fns = {m: build_method(m, shapes, wd) for m in methods if wd == 0 or m != ADOPT}
            fns["copy"] = copy_fn(n_floats)
            times = time_interleaved(fns, reps)
            for m, ts in times.items():
                t = median(ts)
                moved = getattr(fns[m], "bytes_moved", None)
                rows.append(
                    {
                        "set": set_name,
                        "tensors": len(shapes),
                        "floats": n_floats,
                        "weight_decay": wd,
                        "method": m,
                        "median_s": t,
                        "min_s": min(ts),
                        "reps": len(ts),
                        "gbps": (moved / t / 1e9) if moved else None,
                    }
                )
            del fns
    return rows
