"""Hugging Face ``transformers`` integration: :class:`KoalaPPTrainer`.

``transformers.Trainer`` calls a bare ``optimizer.step()`` after the last micro-batch of each
accumulation, so :class:`koala_func.KoalaPP` never sees a loss there. ``KoalaPPTrainer``
observes, after every micro-batch, the loss that ``training_step`` backpropagated. The Trainer
has already normalised that loss for gradient accumulation, in one of two ways: a model that
accepts ``num_items_in_batch`` (``model_accepts_loss_kwargs``, e.g. the causal LMs) returns
its token-summed loss divided by the number of label tokens of the *whole* accumulated batch;
otherwise the Trainer divides the model's mean loss by the number of micro-batches. Either way
the observed losses add up to the loss whose gradient was accumulated, so the step is exact.

Examples:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    >>> from koala_func.integrations.transformers import KoalaPPTrainer
    >>> _ = torch.manual_seed(0)
    >>> config = GPT2Config(
    ...     vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=0,
    ...     eos_token_id=0,
    ... )
    >>> model = GPT2LMHeadModel(config)
    >>> ids = torch.randint(0, 16, (8, 8))
    >>> data = [{"input_ids": row, "labels": row} for row in ids]
    >>> args = TrainingArguments(
    ...     output_dir="unused", per_device_train_batch_size=2, gradient_accumulation_steps=2,
    ...     max_steps=2, learning_rate=0.01, report_to=[], use_cpu=True, save_strategy="no",
    ...     logging_strategy="no", disable_tqdm=True,
    ... )
    >>> trainer = KoalaPPTrainer(model=model, args=args, train_dataset=data)
    >>> _ = trainer.train()  # the Trainer prints its final metrics
    {'train_runtime': ...}
    >>> type(trainer.optimizer.optimizer).__name__, trainer.state.global_step
    ('KoalaPP', 2)
"""

from __future__ import annotations

from typing import Any

import torch

from koala_func import KoalaPP
from koala_func.integrations._require import require

_transformers = require("transformers", "transformers", "transformers")

__all__ = ["KoalaPPTrainer"]


def _observer(optimizer: Any) -> Any:
    """The innermost optimizer with ``observe_loss`` (accelerate wraps the one we built)."""
    opt = optimizer
    while opt is not None:
        if callable(getattr(opt, "observe_loss", None)):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


class KoalaPPTrainer(_transformers.Trainer):
    """A ``transformers.Trainer`` that feeds :class:`~koala_func.KoalaPP` its loss.

    Use it exactly like ``Trainer``. Without ``optimizers=`` or ``optimizer_cls_and_kwargs=``
    it builds ``KoalaPP(lr=args.learning_rate)`` over the Trainer's usual two parameter groups
    (``args.weight_decay``, and no decay for biases and norms); set ``learning_rate`` for
    KOALA++ (the Trainer's default 5e-5 is an AdamW value). ``args.optim`` is then ignored.

    After every micro-batch it calls ``optimizer.observe_loss`` with the loss that
    ``training_step`` backpropagated (see the module docstring for how the Trainer normalises
    it under ``gradient_accumulation_steps``), before gradient clipping and the Trainer's bare
    ``optimizer.step()``. Under ``fp16=True`` the loss observed is the unscaled one (the
    ``GradScaler`` scales inside ``accelerator.backward``).

    Raises:
        TypeError: in ``training_step``, when the optimizer has no ``observe_loss``.

    Examples:
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> from koala_func.integrations.transformers import KoalaPPTrainer
        >>> model = torch.nn.Linear(3, 2)
        >>> args = TrainingArguments(
        ...     output_dir="unused", learning_rate=0.5, weight_decay=1e-3, report_to=[],
        ...     use_cpu=True, save_strategy="no",
        ... )
        >>> opt = KoalaPPTrainer(model=model, args=args).create_optimizer()
        >>> [(g["weight_decay"], len(g["params"])) for g in opt.param_groups]
        [(0.001, 1), (0.0, 1)]
    """

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Build ``KoalaPP(lr=args.learning_rate)`` unless an optimizer was given."""
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = (KoalaPP, {"lr": self.args.learning_rate})
        return super().create_optimizer(model)

    def training_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Run ``Trainer.training_step`` and observe the loss it backpropagated."""
        opt = _observer(self.optimizer)
        if opt is None:
            raise TypeError(
                "KoalaPPTrainer needs an optimizer with observe_loss (KoalaPP), got "
                f"{type(self.optimizer).__name__}"
            )
        # the returned loss is the one given to accelerator.backward (its own division by
        # gradient_accumulation_steps is 1 under the Trainer), detached and unscaled
        loss = super().training_step(model, inputs, num_items_in_batch)
        opt.observe_loss(loss)
        return loss
