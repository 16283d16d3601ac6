r"""The two passes of a KOALA++ step over packed buffers, and the driver every fast door calls.

1. Reduction: one read of :math:`g, \theta, H_{k-1}, v_{k-1}` per layout gives per-chunk partial
   sums ``[..., n_chunks, 7]`` (:data:`~koala_func.engine.math.DOTS`, with
   :math:`H = g + \mathrm{wd}\,\theta`), ``index_add``-ed into per-block sums ``[..., T, 7]``.
2. An optional ``reduce`` hook sums the partial block sums of sharded layouts over ranks (one
   all-reduce, which also averages the loss moments); identity otherwise.
3. The scalar math :func:`~koala_func.engine.math.block_update`.
4. Elementwise: per-chunk coefficients gathered by ``owner``, then
   :math:`v_k = a v_{k-1} + c H_k + b H_{k-1}`,
   :math:`\theta_k = \theta_{k-1} - \mathrm{scale}\,v_k - \mathrm{scale}\,Q\,H_k`,
   :math:`H_{k-1} \leftarrow H_k`, where the block is ``ok``; written into the buffers
   (``inplace=True``, or ``overwrite=True`` for buffers the caller owns) or returned as new
   tensors.

Every buffer may carry leading member dimensions (``[E, n_chunks, C]``, ensembles). Elementwise
math runs in the scalar dtype (float32 at least) and is stored back in each buffer's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from koala_func.engine.math import DOTS, BlockConfig, BlockUpdate, Hyper, block_update

__all__ = ["Blocks", "Buffers", "run"]

Reduce = Callable[[torch.Tensor], torch.Tensor]


class Buffers(NamedTuple):
    """One layout's packed tensors, each ``[..., n_chunks, C]`` (see :func:`run`).

    Examples:
        >>> import torch
        >>> from koala_func.engine import Layout
        >>> layout = Layout([(3,)], torch.float32, "cpu", chunk_size=4)
        >>> buf = Buffers(*(layout.zeros() for _ in range(4)))  # theta, g, v, h
        >>> tuple(buf.theta.shape)
        (1, 4)
    """

    theta: torch.Tensor
    g: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor


class Blocks(NamedTuple):
    """The per-block state, each ``[..., T]`` (``r_est`` broadcastable to it).

    Examples:
        >>> import torch
        >>> T = 2
        >>> blocks = Blocks(torch.zeros(T), torch.zeros(T, dtype=torch.long),
        ...                 torch.zeros(T, dtype=torch.long), torch.ones(T))
        >>> blocks.count.tolist()
        [0, 0]
    """

    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r_est: torch.Tensor


def _per_chunk(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` (or ``[..., 1]``: uniform) values as ``[..., n_chunks, 1]`` by owner."""
    if x.shape[-1] != 1:
        x = x.index_select(-1, owner)
    return x.unsqueeze(-1)


def _cat(xs: list[torch.Tensor], dim: int) -> torch.Tensor:
    return xs[0] if len(xs) == 1 else torch.cat(xs, dim)


def _block_sums(parts: torch.Tensor, owner: torch.Tensor, n_blocks: int) -> torch.Tensor:
    if n_blocks == 1:
        return parts.sum(-2, keepdim=True)
    out = parts.new_zeros(*parts.shape[:-2], n_blocks, parts.shape[-1])
    return out.index_add(-2, owner, parts)


#: Eager CPU steps run each pass over tiles of about this many elements per buffer: their
#: temporaries stay in cache and are reused by the allocator, where a full-size temporary of a
#: large buffer is a fresh mapping (a page fault per 4 KiB) each time.
TILE = 1 << 18


def _tiles(g: torch.Tensor) -> list[slice | None]:
    """Row tiles of a ``[..., n_chunks, C]`` buffer; ``[None]``: all rows in one, flattened."""
    if torch.compiler.is_compiling() or g.device.type != "cpu" or g.numel() <= TILE:
        # compiled: one fused loop over all rows; CUDA: a caching allocator, fewer launches
        return [None]
    n_chunks = g.shape[-2]
    step = max(1, TILE * n_chunks // g.numel())
    return [slice(i, min(i + step, n_chunks)) for i in range(0, n_chunks, step)]


def _rows(x: torch.Tensor, tile: slice | None) -> torch.Tensor:
    """The rows of ``x`` (``[..., n_chunks, k]``) in ``tile``, keeping the leading dims; for
    ``None`` every row, with the leading dims folded in: ``[rows, k]``. Every product then
    loops over one range, which inductor fuses into one read of each buffer."""
    return x.reshape(-1, x.shape[-1]) if tile is None else x[..., tile, :]


def _inputs(buf: Buffers, wd_c: torch.Tensor | None, tile: slice | None, cdt: torch.dtype):
    """``theta, g, v, h`` of ``tile`` in the compute dtype, and ``H = g + wd * theta``
    (``wd_c``: the weight decay per chunk; ``None``: none)."""
    theta, g, v, h = (_rows(t, tile).to(cdt) for t in buf)
    H = g if wd_c is None else g + _rows(wd_c, tile) * theta
    return theta, g, v, h, H


def partial_sums(
    buf: Buffers, wd_c: torch.Tensor | None, tile: slice | None, cdt: torch.dtype
) -> torch.Tensor:
    """Pass 1 over ``tile`` (``None``: every row): the per-chunk partial sums
    ``[..., n_chunks, 7]`` of :data:`~koala_func.engine.math.DOTS` (``wd_c``: the weight decay
    per chunk; ``None``: none, and theta is not read)."""
    theta, g, v, h, H = _inputs(buf, wd_c, tile, cdt)
    tt = (theta * theta).sum(-1) if wd_c is not None else torch.zeros_like(g[..., 0])
    parts = [(g * g).sum(-1), (H * H).sum(-1), (H * h).sum(-1), (H * v).sum(-1)]
    parts += [(h * h).sum(-1), (h * v).sum(-1), tt]
    return torch.stack(parts, dim=-1).view(*buf.g.shape[:-2], -1, len(DOTS))


def _updated(buf: Buffers, wd_c, cf: torch.Tensor, tile: slice | None, cdt: torch.dtype):
    """The new ``theta, v, h`` of ``tile`` (``cf``: the per-chunk coefficients, see :func:`run`),
    in the compute dtype ``cdt``.

    A block that is not updated has the coefficients of the identity (``a = 1``, the others
    0, see :func:`_coefficients`) and must come back unchanged even if its gradient is NaN.
    Compiled, a ``torch.where`` per result does that at no cost (it fuses into the kernel).
    Eagerly on CPU a ``where`` costs four multiplies, so ``H`` is read through ``nan_to_num``
    instead, which changes only such blocks (an updated block's sums are finite, so are its
    values); ``v`` and ``h`` are finite (they only ever receive an updated block's values), so
    zero times them is exactly zero and the identity leaves ``theta, v, h`` as they were."""
    theta, _, v, h, H = _inputs(buf, wd_c, tile, cdt)
    a, c, b, scale, d, okf = _rows(cf, tile).unsqueeze(-1).unbind(-2)
    select = torch.compiler.is_compiling()
    Hs = H if select else torch.nan_to_num(H)
    v_new = torch.addcmul(torch.addcmul(a * v, c, Hs), b, h)
    theta_new = theta.addcmul(scale, v_new, value=-1).addcmul_(d, Hs, value=-1)
    if select:
        ok = okf != 0
        return torch.where(ok, theta_new, theta), torch.where(ok, v_new, v), torch.where(ok, H, h)
    return theta_new, v_new, torch.addcmul((1 - okf) * h, okf, Hs)


def _coefficients(u: BlockUpdate, q: torch.Tensor) -> torch.Tensor:
    """``[..., T, 6]``: ``a, c, b, scale, scale * q, ok`` per block, those of the identity
    (``1, 0, 0, 0, 0, 0``) where the block is not updated (see :func:`_updated`)."""
    ok = u.ok
    a = torch.where(ok, u.a, 1.0)
    c, b, scale, d = (torch.where(ok, x, 0.0) for x in (u.c, u.b, u.scale, u.scale * q))
    return torch.stack(torch.broadcast_tensors(a, c, b, scale, d, ok.to(a.dtype)), dim=-1)


def write_update(buf: Buffers, wd_c, cf: torch.Tensor, tile: slice | None, dst) -> None:
    """:func:`_updated` written into ``dst`` (``theta, v, h`` buffers; may be ``buf``'s own:
    each element is read before it is written)."""
    new = _updated(buf, wd_c, cf, tile, cf.dtype)
    for into, x in zip(dst, new, strict=True):
        if tile is None:
            into.copy_(x.view(into.shape))
        else:
            into[..., tile, :].copy_(x)


def _overwrite(theta, g, v, h, cf, wd_c) -> None:
    write_update(Buffers(theta, g, v, h), wd_c, cf, None, (theta, v, h))


def _overwrite_plain(theta, g, v, h, cf) -> None:
    write_update(Buffers(theta, g, v, h), None, cf, None, (theta, v, h))


# Two functions, not one with an optional argument: Dynamo caches by code object, and each
# keeps its own recompile limit. The compiled kernel of each, by ``decay``:
_COMPILED: dict[bool, Callable] = {}


# An opaque, mutating op: inside a compiled step, inductor then writes the update into the
# caller's own packed buffers (the op's inputs, dead afterwards) instead of allocating three new
# outputs, each a fresh mapping on CPU that pays a page fault per 4 KiB. The op runs a compiled
# elementwise kernel of its own.
@torch.library.custom_op("koala_func::overwrite_update", mutates_args=("theta", "v", "h"))
def overwrite_update(
    theta: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    cf: torch.Tensor,
    wd_c: torch.Tensor | None,
) -> None:
    """Write the update into ``theta, v, h`` (``[rows, C]`` buffers; see :func:`run`)."""
    decay = wd_c is not None
    eager = _overwrite if decay else _overwrite_plain
    args = (theta, g, v, h, cf, wd_c) if decay else (theta, g, v, h, cf)
    fn = _COMPILED.get(decay)
    if fn is None:
        # dynamic: one graph for every layout's shape, not a recompile per model
        fn = _COMPILED[decay] = torch.compile(eager, fullgraph=True, dynamic=True)
    if fn is eager:
        eager(*args)
        return
    try:
        # One dispatch state for every call: the op is reached through its ADInplaceOrView
        # kernel from a compiled graph and directly from an eager one, and Dynamo guards on the
        # inputs' dispatch keys (which include this state): a second graph otherwise.
        with torch._C._AutoDispatchBelowADInplaceOrView():
            fn(*args)
    except Exception as err:  # the caller's backend works here, inductor does not
        warnings.warn(
            f"koala_func: compiling the update kernel failed ({type(err).__name__}: {err}); "
            "running it eagerly instead (same results, slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        _COMPILED[decay] = eager
        eager(*args)


@overwrite_update.register_fake
def _(theta, g, v, h, cf, wd_c) -> None:
    return None


def run(
    owners: Sequence[torch.Tensor],
    bufs: Sequence[Buffers],
    blocks: Blocks,
    mean: torch.Tensor,
    mean_sq: torch.Tensor,
    hp: Hyper,
    cfg: BlockConfig,
    *,
    decay: bool = True,
    present: torch.Tensor | None = None,
    skip_all: torch.Tensor | None = None,
    reduce: Reduce | None = None,
    sharded: Sequence[bool] | None = None,
    per_sample: bool = True,
    inplace: bool = False,
    overwrite: bool = False,
    out: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], BlockUpdate]:
    """One KOALA++ step over packed buffers.

    Args:
        owners, bufs: per layout, the block of each chunk (``Layout.owner``: global block
            indices in ``0..T-1``) and its :class:`Buffers`.
        blocks: the stored per-block state.
        mean, mean_sq: the loss moments (``[...]``, the leading dims of the buffers).
        hp: hyperparameters broadcastable to ``[..., T]`` (per block, or ``[..., 1]``).
        cfg: structural options (bools, or per-block bool tensors).
        decay: apply ``hp.weight_decay`` (``False`` saves a read of theta in pass 1).
        present: bool ``[T]``, blocks that received a gradient.
        skip_all: bool 0-d, refuse the whole step (found inf under a GradScaler).
        reduce: sums a flat ``[T_sharded*7 + 3]`` vector over ranks (the partial block sums of
            the layouts flagged in ``sharded``, then ``[mean, mean_sq, 1]``).
        per_sample: the loss moments come from per-sample losses (else ``mean_sq`` is
            ``mean**2``, recomputed after ``reduce`` averages ``mean`` over ranks).
        inplace: write theta, v, h into the buffers and the block state into ``blocks``.
        overwrite: write theta, v, h into the buffers, which the caller owns (its own packed
            copies), and return the block state; compiled on CPU, through the opaque
            :func:`overwrite_update`, so that no output buffer is allocated.
        out: per layout, ``(theta, v, h)`` buffers to write the results into (recycled
            buffers: fresh outputs pay page faults on CPU); the block state is returned.

    Returns:
        per layout ``(theta, v, h)`` (the buffers written, with ``inplace`` or ``out``), and the
        :class:`~koala_func.engine.math.BlockUpdate` (``r`` is the R used).

    Examples:
        Two tensors in one layout, one block each, stepped in place:

        >>> import torch
        >>> from koala_func.engine import BlockConfig, Hyper, Layout
        >>> layout = Layout([(3, 2), (2,)], torch.float32, "cpu", chunk_size=4)
        >>> theta = layout.pack([torch.ones(3, 2), torch.ones(2)])
        >>> grad = layout.pack([torch.full((3, 2), 0.1), torch.full((2,), -0.2)])
        >>> buf = Buffers(theta, grad, layout.zeros(), layout.zeros())
        >>> blocks = Blocks(torch.zeros(2), torch.zeros(2, dtype=torch.long),
        ...                 torch.zeros(2, dtype=torch.long), torch.ones(2))
        >>> hp = Hyper(*(torch.tensor([v]) for v in (0.5, 0.1, 0.1, 1.0, 0.9, 0.0, 0.0)))
        >>> cfg = BlockConfig(symmetric=True, online=True, variance=False, eps=1e-9)
        >>> loss = torch.tensor(0.7)
        >>> _ = run([layout.owner], [buf], blocks, loss, loss**2, hp, cfg, inplace=True)
        >>> w, b = layout.views(theta)
        >>> bool((w < 1).all()), bool((b > 1).all()), blocks.count.tolist()
        (True, True, [1, 1])
    """
    cdt = blocks.s.dtype
    n_blocks = blocks.s.shape[-1]
    sharded = list(sharded) if sharded is not None else [False] * len(bufs)
    wd = hp.weight_decay.to(cdt)
    # Per layout: the weight decay of each chunk [*lead, n_chunks, 1], and the row tiles.
    wds = [
        _per_chunk(wd, owner).expand(*b.g.shape[:-2], owner.shape[0], 1) if decay else None
        for owner, b in zip(owners, bufs, strict=True)
    ]
    tiles = [_tiles(b.g) for b in bufs]

    # Pass 1: per-chunk partial sums, then per-block sums (sharded and replicated apart), by
    # one index_add over every layout's chunks: many small layouts (an ensemble's, one per
    # tensor) would otherwise add a [..., T, 7] buffer each.
    found: dict[bool, tuple[list, list]] = {True: ([], []), False: ([], [])}
    for owner, buf, wd_c, shard, layout_tiles in zip(
        owners, bufs, wds, sharded, tiles, strict=True
    ):
        for tile in layout_tiles:
            found[shard][0].append(partial_sums(buf, wd_c, tile, cdt))
            found[shard][1].append(owner if tile is None else owner[tile])
    dots = {
        shard: _block_sums(_cat(parts, -2), _cat(whose, 0), n_blocks) if parts else None
        for shard, (parts, whose) in found.items()
    }

    if reduce is not None:
        one = torch.ones_like(mean)
        part = dots[True]
        flat = [] if part is None else [part.reshape(-1)]
        vec = reduce(torch.cat([*flat, torch.stack([mean.to(cdt), mean_sq.to(cdt), one])]))
        if part is not None:
            dots[True] = vec[:-3].view_as(part)
        mean = vec[-3] / vec[-1]
        # A mean loss feeds R with L**2 of the global mean, not the mean of the ranks' L**2.
        mean_sq = vec[-2] / vec[-1] if per_sample else mean * mean
    total = [d for d in dots.values() if d is not None]
    sums = total[0] if len(total) == 1 else total[0] + total[1]
    assert sums.shape[-1] == len(DOTS)

    u = block_update(
        sums,
        blocks.s,
        blocks.count,
        blocks.skipped,
        blocks.r_est,
        mean.to(cdt).unsqueeze(-1),
        mean_sq.to(cdt).unsqueeze(-1),
        hp,
        cfg,
        present,
        skip_all,
    )

    # Pass 2: per-chunk coefficients, one elementwise pass per layout.
    coef = _coefficients(u, hp.q.to(cdt))
    results = []
    dsts = [(b.theta, b.v, b.h) for b in bufs] if inplace or overwrite else out
    for i, (owner, buf, wd_c, layout_tiles) in enumerate(
        zip(owners, bufs, wds, tiles, strict=True)
    ):
        kept = (buf.theta, buf.v, buf.h)
        cf = coef if n_blocks == 1 else coef.index_select(-2, owner)
        cf = cf.expand(*buf.g.shape[:-2], owner.shape[0], cf.shape[-1])
        dst = dsts[i] if dsts is not None else None
        if dst is None and layout_tiles != [None]:  # eager tiles write into new buffers
            dst = tuple(torch.empty_like(t) for t in kept)
        if dst is None:  # compiled, functional: the results are the new tensors
            new = _updated(buf, wd_c, cf, None, cdt)
            results.append(
                tuple(x.to(t.dtype).view(t.shape) for x, t in zip(new, kept, strict=True))
            )
            continue
        if overwrite and torch.compiler.is_compiling() and buf.g.device.type == "cpu":
            overwrite_update(*buf, _rows(cf, None), None if wd_c is None else _rows(wd_c, None))
        else:
            for tile in layout_tiles:
                write_update(buf, wd_c, cf, tile, dst)
        results.append(tuple(dst))
    if inplace:
        for dst, src in zip(blocks, (u.s, u.count, u.skipped, u.r), strict=True):
            # Through a 1-d view: inductor (torch 2.13, CPU) drops a copy_ into a 0-d float64
            # graph input.
            dst.view(-1).copy_(src.expand_as(dst).reshape(-1))
    return results, u
