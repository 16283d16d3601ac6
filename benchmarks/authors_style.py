"""An eager per-tensor KOALA++ loop shaped like the authors' released optimizer class.

A re-implementation, for timing only, of the tensor operations of ``KOALAPlusPlus.update`` in
the authors' repository (Sumxiaa/KOALA_Plus_Plus; Xia, Davtyan, Favaro, NeurIPS 2025,
arXiv:2506.04432), following /work/shared/design/algorithm.md: a Python loop over parameters,
a host-synchronising skip test ``p.grad.norm(2) < eps``, lazily created per-parameter state,
``torch.dot`` for each product, and a second reduction for ``S``. It is not used by the
library; the library's results are checked against ``koala_func.KoalaPPTransform.step``.
"""

from __future__ import annotations

import torch


class AuthorsStyleKoalaPP:
    def __init__(self, params, lr=1.0, sigma=0.1, q=0.1, r=None, alpha_r=0.9, weight_decay=0.0):
        self.params = list(params)
        self.lr, self.sigma, self.q, self.wd = lr, sigma, q, weight_decay
        self.fixed_r, self.alpha_r = r, alpha_r
        self.R = torch.tensor(1.0)
        self.state: dict[torch.Tensor, dict] = {}

    @torch.no_grad()
    def update(self, loss: torch.Tensor) -> None:
        """One step; ``loss`` is the minibatch mean (0-d); grads are read from ``p.grad``."""
        m2 = loss**2
        if self.fixed_r is None:
            self.R = self.alpha_r * self.R + (1 - self.alpha_r) * m2
        R = self.R if self.fixed_r is None else self.fixed_r
        Q, wd = self.q, self.wd
        for p in self.params:
            if p.grad is None:
                continue
            if p.grad.norm(2) < 1e-9:  # host sync, as released
                continue
            g = p.grad.view(-1)
            theta = p.view(-1)
            H = g + wd * theta
            st = self.state.setdefault(p, {})
            if "v" not in st:
                st["v"] = self.sigma * H
                st["H_prev"] = H.clone()
                st["S"] = torch.dot(st["H_prev"], st["v"]) + Q * torch.dot(H, H) + R
            v_prev, H_prev, S_prev = st["v"], st["H_prev"], st["S"]
            x = torch.dot(H_prev, H_prev)
            y = torch.dot(H_prev, v_prev)
            hh_p = torch.dot(H, H_prev)
            hv_p = torch.dot(H, v_prev)
            lam = (hv_p + Q * hh_p) / S_prev
            alpha = hh_p / x
            w = hv_p / x - hh_p * y / x**2
            v = (alpha - lam) * v_prev + Q * (H - lam * H_prev) + w * H_prev
            d = v + Q * H
            S = torch.dot(d, H) + R
            L_blk = loss + 0.5 * wd * theta.norm(2) ** 2
            theta.sub_(self.lr * L_blk * d / S)
            st["v"], st["H_prev"], st["S"] = v, H, S
