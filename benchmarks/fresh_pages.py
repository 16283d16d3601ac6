"""What fresh pages cost on CPU: the doors under three settings of the process's allocator.

    python -m benchmarks.fresh_pages resnet18 thp     # one process, THP_MEM_ALLOC_ENABLE=1

A fresh CPU buffer of more than a few megabytes is a new mapping: its first write pays a page
fault for every 4 KiB. Doors that allocate their results every step (the functional door's
outputs, the reference step's temporaries) pay that each step; in-place ones (``KoalaPP``,
``Adam(fused=True)``) do not. Two settings of the environment avoid most of it (both are read
once, when the process starts or at its first allocation, and both apply to the whole
process):

- ``THP_MEM_ALLOC_ENABLE=1``: PyTorch backs CPU allocations of 2 MiB and more with
  transparent huge pages, a fault per 2 MiB instead;
- ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``: glibc
  serves large blocks from its heap and keeps freed memory there (no new mapping, no fault),
  at the price of never handing freed memory back to the system.

:func:`measure` runs :func:`worker` in a fresh interpreter under one of :data:`CONFIGS`, so
the settings are timed the same way; report.py shows them side by side.
"""

from __future__ import annotations

import json
import os
import sys

from .cold_compile import run_worker

VAR = "THP_MEM_ALLOC_ENABLE"
GLIBC = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
#: name: (the environment it sets, how the report's columns name it)
CONFIGS = {
    "default": ({VAR: "0"}, f"{VAR}=0 (default)"),
    "thp": ({VAR: "1"}, f"{VAR}=1"),
    "glibc": ({VAR: "0", "GLIBC_TUNABLES": GLIBC}, "glibc keeps freed memory"),
}
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


def measure(set_name: str, config: str, methods=PLAN, reps: int = 10, timeout: float = 600) -> dict:
    """Rows of one set timed in a fresh process under ``CONFIGS[config]``."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(CONFIGS[config][0])
    cmd = [sys.executable, "-m", "benchmarks.fresh_pages", set_name, config]
    cmd += ["--reps", str(reps), "--methods", *methods]
    rows, error = run_worker(cmd, env, timeout)
    return {"config": config, "error": error} if error else {"config": config, "rows": rows}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set")
    p.add_argument("config", choices=list(CONFIGS), help="the setting this process was given")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=list(PLAN))
    args = p.parse_args(argv)
    wanted = CONFIGS[args.config][0]
    if any(os.environ.get(k, "0" if k == VAR else None) != v for k, v in wanted.items()):
        given = " ".join(f"{k}={v}" for k, v in wanted.items())
        raise SystemExit(f"start this worker with {given} in its environment")
    print("RESULT " + json.dumps(worker(args.set, args.methods, args.reps)), flush=True)


if __name__ == "__main__":
    main()
