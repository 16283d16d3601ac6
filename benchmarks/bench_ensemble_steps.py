"""The ensemble benchmark (E = 64 small MLPs) with pytest-benchmark.

    python -m pytest benchmarks/bench_ensemble_steps.py --benchmark-group-by=param:group

The side-by-side table with ratios is ``python benchmarks/bench_ensemble.py``.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_ensemble import EAGER, ONE_CALL, build_cases

MEMBERS = 64


@pytest.fixture(scope="module")
def cases():
    step_cases, train_cases, _ = build_cases(MEMBERS)
    return {"optimizer step": step_cases, "training step": train_cases}


NAMES = (
    ONE_CALL,
    EAGER,
    f"loop of {MEMBERS} eager steps",
    f"loop of {MEMBERS} compiled steps",
)


@pytest.mark.parametrize("case", NAMES)
@pytest.mark.parametrize("group", ["optimizer step", "training step"])
def test_ensemble(benchmark, cases, group, case):
    benchmark.pedantic(cases[group][case], rounds=10, warmup_rounds=2)
