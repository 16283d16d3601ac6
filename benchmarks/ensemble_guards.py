"""What Dynamo's guard check costs the ensemble step: each door with its graph called directly
(the default, ``koala_func._precompiled``) and through Dynamo's guards, side by side with
``Adam(fused=True)`` over the same stacked parameters, in one process.

    python -m benchmarks.ensemble_guards            # E = 64 members of the 64-64-64-10 MLP
    python -m benchmarks.ensemble_guards --rounds 5 --calls 200

Each round interleaves ``calls`` calls of each door pair and Adam (the order reversed every
other call, as in the report) and prints the median of each and its ratio to Adam's.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.harness import (
    ENS,
    ENS_ADAM,
    ENS_INPLACE,
    _ensemble_case,
    through_guards,
    time_interleaved,
)
from koala_func.engine.layout import SPARE

CASES = {
    "in place": (ENS_INPLACE, False),
    "in place, guarded": (ENS_INPLACE, True),
    "functional": (ENS, False),
    "functional, guarded": (ENS, True),
    "Adam": (ENS_ADAM, False),
}


def run(members: int = 64, rounds: int = 3, calls: int = 200) -> list[dict[str, float]]:
    """Per round, milliseconds a call by case name, and ``"x <name>"``: the ratio to Adam.

    The in-place pair and the functional pair are timed in rotations of their own, each with
    Adam: two functional doors hold 7 spare buffers per shape each, so the pool's limit is
    doubled while they run (else one of them allocates fresh buffers, and pays page faults)."""
    out: list[dict[str, float]] = [{} for _ in range(rounds)]
    limit = SPARE.limit
    SPARE.limit = 2 * limit
    try:
        for names in (("in place", "in place, guarded"), ("functional", "functional, guarded")):
            fns = {}
            for name in (*names, "Adam"):
                method, guarded = CASES[name]
                case = _ensemble_case(method, members, 5e-4, "cpu")
                if guarded:
                    through_guards(case)
                for _ in range(10):  # compile, warm
                    case.fn()
                fns[name] = case.fn
            for r in out:
                times = time_interleaved(fns, calls)
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                r.update({k: ms[k] for k in names}, **{f"x {k}": ms[k] / ms["Adam"] for k in ms})
                r["Adam"] = ms["Adam"]  # of the last rotation
            del fns, case
    finally:
        SPARE.limit = limit
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    for r in run(args.members, args.rounds, args.calls):
        print("  ".join(f"{k} {r[k]:.3f} ms ({r['x ' + k]:.2f}x)" for k in CASES if k != "Adam"))


if __name__ == "__main__":
    main()
