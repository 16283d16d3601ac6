r"""The functional KOALA++ step over DTensors (FSDP2) and replicated tensors (DDP).

KOALA++ (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432) needs, per filtered block,
only the seven sums :data:`koala_func.engine.DOTS`; everything else is scalar math on them and
one elementwise pass. A sum over a tensor sharded across ranks is the sum of the per-rank sums
of its local shards, so the engine (:func:`koala_func.engine.run`) runs on the *local* shards
and its ``reduce`` hook all-reduces the partial block sums once per step, together with the
loss moments ``[L, m2, 1]`` (so that every rank uses the same, averaged loss). This module only
converts: ``to_local()``, :func:`koala_func.functional.engine_step` with that hook, and
``DTensor.from_local`` back (no communication). The step math lives in the engine only.

For a ``torch.optim`` optimizer on an FSDP2 model use :class:`koala_func.KoalaPP` directly:
``KoalaPP(model.parameters())`` on a ``fully_shard`` model does the same, in place. See
``docs/distributed.md`` for the loss contract under FSDP2 and DDP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from tensordict import TensorDict, TensorDictBase

from koala_func._dtensor import _all_reduce_hook, _is_dtensor, _local, _sharded, _wrap_like
from koala_func._validation import check_state, check_step_inputs
from koala_func.functional import KoalaPPTransform, engine_step
from koala_func.state import KoalaPPState, NestedKey, blocks_of, float_keys, leaves

__all__ = ["ShardedKoalaPPTransform", "sharded"]


def _local_td(td: TensorDictBase, keys: list[NestedKey], found: dict) -> TensorDictBase:
    out = td.copy()
    for k in keys:
        out.set(k, _local(found[k]))
    return out


class ShardedKoalaPPTransform:
    """KOALA++ over TensorDicts of DTensors (FSDP2) or plain tensors (DDP): pure init and step.

    Same contract as :class:`~koala_func.KoalaPPTransform` (returns new parameters and a new
    state), on every rank of the group, with the same keys in the same order on every rank.

    - DTensors with a ``Shard`` placement are sharded: their sums are partial and are
      all-reduced, with the loss moments, in one functional all-reduce per step.
    - Plain tensors and ``Replicate`` DTensors are replicated (DDP): their sums are already
      global and do not travel.
    - ``v`` and ``h_prev`` in the state have the placements of the parameters; ``s``,
      ``count``, ``skipped``, ``r_est``, ``step`` and ``hyper`` are plain tensors, equal on
      every rank.

    The step always runs the engine (``transform.impl`` is not consulted); ``differentiable``
    transforms are refused (the engine's packing has no autograd formula).

    Args:
        transform: the optimizer, from :func:`koala_func.koala_pp`.
        process_group: the group the parameters are sharded over. ``None``: the group of the
            parameters' 1-D device mesh, or the default group when nothing is sharded.
        average_loss: average the loss over the group (each rank passes the loss of its own
            data). With sharded parameters it travels in the one all-reduce anyway; with
            replicated ones only (DDP) it costs an all-reduce of 3 floats, and ``False`` (the
            loss is already the same on every rank) leaves no communication at all.
        compile: run the local step through ``torch.compile(fullgraph=True)`` (the functional
            all-reduce is in the graph); one graph per structure.

    Examples:
        Replicated parameters with a loss that is already the same on every rank need no
        communication, so this runs without ``init_process_group``; under ``torchrun`` with
        ``fully_shard(model)`` the same code runs on the local shards:

        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = ShardedKoalaPPTransform(koala_pp(lr=0.5), average_loss=False)
        >>> params = TensorDict(w=torch.ones(3))
        >>> grads = TensorDict(w=torch.tensor([0.1, 0.2, 0.3]))
        >>> new, state = opt.step(params, grads, torch.tensor(0.7), opt.init(params))
        >>> ref, _ = koala_pp(lr=0.5).step(params, grads, torch.tensor(0.7), opt.init(params))
        >>> torch.allclose(new["w"], ref["w"])
        True
    """

    def __init__(
        self,
        transform: KoalaPPTransform,
        process_group: torch.distributed.ProcessGroup | None = None,
        *,
        average_loss: bool = True,
        compile: bool = False,
    ) -> None:
        if not isinstance(transform, KoalaPPTransform):
            raise TypeError(
                f"transform must be a KoalaPPTransform (from koala_pp), got {type(transform)}"
            )
        if transform.differentiable:
            raise ValueError("sharded() runs the engine, which is not differentiable")
        self.transform = transform
        self.process_group = process_group
        self.average_loss = bool(average_loss)
        self.compile = bool(compile)
        self._compiled: Callable | None = None

    def init(self, params: TensorDictBase) -> KoalaPPState:
        """A fresh state; ``v`` and ``h_prev`` are zeros with the placements of ``params``.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> from koala_func import koala_pp
            >>> sharded(koala_pp()).init(TensorDict(w=torch.ones(2))).v["w"].tolist()
            [0.0, 0.0]
        """
        return self.transform.init(params)

    def _group(self, tensors: list[torch.Tensor], any_sharded: bool):
        import torch.distributed as dist

        if self.process_group is not None:
            return self.process_group
        if not any_sharded:
            return dist.group.WORLD if dist.is_initialized() else None
        meshes = {t.device_mesh for t in tensors if _is_dtensor(t) and _sharded(t)}
        if len(meshes) > 1:
            raise ValueError(
                "sharded parameters live on different device meshes; pass process_group"
            )
        (mesh,) = meshes
        if mesh.ndim != 1:
            raise ValueError(
                f"parameters are sharded on a {mesh.ndim}-D device mesh; pass the group of the "
                "sharding dimension as process_group"
            )
        return mesh.get_group()

    def step(
        self,
        params: TensorDictBase,
        grads: TensorDictBase | Mapping[str, torch.Tensor | None],
        loss: torch.Tensor,
        state: KoalaPPState,
    ) -> tuple[TensorDictBase, KoalaPPState]:
        """One KOALA++ step on every rank; returns new parameters and a new state.

        Args:
            params: the parameters (DTensors or plain tensors).
            grads: gradients with the parameters' placements (e.g. the ``.grad`` of FSDP2
                parameters); a TensorDict or a dict, missing or ``None`` entries as in
                :meth:`koala_func.KoalaPPTransform.step`.
            loss: this rank's minibatch mean loss (0-d) or per-sample losses (1-d); averaged
                over the ranks (see ``average_loss``).
            state: from :meth:`init` or a previous :meth:`step`.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> from koala_func import koala_pp
            >>> opt = sharded(koala_pp(lr=0.5), average_loss=False)  # one process
            >>> params = TensorDict(w=torch.ones(2), b=torch.zeros(2))
            >>> grads = {"w": torch.tensor([0.5, -0.5]), "b": None}  # "b": no gradient
            >>> params, state = opt.step(params, grads, torch.tensor(0.3), opt.init(params))
            >>> state.count.tolist()
            [1, 0]
        """
        if not isinstance(grads, TensorDictBase):
            grads = TensorDict({k: g for k, g in grads.items() if g is not None})
        opt = self.transform
        keys = float_keys(params)
        p_all, g_all, v_all = leaves(params), leaves(grads), leaves(state.v)
        check_step_inputs(keys, p_all, g_all, loss, 0)
        check_state(keys, p_all, v_all, state.s.shape[-1], len(blocks_of(keys, opt.granularity)))
        opt._check_loss(loss, 0)
        flags = [_is_dtensor(p_all[k]) and _sharded(p_all[k]) for k in keys]
        for k in keys:
            _check_like(k, p_all[k], g_all.get(k), "gradient")
            _check_like(k, p_all[k], v_all[k], "state")
        p_loc = {k: _local(p_all[k]) for k in keys}
        g_loc = {k: _local(g) for k, g in g_all.items()}
        v_loc = {k: _local(v_all[k]) for k in keys}
        if not keys:
            return params, state.replace(step=state.step + 1)
        group = self._group([p_all[k] for k in keys], any(flags))
        reduce = None
        if group is not None and (any(flags) or self.average_loss):
            reduce = _all_reduce_hook(group)
        h_all = leaves(state.h_prev)
        local_state = state.replace(
            v=_local_td(state.v, keys, v_all), h_prev=_local_td(state.h_prev, keys, h_all)
        )
        fn = _local_step
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(_local_step, fullgraph=True)
            fn = self._compiled
        with torch.no_grad():
            new_loc, new_state = fn(
                opt,
                keys,
                (p_loc, g_loc, v_loc),
                _local_td(params, keys, p_all),
                loss.detach(),
                local_state,
                reduce,
                flags,
            )
        if opt.nonfinite == "raise" and bool(torch.any(new_state.skipped != state.skipped)):
            raise FloatingPointError(
                "KOALA++ step met a NaN or inf (loss, gradient or denominator) or a negative "
                "residual; use nonfinite='skip' to skip such blocks instead"
            )
        new_params, new_v, new_h = params.copy(), state.v.copy(), state.h_prev.copy()
        out_p, out_v, out_h = leaves(new_loc), leaves(new_state.v), leaves(new_state.h_prev)
        for k in keys:
            new_params.set(k, _wrap_like(out_p[k], p_all[k]))
            new_v.set(k, _wrap_like(out_v[k], v_all[k]))
            new_h.set(k, _wrap_like(out_h[k], h_all[k]))
        return new_params, new_state.replace(v=new_v, h_prev=new_h)


def _local_step(opt, keys, found, params, loss, state, reduce, flags):
    # The engine on local tensors; a function of its own so that compile=True traces only it.
    return engine_step(opt, keys, found, params, loss, state, 0, reduce=reduce, sharded=flags)


def _check_like(key, p: torch.Tensor, other: torch.Tensor | None, name: str) -> None:
    if other is None:
        return
    if _is_dtensor(p) != _is_dtensor(other) or (
        _is_dtensor(p) and other.placements != p.placements
    ):
        raise ValueError(
            f"{name} placements {getattr(other, 'placements', None)} do not match parameter "
            f"placements {getattr(p, 'placements', None)} at key {key!r}"
        )
    if _local(other).shape != _local(p).shape:
        raise ValueError(
            f"local {name} shape {tuple(_local(other).shape)} does not match local parameter "
            f"shape {tuple(_local(p).shape)} at key {key!r}"
        )


def sharded(
    transform: KoalaPPTransform,
    process_group: torch.distributed.ProcessGroup | None = None,
    *,
    average_loss: bool = True,
    compile: bool = False,
) -> ShardedKoalaPPTransform:
    """KOALA++ for FSDP2 / DDP as pure functions: see :class:`ShardedKoalaPPTransform`.

    Under ``torchrun``, after ``fully_shard(model)``, the parameters are DTensors and each step
    all-reduces the ``[T, 7]`` partial sums and the loss moments once.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> model = torch.nn.Linear(3, 2)  # fully_shard(model) under torchrun
        >>> opt = sharded(koala_pp(lr=0.5), average_loss=False)  # one process: no collective
        >>> params = TensorDict({n: p.detach() for n, p in model.named_parameters()})
        >>> state = opt.init(params)
        >>> model(torch.randn(4, 3)).square().mean().backward()
        >>> grads = {n: p.grad for n, p in model.named_parameters()}
        >>> params, state = opt.step(params, grads, torch.tensor(0.5), state)
        >>> state.count.tolist()
        [1, 1]
    """
    return ShardedKoalaPPTransform(
        transform, process_group, average_loss=average_loss, compile=compile
    )
