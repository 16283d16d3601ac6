"""The guard-free compiled call behind the in-place ensemble step (koala_func/_precompiled.py):
its signature tells apart what a graph specializes on, each signature gets its own graph, and
the ordinary compiled function answers wherever the signature cannot vouch for the call."""

from __future__ import annotations

import gc
import weakref
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from koala_func._precompiled import Precompiled, signature


class _Passthrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_signature_is_metadata_not_identity():
    x = torch.zeros(2, 3)
    same = torch.ones(2, 3)
    assert signature(x) == signature(same)
    assert signature(Pair(x, x)) == signature(Pair(same, same))  # no tensor in the key
    hash(signature(Pair(x, x)))
    for other in (
        torch.zeros(3, 2).t(),  # strides
        torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(2, 4),
        torch.zeros(2, 3, requires_grad=True),
        torch.nn.Parameter(torch.zeros(2, 3)),  # type
    ):
        assert signature(x) != signature(other)
    assert signature((x, 1, None)) != signature((x, 2, None))
    assert signature([x]) != signature((x,))


def _scaled_add_(x, y, out):
    out.copy_(x + 2 * y)


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def test_one_graph_per_signature_and_results_follow_the_inputs():
    fallback = _Counting(_scaled_add_)
    fast = Precompiled(_scaled_add_, fallback, fullgraph=True)
    if not fast.available:  # a torch without ahead-of-time compilation: nothing to test
        return
    x, out = torch.arange(6.0).view(2, 3), torch.empty(2, 3)
    for y in (torch.ones(2, 3), torch.arange(6.0).view(3, 2).t()):  # contiguous, transposed
        args = (x, y, out)
        fast(signature(args), *args)
        torch.testing.assert_close(out, x + 2 * y, rtol=0, atol=0)
    assert len(fast.entries) == 2 and fallback.calls == 0
    y = torch.full((2, 3), 3.0)
    fast(signature((x, y, out)), x, y, out)  # the first signature again: no new graph
    assert len(fast.entries) == 2
    torch.testing.assert_close(out, x + 6, rtol=0, atol=0)

    # a torch-function mode is global state that no signature covers: the fallback answers
    with _Passthrough():
        fast(signature((x, y, out)), x, y, out)
    assert fallback.calls == 1 and len(fast.entries) == 2
    with torch.compiler.set_stance("force_eager"):  # the user asked Dynamo to stand aside
        fast(signature((x, y, out)), x, y, out)
    assert fallback.calls == 2 and len(fast.entries) == 2

    # the compiled graphs keep no input alive
    probe = torch.ones(2, 3)
    fast(signature((x, probe, out)), x, probe, out)
    ref = weakref.ref(probe)
    del probe
    gc.collect()
    assert ref() is None


def test_a_backend_that_cannot_precompile_falls_back_to_the_compiled_function():
    calls = []

    def backend(gm, example_inputs):  # a plain callable: not serializable ahead of time
        calls.append(1)
        return gm.forward

    fallback = torch.compile(_scaled_add_, fullgraph=True, backend=backend)
    fast = Precompiled(_scaled_add_, fallback, backend=backend)
    x, y, out = torch.ones(3), torch.ones(3), torch.empty(3)
    for _ in range(2):
        fast(signature((x, y, out)), x, y, out)
        torch.testing.assert_close(out, torch.full((3,), 3.0))
    assert calls and not fast.available and not fast.entries  # Dynamo's graph ran
