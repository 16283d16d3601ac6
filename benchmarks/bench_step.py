"""Step time of every door and peer on every parameter set, with pytest-benchmark.

    python -m pytest benchmarks/bench_step.py --benchmark-group-by=param:set -k resnet18

Each benchmark is one call of a case of benchmarks/harness.py (compiled doors are compiled and
warmed before timing). The side-by-side report with ratios is ``python -m benchmarks.report``.
"""

from __future__ import annotations

import pytest

from benchmarks import harness

WEIGHT_DECAY = 5e-4
PLAN = [(m, harness.STEP) for m in harness.METHODS]
PLAN += [(m, harness.TRAIN) for m in harness.TRAIN_METHODS]


@pytest.mark.parametrize(("method", "mode"), PLAN)
@pytest.mark.parametrize("weight_decay", [WEIGHT_DECAY, 0.0])
@pytest.mark.parametrize("set", list(harness.SETS))
def test_step(benchmark, set, weight_decay, method, mode):
    case = harness.build_case(method, mode, harness.SETS[set](), weight_decay)
    if case.error:
        pytest.fail(case.error)
    benchmark.extra_info["tensors"] = len(harness.SETS[set]())
    benchmark.pedantic(case.fn, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("method", harness.ENSEMBLE_METHODS)
def test_ensemble(benchmark, method):
    case = harness.build_case(method, harness.STEP, [], WEIGHT_DECAY, members=64)
    if case.error:
        pytest.fail(case.error)
    benchmark.pedantic(case.fn, rounds=20, warmup_rounds=2)
