"""The one fast implementation of KOALA++: the scalar math, the packed layout and the passes.

Every door (:class:`koala_func.KoalaPP`, a compiled :meth:`koala_func.KoalaPPTransform.step`,
the ensembles, the sharded step) calls :func:`koala_func.engine.passes.run`; only the readable
reference (:mod:`koala_func.reference`) implements the step separately.
"""

from koala_func.engine.layout import Layout, choose_chunk_size, empty_cache
from koala_func.engine.math import DOTS, BlockConfig, Hyper, block_update, loss_moments
from koala_func.engine.passes import Blocks, Buffers, run

__all__ = [
    "DOTS",
    "BlockConfig",
    "Blocks",
    "Buffers",
    "Hyper",
    "Layout",
    "block_update",
    "choose_chunk_size",
    "empty_cache",
    "loss_moments",
    "run",
]
