"""An independent KOALA++ written from ../shared/design/algorithm.md, for parity tests.

Deliberately in the shape of the authors' released class (mutable per-block state that is
``None`` until the block's first update, Python branches, two reductions for S), and it imports
nothing from koala_func: it is the yardstick, not a copy of the package's math.

Beyond the released class it models what the package documents:

- ``r_statistic``: the online R is fed ``mean((l - target)**2)`` (``"second_moment"``; ``L**2``
  for a scalar loss) or ``mean(l**2) - mean(l)**2`` (``"variance"``, per-sample losses only);
  a non-finite value leaves R as it was;
- ``loss_target``: the residual ``L_blk - target`` drives the step; a block whose residual is
  negative is refused;
- refusals: a block whose update meets a NaN, an inf or a zero denominator, or a negative
  residual, is left unchanged and counted in ``skipped``; a block whose raw gradient norm is
  below ``eps`` (or with no gradient at all) is left unchanged and not counted.
"""

from __future__ import annotations

import math

import torch


class ReferenceKoalaPP:
    def __init__(
        self,
        names,
        *,
        lr=1.0,
        sigma=0.1,
        q=0.1,
        r=None,
        alpha_r=0.9,
        weight_decay=0.0,
        loss_target=0.0,
        symmetric=True,
        granularity="tensor",
        r_statistic="second_moment",
        eps=1e-9,
    ):
        self.lr, self.sigma, self.q, self.wd = lr, sigma, q, weight_decay
        self.fixed_r, self.alpha_r, self.R = r, alpha_r, 1.0
        self.target, self.r_statistic = loss_target, r_statistic
        self.symmetric, self.eps = symmetric, eps
        self.blocks = [[n] for n in names] if granularity == "tensor" else [list(names)]
        self.v = [None] * len(self.blocks)
        self.H = [None] * len(self.blocks)
        self.S = [None] * len(self.blocks)
        self.count = [0] * len(self.blocks)
        self.skipped = [0] * len(self.blocks)
        self.steps = 0

    def _noise(self, loss):
        if loss.dim() == 1:
            L = loss.mean()
            if self.r_statistic == "variance":
                m = (loss**2).mean() - L**2
            else:
                m = ((loss - self.target) ** 2).mean()
        else:
            if self.r_statistic == "variance" and self.fixed_r is None:
                raise ValueError("the variance needs per-sample losses")
            L, m = loss, (loss - self.target) ** 2
        if self.fixed_r is not None:
            return L, self.fixed_r
        R = self.alpha_r * self.R + (1 - self.alpha_r) * m
        if math.isfinite(float(R)):
            self.R = R
        return L, self.R

    def update(self, params: dict, grads: dict, loss: torch.Tensor) -> None:
        """Updates ``params`` (name -> tensor) in place, as the released ``update``."""
        self.steps += 1
        L, R = self._noise(loss)
        Q, wd = self.q, self.wd
        for b, names in enumerate(self.blocks):
            g = [grads[n].reshape(-1) for n in names if grads.get(n) is not None]
            if not g:
                continue
            norm = float(torch.cat(g).norm(2))
            if not norm >= self.eps:
                self.skipped[b] += 0 if math.isfinite(norm) else 1
                continue
            g = torch.cat(
                [
                    grads[n].reshape(-1)
                    if grads.get(n) is not None
                    else torch.zeros_like(params[n]).reshape(-1)
                    for n in names
                ]
            )
            theta = torch.cat([params[n].reshape(-1) for n in names])
            H = g + wd * theta
            if self.v[b] is None:
                v_prev, H_prev = self.sigma * H, H
                S_prev = H_prev @ v_prev + Q * (H_prev @ H_prev) + R
            else:
                v_prev, H_prev, S_prev = self.v[b], self.H[b], self.S[b]
            x = H_prev @ H_prev
            y = H_prev @ v_prev
            lam = (H @ v_prev + Q * (H @ H_prev)) / S_prev
            alpha = (H @ H_prev) / x
            w = (H @ v_prev) / x - (H @ H_prev) * y / x**2 if self.symmetric else 0.0
            v = (alpha - lam) * v_prev + Q * (H - lam * H_prev) + w * H_prev
            S = (v + Q * H) @ H + R
            residual = L + 0.5 * wd * (theta @ theta) - self.target
            scale = self.lr * residual / S
            checks = (x, S_prev, S)
            finite = all(math.isfinite(float(d)) and float(d) != 0 for d in checks) and all(
                math.isfinite(float(t)) for t in (scale, lam, alpha, w)
            )
            if not finite or not float(residual) >= 0:
                self.skipped[b] += 1
                continue
            theta = theta - scale * (v + Q * H)
            self.v[b], self.H[b], self.S[b] = v, H, S
            self.count[b] += 1
            offset = 0
            for n in names:
                k = params[n].numel()
                params[n] = theta[offset : offset + k].view_as(params[n])
                offset += k
