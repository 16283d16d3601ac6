"""koala_func: the KOALA++ Kalman-filter optimizer as a pure function over TensorDicts."""

from koala_func import checkpoint
from koala_func.functional import params_of, per_sample_loss, value_and_grad
from koala_func.koala_pp import KoalaPPHyperparams, KoalaPPState, KoalaPPTransform, koala_pp
from koala_func.optim import KoalaPP

__all__ = [
    "KoalaPP",
    "KoalaPPHyperparams",
    "KoalaPPState",
    "KoalaPPTransform",
    "checkpoint",
    "koala_pp",
    "params_of",
    "per_sample_loss",
    "value_and_grad",
]
__version__ = "0.1.0"
