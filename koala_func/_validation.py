"""Argument checks shared by every optimizer builder, worded like torch.optim's."""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor

# name -> (message, predicate that flags a bad value); NaN is always bad.
_RULES = {
    "lr": ("Invalid learning rate: {}", lambda t: t < 0),
    "sigma": ("Invalid sigma value: {}", lambda t: t <= 0),
    "q": ("Invalid q value: {}", lambda t: t < 0),
    "r": ("Invalid r value: {}", lambda t: t <= 0),
    "alpha_r": ("Invalid alpha_r value: {}", lambda t: (t < 0) | (t >= 1)),
    "weight_decay": ("Invalid weight_decay value: {}", lambda t: t < 0),
    "loss_target": ("Invalid loss_target value: {}", lambda t: ~torch.isfinite(t)),
    "eps": ("Invalid epsilon value: {}", lambda t: t < 0),
}


def _as_float(name: str, x: Scalar) -> torch.Tensor:
    # Build time only: a host sync is fine here, never inside a step.
    if isinstance(x, bool) or not isinstance(x, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(x).__name__}")
    t = torch.as_tensor(x).detach()
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real number, got a tensor of dtype {t.dtype}")
    return t.to("cpu", torch.float64)


def check_hyperparameters(**values: Scalar | None) -> None:
    """Check the given hyperparameters (``r=None`` means an online R and is not checked).

    Raises ``TypeError`` naming the argument for a value that is not a number, and
    ``ValueError("Invalid learning rate: -1.0")``-style errors for values out of range.
    """
    for name, x in values.items():
        if x is None and name == "r":
            continue
        message, bad = _RULES[name]
        t = _as_float(name, x)
        if bool(torch.any(bad(t)) or torch.any(torch.isnan(t))):
            raise ValueError(message.format(x))


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})"
        )


def check_step_inputs(
    keys: list, params: dict, grads: dict, loss: torch.Tensor, n_lead: int = 0
) -> None:
    """Structural checks (keys, shapes, dtypes, loss rank) on leaf dicts; no values read."""
    if not isinstance(loss, torch.Tensor) or loss.dim() not in (n_lead, n_lead + 1):
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        what = "(0-d) or the per-sample losses (1-d)" if not n_lead else "[E] or [E, B]"
        raise ValueError(f"loss must be the minibatch mean {what}, got {shape}")
    extra = set(grads) - set(params)
    if extra:
        raise KeyError(f"grads hold keys that params lack: {sorted(map(str, extra))}")
    for key in keys:
        g = grads.get(key, None)
        if g is None:
            continue
        p = params[key]
        if g.shape != p.shape:
            raise ValueError(
                f"gradient shape {tuple(g.shape)} does not match parameter shape "
                f"{tuple(p.shape)} at key {key!r}"
            )
        if g.dtype != p.dtype:
            raise TypeError(
                f"gradient dtype {g.dtype} does not match parameter dtype {p.dtype} at key {key!r}"
            )


def check_state(keys: list, params: dict, v: dict, n_state_blocks: int, n_blocks: int) -> None:
    """Refuse a state built for other parameters, naming the key and the shapes."""
    for key in keys:
        sv = v.get(key, None)
        p = params[key]
        if sv is None:
            raise KeyError(
                f"the state has no entry for parameter {key!r}: it was built for other "
                "parameters (use opt.init(params))"
            )
        if sv.shape != p.shape:
            raise ValueError(
                f"state shape {tuple(sv.shape)} does not match parameter shape "
                f"{tuple(p.shape)} at key {key!r}: the state was built for other parameters"
            )
    if n_state_blocks != n_blocks:
        raise ValueError(
            f"the state has {n_state_blocks} blocks, these parameters have {n_blocks}: "
            "it was built for other parameters or another granularity"
        )
