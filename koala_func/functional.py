"""Glue for functional training loops: a module and a loss become pure functions of params."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["params_of", "per_sample_loss", "value_and_grad"]


def params_of(module: torch.nn.Module) -> TensorDict:
    """The module's parameters (no buffers) as a detached TensorDict with nested keys.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> params = params_of(model)
        >>> sorted(params.keys(include_nested=True, leaves_only=True))
        [('0', 'bias'), ('0', 'weight'), ('1', 'bias'), ('1', 'weight')]
    """
    flat = {name: p.detach() for name, p in module.named_parameters()}
    return TensorDict(flat, batch_size=[]).unflatten_keys(".")


def per_sample_loss(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[TensorDictBase, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(params, inputs, targets) -> per-sample losses`` through ``torch.func.functional_call``.

    ``loss_fn(outputs, targets)`` must return one loss per sample, e.g.
    ``lambda out, y: F.cross_entropy(out, y, reduction="none")``. Leaves of ``params`` replace
    the module's tensors of the same name; the module's other buffers are used as they are.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> model = torch.nn.Linear(4, 3)
        >>> losses_of = per_sample_loss(model, lambda o, y: F.cross_entropy(o, y, reduction="none"))
        >>> losses_of(params_of(model), torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])).shape
        torch.Size([5])
    """

    def fn(params: TensorDictBase, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # functional_call does not accept a TensorDict: give it a plain dict of dotted names.
        tensors = params.flatten_keys(".").to_dict()
        out = torch.func.functional_call(module, tensors, (inputs,), strict=False)
        return loss_fn(out, targets)

    return fn


def value_and_grad(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[TensorDictBase, torch.Tensor, torch.Tensor], tuple[TensorDictBase, torch.Tensor]]:
    """``(params, inputs, targets) -> (grads, per-sample losses)``.

    ``grads`` is the gradient of the *mean* loss, a TensorDict holding the floating-point keys
    of ``params``; the per-sample losses are what :meth:`koala_func.KoalaPPTransform.step` takes as
    ``loss`` (it derives the mean and the second moment for the online R from them).
    Composes with ``torch.vmap`` (ensembles) and ``torch.compile``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from koala_func import koala_pp
        >>> model = torch.nn.Linear(4, 3)
        >>> grad_fn = value_and_grad(model, lambda o, y: F.cross_entropy(o, y, reduction="none"))
        >>> opt = koala_pp()
        >>> params = params_of(model)
        >>> state = opt.init(params)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> grads, losses = grad_fn(params, x, y)
        >>> params, state = opt.step(params, grads, losses, state)
        >>> grads["weight"].shape, losses.shape
        (torch.Size([3, 4]), torch.Size([8]))
    """
    losses_of = per_sample_loss(module, loss_fn)

    def mean_loss(float_params, other, inputs, targets):
        losses = losses_of(float_params.update(other), inputs, targets)
        return losses.mean(), losses

    grad_fn = torch.func.grad(mean_loss, has_aux=True)

    def fn(params: TensorDictBase, inputs: torch.Tensor, targets: torch.Tensor):
        float_keys = [
            k
            for k, v in params.items(include_nested=True, leaves_only=True)
            if v.is_floating_point()
        ]
        other = params.exclude(*float_keys)
        return grad_fn(params.select(*float_keys), other, inputs, targets)

    return fn
