"""A compiled function called without Dynamo's guard evaluation, for callers that check their
inputs themselves.

A ``torch.compile``-d step is entered through Dynamo, which evaluates the guards of its cache
entry on every call: for the ensemble step (about 20 tensor inputs and the functions the graph
inlined) that is several hundred guards, about 0.1 ms of a 0.5 ms kernel on this project's
2-core machine. A door that has already matched its inputs against a remembered plan needs only
a few of them. :class:`Precompiled` compiles ``fn`` ahead of time (``torch.compile(...)
.aot_compile``, where torch has it) once per *signature* that the caller computes (the metadata of
every tensor input, see :func:`signature`, and the structural constants) and calls the result
directly. Where ahead-of-time compilation is unavailable or fails, or while a torch-function
mode or a functorch transform is active (global state that the signature does not cover), it
calls the ordinary ``torch.compile``-d function instead, which guards as usual; so it does
under a ``torch.compiler.set_stance`` other than ``"default"``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["Precompiled", "signature"]

#: Signatures compiled per function before the rest go through Dynamo (its recompile limit).
MAX_ENTRIES = 8


def signature(x: Any) -> Hashable:
    """What a compiled graph specializes on in ``x``: for a tensor its type, dtype, device,
    shape, strides and ``requires_grad``; tuples and lists element by element; other values
    by type and value (``None``, numbers, strings and tuples of them: the constants a graph
    bakes in).

    Examples:
        >>> import torch
        >>> a, b = torch.zeros(2, 3), torch.zeros(3, 2).t()
        >>> signature(a) == signature(torch.ones(2, 3)), signature(a) == signature(b)
        (True, False)
    """
    kind = type(x)
    if kind is torch.Tensor or isinstance(x, torch.Tensor):  # the usual value, first
        return (kind, x.dtype, x.device, x.shape, x.stride(), x.requires_grad)
    if kind is tuple or kind is list:
        return (kind, tuple(map(signature, x)))
    if isinstance(x, (tuple, list)):  # a NamedTuple, say
        return (kind, tuple(map(signature, x)))
    return (kind, x)


def _global_state() -> Hashable | None:
    """The global state a graph depends on, or ``None`` where the signature cannot cover it
    (or where the user asked Dynamo for something else: ``set_stance``, ``config.disable``)."""
    try:  # private hooks: a torch without one of them gets Dynamo's guards instead
        stance = getattr(torch._dynamo.eval_frame, "_stance", None)
        if getattr(stance, "stance", "default") != "default" or torch._dynamo.config.disable:
            return None
        if torch._C._is_torch_function_mode_enabled():
            return None
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return None
        return (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch._C._is_any_autocast_enabled(),
        )
    except AttributeError:
        return None


class Precompiled:
    """``fn`` compiled ahead of time per caller-given key, else ``fallback``.

    The caller's key must determine everything the graph specializes on: :func:`signature` of
    every input. Inputs that the graph mutates must not alias each other.

    Args:
        fn: the function to compile (``fullgraph`` is implied).
        fallback: the ``torch.compile``-d ``fn``, called where ``fn`` cannot be precompiled.
        compile_kwargs: passed to ``torch.compile``.

    Examples:
        >>> import torch
        >>> def add_(x, y):
        ...     x.add_(y)
        >>> fast = Precompiled(add_, torch.compile(add_, fullgraph=True), fullgraph=True)
        >>> x, y = torch.zeros(3), torch.ones(3)
        >>> fast(signature((x, y)), x, y)
        >>> x.tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, fn: Callable, fallback: Callable, **compile_kwargs: Any):
        self.fallback = fallback
        self.compiler = torch.compile(fn, **{**compile_kwargs, "fullgraph": True})
        self.entries: dict[Hashable, Callable] = {}
        self.available = hasattr(self.compiler, "aot_compile")

    def __call__(self, key: Hashable, *args: Any) -> Any:
        state = _global_state() if self.available else None
        if state is None:
            return self.fallback(*args)
        key = (key, state)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= MAX_ENTRIES:
                return self.fallback(*args)
            try:
                compiled = self.compiler.aot_compile((args, {}))
            except Exception:  # this backend or torch cannot: guard as usual from now on
                self.available = False
                return self.fallback(*args)
            compiled.disable_guard_check()  # the key is the guard
            entry = self.entries[key] = compiled
        return entry(*args)
