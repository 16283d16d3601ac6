"""The KOALA++ state and hyperparameters (frozen all-tensor TensorClasses) and tree helpers.

Shared by the reference step, every door and the checkpoints, so that none of them imports
another door to get them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
from tensordict import TensorClass, TensorDict, TensorDictBase

from koala_func._validation import Scalar, check_hyperparameters

__all__ = ["HYPERPARAMETERS", "KoalaPPHyperparams", "KoalaPPState"]

Granularity = Literal["tensor", "global"]
NonFinite = Literal["skip", "raise"]
RStatistic = Literal["second_moment", "variance"]
NestedKey = str | tuple[str, ...]

#: The hyperparameter fields, in :class:`KoalaPPHyperparams` order.
HYPERPARAMETERS = ("lr", "sigma", "q", "r", "alpha_r", "weight_decay", "loss_target")


class KoalaPPHyperparams(TensorClass["nocast", "frozen"]):
    """The hyperparameters, as tensors in the state (optax's ``inject_hyperparams``).

    Each field is a 0-d tensor (or ``[E]`` for an ensemble with per-member values), so that it
    can change between steps without a recompile, follow a schedule, and receive gradients.
    ``r`` is the fixed observation noise; it is unused when R is estimated online.
    ``loss_target`` is the value the loss is driven to (the observation); 0 by default.
    """

    lr: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    alpha_r: torch.Tensor
    weight_decay: torch.Tensor
    loss_target: torch.Tensor


class KoalaPPState(TensorClass["nocast", "frozen"]):
    """The whole optimizer state: all tensors, fixed structure.

    Fields (``T`` is the number of filtered blocks: one per floating-point tensor of the
    parameters for ``granularity="tensor"``, one for ``"global"``):

    - ``v``: TensorDict like the parameters, the gradient-covariance product :math:`H_k P_{k-1}`.
    - ``h_prev``: TensorDict like the parameters, the previous :math:`H`.
    - ``s``: ``[T]``, the previous innovation variance :math:`S_{k-1}` of each block.
    - ``count``: ``[T]`` int64, updates applied to each block (0: its next update is its first).
    - ``skipped``: ``[T]`` int64, updates refused: a NaN or inf, or a negative residual
      ``L - loss_target`` (which would move uphill).
    - ``r_est``: 0-d, the observation noise R used by the last step (online estimate or fixed).
    - ``step``: 0-d int64, calls to ``step``.
    - ``hyper``: :class:`KoalaPPHyperparams`.
    """

    v: TensorDictBase
    h_prev: TensorDictBase
    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r_est: torch.Tensor
    step: torch.Tensor
    hyper: KoalaPPHyperparams

    def with_hyperparams(self, **values: Scalar) -> KoalaPPState:
        """A copy with some hyperparameters replaced, e.g. ``state.with_hyperparams(lr=0.1)``.

        Floats are converted to tensors of the state's scalar dtype and device, so that a
        compiled step sees the same input types and does not recompile. Values are checked
        as the builder checks them (eagerly; inside a compiled function nothing is read).

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> from koala_func import koala_pp
            >>> state = koala_pp().init(TensorDict(w=torch.ones(2)))
            >>> float(state.with_hyperparams(lr=0.25).hyper.lr)
            0.25
            >>> state.with_hyperparams(lr=-1.0)
            Traceback (most recent call last):
            ...
            ValueError: Invalid learning rate: -1.0
        """
        return replace_fields(self, hyper=replace_hyperparams(self.hyper, values))


def replace_hyperparams(hyper: TensorClass, values: dict[str, Scalar]) -> TensorClass:
    """``hyper`` with ``values`` replaced, as tensors of its scalar dtype and device."""
    unknown = set(values) - {f.name for f in dataclasses.fields(hyper)}
    if unknown:
        raise TypeError(f"unknown hyperparameter {sorted(unknown)[0]!r}")
    # Checked eagerly on plain values; inside torch.compile, vmap or grad nothing is read.
    plain = {
        k: v
        for k, v in values.items()
        if not (isinstance(v, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(v))
    }
    if plain and not torch.compiler.is_compiling():
        check_hyperparameters(**plain)
    ref = hyper.lr
    return replace_fields(
        hyper,
        **{
            k: (
                v.to(dtype=ref.dtype, device=ref.device)
                if isinstance(v, torch.Tensor)
                else torch.tensor(v, dtype=ref.dtype, device=ref.device)
            )
            for k, v in values.items()
        },
    )


def leaves(td: TensorDictBase) -> dict[NestedKey, torch.Tensor]:
    """Every leaf of ``td`` by key (``"w"``, or ``("block", "w")`` when nested), in order.

    Walks the TensorDicts' own dicts: under ``torch.compile`` this traces several times
    faster than ``td.items(include_nested=True)``.
    """
    out: dict[NestedKey, torch.Tensor] = {}
    _walk(td, (), out)
    return out


# Module-level recursion, not nested closures: a closure that calls itself is a reference
# cycle, which would keep every leaf it saw alive until the garbage collector runs.
def _walk(t: TensorDictBase, prefix: tuple, out: dict) -> None:
    if not hasattr(t, "_tensordict"):  # a lazy stack, say: through the public API
        for k, v in t.items(include_nested=True, leaves_only=True):
            key = (*prefix, *((k,) if isinstance(k, str) else k))
            out[key if len(key) > 1 else key[0]] = v
        return
    for k, v in t._tensordict.items():
        key = (*prefix, k)
        if isinstance(v, torch.Tensor):
            out[key if prefix else k] = v
        else:
            _walk(v, key, out)


def replace_fields(obj: TensorClass, **changes) -> TensorClass:
    """``obj.replace(**changes)`` for a TensorClass, built in one constructor call.

    Under ``torch.compile`` this traces in a fraction of the time of ``replace``, which walks
    every nested leaf (over a second for a state of 160 tensors).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> state = koala_pp().init(TensorDict(w=torch.ones(2)))
        >>> replace_fields(state, step=torch.tensor(5)).step.item()
        5
    """
    td = obj._tensordict
    unknown = set(changes) - set(td._tensordict)
    if unknown:
        raise TypeError(f"unknown field {sorted(unknown)[0]!r}")
    src = {**td._tensordict, **changes}
    return type(obj)._from_tensordict(_new_tensordict(src, td.batch_size, td.device))


def _new_tensordict(src: dict, batch_size: torch.Size, device) -> TensorDict:
    """A TensorDict over ``src`` (already valid: leaves and TensorDicts of ``batch_size``)."""
    if not torch.compiler.is_compiling():
        return TensorDict._new_unsafe(src, batch_size=batch_size, device=device, nested=False)
    # What _new_unsafe does eagerly. Under torch.compile it calls the full constructor instead,
    # which (with reading batch_size and device through their properties) costs Dynamo about
    # 30 ms per nested TensorDict: seconds for a model's parameters, state and results.
    td = TensorDict.__new__(TensorDict)
    td._device = device
    td._tensordict = src
    td._batch_size = batch_size
    td._td_dim_names = None
    return td


def without_grad(td: TensorDictBase) -> TensorDictBase:
    """``td`` with every leaf that requires grad detached (an ``nn.Parameter`` becomes a
    plain tensor); ``td`` itself when none does. The other leaves are kept as they are.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> td = TensorDict(w=torch.nn.Parameter(torch.ones(2)), n=torch.tensor(3))
        >>> out = without_grad(td)
        >>> out["w"].requires_grad, type(out["w"]).__name__, out["n"] is td["n"]
        (False, 'Tensor', True)
    """
    found = {k: t.detach() for k, t in leaves(td).items() if t.requires_grad}
    return replace_leaves(td, found) if found else td


def replace_leaves(td: TensorDictBase, new: dict[NestedKey, torch.Tensor]) -> TensorDictBase:
    """A TensorDict shaped like ``td`` (same nesting, batch sizes and devices) whose leaves
    are ``new[key]`` where given and ``td``'s own elsewhere; ``td`` is not modified.

    Built bottom-up from plain dicts: under ``torch.compile`` this traces several times faster
    than ``td.copy()`` and one ``set`` per key. Other TensorDict types go through ``set``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> td = TensorDict(a=torch.zeros(2), b=TensorDict(c=torch.zeros(1)))
        >>> replace_leaves(td, {("b", "c"): torch.ones(1)})["b", "c"].tolist()
        [1.0]
    """
    out = _build(td, (), new)
    if out is not None:
        return out
    out = td.copy()
    for key, value in new.items():
        out.set(key, value)
    return out


def _build(t: TensorDictBase, prefix: tuple, new: dict) -> TensorDict | None:
    """``t`` rebuilt over plain dicts with ``new``'s leaves; ``None`` if ``t`` holds anything
    but plain TensorDicts and tensors (other types go through ``set``)."""
    if type(t) is not TensorDict:
        return None
    src = {}
    for k, v in t._tensordict.items():
        if isinstance(v, torch.Tensor):
            src[k] = new.get((*prefix, k) if prefix else k, v)
            continue
        sub = _build(v, (*prefix, k), new)
        if sub is None:
            return None
        src[k] = sub
    return _new_tensordict(src, t._batch_size, t._device)


def float_keys(params: TensorDictBase | dict[NestedKey, torch.Tensor]) -> list[NestedKey]:
    """The keys of the floating-point leaves of ``params`` (a TensorDict, or its
    :func:`leaves`), in order.

    Integer and boolean leaves (for example BatchNorm's ``num_batches_tracked`` in
    ``TensorDict.from_module(model)``) are not optimized: they pass through unchanged.
    """
    keys = []
    found = params if isinstance(params, dict) else leaves(params)
    for key, value in found.items():
        if value.is_complex():
            raise TypeError(f"KOALA++ does not support complex parameters (key {key!r})")
        if value.is_floating_point():
            keys.append(key)
    return keys


def scalar_dtype(params: TensorDictBase) -> torch.dtype:
    """Dtype of the per-block scalars: the widest float of the parameters, at least float32."""
    dtype = torch.float32
    for key in float_keys(params):
        dtype = torch.promote_types(dtype, params.get(key).dtype)
    return dtype


def blocks_of(keys: Sequence[NestedKey], granularity: Granularity) -> list[list[NestedKey]]:
    """The filtered blocks: one per tensor, or one holding every tensor."""
    if granularity == "tensor":
        return [[k] for k in keys]
    return [list(keys)] if keys else []
