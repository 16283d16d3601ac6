r"""Exact KOALA++ under FSDP2 (sharded DTensors) and DDP, with one all-reduce per step.

KOALA++ (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432) needs, per filtered block,
only the seven sums :data:`koala_func._scalars.DOTS` (``g.g``, ``H.H``, ``H.h_prev``,
``H.v_prev``, ``h_prev.h_prev``, ``h_prev.v_prev``, ``theta.theta``); everything else is scalar
math on them followed by an elementwise pass. A sum over a tensor sharded across ranks is the
sum of the per-rank sums of its local shard, so one sharded step is

1. per rank, the partial sums of :data:`DOTS` over the *local* shards (plain tensors from
   ``DTensor.to_local()``): ``[T, 7]``;
2. ONE ``all_reduce(sum)`` of those partial sums, packed with the loss moments ``[L, m2, 1]``;
3. :func:`koala_func._scalars.block_update` (identical on every rank, since its inputs are);
4. the elementwise update of the local shards only:
   :math:`v = a\,v_{prev} + c_H H + b\,h_{prev}`, :math:`\theta \mathrel{-}= c\,(v + Q H)`,
   :math:`h_{prev} = H`, where the block is ``ok``.

This gives the single-process :meth:`~koala_func.KoalaPPTransform.step` up to the order of
floating-point summation. Letting DTensor propagate the dot products instead is correct but
issues several collectives per tensor (a ``Partial`` scalar times a ``Shard(0)`` tensor
all-gathers the whole tensor); see ``docs/distributed.md``.

The loss: each rank passes the loss of its own data (the minibatch mean, 0-d, or the per-sample
losses, 1-d). The step averages ``L`` and ``m2`` over the ranks inside the same all-reduce, so
that the step size :math:`\eta L_k / S_k` and the online R are the same on every rank (FSDP and
DDP average the gradients the same way). With DDP the dot products are already global, so only
the three loss floats travel; pass ``average_loss=False`` when the loss is already identical on
every rank and no communication at all is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from tensordict import TensorDict, TensorDictBase
from torch.distributed.tensor import DTensor, Partial, Shard

from koala_func._scalars import DOTS, block_update
from koala_func._validation import check_step_inputs
from koala_func.koala_pp import (
    KoalaPPState,
    KoalaPPTransform,
    NestedKey,
    blocks_of,
    float_keys,
    next_r,
)

__all__ = ["ShardedKoalaPP", "ShardedKoalaPPTransform", "sharded"]

_K = len(DOTS)


class _Hyper(NamedTuple):
    # The fields of KoalaPPHyperparams as plain tensors: a compiled step takes them unpacked.
    lr: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    alpha_r: torch.Tensor
    weight_decay: torch.Tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether the local tensor holds only part of the values (its sums are partial)."""
    if not isinstance(t, DTensor):
        return False
    if any(isinstance(p, Partial) for p in t.placements):
        raise ValueError(
            "KOALA++ needs parameters and gradients with Shard or Replicate placements, got "
            f"{t.placements}; redistribute Partial tensors first"
        )
    return any(isinstance(p, Shard) for p in t.placements)


def _wrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # shape and stride given explicitly: from_local cannot infer them for uneven shards.
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _make_local_step(
    *,
    block_of: tuple[int, ...],
    n_blocks: int,
    has_grad: tuple[bool, ...],
    sharded: tuple[bool, ...],
    per_sample: bool,
    average_loss: bool,
    symmetric: bool,
    online_r: bool,
    eps: float,
    group: dist.ProcessGroup | None,
) -> Callable:
    """The step over local (plain) tensors. Structure is static; every value is a tensor.

    ``block_of[i]`` is the block of tensor ``i``; ``has_grad[i]`` whether it received a
    gradient (``grads`` holds only those); ``sharded[i]`` whether its sums are partial.
    """
    present_blocks = [False] * n_blocks
    for i, b in enumerate(block_of):
        present_blocks[b] |= has_grad[i]
    reduce_blocks = [False] * n_blocks  # a block with a partial sum needs the all-reduce
    for i, b in enumerate(block_of):
        reduce_blocks[b] |= sharded[i]
    reduced = [b for b in range(n_blocks) if reduce_blocks[b]]
    # no process group (not initialized, nothing sharded): a single process, nothing to reduce
    need_collective = (bool(reduced) or average_loss) and group is not None

    def step(theta, grads, v, h_prev, s, count, skipped, r_est, n_step, hyper, loss):
        hp = _Hyper(*hyper)
        cdt = hp.lr.dtype
        q, wd = hp.q, hp.weight_decay

        # 1. per-rank partial sums of DOTS, one row per block
        grad_iter = iter(grads)
        flat_t, flat_v, flat_h, H_all = [], [], [], []
        # partial sums (sharded tensors: summed over the ranks) and full sums (replicated
        # tensors: already global, must not be summed again) are kept apart
        partial: list[torch.Tensor | None] = [None] * n_blocks
        full: list[torch.Tensor | None] = [None] * n_blocks
        for i, b in enumerate(block_of):
            t = theta[i].reshape(-1).to(cdt)
            g = next(grad_iter).reshape(-1).to(cdt) if has_grad[i] else torch.zeros_like(t)
            vp = v[i].reshape(-1).to(cdt)
            hp_ = h_prev[i].reshape(-1).to(cdt)
            H = g + wd * t
            row = torch.stack(
                [
                    (g * g).sum(),
                    (H * H).sum(),
                    (H * hp_).sum(),
                    (H * vp).sum(),
                    (hp_ * hp_).sum(),
                    (hp_ * vp).sum(),
                    (t * t).sum(),
                ]
            )
            acc = partial if sharded[i] else full
            acc[b] = row if acc[b] is None else acc[b] + row
            flat_t.append(t)
            flat_v.append(vp)
            flat_h.append(hp_)
            H_all.append(H)
        zero_row = torch.zeros(_K, dtype=cdt, device=s.device)
        partial = [zero_row if r is None else r for r in partial]

        # 2. ONE all-reduce: partial sums of the sharded blocks, then the loss moments
        loss = loss.detach().to(cdt)
        if per_sample:
            L_loc, m2_loc = loss.mean(), loss.square().mean()
        else:
            L_loc, m2_loc = loss, loss.square()
        loss_row = torch.stack([L_loc, m2_loc, torch.ones_like(L_loc)])
        if need_collective:
            parts = [partial[b] for b in reduced]
            if average_loss:
                parts.append(loss_row)
            buf = torch.cat(parts)
            buf = funcol.wait_tensor(funcol.all_reduce(buf, "sum", group))
            for j, b in enumerate(reduced):
                partial[b] = buf[j * _K : (j + 1) * _K]
            if average_loss:
                loss_row = buf[len(reduced) * _K :]
        L = loss_row[0] / loss_row[2]
        m2 = loss_row[1] / loss_row[2] if per_sample else L.square()
        rows = [p if f is None else p + f for p, f in zip(partial, full, strict=True)]
        dots = torch.stack(rows) if rows else zero_row.new_zeros(0, _K)

        # 3. the scalar math, identical on every rank
        R = next_r(r_est, m2, hp, online_r)
        present = torch.tensor(present_blocks, dtype=torch.bool, device=s.device)
        u = block_update(dots, s, count, skipped, L, R, hp, symmetric, eps, present)

        # 4. elementwise update of the local shards
        new_theta, new_v, new_h = [], [], []
        for i, b in enumerate(block_of):
            t, vp, hp_, H = flat_t[i], flat_v[i], flat_h[i], H_all[i]
            if not present_blocks[b]:  # structure: no gradient, nothing changes
                new_theta.append(theta[i])
                new_v.append(v[i])
                new_h.append(h_prev[i])
                continue
            ok = u.ok[b]
            vn = u.a[b] * vp + u.c_h[b] * H + u.b[b] * hp_
            tn = t - u.scale[b] * (vn + q * H)
            new_theta.append(torch.where(ok, tn, t).to(theta[i].dtype).view_as(theta[i]))
            new_v.append(torch.where(ok, vn, vp).to(v[i].dtype).view_as(v[i]))
            new_h.append(torch.where(ok, H, hp_).to(h_prev[i].dtype).view_as(h_prev[i]))
        return new_theta, new_v, new_h, u.s, u.count, u.skipped, R, n_step + 1

    return step


class ShardedKoalaPPTransform:
    """KOALA++ over TensorDicts of DTensors (FSDP2) or replicated tensors (DDP): init and step.

    Same contract as :class:`~koala_func.KoalaPPTransform` (pure: returns new parameters and a
    new state), with collectives. Every rank of ``process_group`` must call :meth:`step` with
    the same keys, in the same order.

    - Parameters that are DTensors with a ``Shard`` placement are sharded: their dot products
      are summed over the ranks of ``process_group`` in one all-reduce per step.
    - Plain tensors and ``Replicate`` DTensors are replicated (DDP): their sums are already
      global and do not travel.
    - ``v`` and ``h_prev`` in the state have the placements of the parameters (each rank holds
      its shard); ``s``, ``count``, ``skipped``, ``r_est``, ``step`` and ``hyper`` are plain
      tensors, identical on every rank.

    Args:
        transform: the optimizer, from :func:`koala_func.koala_pp`.
        process_group: the group the parameters are sharded over. ``None``: the group of the
            parameters' 1-D device mesh, or the default group when no parameter is sharded.
        average_loss: average the loss moments over the group inside the same all-reduce
            (each rank passes the loss of its own data). ``False``: the loss is already the
            same on every rank, and a step with no sharded parameter communicates nothing.
        compile: run the step on local tensors through ``torch.compile(fullgraph=True)`` (the
            functional all-reduce is part of the graph); one graph per parameter structure.

    Example:
        Replicated (DDP) parameters with a loss that is the same on every rank need no
        communication, so this runs even without ``init_process_group``; under ``torchrun``
        with ``fully_shard(model)`` the same code runs on the local shards
        (``docs/examples/fsdp_train.py``):

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
        process_group: dist.ProcessGroup | None = None,
        *,
        average_loss: bool = True,
        compile: bool = False,
    ) -> None:
        if not isinstance(transform, KoalaPPTransform):
            raise TypeError(
                f"transform must be a KoalaPPTransform (from koala_pp), got {type(transform)}"
            )
        self.transform = transform
        self.process_group = process_group
        self.average_loss = bool(average_loss)
        self.compile = bool(compile)
        self._steps: dict[tuple, Callable] = {}

    def init(self, params: TensorDictBase) -> KoalaPPState:
        """A fresh state; ``v`` and ``h_prev`` are zeros with the placements of ``params``."""
        return self.transform.init(params)

    def _group(self, tensors: list[torch.Tensor]) -> dist.ProcessGroup | None:
        if self.process_group is not None:
            return self.process_group
        meshes = {t.device_mesh for t in tensors if isinstance(t, DTensor) and _is_sharded(t)}
        if not meshes:
            return dist.group.WORLD if dist.is_initialized() else None
        if len(meshes) > 1:
            raise ValueError(
                "sharded parameters live on different device meshes; pass process_group"
            )
        (mesh,) = meshes
        if mesh.ndim != 1:
            raise ValueError(
                f"parameters are sharded on a {mesh.ndim}-D device mesh; pass the group of "
                "the sharding dimension as process_group"
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
            params: TensorDict of the parameters (DTensors or plain tensors).
            grads: gradients with the parameters' placements (e.g. the ``.grad`` of FSDP2
                parameters); a TensorDict or a dict, missing or ``None`` entries as in
                :meth:`KoalaPPTransform.step`.
            loss: this rank's minibatch mean loss (0-d) or per-sample losses (1-d); averaged
                over the ranks (see ``average_loss``).
            state: from :meth:`init` or a previous :meth:`step`.
        """
        if not isinstance(grads, TensorDictBase):
            grads = TensorDict({k: g for k, g in grads.items() if g is not None})
        opt = self.transform
        keys = float_keys(params)
        check_step_inputs(keys, params, grads, loss)
        ctx = contextlib.nullcontext() if opt.differentiable else torch.no_grad()
        with ctx:
            return self._step(keys, params, grads, loss, state)

    def _step(self, keys: list[NestedKey], params, grads, loss, state):
        opt = self.transform
        p_list = [params.get(k) for k in keys]
        g_full = [grads.get(k, None) for k in keys]
        v_list = [state.v.get(k) for k in keys]
        h_list = [state.h_prev.get(k) for k in keys]
        sharded = tuple(_is_sharded(p) for p in p_list)
        for k, p, g, v in zip(keys, p_list, g_full, v_list, strict=True):
            for name, other in (("gradient", g), ("state", v)):
                if other is None:
                    continue
                if _is_sharded(other) != _is_sharded(p) or (
                    isinstance(p, DTensor) and other.placements != p.placements
                ):
                    raise ValueError(
                        f"{name} placements {getattr(other, 'placements', None)} do not match "
                        f"parameter placements {getattr(p, 'placements', None)} at key {k!r}"
                    )
                if _local(other).shape != _local(p).shape:
                    raise ValueError(
                        f"local {name} shape {tuple(_local(other).shape)} does not match local "
                        f"parameter shape {tuple(_local(p).shape)} at key {k!r}"
                    )
        blocks = blocks_of(keys, opt.granularity)
        block_of = tuple(b for b, blk in enumerate(blocks) for _ in blk)
        has_grad = tuple(g is not None for g in g_full)
        group = self._group(p_list)
        sig = (block_of, len(blocks), has_grad, sharded, loss.dim() == 1, id(group))
        fn = self._steps.get(sig)
        if fn is None:
            fn = _make_local_step(
                block_of=block_of,
                n_blocks=len(blocks),
                has_grad=has_grad,
                sharded=sharded,
                per_sample=loss.dim() == 1,
                average_loss=self.average_loss,
                symmetric=opt.symmetric,
                online_r=opt.online_r,
                eps=opt.eps,
                group=group,
            )
            if self.compile:
                fn = torch.compile(fn, fullgraph=True)
            self._steps[sig] = fn
        hyper = state.hyper
        theta, v, h, s, count, skipped, r_est, n_step = fn(
            [_local(p) for p in p_list],
            [_local(g) for g in g_full if g is not None],
            [_local(t) for t in v_list],
            [_local(t) for t in h_list],
            state.s,
            state.count,
            state.skipped,
            state.r_est,
            state.step,
            (hyper.lr, hyper.sigma, hyper.q, hyper.r, hyper.alpha_r, hyper.weight_decay),
            loss,
        )
        if opt.nonfinite == "raise" and bool(torch.any(skipped != state.skipped)):
            raise FloatingPointError(
                "KOALA++ step met a NaN or inf (loss, gradient or denominator); "
                "use nonfinite='skip' to skip such blocks instead"
            )
        new_params = params.copy()
        new_v, new_h = state.v.copy(), state.h_prev.copy()
        for i, k in enumerate(keys):
            new_params.set(k, _wrap_like(theta[i], p_list[i]))
            new_v.set(k, _wrap_like(v[i], v_list[i]))
            new_h.set(k, _wrap_like(h[i], h_list[i]))
        return new_params, state.replace(
            v=new_v, h_prev=new_h, s=s, count=count, skipped=skipped, r_est=r_est, step=n_step
        )


def sharded(
    transform: KoalaPPTransform,
    process_group: dist.ProcessGroup | None = None,
    *,
    average_loss: bool = True,
    compile: bool = False,
) -> ShardedKoalaPPTransform:
    """KOALA++ for FSDP2 / DDP: see :class:`ShardedKoalaPPTransform`.

    Under ``torchrun``, after ``fully_shard(model)``, the parameters are DTensors and the
    step all-reduces the ``[T, 7]`` partial sums once (``docs/examples/fsdp_train.py``).

    Example:
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


class ShardedKoalaPP:
    """A torch.optim-like loop helper: KOALA++ on a module's (FSDP2 or DDP) parameters, in place.

    ``step(loss)`` reads ``p.grad``, runs :meth:`ShardedKoalaPPTransform.step` and writes the
    new values into the parameters' local shards. ``loss`` is this rank's loss (it is averaged
    over the ranks, see ``average_loss``).

    Under ``torchrun``: ``fully_shard(model)`` first, then the same loop.

    Example:
        >>> import torch
        >>> from koala_func import koala_pp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ShardedKoalaPP(model, koala_pp(lr=0.5), average_loss=False)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> for _ in range(3):
        ...     loss = (model(x) - y).square().mean()
        ...     loss.backward()
        ...     opt.step(loss.detach())
        ...     opt.zero_grad()
        >>> opt.state.count.tolist()
        [3, 3]
    """

    def __init__(
        self,
        named_params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
        transform: KoalaPPTransform,
        process_group: dist.ProcessGroup | None = None,
        *,
        average_loss: bool = True,
        compile: bool = False,
    ) -> None:
        if isinstance(named_params, torch.nn.Module):
            named_params = named_params.named_parameters()
        self.params = {n: p for n, p in named_params if p.requires_grad}
        self.transform = sharded(
            transform, process_group, average_loss=average_loss, compile=compile
        )
        self.state = self.transform.init(self._params_td())

    def _params_td(self) -> TensorDict:
        return TensorDict({n: p.detach() for n, p in self.params.items()})

    @torch.no_grad()
    def step(self, loss: torch.Tensor) -> None:
        """One KOALA++ step on the parameters, from their ``.grad`` and this rank's loss."""
        grads = {n: p.grad for n, p in self.params.items() if p.grad is not None}
        new, self.state = self.transform.step(self._params_td(), grads, loss, self.state)
        for n, p in self.params.items():
            _local(p).copy_(_local(new.get(n)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
