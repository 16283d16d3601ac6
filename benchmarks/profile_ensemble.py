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

    python -m benchmarks.profile_ensemble --rotation  # the in-place call taken apart

``--rotation`` times the in-place door and what it is made of, each in the report's rotation
(its four ensemble cases interleaved, odd rounds reversed) in the door's place: its compiled
call alone, called with the arguments of the door's last call (the kernel and the wrappers of
torch's compiled code, none of our Python). The report's member, an MLP of 6 tensors (at most
``PER_TENSOR_LAYOUTS``), has a layout per tensor: the step reads its gradients where they are,
so there is no gradient refill between the two. What runs before a call moves its time, so each
runs between the same neighbours; the rotations take turns. Each time is also given over
stacked ``Adam(fused=True)`` of its own rotation.
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import (
    ENS,
    ENS_ADAM,
    ENS_INPLACE,
    ENS_LOOP,
    STEP,
    _ensemble_case,
    build_case,
    through_guards,
    time_interleaved,
)

CALL = "its compiled call alone"


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


def rotation(members: int = 64, rounds: int = 300, turns: int = 3) -> dict[str, float]:
    """Median ms of the in-place door, of its compiled call alone (:data:`CALL`) and of
    the report's other ensemble cases, and ``"x " + name``: the median over rounds of the
    ratio to stacked ``Adam`` in the same rotation (see the module docstring). ``turns``:
    how many times each rotation runs, ``rounds`` rounds each."""
    cases = {
        m: build_case(m, STEP, None, 5e-4, members=members)
        for m in (ENS, ENS_INPLACE, ENS_ADAM, ENS_LOOP)
    }
    door = cases[ENS_INPLACE].extra["door"]
    seen: dict[str, tuple] = {}
    call = door._call

    def record_call(args, written, read, key):
        seen["call"] = (args, key)
        return call(args, written, read, key)

    door._call = record_call
    cases[ENS_INPLACE].fn()
    del door._call  # the instance attribute: back to the method
    args, key = seen["call"]
    assert not door._grads, "the member's gradients are packed: the rotation omits that"

    def compiled() -> None:
        if door._fast is not None:
            door._fast(key, *args)
        else:
            door._packed(*args)

    subjects = {ENS_INPLACE: cases[ENS_INPLACE].fn, CALL: compiled}
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for _ in range(turns):
        for name, fn in subjects.items():
            fns = {ENS: cases[ENS].fn, name: fn, ENS_ADAM: cases[ENS_ADAM].fn}
            fns[ENS_LOOP] = cases[ENS_LOOP].fn
            fn()
            got = time_interleaved(fns, rounds)
            for k, v in got.items():
                times.setdefault(k, []).extend(v)
                per = [a / b for a, b in zip(v, got[ENS_ADAM], strict=True)]
                ratios.setdefault(k, []).extend(per)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out |= {f"x {k}": statistics.median(v) for k, v in ratios.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--inplace", action="store_true", help="ensemble_step(opt, inplace=True)")
    ap.add_argument("--guarded", action="store_true", help="through Dynamo's guard check")
    ap.add_argument("--rotation", action="store_true", help="the in-place call taken apart")
    ap.add_argument("--rounds", type=int, default=300, help="rounds of each --rotation turn")
    ap.add_argument("--turns", type=int, default=3, help="turns of each --rotation")
    args = ap.parse_args(argv)
    if args.rotation:
        r = rotation(args.members, args.rounds, args.turns)
        print(
            f"E={args.members}, {args.turns} turns of {args.rounds} interleaved rounds each "
            f"(ms, x {ENS_ADAM}):"
        )
        for k in (ENS_INPLACE, CALL, ENS, ENS_ADAM, ENS_LOOP):
            print(f"  {k:50s} {r[k]:7.3f}  {r['x ' + k]:5.2f}x")
        return
    r = run(args.members, inplace=args.inplace, guarded=args.guarded)
    door = "in place" if args.inplace else "functional"
    door += ", guarded" if args.guarded else ""
    print(f"E={args.members}, {door}: {r['call']:.3f} ms a call; profiled {r['wall']:.3f} ms:")
    for k in ("kernel", "region", "guards", "outside"):
        print(f"  {k:8s} {r[k]:.3f} ms  {r[k] / r['wall']:4.0%}")


if __name__ == "__main__":
    main()
