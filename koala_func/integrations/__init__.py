"""Integrations of :class:`koala_func.KoalaPP` with the frameworks people train with.

KOALA++ needs the loss of every step, and each framework calls ``optimizer.step()`` in its own
way, so each integration makes the loss that was actually backpropagated reach the optimizer
through :meth:`KoalaPP.observe_loss <koala_func.KoalaPP.observe_loss>`:

- :mod:`koala_func.integrations.lightning`: ``KoalaPPCallback`` (Lightning);
- :mod:`koala_func.integrations.transformers`: ``KoalaPPTrainer`` (Hugging Face ``Trainer``);
- :mod:`koala_func.integrations.accelerate`: ``backward`` and ``observe`` (accelerate loops);
- :mod:`koala_func.integrations.timm`: ``register`` (``timm.optim.create_optimizer_v2``).

Each submodule imports its framework, which is an optional dependency (``pip install
"koala_func[integrations]"``); importing a submodule whose framework is missing raises
``ImportError`` with the package to install. This package itself imports nothing. See
``docs/frameworks.md`` for a tested recipe per framework.

Examples:
    >>> import koala_func.integrations
    >>> koala_func.integrations.__all__
    []
"""

__all__: list[str] = []
