"""timm integration: :func:`register` makes ``"koalapp"`` a ``timm.optim`` optimizer.

After ``register()``, ``timm.optim.create_optimizer_v2(model, "koalapp", lr=..., weight_decay=...)``
builds a :class:`koala_func.KoalaPP` over timm's parameter groups: no weight decay for biases,
norm parameters and the model's ``no_weight_decay()`` names, and with ``layer_decay=`` one group
per layer depth carrying timm's ``"lr_scale"``. As for every timm optimizer, ``lr_scale`` is
applied by timm's schedulers (``timm.scheduler``), which set each group's ``lr`` to the
scheduled value times ``lr_scale``. timm's ``eps``, ``betas`` and ``momentum`` do not apply
(``KoalaPP``'s ``eps`` is a gradient-norm threshold, not Adam's epsilon): timm drops them.
Pass KOALA++ options (``sigma``, ``q``, ``r``, ...) as keyword arguments.

Remember that ``KoalaPP.step`` needs the loss: ``optimizer.step(loss=loss)``.

Examples:
    >>> import torch
    >>> import timm.optim
    >>> from koala_func.integrations.timm import register
    >>> register()
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> opt = timm.optim.create_optimizer_v2(model, "koalapp", lr=0.5, weight_decay=1e-4, q=0.2)
    >>> type(opt).__name__, [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    ('KoalaPP', [(0.0, 3), (0.0001, 1)])
"""

from __future__ import annotations

from koala_func import KoalaPP
from koala_func.integrations._require import require

_timm_optim = require("timm.optim", "timm", "timm")

__all__ = ["register"]


def register(name: str = "koalapp") -> None:
    """Register :class:`~koala_func.KoalaPP` in timm's optimizer registry under ``name``.

    Idempotent. Afterwards ``timm.optim.create_optimizer_v2(model, name, ...)``,
    ``timm.optim.create_optimizer`` (timm's ``train.py --opt koalapp``) and
    ``timm.optim.get_optimizer_class(name)`` know it.

    Raises:
        ImportError: when this timm version has no optimizer registry (timm < 1.0).

    Examples:
        >>> import timm.optim
        >>> from koala_func import KoalaPP
        >>> from koala_func.integrations.timm import register
        >>> register()
        >>> timm.optim.get_optimizer_class("koalapp") is KoalaPP
        True
    """
    factory = getattr(_timm_optim, "_optim_factory", None)
    registry = getattr(factory, "default_registry", None)
    if registry is None:
        raise ImportError("koala_func.integrations.timm requires timm>=1.0 (an optimizer registry)")
    if name.lower() in registry.list_optimizers():
        if registry.get_optimizer_info(name).opt_class is KoalaPP:
            return  # already registered: timm would log an "overwriting" warning
    registry.register(
        _timm_optim.OptimInfo(
            name=name,
            opt_class=KoalaPP,
            description="KOALA++: Kalman-filter optimizer (needs the loss at every step)",
            has_eps=False,  # KoalaPP's eps is a gradient-norm threshold, not Adam's
            has_momentum=False,
            has_betas=False,
        )
    )
