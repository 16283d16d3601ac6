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

On CPU the packed buffers come from :data:`SPARE`, which hands a buffer out again once nothing
else references it: a fresh multi-megabyte buffer costs a page fault for every 4 KiB on its
first write (glibc gives freed large blocks back to the OS), which made a compiled functional
step on ResNet-18 shapes several times slower than its arithmetic.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence

import torch

__all__ = ["CHUNK_SIZES", "SPARE", "Layout", "choose_chunk_size", "empty_cache"]

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


class SparePool:
    """CPU buffers that are handed out again once nothing but the pool references them.

    The pool keeps one tensor per buffer and hands out a new tensor on the same storage (not a
    view of it, so no ``_base`` leads back to the pool's own). A buffer is free when no tensor
    but the pool's shares its storage: every tensor handed out, and every view of one, counts
    until it dies. At most :attr:`limit` buffers are kept per shape and dtype;
    :func:`empty_cache` drops them. Other devices get a plain ``torch.empty`` (CUDA's caching
    allocator already reuses memory).

    Examples:
        >>> import torch
        >>> pool = SparePool()
        >>> a = pool.empty((4, 8), torch.float32, "cpu")
        >>> w = a[1]  # a view keeps the buffer in use after a is gone
        >>> ptr = a.data_ptr(); del a
        >>> pool.empty((4, 8), torch.float32, "cpu").data_ptr() == ptr
        False
        >>> del w
        >>> pool.empty((4, 8), torch.float32, "cpu").data_ptr() == ptr  # handed out again
        True
    """

    # A compiled functional step uses 7 per shape (the 3 results the caller holds, which it
    # reads, the gradients' pack and 3 new results); the rest leaves room for results the
    # caller keeps.
    limit = 12

    def __init__(self) -> None:
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._sets: dict[tuple, list[list[torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def empty(self, shape: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
        """A buffer of ``shape``: a free one from the pool, else a new one (its contents are
        arbitrary either way)."""
        if device is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        with self._lock:
            kept = self._buffers.setdefault((tuple(shape), dtype), [])
            for buf in kept:
                if _unreferenced(buf):
                    return _alias(buf)
            buf = torch.empty(shape, dtype=dtype, device=device)
            if len(kept) >= self.limit:
                return buf
            kept.append(buf)
            return _alias(buf)

    def empty_set(self, specs: Sequence[tuple], device) -> list[torch.Tensor]:
        """Buffers of the ``(shape, dtype)`` of ``specs``, handed out together: a set whose
        buffers no tensor shares any more, else a new one. A step's results need one buffer
        per tensor of a small layout: one check each here, where :meth:`empty` costs a few
        microseconds a buffer. These are the pool's own tensors, not new ones on their
        storage: pass them to a graph and hand out views of them, never the tensors.

        Examples:
            >>> import torch
            >>> pool = SparePool()
            >>> specs = [((2, 3), torch.float32), ((4,), torch.float64)]
            >>> a, b = pool.empty_set(specs, "cpu")
            >>> held = a.view(-1)  # a view of one buffer keeps the whole set in use
            >>> pool.empty_set(specs, "cpu")[0] is a
            False
            >>> del held
            >>> pool.empty_set(specs, "cpu")[0] is a  # handed out again
            True
        """
        if device is None or torch.device(device).type != "cpu":
            return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
        key = tuple(specs)
        with self._lock:
            kept = self._sets.setdefault(key, [])
            for found in kept:
                if all(map(_unreferenced, found)):
                    return found
            found = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
            if len(kept) < self.limit:
                kept.append(found)
            return found

    def keys(self) -> list[tuple]:
        """The ``(shape, dtype)`` of every kind of buffer the pool keeps (and the specs of
        every kind of set)."""
        return [*self._buffers, *self._sets]

    def buffers(self, keys: Sequence[tuple] | None = None) -> list[torch.Tensor]:
        """Every buffer the pool keeps (of the kinds ``keys``, from :meth:`keys`)."""
        chosen = self._buffers if keys is None else keys
        found = [b for k in chosen for b in self._buffers.get(k, [])]
        sets = self._sets if keys is None else keys
        return found + [b for k in sets for kept in self._sets.get(k, []) for b in kept]

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._sets.clear()


def _alias(buf: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(
        buf.untyped_storage(), 0, buf.shape, buf.stride()
    )


def _unreferenced(buf: torch.Tensor) -> bool:
    # Storage users: buf and the storage object asked for here; a tensor handed out, or any
    # view of one, adds one. (Python reference counts are no guide: Dynamo's frame hook holds
    # extra references while a compiled graph runs.)
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2


#: The pool the packed buffers of every door come from.
SPARE = SparePool()


def empty_cache() -> None:
    """Release the spare CPU buffers that :data:`SPARE` keeps for reuse.

    Buffers that tensors still live on are not freed by this (their tensors hold them); the
    pool only forgets them, and later packs start from fresh buffers again.

    Examples:
        >>> import torch
        >>> x = SPARE.empty((2, 16), torch.float32, "cpu")
        >>> del x
        >>> empty_cache()
        >>> len(SPARE.buffers())
        0
    """
    SPARE.clear()


def _fill(
    out: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    starts: Sequence[int],
    zero_ranges: Sequence[int],
    n_lead: int,
) -> torch.Tensor:
    """``tensors`` (each ``[*lead, *shape]``) copied into ``out`` (``[*lead, n_chunks, C]``).

    Tensor ``i`` starts at chunk ``starts[i]``; ``zero_ranges`` (flat ``[begin, end, ...]``
    element offsets in a row: each tensor's padding, and every chunk of a missing tensor) are
    zeroed, so padding is zero. Nothing else is written twice.
    """
    lead, chunk = out.shape[:n_lead], out.shape[-1]
    rows = out.view(*lead, -1)
    per = math.prod(lead)
    numels = tuple(t.numel() // per if per else 0 for t in tensors)
    # the data and zero ranges tile the row: one split gives every piece of it
    sizes, data, zeros = _segments(tuple(starts), numels, tuple(zero_ranges), chunk)
    pieces = rows.split_with_sizes(sizes, dim=-1)
    if zeros:
        torch._foreach_zero_([pieces[k] for k in zeros])
    if tensors:
        torch._foreach_copy_([pieces[k] for k in data], [t.reshape(*lead, -1) for t in tensors])
    return out


@functools.lru_cache(maxsize=256)
def _segments(starts: tuple, numels: tuple, zero_ranges: tuple, chunk: int):
    """The pieces of a packed row in order (``split_with_sizes`` sizes), and the indices of
    each tensor's data piece and of the zero pieces (the ranges of :func:`_pack_plan`)."""
    segs = [(s * chunk, n, i) for i, (s, n) in enumerate(zip(starts, numels, strict=True))]
    segs += [(a, b - a, -1) for a, b in zip(zero_ranges[::2], zero_ranges[1::2], strict=True)]
    segs.sort(key=lambda x: (x[0], x[1] != 0))  # an empty tensor's piece before its padding
    data = [k for _, k in sorted((i, k) for k, (_, _, i) in enumerate(segs) if i >= 0)]
    zeros = [k for k, (_, _, i) in enumerate(segs) if i < 0]
    return [n for _, n, _ in segs], data, zeros


# One opaque graph node whatever the number of tensors. Eager callers with plain tensors and
# a buffer to fill call _fill directly (the op's Python dispatch costs ~0.1 ms a call).
@torch.library.custom_op("koala_func::pack", mutates_args=())
def pack(
    tensors: list[torch.Tensor],
    starts: list[int],
    zero_ranges: list[int],
    n_chunks: int,
    chunk: int,
    n_lead: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``tensors`` packed into a new ``[*lead, n_chunks, chunk]`` buffer (see :func:`_fill`)."""
    lead = tensors[0].shape[:n_lead] if tensors else ()
    device = tensors[0].device if tensors else None
    out = SPARE.empty((*lead, n_chunks, chunk), dtype, device)
    return _fill(out, tensors, starts, zero_ranges, n_lead)


@pack.register_fake
def _(tensors, starts, zero_ranges, n_chunks, chunk, n_lead, dtype):
    lead = tensors[0].shape[:n_lead]
    return tensors[0].new_empty((*lead, n_chunks, chunk), dtype=dtype)


def _pack_vmap(info, in_dims, tensors, starts, zero_ranges, n_chunks, chunk, n_lead, dtype):
    # vmap over the step (compile(vmap(opt.step))): one more leading dimension.
    dims = in_dims[0]
    moved = [
        t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        for t, d in zip(tensors, dims, strict=True)
    ]
    return pack(moved, starts, zero_ranges, n_chunks, chunk, n_lead + 1, dtype), 0


torch.library.register_vmap("koala_func::pack", _pack_vmap)


#: The ensemble door packs the parameters and state of a layout of at most this many tensors (its
#: gradients go into a buffer the step keeps: see ``koala_func.ensemble``), of at most
#: :data:`FUSED_PACK_NUMEL` elements in all, inside its compiled graph by graph ops
#: (:func:`pack_in_graph`): inductor writes the packed buffer in the same kernel call that
#: reads it, where an eager pack is one more launch before the graph runs. On CPU the packed
#: buffer is still materialized (inductor turns pointwise cat off there), so the pack costs
#: one pass over memory either way; it saves launches and Python, not traffic. More tensors
#: would add graph inputs and nodes per tensor (compile time growing with them), and a
#: larger buffer that inductor allocates would be a fresh allocation per step (page faults
#: on CPU) where the eager pack fills a pooled one.
FUSED_PACK_TENSORS = 8
FUSED_PACK_NUMEL = 1 << 22


def pack_in_graph(
    tensors: Sequence[torch.Tensor | None],
    counts: Sequence[int],
    chunk: int,
    dtype: torch.dtype,
    n_lead: int,
) -> torch.Tensor:
    """What :func:`pack` computes (tensor ``i`` in ``counts[i]`` chunks of ``chunk``, zero
    padding, ``None`` as zeros), as plain graph ops for inductor to fuse into one kernel."""
    first = next(t for t in tensors if t is not None)
    lead = first.shape[:n_lead]
    parts = []
    for t, count in zip(tensors, counts, strict=True):
        if t is None:
            parts.append(first.new_zeros((*lead, count, chunk), dtype=dtype))
            continue
        flat = t.reshape(*lead, -1).to(dtype)
        flat = torch.nn.functional.pad(flat, (0, count * chunk - flat.shape[-1]))
        parts.append(flat.view(*lead, count, chunk))
    return torch.cat(parts, dim=-2)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


# The helpers below are plain integer bookkeeping over every tensor. Marked as constant
# results, they run as ordinary Python when Dynamo traces a step that builds a Layout (the
# functional door): interpreted, they cost seconds at a few hundred tensors, and their
# results depend only on the shapes, which the graph's guards already fix.


@torch._dynamo.assume_constant_result
def _geometry(shapes, blocks, chunk_size, strides) -> dict:
    sizes = [torch.Size(s) for s in shapes]
    numels = [s.numel() for s in sizes]
    blocks = list(range(len(sizes))) if blocks is None else [int(b) for b in blocks]
    strides = list(strides) if strides is not None else [None] * len(sizes)
    chunk = int(chunk_size) if chunk_size is not None else choose_chunk_size(numels)
    counts = [max(1, -(-n // chunk)) for n in numels]
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    dense = [_contiguous_strides(s) for s in sizes]
    return {
        "shapes": sizes,
        "numels": numels,
        "blocks": blocks,
        "chunk_size": chunk,
        "counts": counts,
        "starts": starts,
        "n_chunks": sum(counts),
        "strides": strides,
        "view_strides": [d if t is None else t for d, t in zip(dense, strides, strict=True)],
        "dense_strides": dense,
        "owner": [b for b, c in zip(blocks, counts, strict=True) for _ in range(c)],
    }


@torch._dynamo.assume_constant_result
def _pack_plan(starts, counts, numels, chunk, missing) -> tuple[list[int], list[int], list[int]]:
    """The present tensors, their start chunks, and the element ranges to zero (flat
    ``[begin, end, ...]``, adjacent ranges merged): each present tensor's padding, and all
    chunks of a missing tensor."""
    present = [i for i, m in enumerate(missing) if not m]
    ranges: list[int] = []
    for i, m in enumerate(missing):
        begin = starts[i] * chunk + (0 if m else numels[i])
        end = (starts[i] + counts[i]) * chunk
        if begin == end:
            continue
        if ranges and ranges[-1] == begin:
            ranges[-1] = end
        else:
            ranges += [begin, end]
    return present, [starts[i] for i in present], ranges


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
        if not shapes:
            raise ValueError("a Layout needs at least one tensor")
        if blocks is not None and len(blocks) != len(shapes):
            raise ValueError("blocks must give one block per tensor")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size}")
        g = _geometry(
            tuple(tuple(s) for s in shapes),
            None if blocks is None else tuple(blocks),
            chunk_size,
            None if strides is None else tuple(None if t is None else tuple(t) for t in strides),
        )
        self.shapes, self.numels, self.blocks = g["shapes"], g["numels"], g["blocks"]
        self.chunk_size, self.counts, self.starts = g["chunk_size"], g["counts"], g["starts"]
        self.n_chunks, self.strides, self.view_strides = (
            g["n_chunks"],
            g["strides"],
            g["view_strides"],
        )
        self._dense_strides = g["dense_strides"]  # contiguous strides of each shape
        # One tensor filling the buffer, no padding (a small ensemble's layout, one per tensor):
        # with member dims a contiguous [*lead, *shape] tensor is its own packed buffer.
        self._whole = len(self.shapes) == 1 and self.n_chunks * self.chunk_size == self.numels[0]
        self._view_geometries: dict[tuple, list[tuple]] = {}  # see _view_geometry
        self._pack_plans: dict[tuple, tuple] = {}  # see pack
        self.dtype = dtype
        self.device = torch.device(device)
        # From a constant list: inside a graph a constant tensor, not a repeat_interleave
        # per call.
        self.owner = torch.tensor(g["owner"], dtype=torch.long, device=self.device)

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

    def spare(self, *lead: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A buffer ``[*lead, n_chunks, C]`` from :data:`SPARE`, contents arbitrary."""
        return SPARE.empty(
            (*lead, self.n_chunks, self.chunk_size), dtype or self.dtype, self.device
        )

    def fuses_pack(self, members: int = 1) -> bool:
        """Whether the ensemble door packs this layout inside its compiled graph
        (``members``: the product of the leading dims), see :data:`FUSED_PACK_TENSORS`."""
        return (
            self.n_tensors <= FUSED_PACK_TENSORS
            and members * self.n_chunks * self.chunk_size <= FUSED_PACK_NUMEL
        )

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views into ``flat`` (``[*lead, n_chunks, C]``) shaped like each tensor; no copy."""
        if flat.shape[-2:] != (self.n_chunks, self.chunk_size):
            raise ValueError(
                f"expected a packed buffer of shape [..., {self.n_chunks}, {self.chunk_size}], "
                f"got {tuple(flat.shape)}"
            )
        lead = flat.shape[:-2]
        C = self.chunk_size
        if lead and self._whole and flat.is_contiguous():  # the buffer reshaped
            return [flat.view(*lead, *self.shapes[0])]
        if not flat.is_contiguous():
            rows = flat.reshape(*lead, -1)
            return [
                rows[..., s * C : s * C + n].view((*lead, *shape))
                for s, n, shape in zip(self.starts, self.numels, self.shapes, strict=True)
            ]
        # as_strided, not slice-then-view: inductor lowers it to a view directly, where
        # simplifying the indexing of a reshaped slice costs ~10 ms per output at compile time.
        # Under torch.compile the buffers viewed are fresh step outputs (offset 0), and
        # storage_offset() is not traceable.
        base = 0 if torch.compiler.is_compiling() else flat.storage_offset()
        return [
            flat.as_strided(shape, stride, base + offset)
            for shape, stride, offset in self._view_geometry(
                tuple(lead), flat.stride()[: len(lead)]
            )
        ]

    def _view_geometry(self, lead: tuple, lead_strides: Sequence[int]) -> list[tuple]:
        """``(shape, stride, offset in the buffer)`` of each tensor's view (see :meth:`views`),
        cached eagerly: every step of a door asks for the same few (traced, a cache would be a
        guarded side effect)."""
        if torch.compiler.is_compiling():
            return self._compute_geometry(lead, lead_strides)
        key = (lead, tuple(lead_strides))
        found = self._view_geometries.get(key)
        if found is None:
            found = self._view_geometries[key] = self._compute_geometry(lead, lead_strides)
        return found

    def _compute_geometry(self, lead: tuple, lead_strides: Sequence[int]) -> list[tuple]:
        C = self.chunk_size
        if lead:  # member rows: each tensor contiguous within its row
            return [
                ((*lead, *shape), (*lead_strides, *dense), s * C)
                for s, shape, dense in zip(
                    self.starts, self.shapes, self._dense_strides, strict=True
                )
            ]
        return [
            (shape, stride, s * C)
            for s, shape, stride in zip(self.starts, self.shapes, self.view_strides, strict=True)
        ]

    def packed_base(
        self, tensors: Sequence[torch.Tensor | None], n_lead: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The buffer ``[*lead, n_chunks, C]`` whose :meth:`views` ``tensors`` are, or ``None``.

        Eager only: it compares storages, offsets and strides. A step fed its own outputs
        (or :func:`koala_func.member_views`) then reads the buffer itself, with no packing copy.

        Examples:
            >>> import torch
            >>> layout = Layout([(2, 3), (4,)], torch.float32, "cpu", chunk_size=4)
            >>> flat = layout.pack([torch.ones(2, 3), torch.ones(4)])
            >>> views = layout.views(flat)
            >>> layout.packed_base(views, 0, torch.float32).data_ptr() == flat.data_ptr()
            True
            >>> layout.packed_base([v.clone() for v in views], 0, torch.float32) is None
            True
        """
        first = tensors[0] if tensors else None
        if first is None or first.dtype != dtype or first.dim() < n_lead:
            return None
        C, row = self.chunk_size, self.n_chunks * self.chunk_size
        if n_lead and self._whole:  # the tensor itself, if contiguous
            if first.shape[n_lead:] != self.shapes[0] or not first.is_contiguous():
                return None
            return first.view(*first.shape[:n_lead], self.n_chunks, C)
        lead = tuple(first.shape[:n_lead])
        buf_strides = _contiguous_strides((*lead, self.n_chunks, C))
        origin = first.storage_offset() - self.starts[0] * C
        storage = first.untyped_storage()
        size = (origin + row * math.prod(lead)) * first.element_size()
        if origin < 0 or size > storage.nbytes():
            return None
        ptr = storage.data_ptr()
        for t, (shape, stride, offset) in zip(
            tensors, self._view_geometry(lead, buf_strides[:n_lead]), strict=True
        ):
            if (
                t is None
                or t.dtype != dtype
                or t.shape != shape
                or t.stride() != stride
                or t.storage_offset() != origin + offset
                or t.untyped_storage().data_ptr() != ptr
            ):
                return None
        return first.as_strided((*lead, self.n_chunks, C), buf_strides, origin)

    def pack(
        self,
        tensors: Sequence[torch.Tensor | None],
        dtype: torch.dtype | None = None,
        n_lead: int = 0,
        *,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A new buffer holding ``tensors`` (``None``: a missing tensor, packed as zeros).

        Inside ``torch.compile`` this is one opaque node whatever the number of tensors.
        ``out`` (a buffer of this layout) is written instead, by direct copies: for eager
        callers with plain tensors (no custom-op dispatch; no vmap or compile support).
        """
        dtype = dtype or self.dtype
        missing = tuple(t is None for t in tensors)
        # cached eagerly (a step packs the same few each time); traced, a cache would be a
        # guarded side effect
        cache = {} if torch.compiler.is_compiling() else self._pack_plans
        found = cache.get(missing)
        if found is None:
            found = cache[missing] = _pack_plan(
                self.starts, self.counts, self.numels, self.chunk_size, missing
            )
        present, starts, zero = found
        if not present:
            raise ValueError("pack() needs at least one tensor")
        chosen = [tensors[i] for i in present]
        if out is not None:
            return _fill(out, chosen, starts, zero, n_lead)
        return pack(chosen, starts, zero, self.n_chunks, self.chunk_size, n_lead, dtype)
