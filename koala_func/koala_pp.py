r"""KOALA++: a Kalman-filter optimizer that tracks a gradient-covariance product.

Reference: Zixuan Xia, Aram Davtyan, Paolo Favaro, "KOALA++: Efficient Kalman-Based Optimization
of Neural Networks with Gradient-Covariance Products", NeurIPS 2025, arXiv:2506.04432.

This module is the readable reference path: it follows the authors' released optimizer
(``KOALAPlusPlus.update``) line by line, one filter per parameter tensor ("tensor" granularity,
as released) or one filter over all parameters ("global", the paper's equations). Every fast
path in :mod:`koala_func.fused` is tested step by step against :meth:`KoalaPPTransform.step`.

For each filtered block, with :math:`H_k = g_k + \mathrm{wd}\,\theta_{k-1}`:

.. math::

    R &\leftarrow \alpha_R R + (1-\alpha_R)\,m_2 \quad\text{(online R; or } R = r \text{ fixed)}\\
    \lambda_k &= \frac{H_k v_{k-1}^\top + Q\,H_k H_{k-1}^\top}{S_{k-1}}, \qquad
    \alpha_k = \frac{H_k H_{k-1}^\top}{\lVert H_{k-1}\rVert^2}\\
    w_k &= \frac{H_k v_{k-1}^\top}{\lVert H_{k-1}\rVert^2}
          - \frac{(H_k H_{k-1}^\top)(H_{k-1} v_{k-1}^\top)}{\lVert H_{k-1}\rVert^4}
          \quad (w_k = 0 \text{ for the asymmetric variant})\\
    v_k &= (\alpha_k - \lambda_k)\,v_{k-1} + Q\,(H_k - \lambda_k H_{k-1}) + w_k H_{k-1}\\
    S_k &= (v_k + Q H_k) H_k^\top + R\\
    \theta_k &= \theta_{k-1} - \eta\,L_k\,\frac{v_k + Q H_k}{S_k},
    \qquad L_k = L + \tfrac{\mathrm{wd}}{2}\lVert\theta_{k-1}\rVert^2

At a block's first update :math:`v_0 = \sigma H_1`, :math:`H_0 = H_1` and
:math:`S_0 = H_0 v_0^\top + Q\lVert H_0\rVert^2 + R` (``sigma`` is the initial covariance
*variance*, the seed's :math:`\sigma_0^2`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from tensordict import TensorClass, TensorDict, TensorDictBase

from koala_func._validation import (
    Scalar,
    check_choice,
    check_hyperparameters,
    check_step_inputs,
)

if TYPE_CHECKING:
    from koala_func.packed import PackedKoalaPP

__all__ = ["KoalaPPHyperparams", "KoalaPPState", "KoalaPPTransform", "koala_pp"]

Granularity = Literal["tensor", "global"]
NonFinite = Literal["skip", "raise"]
NestedKey = str | tuple[str, ...]


class KoalaPPHyperparams(TensorClass["nocast", "frozen"]):
    """The hyperparameters, as tensors in the state (optax's ``inject_hyperparams``).

    Each field is a 0-d tensor (or ``[E]`` for an ensemble with per-member values), so that it
    can change between steps without a recompile, follow a schedule, and receive gradients.
    ``r`` is the fixed observation noise; it is unused when R is estimated online.
    """

    lr: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    alpha_r: torch.Tensor
    weight_decay: torch.Tensor


class KoalaPPState(TensorClass["nocast", "frozen"]):
    """The whole optimizer state: all tensors, fixed structure.

    Fields (``T`` is the number of filtered blocks: one per floating-point tensor of the
    parameters for ``granularity="tensor"``, one for ``"global"``):

    - ``v``: TensorDict like the parameters, the gradient-covariance product :math:`H_k P_{k-1}`.
    - ``h_prev``: TensorDict like the parameters, the previous :math:`H`.
    - ``s``: ``[T]``, the previous innovation variance :math:`S_{k-1}` of each block.
    - ``count``: ``[T]`` int64, updates applied to each block (0: its next update is its first).
    - ``skipped``: ``[T]`` int64, updates refused because a value was NaN or inf.
    - ``r_est``: 0-d, the observation noise R used by the last step (online estimate or fixed).
    - ``step``: 0-d int64, calls to ``step``.
    - ``hyper``: :class:`KoalaPPHyperparams`.
    """

    v: TensorDict
    h_prev: TensorDict
    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r_est: torch.Tensor
    step: torch.Tensor
    hyper: KoalaPPHyperparams

    def with_hyperparams(self, **values: Scalar) -> KoalaPPState:
        """A copy with some hyperparameters replaced, e.g. ``state.with_hyperparams(lr=0.1)``.

        Floats are converted to tensors of the state's scalar dtype and device, so that a
        compiled step sees the same input types and does not recompile.
        """
        return self.replace(hyper=replace_hyperparams(self.hyper, values))


def replace_hyperparams(hyper: KoalaPPHyperparams, values: dict[str, Scalar]) -> KoalaPPHyperparams:
    """``hyper`` with ``values`` replaced, as tensors of its scalar dtype and device."""
    ref = hyper.lr
    return hyper.replace(
        **{
            k: (
                v.to(dtype=ref.dtype, device=ref.device)
                if isinstance(v, torch.Tensor)
                else torch.tensor(v, dtype=ref.dtype, device=ref.device)
            )
            for k, v in values.items()
        }
    )


def float_keys(params: TensorDictBase) -> list[NestedKey]:
    """The keys of the floating-point leaves of ``params``, in the TensorDict's order.

    Integer and boolean leaves (for example BatchNorm's ``num_batches_tracked`` in
    ``TensorDict.from_module(model)``) are not optimized: they pass through unchanged.
    """
    keys = []
    for key, value in params.items(include_nested=True, leaves_only=True):
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


def loss_moments(loss: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The minibatch mean loss ``L`` and the second moment ``m2`` that feeds the online R.

    Per-sample losses (1-d): ``m2 = mean(loss**2)``; a scalar loss: ``m2 = L**2`` (as the
    authors' image-classification scripts pass it).
    """
    loss = loss.to(dtype)
    if loss.dim() == 1:
        return loss.mean(), loss.square().mean()
    return loss, loss.square()


def next_r(r_est: torch.Tensor, m2: torch.Tensor, hyper: KoalaPPHyperparams, online: bool):
    """R for this step: updated before use when online, else the fixed ``r``.

    A non-finite loss leaves the online estimate as it was (its blocks are refused anyway, as
    their ``L`` is not finite), so that one bad batch does not poison every later step.
    """
    if online:
        R = hyper.alpha_r * r_est + (1 - hyper.alpha_r) * m2
        return torch.where(torch.isfinite(R), R, r_est)
    return hyper.r + torch.zeros_like(r_est)


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b, strict=True))


def _safe_denominator(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A refused denominator becomes 1 before the division, so that a skipped block yields
    # neither NaN values nor NaN gradients (torch.where alone would leak 0 * inf into backward).
    ok = torch.isfinite(den) & (den != 0)
    return torch.where(ok, den, torch.ones_like(den)), ok


def _filter_block(
    theta: list[torch.Tensor],
    g: list[torch.Tensor],
    v_prev: list[torch.Tensor],
    h_prev: list[torch.Tensor],
    s_prev: torch.Tensor,
    count: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    hp: KoalaPPHyperparams,
    symmetric: bool,
    eps: float,
):
    """One KOALA++ update of one block. Lists hold the block's tensors, flattened."""
    q, wd = hp.q, hp.weight_decay
    H = [gi + wd * ti for gi, ti in zip(g, theta, strict=True)]
    # First update of this block: v_prev = sigma * H, H_prev = H, S_prev from them.
    first = count == 0
    v_prev = [torch.where(first, hp.sigma * Hi, vi) for Hi, vi in zip(H, v_prev, strict=True)]
    h_prev = [torch.where(first, Hi, hi) for Hi, hi in zip(H, h_prev, strict=True)]
    x = _dot(h_prev, h_prev)
    y = _dot(h_prev, v_prev)
    s_prev = torch.where(first, y + q * x + R, s_prev)
    x, x_ok = _safe_denominator(x)
    s_prev, s_prev_ok = _safe_denominator(s_prev)

    hh_prev = _dot(H, h_prev)
    hv_prev = _dot(H, v_prev)
    lam = (hv_prev + q * hh_prev) / s_prev
    alpha = hh_prev / x
    w = hv_prev / x - hh_prev * y / x**2 if symmetric else torch.zeros_like(x)
    v = [
        (alpha - lam) * vi + q * (Hi - lam * hi) + w * hi
        for vi, Hi, hi in zip(v_prev, H, h_prev, strict=True)
    ]
    direction = [vi + q * Hi for vi, Hi in zip(v, H, strict=True)]
    S, S_ok = _safe_denominator(_dot(direction, H) + R)

    L_blk = L + 0.5 * wd * _dot(theta, theta)
    scale = hp.lr * L_blk / S
    new_theta = [ti - scale * di for ti, di in zip(theta, direction, strict=True)]

    grad_norm = torch.sqrt(_dot(g, g))
    finite = x_ok & s_prev_ok & S_ok & torch.isfinite(scale) & torch.isfinite(lam + alpha + w)
    active = grad_norm >= eps  # the released skip rule (NaN norms fail it too)
    return new_theta, v, H, S, active & finite, (grad_norm >= eps) | ~torch.isfinite(grad_norm)


@dataclass(frozen=True, eq=False)
class KoalaPPTransform:
    """The KOALA++ optimizer: two pure functions, :meth:`init` and :meth:`step`.

    Build it with :func:`koala_pp`. The hyperparameters given here are the initial values that
    :meth:`init` writes into the state; :meth:`step` reads them from the state only, so a
    compiled step never recompiles when they change (``state.with_hyperparams(lr=...)``).
    This is the readable reference path; :meth:`packed` gives the compiled fast path.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3), b=torch.zeros(()))
        >>> state = opt.init(params)
        >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]), b=torch.tensor(0.5))
        >>> params, state = opt.step(params, grads, torch.tensor(0.7), state)
        >>> state = state.with_hyperparams(lr=0.25)  # a schedule: edit the state between steps
        >>> params, state = opt.step(params, grads, torch.tensor(0.6), state)
        >>> state.step.item(), state.count.tolist()
        (2, [2, 2])
    """

    lr: Scalar = 1.0
    sigma: Scalar = 0.1
    q: Scalar = 0.1
    r: Scalar | None = None
    alpha_r: Scalar = 0.9
    weight_decay: Scalar = 0.0
    symmetric: bool = True
    granularity: Granularity = "tensor"
    eps: float = 1e-9
    state_dtype: torch.dtype | None = None
    differentiable: bool = False
    nonfinite: NonFinite = "skip"

    @property
    def online_r(self) -> bool:
        return self.r is None

    def init(self, params: TensorDictBase) -> KoalaPPState:
        """A fresh state for ``params`` (a TensorDict, e.g. ``TensorDict.from_module(model)``).

        ``v`` and ``h_prev`` start at zero; the first :meth:`step` of each block replaces them
        as the released optimizer does (``v_prev = sigma * H``), without branching.

        Example:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> state = koala_pp(granularity="global").init(TensorDict(w=torch.ones(2, 2)))
            >>> state.s.shape, state.hyper.lr.item()
            (torch.Size([1]), 1.0)
        """
        keys = float_keys(params)
        dtype = scalar_dtype(params)
        device = params.get(keys[0]).device if keys else params.device or torch.device("cpu")
        n_blocks = len(blocks_of(keys, self.granularity))

        def state_like(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(p, dtype=self.state_dtype or p.dtype).detach()

        def scalar(x: Scalar) -> torch.Tensor:
            if isinstance(x, torch.Tensor):
                return x.to(dtype=dtype, device=device)
            return torch.tensor(x, dtype=dtype, device=device)

        zeros = params.select(*keys).apply(state_like) if keys else TensorDict()
        r = 1.0 if self.r is None else self.r
        return KoalaPPState(
            v=zeros,
            h_prev=zeros.clone(),
            s=torch.zeros(n_blocks, dtype=dtype, device=device),
            count=torch.zeros(n_blocks, dtype=torch.int64, device=device),
            skipped=torch.zeros(n_blocks, dtype=torch.int64, device=device),
            r_est=scalar(r),
            step=torch.zeros((), dtype=torch.int64, device=device),
            hyper=KoalaPPHyperparams(
                lr=scalar(self.lr),
                sigma=scalar(self.sigma),
                q=scalar(self.q),
                r=scalar(r),
                alpha_r=scalar(self.alpha_r),
                weight_decay=scalar(self.weight_decay),
            ),
        )

    def step(
        self,
        params: TensorDictBase,
        grads: TensorDictBase,
        loss: torch.Tensor,
        state: KoalaPPState,
    ) -> tuple[TensorDictBase, KoalaPPState]:
        """One KOALA++ update: returns new parameters and a new state; inputs are not modified.

        Args:
            params: the parameters (TensorDict; non-float leaves pass through).
            grads: gradients of the mean loss, a TensorDict with a subset of the float keys of
                ``params``. A missing key, or a block whose raw gradient norm is below ``eps``,
                leaves that block and its state unchanged (with ``granularity="global"``, a
                missing gradient counts as zero).
            loss: the minibatch mean loss (0-d) or the per-sample losses (1-d).
            state: from :meth:`init` or a previous :meth:`step`.

        Example:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> opt = koala_pp(lr=1.0, r=0.5)
            >>> params = TensorDict(w=torch.tensor([1.0, 2.0]))
            >>> state = opt.init(params)
            >>> per_sample = torch.tensor([0.5, 0.9, 0.7])  # 1-d: per-sample losses
            >>> grads = TensorDict(w=torch.tensor([0.3, 0.4]))
            >>> new, state = opt.step(params, grads, per_sample, state)
            >>> bool((new["w"] < params["w"]).all())
            True
        """
        keys = float_keys(params)
        check_step_inputs(keys, params, grads, loss)
        ctx = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with ctx:
            return self._step(keys, params, grads, loss, state)

    def packed(self, params: TensorDictBase, **kwargs: Any) -> PackedKoalaPP:
        """This optimizer on a packed layout of ``params``: the compiled fast path.

        Same math, tested step by step against :meth:`step`; see
        :func:`koala_func.packed.packed` for ``kwargs`` (``chunk_size``, ``decay``).

        Example:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> params = TensorDict(w=torch.ones(4, 3), b=torch.zeros(3))
            >>> popt = koala_pp(lr=0.5).packed(params)
            >>> flat = popt.pack(params)
            >>> popt.unpack(flat)["w"].shape
            torch.Size([4, 3])
        """
        from koala_func.packed import packed

        return packed(self, params, **kwargs)

    def _step(self, keys, params, grads, loss, state):
        hp = state.hyper
        cdt = hp.lr.dtype
        L, m2 = loss_moments(loss, cdt)
        R = next_r(state.r_est, m2, hp, self.online_r)

        new_params = params.copy()
        new_v, new_h = state.v.copy(), state.h_prev.copy()
        s_out, count_out, skipped_out = [], [], []
        for b, block in enumerate(blocks_of(keys, self.granularity)):
            present = [k for k in block if grads.get(k, None) is not None]
            if not present:  # structure, not values: a block with no gradient is skipped
                s_out.append(state.s[b])
                count_out.append(state.count[b])
                skipped_out.append(state.skipped[b])
                continue
            if self.granularity == "tensor":
                block = present

            def flat(td, key, dtype=cdt):
                return td.get(key).reshape(-1).to(dtype)

            theta = [flat(params, k) for k in block]
            g = [
                flat(grads, k) if k in present else torch.zeros_like(theta[i])
                for i, k in enumerate(block)
            ]
            # the stored state: a refused update keeps exactly this (not the first-step values)
            v_prev = [flat(state.v, k) for k in block]
            h_prev = [flat(state.h_prev, k) for k in block]
            new_theta, v, H, S, ok, tried = _filter_block(
                theta,
                g,
                v_prev,
                h_prev,
                state.s[b],
                state.count[b],
                L,
                R,
                hp,
                self.symmetric,
                self.eps,
            )
            for i, k in enumerate(block):
                p = params.get(k)
                new_params.set(k, torch.where(ok, new_theta[i], theta[i]).to(p.dtype).view_as(p))
                sv = state.v.get(k)
                new_v.set(k, torch.where(ok, v[i], v_prev[i]).to(sv.dtype).view_as(sv))
                new_h.set(k, torch.where(ok, H[i], h_prev[i]).to(sv.dtype).view_as(sv))
            s_out.append(torch.where(ok, S, state.s[b]))
            count_out.append(state.count[b] + ok.long())
            skipped_out.append(state.skipped[b] + (tried & ~ok).long())

        skipped = _stack(skipped_out, state.skipped)
        if self.nonfinite == "raise" and bool(torch.any(skipped != state.skipped)):
            raise FloatingPointError(
                "KOALA++ step met a NaN or inf (loss, gradient or denominator); "
                "use nonfinite='skip' to skip such blocks instead"
            )
        return new_params, state.replace(
            v=new_v,
            h_prev=new_h,
            s=_stack(s_out, state.s),
            count=_stack(count_out, state.count),
            skipped=skipped,
            r_est=R,
            step=state.step + 1,
        )


def _stack(items: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(items) if items else like.clone()


def koala_pp(
    *,
    lr: Scalar = 1.0,
    sigma: Scalar = 0.1,
    q: Scalar = 0.1,
    r: Scalar | None = None,
    alpha_r: Scalar = 0.9,
    weight_decay: Scalar = 0.0,
    symmetric: bool = True,
    granularity: Granularity = "tensor",
    eps: float = 1e-9,
    state_dtype: torch.dtype | None = None,
    differentiable: bool = False,
    nonfinite: NonFinite = "skip",
) -> KoalaPPTransform:
    """Build a KOALA++ optimizer (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432).

    Args:
        lr: learning rate :math:`\\eta` (the released default for vision is 1.0).
        sigma: initial covariance variance, :math:`P_0 = \\sigma I` (``v_0 = sigma * H``).
        q: process noise :math:`Q`.
        r: fixed observation noise :math:`R`; ``None`` estimates it online from the loss.
        alpha_r: smoothing of the online R estimate (which starts at 1.0).
        weight_decay: L2 coefficient coupled into the filter (:math:`H = g + wd\\,\\theta`).
        symmetric: keep the :math:`w_k` term (the symmetric least-squares estimate); ``False``
            is the cheaper asymmetric variant.
        granularity: ``"tensor"`` (one filter per tensor, as released) or ``"global"``.
        eps: blocks whose raw gradient norm is below ``eps`` are skipped.
        state_dtype: dtype of ``v`` and ``h_prev``; ``None`` uses each parameter's dtype
            (use ``torch.float32`` with float16/bfloat16 parameters).
        differentiable: let autograd flow through :meth:`KoalaPPTransform.step` (meta-learning,
            hypergradients). Otherwise the step runs under ``torch.no_grad()``.
        nonfinite: ``"skip"`` (a block that meets NaN or inf is left unchanged and counted in
            ``state.skipped``) or ``"raise"`` (eager only: raise ``FloatingPointError``).

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3))
        >>> state = opt.init(params)
        >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]))
        >>> params, state = opt.step(params, grads, torch.tensor(0.7), state)
        >>> state.count.tolist()
        [1]
    """
    check_hyperparameters(
        lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay, eps=eps
    )
    check_choice("granularity", granularity, ("tensor", "global"))
    check_choice("nonfinite", nonfinite, ("skip", "raise"))
    return KoalaPPTransform(
        lr=lr,
        sigma=sigma,
        q=q,
        r=r,
        alpha_r=alpha_r,
        weight_decay=weight_decay,
        symmetric=bool(symmetric),
        granularity=granularity,
        eps=float(eps),
        state_dtype=state_dtype,
        differentiable=bool(differentiable),
        nonfinite=nonfinite,
    )
