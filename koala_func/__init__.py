"""koala_func: the KOALA++ Kalman-filter optimizer as a pure function over TensorDicts.

The reference step lives in :mod:`koala_func.koala_pp`; the packed, compiled fast path in
:mod:`koala_func.packed`; ensembles and sweeps in :mod:`koala_func.ensemble`; the
``torch.optim`` adapter in :mod:`koala_func.optim`. The sharded step for FSDP2 is imported on
demand from :mod:`koala_func.distributed` (it pulls in ``torch.distributed``).
"""

from koala_func import checkpoint
from koala_func.ensemble import (
    ensemble_init,
    ensemble_size,
    ensemble_step,
    ensemble_train_step,
    stack_params,
)
from koala_func.functional import params_of, per_sample_loss, value_and_grad
from koala_func.fused import fused_step, fused_step_
from koala_func.koala_pp import KoalaPPHyperparams, KoalaPPState, KoalaPPTransform, koala_pp
from koala_func.koala_v import KoalaVHyperparams, KoalaVState, KoalaVTransform, koala_v
from koala_func.optim import KoalaPP
from koala_func.packed import PackedKoalaPP, PackedLayout, PackedState, packed

__all__ = [
    "KoalaPP",
    "KoalaPPHyperparams",
    "KoalaPPState",
    "KoalaPPTransform",
    "KoalaVHyperparams",
    "KoalaVState",
    "KoalaVTransform",
    "PackedKoalaPP",
    "PackedLayout",
    "PackedState",
    "checkpoint",
    "ensemble_init",
    "ensemble_size",
    "ensemble_step",
    "ensemble_train_step",
    "fused_step",
    "fused_step_",
    "koala_pp",
    "koala_v",
    "packed",
    "params_of",
    "per_sample_loss",
    "stack_params",
    "value_and_grad",
]
__version__ = "0.1.0"
