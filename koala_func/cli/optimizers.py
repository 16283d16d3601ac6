"""The optimizers of the command line, by name, with their default lr and how it was chosen."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from koala_func import koala_pp, koala_v
from koala_func.baselines import adam, adamw, sgd

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "LR_GRIDS",
    "OPTIMIZERS",
    "WEIGHT_DECAY",
    "OptimizerSpec",
    "make_optimizer",
]

#: The released vision setting's weight decay (L2), used for every optimizer but AdamW.
WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer of the CLI: a builder ``lr -> transform``, its default lr, and how
    that default was chosen (the tuning budget it got).

    Examples:
        >>> spec = OPTIMIZERS["adam"]
        >>> spec.lr, type(spec.build(spec.lr)).__name__
        (0.01, 'AdamTransform')
    """

    label: str
    build: Callable[[float], object]
    lr: float
    tuning: str


#: Tuning budget of every default lr below: the best of a 5-point lr grid (2 seeds, 20 epochs,
#: MLP, on a validation split of the digits training set). Every other hyperparameter is its
#: published default.
TUNING = "best of a 5-point lr grid (2 seeds, 20 epochs, digits MLP, validation split)"
#: The lr grid of each optimizer (5 points, log-spaced around the default).
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "koala++": (0.1, 0.3, 1.0, 2.0, 4.0),
    "koala++-asym": (0.1, 0.3, 1.0, 2.0, 4.0),
    "koala-v": (0.1, 0.3, 1.0, 2.0, 4.0),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (0.01, 0.03, 0.1, 0.3, 1.0),
}

#: Every optimizer of the CLI, by the name its ``--optimizers`` option takes.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "koala++": OptimizerSpec(
        "KOALA++ (symmetric)",
        lambda lr: koala_pp(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY),
        2.0,
        TUNING + "; sigma = q = 0.1 and online R as released (released vision lr: 1.0)",
    ),
    "koala++-asym": OptimizerSpec(
        "KOALA++ (asymmetric)",
        lambda lr: koala_pp(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY, symmetric=False),
        2.0,
        TUNING + "; as symmetric KOALA++ without the w term",
    ),
    "koala-v": OptimizerSpec(
        "KOALA-V",
        lambda lr: koala_v(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY),
        2.0,
        TUNING + "; sigma = q = 0.1 and online R",
    ),
    "adam": OptimizerSpec(
        "Adam",
        lambda lr: adam(lr=lr, weight_decay=WEIGHT_DECAY),
        1e-2,
        TUNING + "; betas (0.9, 0.999) (torch's default lr: 1e-3)",
    ),
    "adamw": OptimizerSpec(
        "AdamW",
        lambda lr: adamw(lr=lr, weight_decay=1e-2),
        1e-2,
        TUNING + "; weight decay 1e-2",
    ),
    "sgd": OptimizerSpec(
        "SGD + momentum 0.9",
        lambda lr: sgd(lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY),
        0.3,
        TUNING + "; momentum 0.9",
    ),
}
#: What ``koala-func train`` runs without ``--optimizers``.
DEFAULT_OPTIMIZERS = ("koala++", "koala++-asym", "koala-v", "adam", "sgd")


def make_optimizer(name: str, lr: float | None = None):
    """The functional optimizer registered as ``name`` in :data:`OPTIMIZERS`.

    Examples:
        >>> make_optimizer("koala++").symmetric, make_optimizer("koala++-asym").symmetric
        (True, False)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    spec = OPTIMIZERS[name]
    return spec.build(spec.lr if lr is None else lr)
