"""Where an ensemble call's time goes: the compiled kernel, Dynamo's guard check, and the rest.

    python -m benchmarks.profile_ensemble            # E = 64 members of the 64-64-64-10 MLP
    python -m benchmarks.profile_ensemble --inplace  # ensemble_step(opt, inplace=True)
    python -m benchmarks.profile_ensemble --guarded  # through Dynamo's guards, as before

The step's compiled graph is called without Dynamo's guard evaluation
(``koala_func._precompiled``); ``--guarded`` turns that off, to show what the guards cost.

The one-call ``ensemble_step`` of the report's ensemble table, timed back to back (median of
5 x 200 calls), then under ``torch.profiler`` over 50 calls. *outside* is the profiled wall
time not spent in the compiled region or the guard check: the Python that takes the
TensorDicts apart and builds the results, plus the profiler's own cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import ENS, ENS_INPLACE, _ensemble_case, through_guards


def run(
    members: int = 64, calls: int = 50, inplace: bool = False, guarded: bool = False
) -> dict[str, float]:
    """Milliseconds a call: ``call`` unprofiled; ``wall``, ``kernel``, ``region``, ``guards``
    and ``outside`` profiled (``guarded``: through Dynamo's guard check)."""
    case = _ensemble_case(ENS_INPLACE if inplace else ENS, members, 5e-4, "cpu")
    if guarded:
        through_guards(case)
    for _ in range(30):  # compile, warm
        case.fn()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            case.fn()
        rounds.append((time.perf_counter() - t) / 200 * 1e3)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            case.fn()
    wall = (time.perf_counter() - t) / calls * 1e3
    ev = {e.key: e.cpu_time_total / calls / 1e3 for e in prof.key_averages()}

    def total(match) -> float:
        return sum(v for k, v in ev.items() if match(k))

    kernel = total(lambda k: k.startswith("## Call CompiledFxGraph"))
    # the precompiled call has no Dynamo frame: its region is the graph's call
    region = total(lambda k: k.startswith("Torch-Compiled Region")) or kernel
    guards = total(lambda k: "Cache Lookup" in k)
    return {
        "call": statistics.median(rounds),
        "wall": wall,
        "kernel": kernel,
        "region": region,
        "guards": guards,
        "outside": wall - region - guards,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--inplace", action="store_true", help="ensemble_step(opt, inplace=True)")
    ap.add_argument("--guarded", action="store_true", help="through Dynamo's guard check")
    args = ap.parse_args(argv)
    r = run(args.members, inplace=args.inplace, guarded=args.guarded)
    door = "in place" if args.inplace else "functional"
    door += ", guarded" if args.guarded else ""
    print(f"E={args.members}, {door}: {r['call']:.3f} ms a call; profiled {r['wall']:.3f} ms:")
    for k in ("kernel", "region", "guards", "outside"):
        print(f"  {k:8s} {r[k]:.3f} ms  {r[k] / r['wall']:4.0%}")


if __name__ == "__main__":
    main()
