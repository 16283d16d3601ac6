"""Checkpoints of the functional state that load with ``torch.load(weights_only=True)``.

A :class:`~koala_func.koala_pp.KoalaPPState` is a TensorClass: pickling it whole needs
``weights_only=False`` (arbitrary code on load). These helpers store plain nested dicts of
tensors instead, which the safe unpickler accepts, and rebuild the TensorClass on load. The
round trip is exact (same dtypes, same bits), so training continues bit-identically.

For large states, TensorDict's memory-mapped format also works as is::

    state.memmap("ckpt/")                       # one file per tensor + metadata
    state = KoalaPPState.load_memmap("ckpt/")   # lazily mapped; state[i] reads one member
"""

from __future__ import annotations

import os
from typing import IO, Any

import torch
from tensordict import TensorDict, TensorDictBase

from koala_func.state import KoalaPPState

__all__ = ["load_state", "save_state", "state_from_dict", "state_to_dict"]

_FORMAT = "koala_func.KoalaPPState/1"
PathLike = str | os.PathLike | IO[bytes]


def state_to_dict(state: KoalaPPState, params: TensorDictBase | None = None) -> dict[str, Any]:
    """``state`` (and optionally the parameters) as nested dicts of tensors.

    The batch size is kept, so an ensemble state (leading ``[E]`` dimension, e.g.
    ``torch.stack([s1, s2, s3])``) comes back as an ensemble.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> state = koala_pp().init(TensorDict(w=torch.ones(3)))
        >>> data = state_to_dict(state)
        >>> data["format"]
        'koala_func.KoalaPPState/1'
        >>> sorted(data["state"])
        ['count', 'h_prev', 'hyper', 'r_est', 's', 'skipped', 'step', 'v']
    """
    out: dict[str, Any] = {
        "format": _FORMAT,
        "batch_size": list(state.batch_size),
        "state": state.to_dict(),
    }
    if params is not None:
        out["params"] = params.to_dict()
        out["params_batch_size"] = list(params.batch_size)
    return out


def state_from_dict(
    data: dict[str, Any],
) -> KoalaPPState | tuple[KoalaPPState, TensorDict]:
    """Inverse of :func:`state_to_dict`: the state, or ``(state, params)`` if params were saved.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> params = TensorDict(w=torch.ones(3))
        >>> state = koala_pp(lr=0.3).init(params)
        >>> back, p = state_from_dict(state_to_dict(state, params))
        >>> torch.equal(back.hyper.lr, state.hyper.lr) and torch.equal(p["w"], params["w"])
        True
    """
    if data.get("format") != _FORMAT:
        raise ValueError(
            f"not a KOALA++ state checkpoint (format {data.get('format')!r}, expected {_FORMAT!r})"
        )
    state = KoalaPPState.from_dict(data["state"], batch_size=torch.Size(data["batch_size"]))
    if "params" not in data:
        return state
    params = TensorDict.from_dict(data["params"], batch_size=torch.Size(data["params_batch_size"]))
    return state, params


def save_state(state: KoalaPPState, f: PathLike, params: TensorDictBase | None = None) -> None:
    """``torch.save`` a state (and optionally the parameters) so that
    ``torch.load(f, weights_only=True)`` accepts it; read it back with :func:`load_state`.

    Examples:
        >>> import io
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> state = koala_pp().init(TensorDict(w=torch.ones(3)))
        >>> buf = io.BytesIO()
        >>> save_state(state, buf)
        >>> _ = buf.seek(0)
        >>> sorted(torch.load(buf, weights_only=True))  # the safe unpickler accepts it
        ['batch_size', 'format', 'state']
    """
    torch.save(state_to_dict(state, params), f)


def load_state(
    f: PathLike, map_location: Any = None, member: int | None = None
) -> KoalaPPState | tuple[KoalaPPState, TensorDict]:
    """Load what :func:`save_state` wrote, with ``weights_only=True``.

    Args:
        f: a path or a binary file object.
        map_location: as for ``torch.load``.
        member: for an ensemble checkpoint, return only this member (``state[member]``).

    Returns:
        the state, or ``(state, params)`` when the parameters were saved too.

    Examples:
        >>> import io
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = koala_pp()
        >>> members = [opt.init(TensorDict(w=torch.ones(3))) for _ in range(4)]
        >>> buf = io.BytesIO()
        >>> save_state(torch.stack(members), buf)  # an ensemble of 4 states
        >>> _ = buf.seek(0)
        >>> load_state(buf, member=2).batch_size
        torch.Size([])
    """
    data = torch.load(f, map_location=map_location, weights_only=True)
    out = state_from_dict(data)
    if member is None:
        return out
    if isinstance(out, tuple):
        return out[0][member].clone(), out[1][member].clone()
    return out[member].clone()
