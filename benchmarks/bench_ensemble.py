"""Ensemble benchmark: E members of a small MLP, one call against a Python loop over members.

Two groups, each timed interleaved in one run (medians; the machine is shared, trust ratios):

- optimizer step only: the one-call ensemble step (``ensemble_step(opt)``: the engine with a
  member dimension, compiled) and ``ensemble_step(opt, compile=False)`` (the reference step
  under ``torch.vmap``, eager), against a loop of E eager single-model ``opt.step`` calls and a
  loop of E calls of ``torch.compile(opt.step)``;
- whole training step (forward, gradient, KOALA++ step): ``ensemble_train_step`` compiled and
  with ``compile=False``, against loops of E eager and E compiled single-model training steps.

The one-call step against fused Adam (issue 10's ensemble targets) is in
``python -m benchmarks.report``; this script compares KOALA++ with itself: one call against loops.

    python benchmarks/bench_ensemble.py                 # E = 64
    python benchmarks/bench_ensemble.py --members 8 --repeats 5 --json /tmp/ens.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from koala_func import (
    ensemble_init,
    ensemble_step,
    ensemble_train_step,
    koala_pp,
    stack_params,
    value_and_grad,
)

ONE_CALL = "one call, compiled"
EAGER = "one call, compile=False (eager vmap)"


def mlp(sizes: tuple[int, ...]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def timed(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Warm up (compiles) each case, then time them interleaved: median and min, in ms."""
    warm = {}
    for name, f in cases.items():
        start = time.perf_counter()
        f()
        warm[name] = time.perf_counter() - start
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, f in cases.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {
        k: {
            "median_ms": 1e3 * statistics.median(v),
            "min_ms": 1e3 * min(v),
            "first_call_s": warm[k],
        }
        for k, v in times.items()
    }


def build_cases(
    members: int = 64, sizes=(32, 64, 64, 10), batch: int = 32
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]], int]:
    """``(optimizer-step cases, training-step cases, params per member)``; not yet compiled."""
    torch.manual_seed(0)
    models = [mlp(sizes) for _ in range(members)]
    module = models[0]
    params = stack_params(models)
    grads = params.apply(lambda p: torch.randn_like(p) * 1e-2)
    losses = torch.rand(members, batch)
    x = torch.randn(batch, sizes[0])
    y = torch.randint(sizes[-1], (batch,))
    opt = koala_pp(lr=0.5)
    state = ensemble_init(opt, params)
    # the loops get their members pre-split (contiguous), so indexing is not timed
    p_list = [params[e].clone() for e in range(members)]
    g_list = [grads[e].clone() for e in range(members)]
    s_list = [opt.init(p) for p in p_list]

    one_call = ensemble_step(opt)
    one_call_eager = ensemble_step(opt, compile=False)
    single_compiled = torch.compile(opt.step, fullgraph=True)

    def loop(step):
        def f():
            return [step(p_list[e], g_list[e], losses[e], s_list[e]) for e in range(members)]

        return f

    step_cases = {
        ONE_CALL: lambda: one_call(params, grads, losses, state),
        EAGER: lambda: one_call_eager(params, grads, losses, state),
        f"loop of {members} eager steps": loop(opt.step),
        f"loop of {members} compiled steps": loop(single_compiled),
    }

    train = ensemble_train_step(opt, module, ce)
    train_eager = ensemble_train_step(opt, module, ce, compile=False)
    grad_fn = value_and_grad(module, ce)

    def member_train(p, s, x, y):
        g, l = grad_fn(p, x, y)
        return opt.step(p, g, l, s)

    member_train_compiled = torch.compile(member_train, fullgraph=True)

    def train_loop(fn):
        def f():
            return [fn(p_list[e], s_list[e], x, y) for e in range(members)]

        return f

    train_cases = {
        ONE_CALL: lambda: train(params, state, x, y),
        EAGER: lambda: train_eager(params, state, x, y),
        f"loop of {members} eager steps": train_loop(member_train),
        f"loop of {members} compiled steps": train_loop(member_train_compiled),
    }
    n_params = sum(p.numel() for p in p_list[0].values(include_nested=True, leaves_only=True))
    return step_cases, train_cases, n_params


def run(members: int = 64, sizes=(32, 64, 64, 10), batch: int = 32, repeats: int = 20) -> dict:
    step_cases, train_cases, n_params = build_cases(members, sizes, batch)
    step_times = timed(step_cases, repeats)
    train_times = timed(train_cases, max(3, repeats // 2))
    return {
        "members": members,
        "sizes": list(sizes),
        "params_per_member": n_params,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "optimizer_step": step_times,
        "training_step": train_times,
    }


def table(result: dict) -> str:
    lines = []
    for group in ("optimizer_step", "training_step"):
        times = result[group]
        base = times[ONE_CALL]

        lines += [
            f"\n{group.replace('_', ' ')} (E={result['members']}, "
            f"{result['params_per_member']} params/member):",
            "| case | median ms | min ms | x one call (median) | x one call (min) | first call s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, t in times.items():
            lines.append(
                f"| {name} | {t['median_ms']:.2f} | {t['min_ms']:.2f} | "
                f"{t['median_ms'] / base['median_ms']:.1f} | {t['min_ms'] / base['min_ms']:.1f} | "
                f"{t['first_call_s']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(members=args.members, batch=args.batch, repeats=args.repeats)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
