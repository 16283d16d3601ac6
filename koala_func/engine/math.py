r"""The per-block scalar math of KOALA++, written once for every fast door.

The readable reference (:mod:`koala_func.reference`) reduces twice per block (the five dot
products, then :math:`S_k = (v_k + Q H_k) H_k^\top + R`). Expanding :math:`v_k` gives
:math:`S_k` from the first pass alone (``shared/design/algorithm.md``):

.. math::

    S_k = (\alpha_k - \lambda_k)\,H_k v_{k-1}^\top + 2Q\,\lVert H_k\rVert^2
          - Q\lambda_k\,H_k H_{k-1}^\top + w_k\,H_k H_{k-1}^\top + R

so a fast step is one reduction pass giving the per-block sums :data:`DOTS`, this scalar math
on ``[..., T]`` tensors, and one elementwise pass

.. math::

    v_k = a\,v_{k-1} + c\,H_k + b\,H_{k-1}, \qquad
    \theta_k = \theta_{k-1} - \mathrm{scale}\,(v_k + Q H_k), \qquad H_{k-1} \leftarrow H_k

applied where ``ok``; elsewhere the block keeps its parameters and state. At a block's first
update the substitutions ``v_prev = sigma*H``, ``H_prev = H`` are folded into the coefficients
(``a = b = 0``), so the stored zeros are never read as a real state.

Every function here is branch-free and free of host syncs (it compiles into one graph and
vmaps). Leading dimensions broadcast: ``[T]`` for one model, ``[E, T]`` for an ensemble.
Structural options (``symmetric``, ``online``, ``variance``) are Python bools or bool tensors
broadcastable to ``[..., T]``, so one graph serves param groups that differ in them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "DOTS",
    "BlockConfig",
    "BlockUpdate",
    "Hyper",
    "block_update",
    "loss_moments",
]

#: Column order of the per-block sums ``[..., T, len(DOTS)]``, with ``H = g + wd * theta``;
#: ``h`` and ``v`` are the stored ``h_prev`` and ``v``.
DOTS = ("gg", "hh", "hh_prev", "hv_prev", "x", "y", "tt")
#  gg = g.g  (raw gradient, skip rule)   hh = H.H   hh_prev = H.h   hv_prev = H.v
#  x  = h.h                              y  = h.v   tt = theta.theta (weight-decay loss term)

Flag = bool | torch.Tensor


class Hyper(NamedTuple):
    """The hyperparameters as tensors broadcastable to the blocks ``[..., T]``.

    One value for every block (``[1]``), one per block (``[T]``, e.g. ``KoalaPP``'s param
    groups), or one per ensemble member (``[E, 1]``).

    Examples:
        >>> import torch
        >>> hp = Hyper(*(torch.tensor([v]) for v in (1.0, 0.1, 0.1, 1.0, 0.9, 0.0, 0.0)))
        >>> hp.q
        tensor([0.1000])
    """

    lr: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    alpha_r: torch.Tensor
    weight_decay: torch.Tensor
    loss_target: torch.Tensor


class BlockConfig(NamedTuple):
    """Per-block structural options: Python values, or tensors broadcastable to ``[..., T]``.

    Examples:
        >>> import torch
        >>> cfg = BlockConfig(symmetric=True, online=True, variance=False, eps=1e-9)
        >>> mixed = cfg._replace(symmetric=torch.tensor([True, False]))  # two param groups
        >>> mixed.symmetric.tolist()
        [True, False]
    """

    symmetric: Flag  # keep the w term
    online: Flag  # R estimated online (else the fixed r)
    variance: Flag  # the online R is fed the loss variance (else its second moment)
    eps: float | torch.Tensor  # skip rule: raw gradient norm below eps


class BlockUpdate(NamedTuple):
    """Per-block results: the elementwise pass's coefficients and the new block state.

    Returned by :func:`block_update` (see its example): ``v = a v_prev + c H + b h_prev`` and
    ``theta -= scale (v + q H)`` where ``ok``; ``s``, ``count``, ``skipped`` and ``r`` are the
    block state after the step.

    Examples:
        >>> BlockUpdate._fields[:4]
        ('a', 'c', 'b', 'scale')
    """

    a: torch.Tensor  # multiplies v_prev
    c: torch.Tensor  # multiplies H
    b: torch.Tensor  # multiplies h_prev
    scale: torch.Tensor  # theta -= scale * (v + q H)
    ok: torch.Tensor  # bool: the block is updated
    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r: torch.Tensor  # R used by this step (the next step's r_est)


def loss_moments(loss: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, mean of squares)`` of per-sample losses ``[..., B]``, in ``dtype``.

    A mean loss (0-d, or ``[E]`` for an ensemble) is not passed here: the doors use
    ``(L, L**2)`` for it, as the authors' image scripts feed R.

    Examples:
        >>> import torch
        >>> loss_moments(torch.tensor([1.0, 3.0]), torch.float64)
        (tensor(2., dtype=torch.float64), tensor(5., dtype=torch.float64))
    """
    loss = loss.to(dtype)
    return loss.mean(-1), loss.square().mean(-1)


def _where(flag: Flag, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if isinstance(flag, bool):
        return a if flag else b
    return torch.where(flag, a, b)


def _safe(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A refused denominator becomes 1 before the division, so that a skipped block yields
    # neither NaN values nor NaN gradients (torch.where alone leaks 0 * inf into backward).
    ok = torch.isfinite(den) & (den != 0)
    return torch.where(ok, den, torch.ones_like(den)), ok


def block_update(
    dots: torch.Tensor,
    s_prev: torch.Tensor,
    count: torch.Tensor,
    skipped: torch.Tensor,
    r_est: torch.Tensor,
    mean: torch.Tensor,
    mean_sq: torch.Tensor,
    hp: Hyper,
    cfg: BlockConfig,
    present: torch.Tensor | None = None,
    skip_all: torch.Tensor | None = None,
) -> BlockUpdate:
    """The scalar math of one step for all blocks at once.

    Args:
        dots: the sums :data:`DOTS`, ``[..., T, 7]``.
        s_prev, count, skipped, r_est: the stored block state, ``[..., T]`` (``r_est`` may be
            any shape broadcastable to it).
        mean, mean_sq: the loss's mean and mean of squares (broadcastable to ``[..., T]``).
        hp: hyperparameters; cfg: structural options.
        present: bool, blocks that received a gradient this step (others are left alone).
        skip_all: bool, refuse the whole step without counting it (a GradScaler found inf).

    Examples:
        One block whose sums say ``g = H = (1, 0)`` at its first update, with a mean loss 0.5:

        >>> import torch
        >>> dots = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])  # DOTS order
        >>> hp = Hyper(*(torch.tensor([v]) for v in (1.0, 0.1, 0.1, 1.0, 0.9, 0.0, 0.0)))
        >>> cfg = BlockConfig(symmetric=True, online=False, variance=False, eps=1e-9)
        >>> zero, none = torch.zeros(1), torch.zeros(1, dtype=torch.long)
        >>> u = block_update(dots, zero, none, none, hp.r, torch.tensor(0.5), torch.tensor(0.25),
        ...                  hp, cfg)
        >>> u.ok.tolist(), u.count.tolist(), round(float(u.s), 4)  # S = (v + Q H).H + R
        ([True], [1], 1.2667)
    """
    gg, hh, hh_p, hv_p, x, y, tt = dots.unbind(-1)
    q, sigma, t = hp.q, hp.sigma, hp.loss_target
    # R, updated before use. The observation is the residual L - target, so its second
    # moment is shifted; the variance is not. A non-finite loss keeps the old estimate.
    m2 = mean_sq - 2 * t * mean + t * t
    stat = _where(cfg.variance, mean_sq - mean * mean, m2)
    r_online = hp.alpha_r * r_est + (1 - hp.alpha_r) * stat
    r_online = torch.where(torch.isfinite(r_online), r_online, r_est)
    R = _where(cfg.online, r_online, hp.r + torch.zeros_like(r_online))

    first = count == 0
    # First update: v_prev = sigma*H, h_prev = H, so every dot with them is a multiple of hh.
    hh_p = torch.where(first, hh, hh_p)
    hv_p = torch.where(first, sigma * hh, hv_p)
    x = torch.where(first, hh, x)
    y = torch.where(first, sigma * hh, y)
    s_p = torch.where(first, y + q * x + R, s_prev)
    x, x_ok = _safe(x)
    s_p, s_p_ok = _safe(s_p)

    lam = (hv_p + q * hh_p) / s_p
    alpha = hh_p / x
    w = _where(cfg.symmetric, hv_p / x - hh_p * y / (x * x), torch.zeros_like(x))
    S, S_ok = _safe((alpha - lam) * hv_p + 2 * q * hh - q * lam * hh_p + w * hh_p + R)
    residual = mean + 0.5 * hp.weight_decay * tt - t  # L_blk - target
    scale = hp.lr * residual / S

    grad_norm = torch.sqrt(gg)
    finite = x_ok & s_p_ok & S_ok & torch.isfinite(scale) & torch.isfinite(lam + alpha + w)
    active = grad_norm >= cfg.eps  # the released skip rule (NaN norms fail it too)
    tried = active | ~torch.isfinite(grad_norm)
    if present is not None:
        active, tried = active & present, tried & present
    if skip_all is not None:
        active, tried = active & ~skip_all, tried & ~skip_all
        R = torch.where(skip_all, r_est + torch.zeros_like(R), R)
    # A negative residual would move uphill (the step is lr * residual * gain): refused, counted.
    ok = active & finite & (residual >= 0)

    a = alpha - lam
    b = w - q * lam
    zero = torch.zeros_like(a)
    return BlockUpdate(
        a=torch.where(first, zero, a),
        c=torch.where(first, a * sigma + q + b, q + zero),
        b=torch.where(first, zero, b),
        scale=scale,
        ok=ok,
        s=torch.where(ok, S, s_prev),
        count=count + ok.long(),
        skipped=skipped + (tried & ~ok).long(),
        r=R,
    )
