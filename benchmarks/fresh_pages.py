"""What fresh pages cost on CPU: the doors, with PyTorch's transparent huge pages off and on.

    python -m benchmarks.fresh_pages resnet18 0     # one process, THP_MEM_ALLOC_ENABLE=0

A fresh CPU buffer of more than a few megabytes is a new mapping: its first write pays a page
fault for every 4 KiB. Doors that allocate their results every step (the functional door's
outputs, the reference step's temporaries) pay that each step; in-place ones (``KoalaPP``,
``Adam(fused=True)``) do not. PyTorch's CPU allocator can back allocations of 2 MiB and more
with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, read once, at the first allocation):
a fault per 2 MiB instead. :func:`measure` runs :func:`worker` in a fresh interpreter with
the variable set to 0 or 1, so the two settings are timed the same way; report.py shows both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .cold_compile import ROOT

VAR = "THP_MEM_ALLOC_ENABLE"
PLAN = (
    "Adam(fused=True)",
    "KoalaPP",
    "KoalaPP(compile=False)",
    "torch.compile(opt.step) over a TensorDict",
    "authors-shaped loop (eager)",
)


def _quiet(*_) -> None:
    pass


def worker(set_name: str, methods: list[str], reps: int) -> list[dict]:
    from . import harness

    rows = harness.run_group(set_name, 5e-4, [(m, harness.STEP) for m in methods], reps, log=_quiet)
    keep = ("method", "median_s", "times_s", "error")
    return [{k: r.get(k) for k in keep} for r in rows]


def measure(set_name: str, thp: bool, methods=PLAN, reps: int = 10, timeout: float = 600) -> dict:
    """Rows of one set timed in a fresh process with ``THP_MEM_ALLOC_ENABLE`` = ``thp``."""
    env = {**os.environ, VAR: "1" if thp else "0"}
    cmd = [sys.executable, "-m", "benchmarks.fresh_pages", set_name, str(int(thp))]
    cmd += ["--reps", str(reps), "--methods", *methods]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"thp": thp, "error": f"no result within {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {"thp": thp, "rows": json.loads(line[len("RESULT ") :])}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"thp": thp, "error": f"exit {proc.returncode}: {tail[:200]}"}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set")
    p.add_argument("thp", type=int, choices=(0, 1), help=f"the {VAR} this process was given")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=list(PLAN))
    args = p.parse_args(argv)
    if os.environ.get(VAR, "0") != str(args.thp):
        raise SystemExit(f"start this worker with {VAR}={args.thp} in its environment")
    print("RESULT " + json.dumps(worker(args.set, args.methods, args.reps)), flush=True)


if __name__ == "__main__":
    main()
