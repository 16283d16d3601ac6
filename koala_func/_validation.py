"""Argument checks shared by every optimizer builder, worded like torch.optim's."""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

Scalar = float | torch.Tensor


def _as_float(x: Scalar) -> torch.Tensor:
    # Build time only: a host sync is fine here, never inside a step.
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def check_hyperparameters(
    *,
    lr: Scalar,
    sigma: Scalar,
    q: Scalar,
    r: Scalar | None,
    alpha_r: Scalar,
    weight_decay: Scalar,
    eps: float,
) -> None:
    def bad(x: Scalar, cond) -> bool:
        t = _as_float(x)
        return bool(torch.any(cond(t)) or torch.any(torch.isnan(t)))

    if bad(lr, lambda t: t < 0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if bad(sigma, lambda t: t <= 0):
        raise ValueError(f"Invalid sigma value: {sigma}")
    if bad(q, lambda t: t < 0):
        raise ValueError(f"Invalid q value: {q}")
    if r is not None and bad(r, lambda t: t <= 0):
        raise ValueError(f"Invalid r value: {r}")
    if bad(alpha_r, lambda t: (t < 0) | (t >= 1)):
        raise ValueError(f"Invalid alpha_r value: {alpha_r}")
    if bad(weight_decay, lambda t: t < 0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not eps >= 0:
        raise ValueError(f"Invalid epsilon value: {eps}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})"
        )


def check_step_inputs(
    keys: list, params: TensorDictBase, grads: TensorDictBase, loss: torch.Tensor
) -> None:
    """Structural checks (keys, shapes, dtypes, loss rank): no tensor values are read."""
    if not isinstance(loss, torch.Tensor) or loss.dim() not in (0, 1):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss must be the minibatch mean (0-d) or the per-sample losses (1-d), got {shape}"
        )
    extra = set(grads.keys(include_nested=True, leaves_only=True)) - set(
        params.keys(include_nested=True, leaves_only=True)
    )
    if extra:
        raise KeyError(f"grads hold keys that params lack: {sorted(map(str, extra))}")
    for key in keys:
        g = grads.get(key, None)
        if g is None:
            continue
        p = params.get(key)
        if g.shape != p.shape:
            raise ValueError(
                f"gradient shape {tuple(g.shape)} does not match parameter shape "
                f"{tuple(p.shape)} at key {key!r}"
            )
        if g.dtype != p.dtype:
            raise TypeError(
                f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype} at key {key!r}"
            )
