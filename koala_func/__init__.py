"""koala_func: the KOALA++ Kalman-filter optimizer as a pure function over TensorDicts.

Layout of the package (one engine, many doors):

- :mod:`koala_func.reference`: the readable step, next to the paper's equations (ground truth).
- :mod:`koala_func.engine`: the one fast implementation (scalar math, packed layout, passes).
- Doors onto the engine: :mod:`koala_func.functional` (``koala_pp``, pure ``init``/``step``),
  :mod:`koala_func.optim` (``KoalaPP``, the ``torch.optim`` optimizer, also for FSDP2/DDP),
  :mod:`koala_func.ensemble` (many members in one call), :mod:`koala_func.distributed` (the
  functional step over DTensors), :mod:`koala_func.integrations` (Lightning, HF, timm, ...).
- :mod:`koala_func.state` (the state types), :mod:`koala_func.checkpoint`,
  :mod:`koala_func.koala_v` (the predecessor), :mod:`koala_func.baselines`.
- :mod:`koala_func.cli`: the experiments (training, sweeps, benchmarks); the core never
  imports it.
"""

from koala_func import checkpoint
from koala_func.ensemble import (
    ensemble_init,
    ensemble_size,
    ensemble_step,
    ensemble_train_step,
    member_views,
    stack_params,
)
from koala_func.functional import (
    KoalaPPTransform,
    koala_pp,
    params_of,
    per_sample_loss,
    value_and_grad,
)
from koala_func.koala_v import KoalaVHyperparams, KoalaVState, KoalaVTransform, koala_v
from koala_func.optim import KoalaPP
from koala_func.state import KoalaPPHyperparams, KoalaPPState

__all__ = [
    "KoalaPP",
    "KoalaPPHyperparams",
    "KoalaPPState",
    "KoalaPPTransform",
    "KoalaVHyperparams",
    "KoalaVState",
    "KoalaVTransform",
    "checkpoint",
    "ensemble_init",
    "ensemble_size",
    "ensemble_step",
    "ensemble_train_step",
    "koala_pp",
    "koala_v",
    "member_views",
    "params_of",
    "per_sample_loss",
    "stack_params",
    "value_and_grad",
]
__version__ = "0.2.0"
