r"""The per-block scalar math of KOALA++ from one reduction pass: shared by every fast path.

The reference step (:mod:`koala_func.koala_pp`) reduces twice per block (the five dot products,
then :math:`S_k = (v_k + Q H_k) H_k^\top + R`). Expanding :math:`v_k` gives :math:`S_k` from the
first pass alone (algorithm.md):

.. math::

    S_k = (\alpha_k - \lambda_k)\,H_k v_{k-1}^\top + 2Q\,\lVert H_k\rVert^2
          - Q\lambda_k\,H_k H_{k-1}^\top + w_k\,H_k H_{k-1}^\top + R

so a fast step is: one pass computing the per-block sums :data:`DOTS`, this scalar math on
``[T]`` tensors, then one elementwise pass

.. math::

    v_k = a\,v_{k-1} + c_H H_k + b\,H_{k-1}, \qquad
    \theta_k = \theta_{k-1} - c\,(v_k + Q H_k), \qquad H_{k-1} \leftarrow H_k

applied where ``ok``; elsewhere the block keeps its parameters and state. At a block's first
update the substitutions ``v_prev = sigma*H``, ``H_prev = H`` are folded into the coefficients
(``a = b = 0``), so the stored zeros are never read as a real state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from koala_func.koala_pp import KoalaPPHyperparams

__all__ = ["DOTS", "BlockUpdate", "block_update"]

#: Column order of the per-block sums ``[T, len(DOTS)]`` a fast path must provide, with
#: ``H = g + weight_decay * theta``; ``h_prev`` and ``v_prev`` are the stored state.
DOTS = ("gg", "hh", "hh_prev", "hv_prev", "x", "y", "tt")
#  gg = g.g          (raw gradient, for the skip rule)
#  hh = H.H          hh_prev = H.h_prev       hv_prev = H.v_prev
#  x  = h_prev.h_prev                         y = h_prev.v_prev
#  tt = theta.theta  (the block's weight-decay loss term)


class BlockUpdate(NamedTuple):
    """Per-block results, each ``[T]``: coefficients of the elementwise pass and new state."""

    a: torch.Tensor  # multiplies v_prev
    c_h: torch.Tensor  # multiplies H
    b: torch.Tensor  # multiplies h_prev
    scale: torch.Tensor  # theta -= scale * (v + q * H)
    ok: torch.Tensor  # bool: the block is updated
    s: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor


def _safe(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ok = torch.isfinite(den) & (den != 0)
    return torch.where(ok, den, torch.ones_like(den)), ok


def block_update(
    dots: torch.Tensor,
    s_prev: torch.Tensor,
    count: torch.Tensor,
    skipped: torch.Tensor,
    L: torch.Tensor,
    R: torch.Tensor,
    hp: KoalaPPHyperparams,
    symmetric: bool,
    eps: float,
    present: torch.Tensor | None = None,
) -> BlockUpdate:
    """Scalar math of one step for all blocks at once, from the sums ``dots`` (``[T, 7]``).

    ``present`` (bool ``[T]``, optional) marks blocks that received a gradient this step.
    Branch-free and free of host syncs: it compiles into one graph and vmaps.
    """
    gg, hh, hh_p, hv_p, x, y, tt = dots.unbind(-1)
    q, sigma = hp.q, hp.sigma
    s_stored = s_prev
    first = count == 0
    # First update: v_prev = sigma*H, h_prev = H, so every dot with them is a multiple of hh.
    hh_p = torch.where(first, hh, hh_p)
    hv_p = torch.where(first, sigma * hh, hv_p)
    x = torch.where(first, hh, x)
    y = torch.where(first, sigma * hh, y)
    s_prev = torch.where(first, y + q * x + R, s_prev)
    x, x_ok = _safe(x)
    s_prev, s_prev_ok = _safe(s_prev)

    lam = (hv_p + q * hh_p) / s_prev
    alpha = hh_p / x
    w = hv_p / x - hh_p * y / x**2 if symmetric else torch.zeros_like(x)
    S, S_ok = _safe((alpha - lam) * hv_p + 2 * q * hh - q * lam * hh_p + w * hh_p + R)
    L_blk = L + 0.5 * hp.weight_decay * tt
    scale = hp.lr * L_blk / S

    grad_norm = torch.sqrt(gg)
    finite = x_ok & s_prev_ok & S_ok & torch.isfinite(scale) & torch.isfinite(lam + alpha + w)
    active = grad_norm >= eps
    tried = active | ~torch.isfinite(grad_norm)
    if present is not None:
        active, tried = active & present, tried & present
    ok = active & finite

    a = alpha - lam
    b = w - q * lam
    zero = torch.zeros_like(a)
    return BlockUpdate(
        a=torch.where(first, zero, a),
        c_h=torch.where(first, a * sigma + q + b, q.expand_as(a)),
        b=torch.where(first, zero, b),
        scale=scale,
        ok=ok,
        s=torch.where(ok, S, s_stored),
        count=count + ok.long(),
        skipped=skipped + (tried & ~ok).long(),
    )
