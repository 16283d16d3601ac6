r"""The packed fast path of KOALA++: all parameters in one ``[n_chunks, C]`` buffer.

KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025, arXiv:2506.04432) needs, per filtered block, the
seven sums :data:`koala_func._scalars.DOTS` and then one elementwise update. Written per tensor,
``torch.compile`` emits two loops per tensor and its compile time grows linearly with the number
of tensors. Here every tensor of one dtype and device lives in one flat buffer, each tensor
padded with zeros to a multiple of a chunk size ``C`` and the whole viewed as ``[n_chunks, C]``;
``owner[i]`` is the block of chunk ``i``. A step is then a fixed handful of loops whatever the
number of tensors:

1. one read of :math:`g, \theta, H_{k-1}, v_{k-1}` giving per-chunk partial sums ``[n_chunks, 7]``
   (with :math:`H = g + \mathrm{wd}\,\theta`);
2. ``index_add`` of the partials into per-block sums ``[T, 7]``;
3. the per-block scalar math :func:`koala_func._scalars.block_update` (``S`` from the same sums);
4. one elementwise pass with per-chunk coefficients gathered by ``owner``:

.. math::

    v_k = a\,v_{k-1} + c_H H_k + b\,H_{k-1},\qquad
    \theta_k = \theta_{k-1} - c\,(v_k + Q H_k),\qquad H_{k-1} \leftarrow H_k

applied where the block is updated (``ok``), else the block keeps its values.

Padding is zero in every buffer and stays zero (a zero ``H`` gives a zero update), so it never
changes a sum. Granularity ``"global"`` is the same machinery with one block (``owner == 0``).

Use :func:`packed` to build a :class:`PackedKoalaPP` from a :class:`~koala_func.KoalaPPTransform`
and the parameters; :meth:`PackedKoalaPP.step` is functional, :meth:`PackedKoalaPP.step_`
writes into the parameter and state buffers (faster, and what CUDA graphs need).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tensordict import TensorClass, TensorDict, TensorDictBase

from koala_func._scalars import DOTS, block_update
from koala_func._validation import Scalar
from koala_func.koala_pp import (
    KoalaPPHyperparams,
    KoalaPPState,
    KoalaPPTransform,
    NestedKey,
    float_keys,
    loss_moments,
    next_r,
    replace_hyperparams,
)

__all__ = ["PackedKoalaPP", "PackedLayout", "PackedState", "choose_chunk_size", "packed"]

#: Chunk sizes tried by :func:`choose_chunk_size`, largest first.
CHUNK_SIZES = (2048, 1024, 512, 256, 128, 64, 32, 16)


def choose_chunk_size(numels: Sequence[int], max_waste: float = 0.125) -> int:
    """The largest chunk size of :data:`CHUNK_SIZES` whose padding wastes at most ``max_waste``.

    Large chunks mean fewer per-chunk partial sums; small chunks waste less memory when there
    are many tiny tensors (each tensor is padded to a multiple of ``C``). A ResNet-18 set gets
    2048 (0.2% padding); 500 tensors of a few hundred floats get a small ``C``.

    Example:
        >>> choose_chunk_size([512 * 512, 512 * 256, 512])
        2048
        >>> choose_chunk_size([300] * 500)
        64
    """
    total = max(sum(numels), 1)
    for c in CHUNK_SIZES:
        padded = sum(-(-n // c) * c for n in numels)
        if padded - total <= max_waste * total:
            return c
    return CHUNK_SIZES[-1]


class PackedLayout:
    """Where each floating-point tensor of a TensorDict lives in a ``[n_chunks, C]`` buffer.

    All packed tensors must share one dtype and device (to pack a mixed-precision model, build
    one layout per dtype from ``params.select(*keys)``). Tensor ``i`` occupies chunks
    ``chunk_start[i] : chunk_start[i] + chunk_count[i]`` (its first ``numel`` entries, the rest
    is zero padding).

    Attributes:
        keys: the packed keys (:func:`~koala_func.koala_pp.float_keys` order).
        shapes, numels: of each tensor.
        chunk_size: ``C``.
        n_chunks: rows of the packed buffer.
        owner: int64 ``[n_chunks]``, the tensor index of each chunk.
        dtype, device: of every packed tensor.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> params = TensorDict(w=torch.randn(5, 3), b=torch.randn(3))
        >>> layout = PackedLayout(params, chunk_size=4)
        >>> layout.n_chunks, layout.owner.tolist()  # 15 floats -> 4 chunks, 3 floats -> 1
        (5, [0, 0, 0, 0, 1])
        >>> flat = layout.pack(params)
        >>> views = layout.unpack(flat)  # views into flat: a step on flat updates them
        >>> torch.equal(views["w"], params["w"]), views["w"].data_ptr() == flat.data_ptr()
        (True, True)
    """

    def __init__(self, params: TensorDictBase, chunk_size: int | None = None) -> None:
        keys = float_keys(params)
        if not keys:
            raise ValueError("PackedLayout needs at least one floating-point tensor")
        tensors = [params.get(k) for k in keys]
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(
                "PackedLayout expects tensors of one dtype and device, got "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}; build one layout "
                "per group with params.select(*keys)"
            )
        self.keys: list[NestedKey] = keys
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device
        if chunk_size is None:
            chunk_size = choose_chunk_size(self.numels)
        if chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.chunk_count = [max(1, -(-n // self.chunk_size)) for n in self.numels]
        self.chunk_start = [0]
        for c in self.chunk_count[:-1]:
            self.chunk_start.append(self.chunk_start[-1] + c)
        self.n_chunks = sum(self.chunk_count)
        self.owner = torch.repeat_interleave(
            torch.arange(len(keys), device=self.device),
            torch.tensor(self.chunk_count, device=self.device),
        )

    @property
    def n_tensors(self) -> int:
        return len(self.keys)

    @property
    def padding(self) -> int:
        """Number of padding entries in the buffer."""
        return self.n_chunks * self.chunk_size - sum(self.numels)

    def __repr__(self) -> str:
        return (
            f"PackedLayout(n_tensors={self.n_tensors}, chunk_size={self.chunk_size}, "
            f"n_chunks={self.n_chunks}, padding={self.padding}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    def empty(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A zero buffer ``[n_chunks, C]`` (padding must be zero)."""
        return torch.zeros(
            self.n_chunks, self.chunk_size, dtype=dtype or self.dtype, device=self.device
        )

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views into ``flat`` shaped like each tensor, in :attr:`keys` order (no copy)."""
        self._check(flat)
        rows = flat.view(-1)
        C = self.chunk_size
        return [
            rows[s * C : s * C + n].view(shape)
            for s, n, shape in zip(self.chunk_start, self.numels, self.shapes, strict=True)
        ]

    def unpack(self, flat: torch.Tensor) -> TensorDict:
        """A TensorDict of views into ``flat`` (nested keys as in the packed TensorDict).

        Writing into a leaf writes into ``flat``; gradients taken with respect to these views
        (when ``flat`` requires grad) accumulate into ``flat.grad``, already packed.
        """
        return TensorDict(dict(zip(self.keys, self.views(flat), strict=True)), batch_size=[])

    def pack(self, td: TensorDictBase, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the tensors of ``td`` into a ``[n_chunks, C]`` buffer (one copy each).

        Missing keys (e.g. a parameter without a gradient) are packed as zeros, which the
        step treats as the reference treats a missing gradient (the block is skipped).
        ``out``, when given, is reused (its padding must already be zero).
        """
        flat = self.empty(td.get(self.keys[0]).dtype) if out is None else out
        dst, src = [], []
        for key, view in zip(self.keys, self.views(flat), strict=True):
            t = td.get(key, None)
            if t is None:
                view.zero_()
            else:
                dst.append(view)
                src.append(t)
        if dst:
            torch._foreach_copy_(dst, src)
        return flat

    def _check(self, flat: torch.Tensor) -> None:
        if flat.shape != (self.n_chunks, self.chunk_size):
            raise ValueError(
                f"expected a packed buffer of shape {(self.n_chunks, self.chunk_size)}, "
                f"got {tuple(flat.shape)}"
            )


@torch.library.custom_op("koala_func::keep_skipped_h_prev_", mutates_args=("grads",))
def _keep_skipped_h_prev_(grads: torch.Tensor, h_prev: torch.Tensor, keep: torch.Tensor) -> None:
    """``grads = where(keep, grads, h_prev)``, written only when some chunk is not kept.

    For ``adopt_grads``: a block skipped by the step keeps its ``h_prev``, so its chunks of the
    adopted gradient tensor receive it. Skips are rare (a zero, missing or non-finite
    gradient), so a host check spares the common step a parameter-sized write. An opaque op,
    so that the step still compiles as one graph (inductor calls it in place on the input,
    between the two passes).
    """
    if not bool(keep.all()):
        grads.copy_(torch.where(keep, grads, h_prev))


class PackedState(TensorClass["nocast", "frozen"]):
    """The state of :class:`PackedKoalaPP`: :class:`~koala_func.KoalaPPState` with packed buffers.

    ``v`` and ``h_prev`` are ``[n_chunks, C]`` in the parameters' layout; ``s``, ``count``,
    ``skipped`` (``[T]``), ``r_est``, ``step`` and ``hyper`` mean what they mean in
    :class:`~koala_func.KoalaPPState`. Convert with :meth:`PackedKoalaPP.to_reference_state`
    and :meth:`PackedKoalaPP.from_reference_state` (checkpoints, parity checks).
    """

    v: torch.Tensor
    h_prev: torch.Tensor
    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r_est: torch.Tensor
    step: torch.Tensor
    hyper: KoalaPPHyperparams

    def with_hyperparams(self, **values: Scalar) -> PackedState:
        """A copy with some hyperparameters replaced, e.g. ``state.with_hyperparams(lr=0.1)``.

        Floats become 0-d tensors of the state's scalar dtype and device (no recompile). For a
        CUDA graph, write in place instead: ``state.hyper.lr.fill_(0.1)``.
        """
        return self.replace(hyper=replace_hyperparams(self.hyper, values))


@dataclass(frozen=True, eq=False)
class PackedKoalaPP:
    """KOALA++ over a :class:`PackedLayout`: ``init``, functional ``step``, in-place ``step_``.

    Same results as :meth:`KoalaPPTransform.step` (tested to 1e-10 in float64), with the
    scalar math shared through :func:`koala_func._scalars.block_update`. Compile the step with
    ``torch.compile(popt.step_, fullgraph=True)``: one graph, no recompiles when the loss or
    the hyperparameters in the state change, and a loop count independent of the number of
    tensors.

    Attributes:
        transform: the :class:`~koala_func.KoalaPPTransform` (hyperparameters, variant).
        layout: the :class:`PackedLayout` of the parameters.
        decay: whether the step applies ``state.hyper.weight_decay``. ``False`` (the default
            when the transform was built with ``weight_decay=0``) saves one read of the
            parameters per step; the step then ignores the weight decay in the state.
        adopt_grads: ``step_`` keeps the gradient tensor it is given as the state's ``h_prev``
            instead of copying it (without weight decay, ``H_k = g_k``): one parameter-sized
            write less per step (9 floats moved per element instead of 10). The caller must
            pass a fresh gradient tensor every step (``flat.grad = None`` before ``backward``,
            or ``torch.autograd.grad``) and use the returned state. A block skipped by the
            step has its previous ``h_prev`` written into that gradient tensor's chunks, after
            one host-side check per step (free on CPU; a device sync on CUDA, so not for CUDA
            graphs). The step still compiles with ``fullgraph=True``. See :func:`packed`.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from koala_func import koala_pp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
        >>> popt = koala_pp(lr=0.5).packed(TensorDict.from_module(model))
        >>> flat = popt.pack(TensorDict.from_module(model)).requires_grad_()
        >>> _ = popt.unpack(flat).to_module(model)  # the model now computes with views of flat
        >>> state = popt.init(flat)
        >>> x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
        >>> for _ in range(5):
        ...     losses = F.cross_entropy(model(x), y, reduction="none")
        ...     (grads,) = torch.autograd.grad(losses.mean(), flat)
        ...     state = popt.step_(flat, grads, losses.detach(), state)
        >>> state.count.tolist()
        [5, 5, 5, 5]
    """

    transform: KoalaPPTransform
    layout: PackedLayout
    decay: bool = True
    adopt_grads: bool = False

    def __post_init__(self) -> None:
        if self.adopt_grads:
            if self.decay:
                raise ValueError(
                    "adopt_grads=True needs a step without weight decay (then H = g): build "
                    "the transform with weight_decay=0 or pass decay=False"
                )
            if self._state_dtype() != self.layout.dtype:
                raise ValueError(
                    "adopt_grads=True needs the state in the parameters' dtype "
                    f"({self.layout.dtype}), got state_dtype={self.transform.state_dtype}"
                )

    @property
    def n_blocks(self) -> int:
        return self.layout.n_tensors if self.transform.granularity == "tensor" else 1

    def _state_dtype(self) -> torch.dtype:
        return self.transform.state_dtype or self.layout.dtype

    def pack(self, td: TensorDictBase, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`PackedLayout.pack`."""
        return self.layout.pack(td, out)

    def unpack(self, flat: torch.Tensor) -> TensorDict:
        """:meth:`PackedLayout.unpack`."""
        return self.layout.unpack(flat)

    def init(self, flat_params: torch.Tensor) -> PackedState:
        """A fresh state (zeros; the first step of each block sets ``v = sigma * H``)."""
        self.layout._check(flat_params)
        # The scalar fields (r_est, step, hyper) as the reference transform makes them.
        one = torch.zeros((), dtype=self.layout.dtype, device=self.layout.device)
        ref = self.transform.init(TensorDict(p=one))
        T = self.n_blocks
        dev = self.layout.device
        return PackedState(
            v=self.layout.empty(self._state_dtype()),
            h_prev=self.layout.empty(self._state_dtype()),
            s=torch.zeros(T, dtype=ref.s.dtype, device=dev),
            count=torch.zeros(T, dtype=torch.int64, device=dev),
            skipped=torch.zeros(T, dtype=torch.int64, device=dev),
            r_est=ref.r_est,
            step=ref.step,
            hyper=ref.hyper,
        )

    def to_reference_state(self, state: PackedState) -> KoalaPPState:
        """The same state as a :class:`~koala_func.KoalaPPState` (copies ``v``, ``h_prev``)."""
        return KoalaPPState(
            v=self.layout.unpack(state.v).clone(),
            h_prev=self.layout.unpack(state.h_prev).clone(),
            s=state.s.clone(),
            count=state.count.clone(),
            skipped=state.skipped.clone(),
            r_est=state.r_est.clone(),
            step=state.step.clone(),
            hyper=state.hyper.clone(),
        )

    def from_reference_state(self, state: KoalaPPState) -> PackedState:
        """A :class:`PackedState` from a :class:`~koala_func.KoalaPPState` of the same params."""
        if state.s.shape[-1] != self.n_blocks:
            raise ValueError(
                f"state has {state.s.shape[-1]} blocks, this packed optimizer has {self.n_blocks}"
            )
        dt = self._state_dtype()
        return PackedState(
            v=self.layout.pack(state.v, self.layout.empty(dt)),
            h_prev=self.layout.pack(state.h_prev, self.layout.empty(dt)),
            s=state.s.clone(),
            count=state.count.clone(),
            skipped=state.skipped.clone(),
            r_est=state.r_est.clone(),
            step=state.step.clone(),
            hyper=state.hyper.clone(),
        )

    # -- the step -------------------------------------------------------------------------

    def _update(self, theta, g, v, h, loss, state, adopt: bool = False):
        """Shared math: returns the new (theta, v, h_prev) and the new scalar fields.

        ``adopt``: between the passes, write ``h`` into the chunks of ``g`` whose block is
        skipped (``g`` then holds the next ``h_prev``). Pass 2 discards those chunks' results,
        and a mutation before pass 2 spares inductor a parameter-sized buffer that one after
        it would need.
        """
        tr = self.transform
        hp = state.hyper
        cdt = hp.lr.dtype
        L, m2 = loss_moments(loss, cdt)
        R = next_r(state.r_est, m2, hp, tr.online_r)
        # Elementwise math in the scalar dtype (float32 at least), stored back in each dtype.
        theta_c, g_c, v_c, h_c = (t.to(cdt) for t in (theta, g, v, h))
        # Without decay, H = g and tt = 0 (so L_blk = L): theta is read once, in pass 2.
        H = g_c + hp.weight_decay * theta_c if self.decay else g_c
        # Pass 1: per-chunk partial sums, in DOTS order, then per-block sums.
        tt = (theta_c * theta_c).sum(1) if self.decay else torch.zeros_like(g_c[:, 0])
        parts = torch.stack(
            [
                (g_c * g_c).sum(1),
                (H * H).sum(1),
                (H * h_c).sum(1),
                (H * v_c).sum(1),
                (h_c * h_c).sum(1),
                (h_c * v_c).sum(1),
                tt,
            ],
            dim=1,
        )
        T = self.n_blocks
        if T == 1:
            dots = parts.sum(0, keepdim=True)
        else:
            dots = torch.zeros(T, len(DOTS), dtype=cdt, device=parts.device)
            dots = dots.index_add(0, self.layout.owner, parts)
        u = block_update(dots, state.s, state.count, state.skipped, L, R, hp, tr.symmetric, tr.eps)
        # Pass 2: per-chunk coefficients broadcast along the chunk.
        coef = torch.stack([u.a, u.c_h, u.b, u.scale, u.ok.to(cdt)], dim=1)  # [T, 5]
        if T > 1:
            coef = coef[self.layout.owner]  # [n_chunks, 5]
        a, c_h, b, scale, okf = coef.unsqueeze(-1).unbind(1)
        ok = okf != 0
        if adopt:  # no decay here: H = g
            _keep_skipped_h_prev_(g, h, ok)
            H = g.to(cdt)
        v_new = a * v_c + c_h * H + b * h_c
        theta_new = theta_c - scale * (v_new + hp.q * H)
        out = (
            torch.where(ok, theta_new, theta_c).to(theta.dtype),
            torch.where(ok, v_new, v_c).to(v.dtype),
            None if adopt else torch.where(ok, H, h_c).to(h.dtype),  # adopt: g is h_prev
        )
        return out, (u.s, u.count, u.skipped, R, state.step + 1)

    def _check_nonfinite(self, state: PackedState, skipped: torch.Tensor) -> None:
        # Eager only: a host sync, as in the reference step.
        if self.transform.nonfinite == "raise" and not torch.compiler.is_compiling():
            if bool(torch.any(skipped != state.skipped)):
                raise FloatingPointError(
                    "KOALA++ step met a NaN or inf (loss, gradient or denominator); "
                    "use nonfinite='skip' to skip such blocks instead"
                )

    def step(
        self,
        flat_params: torch.Tensor,
        flat_grads: torch.Tensor,
        loss: torch.Tensor,
        state: PackedState,
    ) -> tuple[torch.Tensor, PackedState]:
        """One KOALA++ update: new parameters and state, inputs unchanged.

        Args:
            flat_params: ``[n_chunks, C]`` from :meth:`PackedLayout.pack` (zero padding).
            flat_grads: the gradients in the same layout (``flat_params.grad`` when the model
                used :meth:`PackedLayout.unpack` views, or :meth:`PackedLayout.pack` of a
                gradient TensorDict; zeros mark missing gradients).
            loss: the minibatch mean loss (0-d) or the per-sample losses (1-d).
            state: from :meth:`init` or a previous step.
        """
        self._check_inputs(flat_params, flat_grads, loss)
        grad_mode = torch.enable_grad() if self.transform.differentiable else torch.no_grad()
        with grad_mode:
            (theta, v, h), (s, count, skipped, r_est, step) = self._update(
                flat_params, flat_grads, state.v, state.h_prev, loss, state
            )
        self._check_nonfinite(state, skipped)
        return theta, state.replace(
            v=v, h_prev=h, s=s, count=count, skipped=skipped, r_est=r_est, step=step
        )

    def step_(
        self,
        flat_params: torch.Tensor,
        flat_grads: torch.Tensor,
        loss: torch.Tensor,
        state: PackedState,
    ) -> PackedState:
        """:meth:`step`, writing into ``flat_params`` and every tensor of ``state``.

        No parameter-sized allocation, and every buffer keeps its address (CUDA graphs).
        Returns ``state`` itself. Refused for ``differentiable=True`` transforms, whose
        steps must not overwrite tensors that autograd saved.

        With ``adopt_grads=True`` it returns a new state whose ``h_prev`` is ``flat_grads``
        (every other tensor is written in place as above); use that state for the next step.
        """
        if self.transform.differentiable:
            raise RuntimeError(
                "step_ writes into its inputs and cannot be differentiated; use step() "
                "with a differentiable=True transform"
            )
        self._check_inputs(flat_params, flat_grads, loss)
        if self.adopt_grads:
            self._check_adoptable(flat_grads, state)
        with torch.no_grad():
            (theta, v, h), (s, count, skipped, r_est, step) = self._update(
                flat_params, flat_grads, state.v, state.h_prev, loss, state, self.adopt_grads
            )
            self._check_nonfinite(state, skipped)
            pairs = [
                (flat_params, theta),
                (state.v, v),
                (state.s, s),
                (state.count, count),
                (state.skipped, skipped),
                (state.r_est, r_est),
                (state.step, step),
            ]
            if not self.adopt_grads:
                pairs.append((state.h_prev, h))
            for dst, src in pairs:
                # Through a 1-d view: inductor (torch 2.13, CPU) drops a copy_ into a 0-d
                # float64 graph input.
                dst.view(-1).copy_(src.view(-1))
        return state.replace(h_prev=flat_grads) if self.adopt_grads else state

    def _check_adoptable(self, flat_grads: torch.Tensor, state: PackedState) -> None:
        if flat_grads is state.h_prev:
            raise ValueError(
                "adopt_grads=True: the gradient tensor is the state's h_prev (the previous "
                "step's gradient); pass a fresh gradient tensor each step (set flat.grad = None "
                "before backward instead of zeroing it)"
            )
        if flat_grads.dtype != state.h_prev.dtype or flat_grads.device != state.h_prev.device:
            raise ValueError(
                f"adopt_grads=True: gradients of dtype {flat_grads.dtype} on "
                f"{flat_grads.device} cannot become the state's h_prev "
                f"({state.h_prev.dtype} on {state.h_prev.device})"
            )

    def _check_inputs(self, flat_params, flat_grads, loss) -> None:
        self.layout._check(flat_params)
        if flat_grads.shape != flat_params.shape:
            raise ValueError(
                f"gradient shape {tuple(flat_grads.shape)} does not match parameter shape "
                f"{tuple(flat_params.shape)}"
            )
        if not isinstance(loss, torch.Tensor) or loss.dim() not in (0, 1):
            raise ValueError("loss must be the minibatch mean (0-d) or the per-sample losses (1-d)")


def packed(
    transform: KoalaPPTransform,
    params: TensorDictBase,
    *,
    chunk_size: int | None = None,
    decay: bool | None = None,
    adopt_grads: bool = False,
) -> PackedKoalaPP:
    """A :class:`PackedKoalaPP` for ``params`` (a TensorDict; its float leaves are packed).

    Args:
        transform: from :func:`koala_func.koala_pp`.
        params: the parameters; only their shapes, dtype and device are read.
        chunk_size: ``C``; ``None`` picks it with :func:`choose_chunk_size`.
        decay: apply the weight decay held in the state. ``None``: ``True`` unless the
            transform's ``weight_decay`` is the number 0 (then the step reads the parameters
            once less; weight decay set later with ``with_hyperparams`` would be ignored).
        adopt_grads: without weight decay, let :meth:`PackedKoalaPP.step_` keep each
            gradient tensor as the state's ``h_prev`` (no copy; see :class:`PackedKoalaPP`).
            One parameter-sized write less per step: worth it where a write costs what a read
            does (GPU memory); little on a CPU that writes back just-read lines cheaply.
            Keep the default for CUDA graphs.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> params = TensorDict(w=torch.ones(3, 2), b=torch.zeros(2))
        >>> popt = packed(koala_pp(lr=0.5), params)
        >>> flat = popt.pack(params)
        >>> state = popt.init(flat)
        >>> grads = popt.pack(TensorDict(w=torch.full((3, 2), 0.1), b=torch.ones(2)))
        >>> state = popt.step_(flat, grads, torch.tensor(0.7), state)
        >>> state.count.tolist()
        [1, 1]
    """
    if not isinstance(transform, KoalaPPTransform):
        raise TypeError(f"packed() expects a KoalaPPTransform, got {type(transform).__name__}")
    layout = PackedLayout(params, chunk_size)
    if decay is None:
        wd = transform.weight_decay
        decay = not (isinstance(wd, (int, float)) and wd == 0)
    return PackedKoalaPP(transform, layout, bool(decay), bool(adopt_grads))
