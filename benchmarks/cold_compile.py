"""Cold compile time of one compiled door, in a fresh process with an empty inductor cache.

    python -m benchmarks.cold_compile functional 160     # one measurement (prints JSON)

:func:`measure` (used by report.py) starts this module as a subprocess with
``TORCHINDUCTOR_CACHE_DIR`` set to a new temporary directory and the FX graph and AOTAutograd
caches off. The worker builds ``n`` tiny tensors nested as ``TensorDict.from_module`` nests a
model (8 per submodule, an integer buffer in each) and takes 20 steps with a changing loss and
lr. The cold compile is the first step minus the steady-state step (the median of the last 10);
the total compile adds every later step's excess (a recompile). It counts the graphs Dynamo
compiled (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``) less those of the update
op's own kernel (:func:`op_graphs`), and keeps the recompile reasons Dynamo logged. The
ensemble door uses E members of ``n`` tensors each. One process is one sample of a machine
whose speed drifts by tens of percent: the report takes several rounds and
:func:`combine` makes one row of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOORS = ("KoalaPP", "functional", "ensemble")
ROOT = Path(os.path.abspath(__file__)).parents[1]  # a symlinked checkout stays itself
STEPS = 20


class _Recompiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.reasons: list[str] = []

    def emit(self, record):
        msg = " ".join(record.getMessage().split())
        if "ecompil" in msg:  # keep the failed guard, the useful part
            guard = re.search(r"guard failure\(s\): - (?:\d+/\d+: )?(.*?)(?: #| - User|$)", msg)
            self.reasons.append((guard.group(1) if guard else msg)[:200])


def _door(door: str, n: int, members: int):
    """``(step(i), loss setter)`` for one door: ``step(i)`` takes step ``i`` (0-based)."""
    import torch
    from tensordict import TensorDict

    import koala_func as kf

    from .harness import LR
    from .sets import grads_of, module_of, tiny

    shapes = tiny(n, seed=n)
    if door == "KoalaPP":
        model = module_of(shapes)
        params = list(model.parameters())
        opt = kf.KoalaPP(params, lr=LR, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        grads = grads_of(shapes)

        def step(i):
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)
            opt.step(loss=torch.tensor(0.5 + 0.01 * i))
            sched.step()

        return step
    if door == "functional":
        model = module_of(shapes)
        params = TensorDict.from_module(model)
        keys = [k for k, v in params.items(True, True) if v.is_floating_point()]
        grads = TensorDict(dict(zip(keys, grads_of(shapes), strict=True)))
        opt = kf.koala_pp(lr=LR, weight_decay=5e-4)
        fn = torch.compile(opt.step, fullgraph=True)
        box = {"params": params, "state": opt.init(params)}

        def step(i):
            box["params"], box["state"] = fn(
                box["params"], grads, torch.tensor(0.5 + 0.01 * i), box["state"]
            )
            box["state"] = box["state"].with_hyperparams(lr=LR * 0.9 ** (i + 1))

        return step
    # ensemble: E members of n tiny tensors each
    models = [module_of(shapes, seed=e) for e in range(members)]
    params = kf.stack_params(models)
    g = torch.Generator().manual_seed(1)
    grads = params.apply(lambda p: torch.randn(p.shape, generator=g) * 1e-2)
    opt = kf.koala_pp(lr=LR, weight_decay=5e-4)
    fn = kf.ensemble_step(opt)
    box = {"params": params, "state": kf.ensemble_init(opt, params)}

    def step(i):
        loss = torch.full((members,), 0.5 + 0.01 * i)
        box["params"], box["state"] = fn(box["params"], grads, loss, box["state"])
        box["state"] = box["state"].with_hyperparams(lr=torch.full((members,), LR * 0.9 ** (i + 1)))

    return step


def op_graphs() -> int:
    """Graphs compiled for the kernel of the engine's own update op
    (``koala_func.engine.passes.overwrite_update``, once per process and dtype, not per step or
    model), which the counts here leave out: they count the graphs of the step's frame."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from koala_func.engine import passes

    fns = (passes._overwrite, passes._overwrite_plain)
    return sum(len(_debug_get_cache_entry_list(f.__code__)) for f in fns)


def graphs_over_steps(variant: str, n: int = 10, steps: int = STEPS, members: int = 4) -> int:
    """Graphs Dynamo compiles over ``steps`` steps with a changing loss and lr (backend
    ``"eager"``: graph capture and guards only, no inductor), in this process."""
    import torch
    from tensordict import TensorDict
    from torch._dynamo.utils import counters

    import koala_func as kf

    from .sets import grads_of, module_of, tiny

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    shapes = tiny(n, seed=n)
    opt = kf.koala_pp(lr=1e-3, weight_decay=5e-4)
    if variant.startswith("ensemble"):
        params = kf.stack_params([module_of(shapes, seed=e) for e in range(members)])
        grads = params.apply(lambda p: torch.full_like(p, 1e-2))
        step, state = kf.ensemble_step(opt, backend="eager"), kf.ensemble_init(opt, params)
        lead = (members,)
    else:
        params = TensorDict.from_module(module_of(shapes))
        params = params.detach() if "detach" in variant else params
        keys = [k for k, v in params.items(True, True) if v.is_floating_point()]
        grads = TensorDict(dict(zip(keys, grads_of(shapes), strict=True)))
        step = torch.compile(opt.step, fullgraph=True, backend="eager")
        state, lead = opt.init(params), ()
    for i in range(steps):
        loss = torch.full(lead, 0.5 + 0.01 * i)
        params, state = step(params, grads, loss, state)
        state = state.with_hyperparams(lr=torch.full(lead, 1e-3 * 0.9**i))
    n_graphs = counters["stats"]["unique_graphs"] - before - op_graphs()
    torch._dynamo.reset()
    return n_graphs


RECOMPILE_VARIANTS = {
    "torch.compile(opt.step), params = TensorDict.from_module(model)": "from_module",
    "torch.compile(opt.step), params = TensorDict.from_module(model).detach()": "detach",
    "ensemble_step(opt), params = stack_params(models)": "ensemble",
}


def worker(door: str, n: int, members: int = 64, steps: int = STEPS) -> dict:
    import torch
    from torch._dynamo.utils import counters

    handler = _Recompiles()
    torch._logging.set_logs(recompiles=True)
    for name in ("torch._dynamo", "torch._dynamo.guards"):
        logging.getLogger(name).addHandler(handler)
    out: dict = {"door": door, "tensors": n}
    step = _door(door, n, members)
    times, graphs_first = [], None
    for i in range(steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
        if i == 0:
            graphs_first = counters["stats"]["unique_graphs"] - op_graphs()
    steady = statistics.median(times[steps // 2 :])
    out.update(
        first_s=times[0],
        second_s=times[1],
        steady_s=steady,
        compile_s=times[0] - steady,  # the cold compile of the first step
        total_compile_s=sum(t - steady for t in times),  # with any recompile after it
        graphs_first_call=graphs_first,
        graphs=counters["stats"]["unique_graphs"] - op_graphs(),
        op_graphs=op_graphs(),
        steps=steps,
        recompile_reasons=handler.reasons[:3],
    )
    return out


def measure(door: str, n: int, timeout: float = 300, threads: int | None = None, members=64):
    """Run :func:`worker` in a fresh interpreter with an empty inductor cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        env.update(
            TORCHINDUCTOR_CACHE_DIR=tmp,
            TORCHINDUCTOR_FX_GRAPH_CACHE="0",
            TORCHINDUCTOR_AUTOGRAD_CACHE="0",
            TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
        )
        env.pop("TORCH_COMPILE_DEBUG", None)
        cmd = [sys.executable, "-m", "benchmarks.cold_compile", door, str(n)]
        cmd += ["--members", str(members)] + (["--threads", str(threads)] if threads else [])
        start = time.perf_counter()
        res, error = run_worker(cmd, env, timeout)
        wall = time.perf_counter() - start
    if error is not None:
        return {"door": door, "tensors": n, "error": error}
    res["process_s"] = wall
    return res


#: Fields of a :func:`worker` result that :func:`combine` takes the median of.
TIMES = ("first_s", "second_s", "steady_s", "compile_s", "total_compile_s", "process_s")


def combine(samples: list[dict]) -> dict:
    """One row from several fresh-process measurements of the same door and size: the median
    of each time (:data:`TIMES`), the most graphs any of them compiled, and, in round order,
    every sample's cold compile (``compile_s_samples``; ``None`` where one failed), so that a
    ratio of two rows can be taken round by round. All failed: the first failure."""
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return dict(samples[0])
    out = dict(ok[0])
    for key in TIMES:
        values = [s[key] for s in ok if s.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    for key in ("graphs", "graphs_first_call", "op_graphs"):
        out[key] = max(s[key] for s in ok)
    reasons = [s["recompile_reasons"] for s in ok if s["recompile_reasons"]]
    out["recompile_reasons"] = reasons[0] if reasons else []
    out["samples"] = len(ok)
    out["compile_s_samples"] = [s.get("compile_s") if "error" not in s else None for s in samples]
    failed = [s["error"] for s in samples if "error" in s]
    if failed:
        out["failed_samples"] = failed
    return out


def round_ratio(hi: dict, lo: dict) -> float | None:
    """The median over rounds of ``hi``'s cold compile over ``lo``'s (rows from
    :func:`combine`, measured in the same rounds), or ``None`` if no round has both."""
    if "error" in hi or "error" in lo:  # every round failed
        return None
    rounds = zip(hi["compile_s_samples"], lo["compile_s_samples"], strict=True)
    pairs = [(a, b) for a, b in rounds if a is not None and b]
    return statistics.median(a / b for a, b in pairs) if pairs else None


def run_worker(cmd: list[str], env: dict | None = None, timeout: float = 600):
    """Run a worker (``python -m benchmarks.... --args``) in a fresh process from the checkout's
    root: ``(result, None)`` from its ``RESULT <json>`` line, or ``(None, error)``."""
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s"
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :]), None
    # the last line that names an error (a launcher such as torchrun adds a summary after it)
    lines = proc.stderr.strip().splitlines()
    tail = [x for x in lines if "Error" in x] or lines or ["no output"]
    return None, f"exit {proc.returncode}: {tail[-1][:200]}"


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("door", choices=DOORS)
    p.add_argument("tensors", type=int)
    p.add_argument("--members", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print("RESULT " + json.dumps(worker(args.door, args.tensors, args.members)), flush=True)


if __name__ == "__main__":
    main()
