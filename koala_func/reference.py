r"""The readable reference step of KOALA++: the ground truth every fast door is tested against.

Reference: Zixuan Xia, Aram Davtyan, Paolo Favaro, "KOALA++: Efficient Kalman-Based Optimization
of Neural Networks with Gradient-Covariance Products", NeurIPS 2025, arXiv:2506.04432.

It follows the authors' released optimizer (``KOALAPlusPlus.update`` in
``Task1_Image_Classification/koalap.py``, see ``docs/math.md``) line by line, one filter per
parameter tensor ("tensor" granularity, as released) or one filter over all parameters
("global", the paper's equations), with two reductions per block as written in the paper. It is
differentiable (meta-learning through the step) and vmappable. The fast doors share one
implementation, :mod:`koala_func.engine`, which computes :math:`S_k` from the first reduction.

For each filtered block, with :math:`H_k = g_k + \mathrm{wd}\,\theta_{k-1}`:

.. math::

    R &\leftarrow \alpha_R R + (1-\alpha_R)\,m \quad\text{(online R; or } R = r \text{ fixed)}\\
    \lambda_k &= \frac{H_k v_{k-1}^\top + Q\,H_k H_{k-1}^\top}{S_{k-1}}, \qquad
    \alpha_k = \frac{H_k H_{k-1}^\top}{\lVert H_{k-1}\rVert^2}\\
    w_k &= \frac{H_k v_{k-1}^\top}{\lVert H_{k-1}\rVert^2}
          - \frac{(H_k H_{k-1}^\top)(H_{k-1} v_{k-1}^\top)}{\lVert H_{k-1}\rVert^4}
          \quad (w_k = 0 \text{ for the asymmetric variant})\\
    v_k &= (\alpha_k - \lambda_k)\,v_{k-1} + Q\,(H_k - \lambda_k H_{k-1}) + w_k H_{k-1}\\
    S_k &= (v_k + Q H_k) H_k^\top + R\\
    \theta_k &= \theta_{k-1} - \eta\,(L_k - L^\ast)\,\frac{v_k + Q H_k}{S_k},
    \qquad L_k = L + \tfrac{\mathrm{wd}}{2}\lVert\theta_{k-1}\rVert^2

:math:`m` is the second moment of the per-sample residuals ``mean((l - L*)**2)`` (the image
scripts; ``L**2`` for a scalar loss) or their variance ``mean(l**2) - mean(l)**2`` (the language
model script), :math:`L^\ast` the ``loss_target`` (0). A block whose residual
:math:`L_k - L^\ast` is negative is refused: the step would move uphill.
At a block's first update :math:`v_0 = \sigma H_1`, :math:`H_0 = H_1` and
:math:`S_0 = H_0 v_0^\top + Q\lVert H_0\rVert^2 + R` (``sigma`` is the initial covariance
*variance*, the seed's :math:`\sigma_0^2`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDictBase

from koala_func.state import KoalaPPHyperparams, KoalaPPState, NestedKey, blocks_of

__all__ = ["reference_step"]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b, strict=True))


def _safe_denominator(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A refused denominator becomes 1 before the division, so that a skipped block yields
    # neither NaN values nor NaN gradients (torch.where alone would leak 0 * inf into backward).
    ok = torch.isfinite(den) & (den != 0)
    return torch.where(ok, den, torch.ones_like(den)), ok


def observation_noise(
    r_est: torch.Tensor, loss: torch.Tensor, hp: KoalaPPHyperparams, opt: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss ``L`` and this step's R (updated before use when online, else ``r``).

    A non-finite loss leaves the online estimate as it was (its blocks are refused anyway, as
    their ``L`` is not finite), so that one bad batch does not poison every later step.
    """
    loss = loss.to(hp.lr.dtype)
    L = loss.mean() if loss.dim() == 1 else loss
    residual = loss - hp.loss_target
    if opt.r_statistic == "variance":
        m = (loss - L).square().mean()
    else:
        m = residual.square().mean()
    if opt.r is None:
        R = hp.alpha_r * r_est + (1 - hp.alpha_r) * m
        return L, torch.where(torch.isfinite(R), R, r_est)
    return L, hp.r + torch.zeros_like(r_est)


def _filter_block(theta, g, v_prev, h_prev, s_prev, count, L, R, hp, symmetric: bool, eps):
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

    residual = L + 0.5 * wd * _dot(theta, theta) - hp.loss_target
    scale = hp.lr * residual / S
    new_theta = [ti - scale * di for ti, di in zip(theta, direction, strict=True)]

    grad_norm = torch.sqrt(_dot(g, g))
    finite = x_ok & s_prev_ok & S_ok & torch.isfinite(scale) & torch.isfinite(lam + alpha + w)
    active = grad_norm >= eps  # the released skip rule (NaN norms fail it too)
    ok = active & finite & (residual >= 0)  # a negative residual would move uphill
    tried = (grad_norm >= eps) | ~torch.isfinite(grad_norm)
    return new_theta, v, H, S, ok, tried


def reference_step(
    opt: Any,
    keys: list[NestedKey],
    params: TensorDictBase,
    grads: TensorDictBase,
    loss: torch.Tensor,
    state: KoalaPPState,
) -> tuple[TensorDictBase, KoalaPPState]:
    """One step of ``opt`` (a :class:`~koala_func.KoalaPPTransform`) over the float ``keys``.

    Inputs are not modified. A block with no gradient is left alone (structure, not values).
    ``opt.step`` calls it eagerly (after its checks); it is the ground truth of every door.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3))
        >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]))
        >>> new, state = reference_step(opt, ["w"], params, grads, torch.tensor(0.7),
        ...                             opt.init(params))
        >>> state.count.tolist(), bool((new["w"] != params["w"]).all())
        ([1], True)
    """
    hp = state.hyper
    cdt = hp.lr.dtype
    L, R = observation_noise(state.r_est, loss, hp, opt)

    new_params = params.copy()
    new_v, new_h = state.v.copy(), state.h_prev.copy()
    s_out, count_out, skipped_out = [], [], []
    for b, block in enumerate(blocks_of(keys, opt.granularity)):
        present = [k for k in block if grads.get(k, None) is not None]
        if not present:
            s_out.append(state.s[b])
            count_out.append(state.count[b])
            skipped_out.append(state.skipped[b])
            continue
        if opt.granularity == "tensor":
            block = present

        def flat(td, key):
            return td.get(key).reshape(-1).to(cdt)

        theta = [flat(params, k) for k in block]
        g = [
            flat(grads, k) if k in present else torch.zeros_like(t)
            for k, t in zip(block, theta, strict=True)
        ]
        # the stored state: a refused update keeps exactly this (not the first-step values)
        v_prev = [flat(state.v, k) for k in block]
        h_prev = [flat(state.h_prev, k) for k in block]
        new_theta, v, H, S, ok, tried = _filter_block(
            theta, g, v_prev, h_prev, state.s[b], state.count[b], L, R, hp, opt.symmetric, opt.eps
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

    def stack(items, like):
        return torch.stack(items) if items else like.clone()

    return new_params, state.replace(
        v=new_v,
        h_prev=new_h,
        s=stack(s_out, state.s),
        count=stack(count_out, state.count),
        skipped=stack(skipped_out, state.skipped),
        r_est=R,
        step=state.step + 1,
    )
