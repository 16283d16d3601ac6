"""An independent KOALA++ written from ../shared/design/algorithm.md, for parity tests.

Deliberately in the shape of the authors' released class (mutable per-block state that is
``None`` until the block's first update, Python branches, two reductions for S), and it imports
nothing from koala_func: it is the yardstick, not a copy of the package's math.
"""

from __future__ import annotations

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
        symmetric=True,
        granularity="tensor",
        eps=1e-9,
    ):
        self.lr, self.sigma, self.q, self.wd = lr, sigma, q, weight_decay
        self.fixed_r, self.alpha_r, self.R = r, alpha_r, 1.0
        self.symmetric, self.eps = symmetric, eps
        self.blocks = [[n] for n in names] if granularity == "tensor" else [list(names)]
        self.v = [None] * len(self.blocks)
        self.H = [None] * len(self.blocks)
        self.S = [None] * len(self.blocks)

    def update(self, params: dict, grads: dict, loss: torch.Tensor) -> None:
        """Updates ``params`` (name -> tensor) in place, as the released ``update``."""
        if loss.dim() == 1:
            L, m2 = loss.mean(), (loss**2).mean()
        else:
            L, m2 = loss, loss**2
        if self.fixed_r is None:
            self.R = self.alpha_r * self.R + (1 - self.alpha_r) * m2
            R = self.R
        else:
            R = self.fixed_r
        Q, wd = self.q, self.wd
        for b, names in enumerate(self.blocks):
            g = [grads[n].reshape(-1) for n in names if n in grads]
            if not g or torch.cat(g).norm(2) < self.eps:
                continue
            g = torch.cat(
                [
                    grads[n].reshape(-1) if n in grads else torch.zeros_like(params[n]).reshape(-1)
                    for n in names
                ]
            )
            theta = torch.cat([params[n].reshape(-1) for n in names])
            H = g + wd * theta
            if self.v[b] is None:
                self.v[b] = self.sigma * H
                self.H[b] = H
                self.S[b] = self.H[b] @ self.v[b] + Q * (self.H[b] @ self.H[b]) + R
            v_prev, H_prev, S_prev = self.v[b], self.H[b], self.S[b]
            x = H_prev @ H_prev
            y = H_prev @ v_prev
            lam = (H @ v_prev + Q * (H @ H_prev)) / S_prev
            alpha = (H @ H_prev) / x
            w = (H @ v_prev) / x - (H @ H_prev) * y / x**2 if self.symmetric else 0.0
            v = (alpha - lam) * v_prev + Q * (H - lam * H_prev) + w * H_prev
            S = (v + Q * H) @ H + R
            L_blk = L + 0.5 * wd * (theta @ theta)
            theta = theta - self.lr * L_blk * (v + Q * H) / S
            self.v[b], self.H[b], self.S[b] = v, H, S
            offset = 0
            for n in names:
                k = params[n].numel()
                params[n] = theta[offset : offset + k].view_as(params[n])
                offset += k
