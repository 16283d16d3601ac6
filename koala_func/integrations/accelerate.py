"""Hugging Face ``accelerate`` integration: :func:`backward` and :func:`observe`.

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer`` whose ``step`` takes
no ``loss=`` and which steps only when the gradients are synchronised (the last micro-batch of
an accumulation), and ``accelerator.backward(loss)`` divides the loss by
``gradient_accumulation_steps`` before backpropagating it. :func:`backward` does that backward
and gives :class:`koala_func.KoalaPP` the same divided loss through ``observe_loss``, so the
bare ``optimizer.step()`` of the accumulation's last micro-batch uses the mean loss of the
accumulated batch.

Examples:
    >>> import torch
    >>> from accelerate import Accelerator
    >>> from koala_func import KoalaPP
    >>> from koala_func.integrations.accelerate import backward
    >>> _ = torch.manual_seed(0)
    >>> accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    >>> model = torch.nn.Linear(4, 1)
    >>> ds = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=4)
    >>> model, opt, loader = accelerator.prepare(model, KoalaPP(model.parameters()), loader)
    >>> for x, y in loader:
    ...     with accelerator.accumulate(model):
    ...         loss = torch.nn.functional.mse_loss(model(x), y)
    ...         backward(accelerator, opt, loss)  # accelerator.backward + observe_loss
    ...         opt.step()
    ...         opt.zero_grad()
    >>> int(opt.state[model.weight]["step"])  # 4 micro-batches, 2 steps
    2
"""

from __future__ import annotations

from typing import Any

import torch

from koala_func.integrations._require import require

require("accelerate", "accelerate", "accelerate")

__all__ = ["backward", "observe"]


def _observer(optimizer: Any) -> Any:
    opt = optimizer
    while opt is not None:
        if callable(getattr(opt, "observe_loss", None)):
            return opt
        opt = getattr(opt, "optimizer", None)
    raise TypeError(
        f"expected a KoalaPP (or an optimizer wrapping one), got {type(optimizer).__name__}"
    )


def observe(accelerator: Any, optimizer: Any, loss: torch.Tensor) -> None:
    """Observe ``loss`` as ``accelerator.backward(loss)`` backpropagates it.

    Gives ``loss / accelerator.gradient_accumulation_steps`` (detached) to the ``observe_loss``
    of ``optimizer`` (an ``AcceleratedOptimizer`` around a :class:`~koala_func.KoalaPP`, or
    the ``KoalaPP`` itself). ``loss`` is the micro-batch mean (0-d) or its per-sample losses
    (1-d, whose mean you backpropagate). Call it once per ``accelerator.backward``.

    Raises:
        TypeError: when ``optimizer`` is not, and does not wrap, an optimizer with
            ``observe_loss``.

    Examples:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from koala_func import KoalaPP
        >>> from koala_func.integrations.accelerate import observe
        >>> accelerator = Accelerator(gradient_accumulation_steps=4, cpu=True)
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = accelerator.prepare(KoalaPP([w]))
        >>> losses = (w * torch.arange(3.0)).pow(2)  # per-sample losses
        >>> accelerator.backward(losses.mean())
        >>> observe(accelerator, opt, losses)  # records losses / 4
    """
    steps = accelerator.gradient_accumulation_steps
    _observer(optimizer).observe_loss(loss.detach() / steps)


def backward(accelerator: Any, optimizer: Any, loss: torch.Tensor, **kwargs: Any) -> None:
    """``accelerator.backward`` of the mean of ``loss``, then :func:`observe` of ``loss``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        optimizer: the prepared optimizer (or the ``KoalaPP`` it wraps).
        loss: the micro-batch loss, its mean (0-d) or per-sample losses (1-d).
        **kwargs: passed on to ``accelerator.backward``.

    Examples:
        >>> import torch
        >>> from accelerate import Accelerator
        >>> from koala_func import KoalaPP
        >>> from koala_func.integrations.accelerate import backward
        >>> accelerator = Accelerator(cpu=True)
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = accelerator.prepare(KoalaPP([w]))
        >>> backward(accelerator, opt, (w - 2).pow(2))  # per-sample losses
        >>> opt.step()
        >>> w.detach()
        tensor([..., ..., ...])
    """
    accelerator.backward(loss.mean() if loss.dim() else loss, **kwargs)
    observe(accelerator, optimizer, loss)
