r"""Functional baselines in KOALA++'s ``init``/``step`` shape: Adam, AdamW and SGD with momentum.

They exist so that the CLI, the reproduction script and user code can train KOALA++ and the
optimizers everyone knows through one loop (and one ``torch.vmap`` over seeds or learning
rates). They follow ``torch.optim.Adam``, ``torch.optim.AdamW`` and ``torch.optim.SGD``
(dampening 0, no Nesterov) exactly, with the hyperparameters as 0-d tensors in the state.
``step`` takes the loss only to keep the signature of
:meth:`koala_func.KoalaPPTransform.step`; it is unused.

Adam (Kingma and Ba, 2015), with :math:`t` the step count and
:math:`g = \nabla L + \mathrm{wd}\,\theta` (Adam) or
:math:`\theta \leftarrow (1 - \eta\,\mathrm{wd})\,\theta` first (AdamW, Loshchilov and Hutter,
2019):

.. math::

    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad u \leftarrow \beta_2 u + (1-\beta_2) g^2\\
    \theta &\leftarrow \theta - \eta\,\frac{m / (1-\beta_1^t)}{\sqrt{u / (1-\beta_2^t)} + \epsilon}

SGD with momentum: :math:`b \leftarrow \mu b + g`, :math:`\theta \leftarrow \theta - \eta b`
with :math:`g = \nabla L + \mathrm{wd}\,\theta`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorClass, TensorDict, TensorDictBase

from koala_func.state import float_keys, scalar_dtype

__all__ = [
    "AdamHyperparams",
    "AdamState",
    "AdamTransform",
    "SGDHyperparams",
    "SGDState",
    "SGDTransform",
    "adam",
    "adamw",
    "sgd",
]


def _scalar(x: float | torch.Tensor, params: TensorDictBase) -> torch.Tensor:
    keys = float_keys(params)
    device = params.get(keys[0]).device if keys else torch.device("cpu")
    dtype = scalar_dtype(params)
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype=dtype, device=device).clone()
    return torch.tensor(x, dtype=dtype, device=device)


def _zeros_like(params: TensorDictBase) -> TensorDict:
    keys = float_keys(params)
    if not keys:
        return TensorDict()
    return params.select(*keys).apply(lambda p: torch.zeros_like(p).detach())


class AdamHyperparams(TensorClass["nocast", "frozen"]):
    """Adam's hyperparameters as 0-d tensors (``[E]`` in an ensemble)."""

    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    weight_decay: torch.Tensor


class AdamState(TensorClass["nocast", "frozen"]):
    """Adam's state: first moment ``m``, second moment ``u`` (TensorDicts like the
    parameters), ``step`` (0-d int64) and ``hyper``."""

    m: TensorDict
    u: TensorDict
    step: torch.Tensor
    hyper: AdamHyperparams


@dataclass(frozen=True, eq=False)
class AdamTransform:
    """Functional Adam / AdamW: :meth:`init` and a pure :meth:`step` (build with :func:`adam`)."""

    lr: float | torch.Tensor = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float | torch.Tensor = 0.0
    decoupled: bool = False

    def init(self, params: TensorDictBase) -> AdamState:
        """Zero moments for the float leaves of ``params``."""
        zeros = _zeros_like(params)
        return AdamState(
            m=zeros,
            u=zeros.clone(),
            step=torch.zeros((), dtype=torch.int64, device=_scalar(0.0, params).device),
            hyper=AdamHyperparams(
                lr=_scalar(self.lr, params),
                beta1=_scalar(self.betas[0], params),
                beta2=_scalar(self.betas[1], params),
                eps=_scalar(self.eps, params),
                weight_decay=_scalar(self.weight_decay, params),
            ),
        )

    @torch.no_grad()
    def step(
        self,
        params: TensorDictBase,
        grads: TensorDictBase,
        loss: torch.Tensor | None,
        state: AdamState,
    ) -> tuple[TensorDictBase, AdamState]:
        """One Adam step; leaves without a gradient are left unchanged (``loss`` is unused).

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> opt = adam(lr=0.1)
            >>> params = TensorDict(w=torch.ones(2))
            >>> state = opt.init(params)
            >>> params, state = opt.step(params, TensorDict(w=torch.ones(2)), None, state)
            >>> params["w"]  # the first Adam step moves each entry by lr
            tensor([0.9000, 0.9000])
        """
        hp = state.hyper
        t = state.step + 1
        tf = t.to(hp.lr.dtype)
        bc1 = 1 - hp.beta1**tf
        bc2 = 1 - hp.beta2**tf
        new_p, new_m, new_u = params.copy(), state.m.copy(), state.u.copy()
        for key in float_keys(params):
            g = grads.get(key, None)
            if g is None:
                continue
            p = params.get(key)
            if self.decoupled:
                p = p * (1 - hp.lr * hp.weight_decay)
            else:
                g = g + hp.weight_decay * p
            m = hp.beta1 * state.m.get(key) + (1 - hp.beta1) * g
            u = hp.beta2 * state.u.get(key) + (1 - hp.beta2) * g * g
            denom = (u / bc2).sqrt() + hp.eps
            new_p.set(key, (p - hp.lr * (m / bc1) / denom).to(p.dtype))
            new_m.set(key, m)
            new_u.set(key, u)
        return new_p, state.replace(m=new_m, u=new_u, step=t)


def adam(
    *,
    lr: float | torch.Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.0,
) -> AdamTransform:
    """Functional Adam, equal to ``torch.optim.Adam`` (L2 weight decay added to the gradient).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = adam(lr=1e-3)
        >>> state = opt.init(TensorDict(w=torch.zeros(3)))
        >>> state.hyper.lr
        tensor(0.0010)
    """
    if not bool((torch.as_tensor(lr) >= 0).all()):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameters: {betas}")
    return AdamTransform(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def adamw(
    *,
    lr: float | torch.Tensor = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 1e-2,
) -> AdamTransform:
    r"""Functional AdamW, equal to ``torch.optim.AdamW``: decoupled decay
    :math:`\theta \leftarrow (1-\eta\,\mathrm{wd})\theta` before the Adam update.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = adamw(lr=0.1, weight_decay=0.5)
        >>> params = TensorDict(w=torch.ones(1))
        >>> params, _ = opt.step(params, TensorDict(w=torch.zeros(1)), None, opt.init(params))
        >>> params["w"]  # only the decay acted: 1 * (1 - 0.1 * 0.5)
        tensor([0.9500])
    """
    opt = adam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return AdamTransform(
        lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, decoupled=True
    )


class SGDHyperparams(TensorClass["nocast", "frozen"]):
    """SGD's hyperparameters as 0-d tensors (``[E]`` in an ensemble)."""

    lr: torch.Tensor
    momentum: torch.Tensor
    weight_decay: torch.Tensor


class SGDState(TensorClass["nocast", "frozen"]):
    """SGD's state: the ``momentum_buffer`` (TensorDict like the parameters), ``step`` and
    ``hyper``."""

    momentum_buffer: TensorDict
    step: torch.Tensor
    hyper: SGDHyperparams


@dataclass(frozen=True, eq=False)
class SGDTransform:
    """Functional SGD with heavy-ball momentum (build with :func:`sgd`)."""

    lr: float | torch.Tensor = 0.1
    momentum: float | torch.Tensor = 0.9
    weight_decay: float | torch.Tensor = 0.0

    def init(self, params: TensorDictBase) -> SGDState:
        """A zero momentum buffer for the float leaves of ``params``."""
        return SGDState(
            momentum_buffer=_zeros_like(params),
            step=torch.zeros((), dtype=torch.int64, device=_scalar(0.0, params).device),
            hyper=SGDHyperparams(
                lr=_scalar(self.lr, params),
                momentum=_scalar(self.momentum, params),
                weight_decay=_scalar(self.weight_decay, params),
            ),
        )

    @torch.no_grad()
    def step(
        self,
        params: TensorDictBase,
        grads: TensorDictBase,
        loss: torch.Tensor | None,
        state: SGDState,
    ) -> tuple[TensorDictBase, SGDState]:
        """One SGD step: :math:`b \\leftarrow \\mu b + g`, then
        :math:`\\theta \\leftarrow \\theta - \\eta b`.

        The buffer starts at zero, so the first step is :math:`b = g` as in ``torch.optim.SGD``.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> opt = sgd(lr=0.5, momentum=0.9)
            >>> params = TensorDict(w=torch.ones(1))
            >>> state = opt.init(params)
            >>> for _ in range(2):
            ...     params, state = opt.step(params, TensorDict(w=torch.ones(1)), None, state)
            >>> params["w"]  # 1 - 0.5 * 1 - 0.5 * 1.9
            tensor([-0.4500])
        """
        hp = state.hyper
        new_p, new_b = params.copy(), state.momentum_buffer.copy()
        for key in float_keys(params):
            g = grads.get(key, None)
            if g is None:
                continue
            p = params.get(key)
            g = g + hp.weight_decay * p
            b = hp.momentum * state.momentum_buffer.get(key) + g
            new_p.set(key, (p - hp.lr * b).to(p.dtype))
            new_b.set(key, b)
        return new_p, state.replace(momentum_buffer=new_b, step=state.step + 1)


def sgd(
    *,
    lr: float | torch.Tensor = 0.1,
    momentum: float | torch.Tensor = 0.9,
    weight_decay: float | torch.Tensor = 0.0,
) -> SGDTransform:
    """Functional SGD with momentum, equal to ``torch.optim.SGD`` (dampening 0, no Nesterov).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> sgd(lr=0.1).init(TensorDict(w=torch.zeros(2))).hyper.momentum
        tensor(0.9000)
    """
    if not bool((torch.as_tensor(lr) >= 0).all()):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not bool((torch.as_tensor(momentum) >= 0).all()):
        raise ValueError(f"Invalid momentum value: {momentum}")
    return SGDTransform(lr=lr, momentum=momentum, weight_decay=weight_decay)
