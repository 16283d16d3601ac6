"""Lightning integration: :class:`KoalaPPCallback` feeds :class:`koala_func.KoalaPP` every
micro-batch loss.

Lightning's automatic optimization calls ``optimizer.step(closure)``, and the closure returns
only the *last* micro-batch's loss (already divided by ``accumulate_grad_batches``); under
``precision="16-mixed"`` the plugin runs the closure itself and then calls
``scaler.step(optimizer)`` with no loss at all. The callback observes, in
``on_before_backward``, the loss that is backpropagated (normalised by
``accumulate_grad_batches``, and unscaled here when a ``GradScaler`` scaled it), so the step
uses the sum of the micro-batch losses: the true mean loss of the accumulated batch.

Examples:
    >>> import logging
    >>> import torch
    >>> import lightning as L
    >>> from koala_func import KoalaPP
    >>> from koala_func.integrations.lightning import KoalaPPCallback
    >>> logging.getLogger("lightning").setLevel(logging.ERROR)
    >>> class Regression(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(4, 1)
    ...
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return torch.nn.functional.mse_loss(self.net(x), y)
    ...
    ...     def configure_optimizers(self):
    ...         return KoalaPP(self.parameters(), lr=0.5)
    >>> _ = torch.manual_seed(0)
    >>> ds = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    >>> data = torch.utils.data.DataLoader(ds, batch_size=8)
    >>> trainer = L.Trainer(
    ...     max_epochs=1, accumulate_grad_batches=2, callbacks=[KoalaPPCallback()],
    ...     accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
    ...     enable_progress_bar=False, enable_model_summary=False,
    ... )
    >>> trainer.fit(Regression(), data)
    >>> trainer.global_step  # 4 micro-batches, 2 optimizer steps
    2
"""

from __future__ import annotations

from typing import Any

import torch

from koala_func.integrations._require import require

_pl = require("lightning.pytorch", "lightning", "lightning")

__all__ = ["KoalaPPCallback"]


def _loss_scale(trainer: Any) -> torch.Tensor | float | None:
    """The factor a ``GradScaler`` multiplied the loss by before ``on_before_backward``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    # the loss is already scaled, so the scale tensor exists; reading it avoids a host sync
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()


def _observers(trainer: Any) -> list[Any]:
    return [opt for opt in trainer.optimizers if callable(getattr(opt, "observe_loss", None))]


class KoalaPPCallback(_pl.Callback):
    """Observe every micro-batch loss for each :class:`~koala_func.KoalaPP` of the trainer.

    In ``on_before_backward`` the callback calls ``optimizer.observe_loss(loss)`` with the loss
    being backpropagated: Lightning has already divided it by ``accumulate_grad_batches``, and
    the callback divides out the ``GradScaler`` scale (``precision="16-mixed"``). The observed
    losses add up to the mean loss of the accumulated batch, and ``KoalaPP.step`` prefers them
    to the closure's return value (the last micro-batch's loss only).

    Automatic optimization needs nothing else. In manual optimization the callback observes
    what ``self.manual_backward(loss)`` receives, so ``opt.step()`` works too; an explicit
    ``opt.step(loss=...)`` still wins. With several ``KoalaPP`` optimizers in manual
    optimization every one of them observes every loss: call each optimizer's ``zero_grad()``
    before its own backward (``zero_grad`` discards the observed losses), or pass ``loss=``.

    Under ``precision="16-mixed"`` with a ``GradScaler`` Lightning lets ``KoalaPP`` unscale the
    gradients inside its step (``KoalaPP`` supports AMP scaling, like a fused optimizer), so it
    refuses ``gradient_clip_val`` there; clip in ``bf16-mixed`` or ``32-true``.

    Raises:
        TypeError: at the start of training, when no optimizer of the trainer has
            ``observe_loss`` (the callback would do nothing).

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from koala_func import KoalaPP
        >>> from koala_func.integrations.lightning import KoalaPPCallback
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = KoalaPP([w])
        >>> trainer = SimpleNamespace(precision_plugin=None, optimizers=[opt])  # what it reads
        >>> for mean in (0.5, 0.75):  # two micro-batches, accumulate_grad_batches=2
        ...     loss = (w.sum() * mean) / 2
        ...     KoalaPPCallback().on_before_backward(trainer, None, loss)
        ...     loss.backward()
        >>> float(opt.step())  # the sum of the observed losses: the batch mean
        1.25
    """

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Check that an optimizer can observe losses."""
        if not _observers(trainer):
            names = [type(o).__name__ for o in trainer.optimizers]
            raise TypeError(
                f"KoalaPPCallback needs an optimizer with observe_loss (KoalaPP), got {names}"
            )

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Observe ``loss`` (unscaled) for every optimizer that has ``observe_loss``."""
        loss = loss.detach()
        scale = _loss_scale(trainer)
        if scale is not None:
            loss = loss / scale  # the scale is a power of two: exact
        for opt in _observers(trainer):
            opt.observe_loss(loss)
