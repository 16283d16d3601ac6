r"""The packed layout: every tensor of one dtype and device in one ``[n_chunks, C]`` buffer.

Written per tensor, ``torch.compile`` emits two loops per tensor and its compile time grows
with the number of tensors. Here each tensor is padded with zeros to a multiple of a chunk size
``C``, the tensors are laid end to end, and the whole is viewed as ``[n_chunks, C]``;
``owner[i]`` is the filtered block of chunk ``i``. A step is then a fixed handful of loops
whatever the number of tensors. Padding is zero in every buffer and stays zero (a zero ``H``
gives a zero update), so it never changes a sum.

Leading dimensions (``[E, n_chunks, C]``: one row of chunks per ensemble member) are allowed
everywhere. :func:`pack` is an opaque custom op so that packing 500 tensors inside a compiled
graph costs the compiler one node, not 500.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CHUNK_SIZES", "Layout", "choose_chunk_size"]

#: Chunk sizes tried by :func:`choose_chunk_size`, largest first.
CHUNK_SIZES = (2048, 1024, 512, 256, 128, 64, 32, 16)


def choose_chunk_size(numels: Sequence[int], max_waste: float = 0.125) -> int:
    """The largest chunk size of :data:`CHUNK_SIZES` whose padding wastes at most ``max_waste``.

    Large chunks mean fewer per-chunk partial sums; small chunks waste less memory when there
    are many tiny tensors. A ResNet-18 set gets 2048 (0.2% padding).

    Examples:
        >>> choose_chunk_size([512 * 512, 512 * 256, 512])
        2048
        >>> choose_chunk_size([300] * 500)
        64
    """
    total = max(sum(numels), 1)
    for c in CHUNK_SIZES:
        padded = sum(max(1, -(-n // c)) * c for n in numels)
        if padded - total <= max_waste * total:
            return c
    return CHUNK_SIZES[-1]


@torch.library.custom_op("koala_func::pack", mutates_args=())
def pack(
    tensors: list[torch.Tensor],
    starts: list[int],
    zero_chunks: list[int],
    n_chunks: int,
    chunk: int,
    n_lead: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``tensors`` (each ``[*lead, *shape]``) copied into a new ``[*lead, n_chunks, chunk]``.

    Tensor ``i`` starts at chunk ``starts[i]``; the chunks ``zero_chunks`` (each tensor's last
    chunk, and every chunk of a missing tensor) are zeroed first, so padding is zero.
    """
    lead = tensors[0].shape[:n_lead] if tensors else ()
    device = tensors[0].device if tensors else None
    out = torch.empty(*lead, n_chunks, chunk, dtype=dtype, device=device)
    if zero_chunks:
        idx = torch.tensor(zero_chunks, dtype=torch.long, device=out.device)
        out.index_fill_(-2, idx, 0)
    rows = out.view(*lead, n_chunks * chunk)
    dst = [
        rows[..., s * chunk : s * chunk + t[(0,) * n_lead].numel()]
        for s, t in zip(starts, tensors, strict=True)
    ]
    if tensors:
        torch._foreach_copy_(dst, [t.reshape(*lead, -1) for t in tensors])
    return out


@pack.register_fake
def _(tensors, starts, zero_chunks, n_chunks, chunk, n_lead, dtype):
    lead = tensors[0].shape[:n_lead]
    return tensors[0].new_empty((*lead, n_chunks, chunk), dtype=dtype)


def _pack_vmap(info, in_dims, tensors, starts, zero_chunks, n_chunks, chunk, n_lead, dtype):
    # vmap over the step (compile(vmap(opt.step))): one more leading dimension.
    dims = in_dims[0]
    moved = [
        t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        for t, d in zip(tensors, dims, strict=True)
    ]
    return pack(moved, starts, zero_chunks, n_chunks, chunk, n_lead + 1, dtype), 0


torch.library.register_vmap("koala_func::pack", _pack_vmap)


class Layout:
    """Where each tensor of one dtype and device lives in a ``[n_chunks, C]`` buffer.

    Tensor ``i`` occupies chunks ``starts[i] : starts[i] + counts[i]`` (its first ``numel``
    entries; the rest is zero padding) and belongs to filtered block ``blocks[i]`` (a global
    block index, shared with other layouts when a block spans dtypes).

    Args:
        shapes: the tensors' shapes (without leading member dimensions).
        dtype, device: of the tensors.
        blocks: the block of each tensor; ``None``: one block per tensor (``0..n-1``).
        chunk_size: ``C``; ``None`` picks it with :func:`choose_chunk_size`.
        strides: optional dense strides per tensor (e.g. channels_last): :meth:`views` then
            returns views with these strides, the buffer holding each tensor in memory order.

    Examples:
        >>> import torch
        >>> layout = Layout([(5, 3), (3,)], torch.float32, torch.device("cpu"), chunk_size=4)
        >>> layout.n_chunks, layout.owner.tolist()  # 15 floats -> 4 chunks, 3 floats -> 1
        (5, [0, 0, 0, 0, 1])
        >>> w, b = torch.randn(5, 3), torch.randn(3)
        >>> flat = layout.pack([w, b])
        >>> views = layout.views(flat)  # views into flat: a step on flat updates them
        >>> torch.equal(views[0], w), views[0].data_ptr() == flat.data_ptr()
        (True, True)
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        dtype: torch.dtype,
        device: torch.device | str,
        blocks: Sequence[int] | None = None,
        chunk_size: int | None = None,
        strides: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        if not self.shapes:
            raise ValueError("a Layout needs at least one tensor")
        self.numels = [s.numel() for s in self.shapes]
        self.dtype = dtype
        self.device = torch.device(device)
        self.blocks = list(range(len(self.shapes))) if blocks is None else [int(b) for b in blocks]
        if len(self.blocks) != len(self.shapes):
            raise ValueError("blocks must give one block per tensor")
        self.strides = list(strides) if strides is not None else [None] * len(self.shapes)
        if chunk_size is None:
            chunk_size = choose_chunk_size(self.numels)
        if chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.counts = [max(1, -(-n // self.chunk_size)) for n in self.numels]
        self.starts = [0]
        for c in self.counts[:-1]:
            self.starts.append(self.starts[-1] + c)
        self.n_chunks = sum(self.counts)
        self.last_chunks = [s + c - 1 for s, c in zip(self.starts, self.counts, strict=True)]
        self.owner = torch.repeat_interleave(
            torch.tensor(self.blocks, dtype=torch.long), torch.tensor(self.counts)
        ).to(self.device)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def padding(self) -> int:
        """Number of padding entries in the buffer."""
        return self.n_chunks * self.chunk_size - sum(self.numels)

    def __repr__(self) -> str:
        return (
            f"Layout(n_tensors={self.n_tensors}, chunk_size={self.chunk_size}, "
            f"n_chunks={self.n_chunks}, padding={self.padding}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    def zeros(self, *lead: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A zero buffer ``[*lead, n_chunks, C]`` (padding must be zero)."""
        return torch.zeros(
            *lead, self.n_chunks, self.chunk_size, dtype=dtype or self.dtype, device=self.device
        )

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views into ``flat`` (``[*lead, n_chunks, C]``) shaped like each tensor; no copy."""
        if flat.shape[-2:] != (self.n_chunks, self.chunk_size):
            raise ValueError(
                f"expected a packed buffer of shape [..., {self.n_chunks}, {self.chunk_size}], "
                f"got {tuple(flat.shape)}"
            )
        lead = flat.shape[:-2]
        rows = flat.reshape(*lead, -1)
        C = self.chunk_size
        out = []
        for s, n, shape, stride in zip(
            self.starts, self.numels, self.shapes, self.strides, strict=True
        ):
            if stride is None or lead:
                out.append(rows[..., s * C : s * C + n].view((*lead, *shape)))
            else:
                out.append(flat.as_strided(shape, stride, flat.storage_offset() + s * C))
        return out

    def pack(
        self,
        tensors: Sequence[torch.Tensor | None],
        dtype: torch.dtype | None = None,
        n_lead: int = 0,
    ) -> torch.Tensor:
        """A new buffer holding ``tensors`` (``None``: a missing tensor, packed as zeros).

        Inside ``torch.compile`` this is one opaque node whatever the number of tensors.
        """
        present = [i for i, t in enumerate(tensors) if t is not None]
        zero = [self.last_chunks[i] for i in present]
        for i, t in enumerate(tensors):
            if t is None:
                zero.extend(range(self.starts[i], self.starts[i] + self.counts[i]))
        if not present:
            raise ValueError("pack() needs at least one tensor")
        return pack(
            [tensors[i] for i in present],
            [self.starts[i] for i in present],
            sorted(set(zero)),
            self.n_chunks,
            self.chunk_size,
            n_lead,
            dtype or self.dtype,
        )
