"""Step time of every method on every parameter set, with pytest-benchmark.

    python -m pytest benchmarks/bench_step.py --benchmark-group-by=param:set -k resnet18

Each benchmark is one optimizer step (compiled methods are compiled and warmed before timing).
"""

from __future__ import annotations

import pytest

from benchmarks import harness

WEIGHT_DECAY = 5e-4


@pytest.mark.parametrize("method", harness.METHODS)
@pytest.mark.parametrize("weight_decay", [WEIGHT_DECAY, 0.0])
@pytest.mark.parametrize("set", list(harness.SETS))
def test_step(benchmark, set, weight_decay, method):
    if method == harness.ADOPT and weight_decay != 0:
        pytest.skip("adopt_grads needs weight_decay=0")
    step = harness.build_method(method, harness.SETS[set](), weight_decay)
    benchmark.extra_info["tensors"] = len(harness.SETS[set]())
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("set", list(harness.SETS))
def test_copy(benchmark, set):
    import math

    step = harness.copy_fn(sum(math.prod(s) for s in harness.SETS[set]()))
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)
