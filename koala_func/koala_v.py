r"""KOALA-V, the predecessor of KOALA++: a Kalman filter with one scalar covariance.

Reference: Aram Davtyan, Sepehr Sameni, Llukman Cerkezi, Givi Meishvili, Adam Bielski, Paolo
Favaro, "KOALA: A Kalman Optimization Algorithm with Loss Adaptivity", AAAI 2022
(arXiv:2107.03331). It is the baseline that KOALA++ (Xia, Davtyan, Favaro, NeurIPS 2025,
arXiv:2506.04432) improves on: KOALA-V collapses the parameter covariance to
:math:`P = p\,I` with one scalar :math:`p` **shared by all parameter tensors**, where KOALA++
tracks the vector :math:`v_k = H_k P_{k-1}`.

One step, following the authors' released code (predict, then update each tensor, then shrink
the shared covariance by the largest per-tensor reduction):

.. math::

    R &\leftarrow \alpha_R R + (1-\alpha_R)\,m_2 \quad\text{(online R; or } R = r \text{ fixed)}\\
    p &\leftarrow p + Q \quad\text{(predict)}\\
    g'_b &= g_b + \mathrm{wd}\,\theta_b, \qquad s_b = p\,\lVert g'_b\rVert^2 + R\\
    \theta_b &\leftarrow \theta_b - \eta\,L_b\,\frac{p}{s_b}\,g_b,
    \qquad L_b = L + \tfrac{\mathrm{wd}}{2}\lVert\theta_b\rVert^2\\
    p &\leftarrow p - p^2 \max_b \frac{\lVert g'_b\rVert^2}{s_b}

The step moves along the raw gradient :math:`g_b`, not :math:`g'_b` (as the authors' code
does), while the filter's gain uses :math:`g'_b`. Blocks ``b`` are the floating-point tensors
of the parameters. A tensor whose raw gradient norm is below ``eps`` (or whose gradient is
missing, or whose update would be NaN or inf) is left unchanged and does not enter the max.
The prediction :math:`p \leftarrow p + Q` happens at every step. :math:`p` starts at ``sigma``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tensordict import TensorClass, TensorDictBase

from koala_func._validation import Scalar, check_hyperparameters, check_step_inputs
from koala_func.state import float_keys, leaves, scalar_dtype


def _loss_moments(loss: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean loss and the second moment feeding R (``L**2`` for a 0-d loss)."""
    loss = loss.to(dtype)
    if loss.dim() == 1:
        return loss.mean(), loss.square().mean()
    return loss, loss.square()


def _next_r(r_est: torch.Tensor, m2: torch.Tensor, hyper, online: bool) -> torch.Tensor:
    """R for this step: updated before use when online (a non-finite value keeps the old)."""
    if online:
        R = hyper.alpha_r * r_est + (1 - hyper.alpha_r) * m2
        return torch.where(torch.isfinite(R), R, r_est)
    return hyper.r + torch.zeros_like(r_est)


__all__ = ["KoalaVHyperparams", "KoalaVState", "KoalaVTransform", "koala_v"]


class KoalaVHyperparams(TensorClass["nocast", "frozen"]):
    """KOALA-V hyperparameters as 0-d tensors (``[E]`` for an ensemble), like KOALA++'s.

    ``sigma`` is the initial value of the shared covariance :math:`p`; ``r`` is the fixed
    observation noise, unused when R is estimated online.
    """

    lr: torch.Tensor
    sigma: torch.Tensor
    q: torch.Tensor
    r: torch.Tensor
    alpha_r: torch.Tensor
    weight_decay: torch.Tensor


class KoalaVState(TensorClass["nocast", "frozen"]):
    """The KOALA-V state: a few scalars, no per-parameter tensors (``T`` tensors optimized).

    - ``p``: 0-d, the shared scalar covariance (:math:`P = p\\,I`), after the last update.
    - ``count``: ``[T]`` int64, updates applied to each tensor.
    - ``skipped``: ``[T]`` int64, updates refused because a value was NaN or inf.
    - ``r_est``: 0-d, the observation noise R used by the last step.
    - ``step``: 0-d int64, calls to ``step``.
    - ``hyper``: :class:`KoalaVHyperparams`.
    """

    p: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    r_est: torch.Tensor
    step: torch.Tensor
    hyper: KoalaVHyperparams

    def with_hyperparams(self, **values: Scalar) -> KoalaVState:
        """A copy with some hyperparameters replaced, e.g. ``state.with_hyperparams(lr=0.1)``.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> state = koala_v().init(TensorDict(w=torch.ones(2)))
            >>> state.with_hyperparams(lr=0.25).hyper.lr
            tensor(0.2500)
        """
        ref = self.hyper.lr
        new = {k: _as_scalar(v, ref.dtype, ref.device) for k, v in values.items()}
        return self.replace(hyper=self.hyper.replace(**new))


def _as_scalar(x: Scalar, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # torch.tensor(float, dtype=...) rounds once; as_tensor(float).to(float64) would round
    # through float32 first.
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype, device=device).clone()
    return torch.tensor(x, dtype=dtype, device=device)


def _safe(den: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ok = torch.isfinite(den) & (den != 0)
    return torch.where(ok, den, torch.ones_like(den)), ok


@dataclass(frozen=True, eq=False)
class KoalaVTransform:
    """The KOALA-V optimizer: two pure functions, :meth:`init` and :meth:`step`.

    Build it with :func:`koala_v`. The hyperparameters here are the initial values that
    :meth:`init` writes into the state; :meth:`step` reads them from the state only, so the
    step compiles once and vmaps over ensembles (no host syncs, no branches on values).
    """

    lr: Scalar = 1.0
    sigma: Scalar = 0.1
    q: Scalar = 0.1
    r: Scalar | None = None
    alpha_r: Scalar = 0.9
    weight_decay: Scalar = 0.0
    eps: float = 1e-9
    differentiable: bool = False

    @property
    def online_r(self) -> bool:
        return self.r is None

    def init(self, params: TensorDictBase) -> KoalaVState:
        """A fresh state for ``params``: ``p = sigma``, counters at zero.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> koala_v(sigma=0.2).init(TensorDict(w=torch.ones(3), b=torch.zeros(1))).p
            tensor(0.2000)
        """
        keys = float_keys(params)
        dtype = scalar_dtype(params)
        device = params.get(keys[0]).device if keys else params.device or torch.device("cpu")

        def scalar(x: Scalar) -> torch.Tensor:
            return _as_scalar(x, dtype, device)

        r = 1.0 if self.r is None else self.r
        return KoalaVState(
            p=scalar(self.sigma),
            count=torch.zeros(len(keys), dtype=torch.int64, device=device),
            skipped=torch.zeros(len(keys), dtype=torch.int64, device=device),
            r_est=scalar(r),
            step=torch.zeros((), dtype=torch.int64, device=device),
            hyper=KoalaVHyperparams(
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
        state: KoalaVState,
    ) -> tuple[TensorDictBase, KoalaVState]:
        """One KOALA-V update: returns new parameters and a new state; inputs are not modified.

        Args:
            params: the parameters (TensorDict; non-float leaves pass through).
            grads: gradients of the mean loss (a subset of the float keys of ``params``).
            loss: the minibatch mean loss (0-d) or the per-sample losses (1-d); per-sample
                losses feed the online R with their second moment, a scalar with ``L**2``.
            state: from :meth:`init` or a previous :meth:`step`.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> opt = koala_v(lr=0.5)
            >>> params = TensorDict(w=torch.ones(3))
            >>> state = opt.init(params)
            >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]))
            >>> params, state = opt.step(params, grads, torch.tensor(0.7), state)
            >>> bool((params["w"] < 1).any()), state.count.tolist()
            (True, [1])
        """
        keys = float_keys(params)
        check_step_inputs(keys, leaves(params), leaves(grads), loss)
        ctx = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with ctx:
            return self._step(keys, params, grads, loss, state)

    def _step(self, keys, params, grads, loss, state):
        hp = state.hyper
        cdt = hp.lr.dtype
        L, m2 = _loss_moments(loss, cdt)
        R = _next_r(state.r_est, m2, hp, self.online_r)
        wd = hp.weight_decay
        p = state.p + hp.q  # predict: P <- P + Q I

        new_params = params.copy()
        shrink, count_out, skipped_out = [], [], []
        for b, key in enumerate(keys):
            g_raw = grads.get(key, None)
            if g_raw is None:  # structure, not values: a tensor without gradient is skipped
                count_out.append(state.count[b])
                skipped_out.append(state.skipped[b])
                continue
            theta_raw = params.get(key)
            theta, g = theta_raw.to(cdt), g_raw.to(cdt)
            g_wd = g + wd * theta  # g' feeds the gain; the step follows the raw g
            gn = (g_wd * g_wd).sum()
            s, s_ok = _safe(p * gn + R)
            L_blk = L + 0.5 * wd * (theta * theta).sum()
            scale = hp.lr * L_blk * p / s
            grad_norm = torch.sqrt((g * g).sum())
            active = grad_norm >= self.eps  # the released skip rule (NaN norms fail it too)
            tried = active | ~torch.isfinite(grad_norm)
            ok = active & s_ok & torch.isfinite(scale) & torch.isfinite(gn)
            new_theta = torch.where(ok, theta - scale * g, theta)
            new_params.set(key, new_theta.to(theta_raw.dtype))
            shrink.append(torch.where(ok, gn / s, torch.zeros_like(gn)))
            count_out.append(state.count[b] + ok.long())
            skipped_out.append(state.skipped[b] + (tried & ~ok).long())

        if shrink:
            p = p - p * p * torch.stack(shrink).amax(-1)
        return new_params, state.replace(
            p=p,
            count=torch.stack(count_out) if count_out else state.count.clone(),
            skipped=torch.stack(skipped_out) if skipped_out else state.skipped.clone(),
            r_est=R,
            step=state.step + 1,
        )


def koala_v(
    *,
    lr: Scalar = 1.0,
    sigma: Scalar = 0.1,
    q: Scalar = 0.1,
    r: Scalar | None = None,
    alpha_r: Scalar = 0.9,
    weight_decay: Scalar = 0.0,
    eps: float = 1e-9,
    differentiable: bool = False,
) -> KoalaVTransform:
    r"""Build a KOALA-V optimizer (Davtyan et al., AAAI 2022), KOALA++'s predecessor.

    Per step: predict :math:`p \leftarrow p + Q`; for each tensor ``b`` with
    :math:`g'_b = g_b + \mathrm{wd}\,\theta_b` and :math:`s_b = p\lVert g'_b\rVert^2 + R`, step
    :math:`\theta_b \leftarrow \theta_b - \eta L_b (p / s_b)\, g_b`; then
    :math:`p \leftarrow p - p^2 \max_b \lVert g'_b\rVert^2 / s_b`. The scalar covariance
    :math:`p` is shared by every tensor.

    Args:
        lr: learning rate :math:`\eta`.
        sigma: initial covariance :math:`p_0` (:math:`P_0 = \sigma I`).
        q: process noise :math:`Q`, added to :math:`p` before each update.
        r: fixed observation noise :math:`R`; ``None`` estimates it online from the loss.
        alpha_r: smoothing of the online R estimate (which starts at 1.0).
        weight_decay: L2 coefficient coupled into the filter's gain and the block loss.
        eps: tensors whose raw gradient norm is below ``eps`` are skipped.
        differentiable: let autograd flow through the step (else it runs under ``no_grad``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = koala_v(lr=1.0, sigma=0.1, q=0.1)
        >>> params = TensorDict(w=torch.tensor([1.0, -2.0]))
        >>> state = opt.init(params)
        >>> for _ in range(50):  # minimise L = |w|^2 / 2, gradient w
        ...     loss = 0.5 * (params["w"] ** 2).sum()
        ...     params, state = opt.step(params, TensorDict(w=params["w"]), loss, state)
        >>> bool(params["w"].abs().max() < 0.5)
        True
    """
    check_hyperparameters(
        lr=lr, sigma=sigma, q=q, r=r, alpha_r=alpha_r, weight_decay=weight_decay, eps=eps
    )
    return KoalaVTransform(
        lr=lr,
        sigma=sigma,
        q=q,
        r=r,
        alpha_r=alpha_r,
        weight_decay=weight_decay,
        eps=float(eps),
        differentiable=bool(differentiable),
    )
