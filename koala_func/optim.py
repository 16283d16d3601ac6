r"""KOALA++ as a drop-in ``torch.optim.Optimizer``, running the engine in place.

Reference: Zixuan Xia, Aram Davtyan, Paolo Favaro, "KOALA++: Efficient Kalman-Based Optimization
of Neural Networks with Gradient-Covariance Products", NeurIPS 2025, arXiv:2506.04432.

With the default ``impl="engine"``, :class:`KoalaPP` packs the parameters of every dtype into
one flat buffer (:class:`~koala_func.engine.Layout`) and makes each parameter's ``data`` a
view of it; the gradients land in a flat gradient buffer the same way (the
``gradient_as_bucket_view`` pattern of DDP and of Megatron's contiguous gradient buffers), so a
step is one compiled call of :func:`koala_func.engine.run` over a few buffers, in place, with
no packing copy. ``zero_grad`` clears that buffer with one op (and keeps it, also when asked
for ``set_to_none``).

The cases that break the views are handled, slower but never stale:

- a gradient the user replaced or set to ``None`` is copied into the buffer (or treated as
  missing) and the view is re-attached;
- a parameter whose ``data`` was replaced (``p.data = ...``, ``model.to(...)``, ``model.half()``)
  is detected at the next step and everything is re-packed, state included;
- DTensor parameters (FSDP2 ``fully_shard``) keep their own storage: their local shards are
  copied into the buffers and back each step, and one all-reduce sums the per-block partial
  sums (and averages the loss over ranks).

``impl="reference"`` runs the readable step (:mod:`koala_func.reference`) instead.

State layout (``optimizer.state[p]``), per parameter like every ``torch.optim`` optimizer:
``v``, ``h_prev`` (tensors like ``p``, dtype ``state_dtype`` or ``p.dtype``) and the 0-d
``s``, ``count``, ``skipped``, ``r_est``, ``step`` of the block ``p`` belongs to (with
``granularity="global"`` the whole group is one block and these tensors are shared by all of
its parameters).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from tensordict import TensorDict

from koala_func._dtensor import (
    _all_reduce_fn,
    _is_dtensor,
    _local,
    _local_like,
    _sharded,
    _wrap_like,
)
from koala_func._validation import check_choice, check_hyperparameters
from koala_func.engine import BlockConfig, Blocks, Buffers, Hyper, Layout, run
from koala_func.functional import KoalaPPTransform
from koala_func.reference import reference_step
from koala_func.state import HYPERPARAMETERS, KoalaPPHyperparams, KoalaPPState

__all__ = ["KoalaPP"]

_BLOCK_KEYS = ("s", "count", "skipped", "r_est", "step")
_STATE_KEYS = ("v", "h_prev", *_BLOCK_KEYS)
_STRUCTURE = ("symmetric", "granularity", "r_statistic", "eps", "state_dtype", "nonfinite", "r")


class _Slot:
    """Where one parameter lives in the packed buffers."""

    __slots__ = ("block", "dtensor", "grad", "param", "theta")

    def __init__(self, param, theta, grad, block, dtensor):
        self.param, self.theta, self.grad = param, theta, grad
        self.block, self.dtensor = block, dtensor


def _packed_step(
    thetas,
    grads,
    vs,
    hs,
    owners,
    blocks,
    step,
    hyper,
    cfg,
    mean,
    mean_sq,
    present,
    skip_all,
    decay,
    reduce,
    sharded,
    per_sample,
):
    """The compiled unit: the engine in place over the optimizer's buffers."""
    run(
        owners,
        [Buffers(*b) for b in zip(thetas, grads, vs, hs, strict=True)],
        blocks,
        mean,
        mean_sq,
        hyper,
        cfg,
        decay=decay,
        present=present,
        skip_all=skip_all,
        reduce=reduce,
        sharded=sharded,
        per_sample=per_sample,
        inplace=True,
    )
    inc = torch.ones_like(step) if skip_all is None else (~skip_all).long().expand_as(step)
    step.add_(inc)


_COMPILED: dict[str, Callable] = {}


def _compiled_step() -> Callable:
    # One compiled function per process, shared by every KoalaPP (its inputs are tensors and
    # structural flags only), so that a second optimizer of the same shapes compiles nothing.
    fn = _COMPILED.get("step")
    if fn is None:
        fn = _COMPILED["step"] = torch.compile(_packed_step, fullgraph=True)
    return fn


# The KoalaPPs that optimize a parameter, by its id: (a weakref to the parameter, a WeakSet
# of optimizers). Weak both ways: the registry keeps neither alive.
_OWNERS: dict[int, tuple[weakref.ref, weakref.WeakSet]] = {}
_HOOK: list = []


def _owners_of(p: torch.Tensor) -> list[KoalaPP]:
    found = _OWNERS.get(id(p))
    return [] if found is None or found[0]() is not p else list(found[1])


def _own(opt: KoalaPP, p: torch.Tensor) -> None:
    found = _OWNERS.get(id(p))
    if found is None or found[0]() is not p:
        key = id(p)
        found = (weakref.ref(p, lambda _, key=key: _OWNERS.pop(key, None)), weakref.WeakSet())
        _OWNERS[key] = found
    found[1].add(opt)
    if not _HOOK:
        hook = torch.nn.modules.module.register_module_parameter_registration_hook
        _HOOK.append(hook(_on_parameter_registered))


def _disown(opt: KoalaPP, p: torch.Tensor) -> None:
    found = _OWNERS.get(id(p))
    if found is not None and found[0]() is p:
        found[1].discard(opt)


def _on_parameter_registered(module: torch.nn.Module, name: str, param) -> None:
    """A module's Parameter object is replaced (``load_state_dict(..., assign=True)``,
    ``module.weight = nn.Parameter(...)``): each optimizer of the old one takes the new one,
    with the old one's state, where torch.optim would keep updating the detached old object."""
    old = module._parameters.get(name) if param is not None else None
    if old is None or old is param:
        return
    for opt in _owners_of(old):
        if opt not in _owners_of(param):  # a parameter tied to one of its own: leave it
            opt._replace_parameter(old, param)


class KoalaPP(torch.optim.Optimizer):
    r"""KOALA++ (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432) as a ``torch.optim``
    optimizer.

    Each filtered block (one per tensor, or the whole group with ``granularity="global"``)
    runs, with :math:`H_k = g_k + \mathrm{wd}\,\theta_{k-1}` and the loss :math:`L`:

    .. math::

        v_k = (\alpha_k - \lambda_k) v_{k-1} + Q (H_k - \lambda_k H_{k-1}) + w_k H_{k-1},\quad
        S_k = (v_k + Q H_k) H_k^\top + R,\quad
        \theta_k = \theta_{k-1} - \eta\,L_k\,\frac{v_k + Q H_k}{S_k}

    (see :mod:`koala_func.reference` for :math:`\lambda_k, \alpha_k, w_k` and the first step).

    The step needs the loss, because the step length is proportional to it. Where it comes
    from, in this order of precedence:

    1. ``step(loss=...)``;
    2. the losses recorded with :meth:`observe_loss` since the last step (gradient
       accumulation: they add up, like the gradients of normalised micro-batch losses);
    3. the return value of the closure ``step(closure)``.

    A closure always runs (frameworks run hooks and clipping in it) and may be given together
    with ``loss=``. The gradients must be those of the *mean* loss::

        loss.backward(); opt.step(loss=loss)      # or per-sample losses (1-d)
        opt.step(closure)                          # closure: zero_grad, backward, return loss

    Per-sample losses (1-d) feed the online R with ``mean(l**2)`` (``r_statistic=
    "second_moment"``) or ``mean(l**2) - mean(l)**2`` (``"variance"``); a 0-d loss gives
    ``L**2`` (and cannot give a variance).

    Args:
        params: parameters or parameter groups (dicts); every key below can be set per group.
        lr: learning rate :math:`\eta`.
        sigma: initial covariance variance, :math:`P_0 = \sigma I`.
        q: process noise :math:`Q`.
        r: fixed observation noise :math:`R`; ``None`` estimates it online from the loss.
        alpha_r: smoothing of the online R estimate (which starts at 1.0).
        weight_decay: L2 coefficient coupled into the filter (:math:`H = g + \mathrm{wd}\,\theta`).
        loss_target: the observation the loss is driven to (0); a block whose residual
            ``L_blk - loss_target`` is negative is skipped and counted in ``skipped``.
        symmetric: keep the :math:`w_k` term (``False``: the cheaper asymmetric variant).
        granularity: ``"tensor"`` (one filter per tensor, as released) or ``"global"`` (one
            filter over the whole group, the paper's equations).
        r_statistic: ``"second_moment"`` or ``"variance"`` (see above).
        eps: a block whose raw gradient norm is below ``eps`` is left unchanged.
        state_dtype: dtype of ``v`` and ``h_prev``; ``None`` uses each parameter's dtype.
            Use ``torch.float32`` with float16/bfloat16 parameters (see ``docs/safety.md``).
        nonfinite: ``"skip"`` (a block that meets NaN or inf is left unchanged and counted in
            ``state[p]["skipped"]``) or ``"raise"`` (``FloatingPointError``; a host sync).
        impl: ``"engine"`` (default: packed buffers, in place) or ``"reference"``.
        compile: compile the engine step (``None``: when ``torch.compile`` works here, unless
            the environment variable ``KOALA_FUNC_COMPILE=0``; it falls back to the eager
            engine with one warning when compiling fails).

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = KoalaPP(model.parameters(), lr=0.5, compile=False)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     losses = F.cross_entropy(model(x), y, reduction="none")
        ...     losses.mean().backward()
        ...     _ = opt.step(loss=losses.detach())
        ...     sched.step()
        >>> group, state = opt.param_groups[0], opt.state[model.weight]
        >>> group["lr"], int(state["count"])
        (0.125, 4)
    """

    # GradScaler hands the scale and an inf flag to step() instead of unscaling and skipping:
    # the step unscales in place, refuses an inf step without a host sync, and consumes the
    # observed losses either way (they would otherwise be counted twice).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1.0,
        sigma: float | torch.Tensor = 0.1,
        q: float | torch.Tensor = 0.1,
        r: float | torch.Tensor | None = None,
        alpha_r: float | torch.Tensor = 0.9,
        weight_decay: float | torch.Tensor = 0.0,
        *,
        loss_target: float | torch.Tensor = 0.0,
        symmetric: bool = True,
        granularity: str = "tensor",
        r_statistic: str = "second_moment",
        eps: float = 1e-9,
        state_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        impl: str = "engine",
        compile: bool | None = None,
    ) -> None:
        check_choice("impl", impl, ("engine", "reference"))
        defaults = dict(
            lr=lr,
            sigma=sigma,
            q=q,
            r=r,
            alpha_r=alpha_r,
            weight_decay=weight_decay,
            loss_target=loss_target,
            symmetric=symmetric,
            granularity=granularity,
            r_statistic=r_statistic,
            eps=eps,
            state_dtype=state_dtype,
            nonfinite=nonfinite,
        )
        self._impl = impl
        self._compile = compile
        self._observed: list[torch.Tensor] = []
        self._packed: _Packed | None = None
        self._ready = False
        super().__init__(params, defaults)
        self._ready = True
        self._rebuild()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checks its hyperparameters) and create its state now."""
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])
        if self._ready:
            self._rebuild()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def _rebuild(self) -> None:
        """(Re)create every buffer and view from the current parameters and state."""
        for group in self.param_groups:
            for p in group["params"]:
                _own(self, p)
                if p not in self.state or not self.state[p]:
                    self.state[p] = _fresh_state(p, group)
            if group["granularity"] == "global" and self._impl == "reference":
                first = self.state[group["params"][0]] if group["params"] else {}
                for p in group["params"][1:]:  # one block: its scalars are shared tensors
                    self.state[p].update({k: first[k] for k in _BLOCK_KEYS})
        if self._impl == "engine":
            with torch.no_grad():
                self._packed = _Packed(self)

    def _replace_parameter(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """Optimize ``new`` in place of ``old``, continuing from ``old``'s state; the buffers
        are re-packed at the next step (``new``'s values become its data)."""
        for group in self.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in self.state:
            self.state[new] = self.state.pop(old)
        _disown(self, old)
        _own(self, new)
        if self._packed is not None:
            self._packed.replaced = True

    # ------------------------------------------------------------------- loss
    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record the loss of one micro-batch, as it was backpropagated.

        The mean (0-d) or the per-sample losses (1-d), already divided by the number of
        accumulation steps as the frameworks do. Losses observed before a step add up (as the
        gradients do), so the step sees the mean loss of the whole accumulated batch; with
        per-sample losses the second moment for the online R accumulates consistently
        (``n * sum(mean(l_i**2))`` for ``n`` equal micro-batches). The next :meth:`step`
        consumes them, and :meth:`zero_grad` clears them with the gradients.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = KoalaPP(model.parameters(), compile=False)
            >>> for x in torch.randn(2, 8, 2):  # two micro-batches
            ...     loss = model(x).square().mean() / 2
            ...     loss.backward()
            ...     opt.observe_loss(loss)
            >>> _ = opt.step()  # uses the sum of the two: the mean over 16 samples
        """
        t = self._as_loss(loss)
        if t.dim() > 1:
            raise ValueError(f"observe_loss expects a 0-d or 1-d loss, got shape {tuple(t.shape)}")
        if self._observed and self._observed[0].dim() != t.dim():
            raise ValueError("observe_loss got both 0-d and 1-d losses before one step")
        self._observed.append(t)

    def _as_loss(
        self, loss: torch.Tensor | float, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        # Reduced in the scalar dtype (float32 at least), as the functional door does: a
        # bfloat16 mean of the per-sample losses would shift R and the step by ~0.3%.
        # ``dtype``: that dtype, known already (the engine's, checked this step).
        if dtype is None:
            dtype = _scalar_dtype(p for g in self.param_groups for p in g["params"])
        if isinstance(loss, torch.Tensor):
            return loss.detach().to(dtype)
        return torch.tensor(float(loss), dtype=dtype)

    def _resolve_loss(
        self, loss, returned, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """(mean, mean of squares, per_sample) of the loss this step uses, or None
        (``dtype``: the scalar dtype, where known)."""
        observed, self._observed = self._observed, []
        if loss is None and observed:
            if observed[0].dim() == 0:
                mean = torch.stack(observed).sum()
                return mean, mean.square(), False
            n = len(observed)
            mean = torch.stack([o.mean() for o in observed]).sum()
            mean_sq = n * torch.stack([o.square().mean() for o in observed]).sum()
            return mean, mean_sq, True
        if loss is None:
            loss = returned
        if loss is None:
            return None
        t = self._as_loss(loss, dtype)
        if t.dim() > 1:
            raise ValueError(
                f"loss must be the minibatch mean (0-d) or the per-sample losses (1-d), "
                f"got shape {tuple(t.shape)}"
            )
        if t.dim() == 1:
            return t.mean(), t.square().mean(), True
        return t, t.square(), False

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss: torch.Tensor | float | None = None,
    ) -> Any:
        """One KOALA++ update of every group.

        Args:
            closure: re-evaluates the model, calls ``backward`` on the *mean* loss and
                (usually) returns the loss. It always runs.
            loss: the loss, when the gradients are already computed: the mean (0-d) or the
                per-sample losses (1-d). Wins over observed losses and the closure's value.

        Returns:
            the closure's return value when a closure was given, else the loss used.
        """
        scaled = hasattr(self, "found_inf")  # set by GradScaler.step for this call only
        if closure is not None and scaled:
            raise RuntimeError(
                "KoalaPP.step got a closure under GradScaler: the closure would recompute "
                "scaled gradients after the scaler checked them. Run forward and backward "
                "first, then call scaler.step(optimizer, loss=loss)"
            )
        returned = None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        used = loss if loss is not None else (self._observed or returned)
        packed = self._packed if self._impl == "engine" else None
        assert packed is not None or self._impl == "reference"
        # Inside a user's torch.compile the buffers are traced as they are (a data-pointer
        # check would break the graph); eagerly, a replaced tensor is re-packed, before the
        # loss is read in the engine's scalar dtype (a scan of every parameter otherwise).
        if packed is not None and not torch.compiler.is_compiling() and packed.stale():
            self._rebuild()
            packed = self._packed
        moments = self._resolve_loss(loss, returned, packed.cdt if packed is not None else None)
        if moments is None:
            if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
                return returned  # e.g. DCP's initialising call: the state exists already
            raise ValueError(
                "KoalaPP.step needs the loss: call step(loss=loss), step(closure) with a "
                "closure that returns it, or observe_loss(loss) for each micro-batch "
                "(the step length is proportional to the loss)"
            )
        self._check_variance(moments[2])
        grad_scale = getattr(self, "grad_scale", None) if scaled else None
        found_inf = getattr(self, "found_inf", None) if scaled else None
        if packed is not None:
            packed.step(moments, grad_scale, found_inf)
        else:
            self._reference_step(moments, grad_scale, found_inf)
        if closure is not None:
            return returned
        return used if not isinstance(used, list) else moments[0]

    def _check_variance(self, per_sample: bool) -> None:
        if per_sample:
            return
        for g in self.param_groups:
            if g["r_statistic"] == "variance" and g["r"] is None:
                raise ValueError(
                    "r_statistic='variance' needs the per-sample losses (a 1-d loss): the "
                    "variance of a single mean loss is unavailable"
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (and the observed losses, which belong to them).

        With the engine the gradients are views of one flat buffer: it is zeroed with one op
        and kept, also for ``set_to_none=True`` (parameters without ``requires_grad`` keep
        ``None``). A gradient replaced by another tensor is re-attached to the buffer.
        """
        self._observed = []
        if self._packed is None:
            super().zero_grad(set_to_none=set_to_none)
            return
        if self._packed.stale():  # e.g. model.to(dtype) swapped the data of our views
            self._rebuild()
        self._packed.zero_grad()

    # ------------------------------------------------------- reference path
    def _reference_step(self, moments, grad_scale, found_inf) -> None:
        mean, mean_sq, per_sample = moments
        if found_inf is not None and bool(found_inf):
            return
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            st0 = self.state[params[0]]
            cdt, dev = st0["r_est"].dtype, st0["r_est"].device
            # the reference takes a loss tensor: rebuild one with these moments
            loss = _loss_with_moments(mean, mean_sq, per_sample, cdt, dev)
            keys = [str(i) for i in range(len(params))]
            grads = {}
            for key, p in zip(keys, params, strict=True):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("KoalaPP does not support sparse gradients")
                    g = p.grad if grad_scale is None else p.grad * (1 / grad_scale)
                    grads[key] = g
            opt = _transform(group)
            state = _group_state(self, group, keys)
            new_params, new_state = reference_step(
                opt,
                keys,
                TensorDict({k: p.detach() for k, p in zip(keys, params, strict=True)}),
                TensorDict(grads),
                loss,
                state,
            )
            _check_nonfinite(group, new_state.skipped, state.skipped)
            dst, src = [], []
            for k, p in zip(keys, params, strict=True):
                st = self.state[p]
                dst += [p, st["v"], st["h_prev"]]
                src += [new_params.get(k), new_state.v.get(k), new_state.h_prev.get(k)]
            glob = group["granularity"] == "global"
            for i, p in enumerate(params):
                if glob and i > 0:
                    break
                b = 0 if glob else i
                for name in ("s", "count", "skipped"):
                    dst.append(self.state[p][name])
                    src.append(getattr(new_state, name)[b])
                dst += [self.state[p]["r_est"], self.state[p]["step"]]
                src += [new_state.r_est, new_state.step]
            torch._foreach_copy_(dst, src)

    # ------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`: an exact (bit-identical) continuation.

        ``torch.optim.Optimizer.load_state_dict`` would cast every state tensor to the
        parameter's dtype (rounding a float32 state of a bfloat16 parameter, turning the int64
        counters into floats); here the values are copied into this optimizer's own state
        tensors (the engine's buffers), keeping their dtypes.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in state_dict["param_groups"]),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        self._rebuild()  # groups may have changed structure (granularity, state_dtype)
        dst, src = [], []
        for i, saved in saved_state.items():
            p = id_map[i]
            absent = [k for k in _STATE_KEYS if k not in saved]
            if absent:
                raise KeyError(f"loaded state of parameter {i} lacks {absent}")
            st = self.state[p]
            if tuple(saved["v"].shape) != tuple(p.shape):
                raise ValueError(
                    f"loaded state of shape {tuple(saved['v'].shape)} does not match "
                    f"parameter shape {tuple(p.shape)}"
                )
            for k in _STATE_KEYS:
                dst.append(_local(st[k]))
                src.append(_local_like(saved[k], st[k]))
        if dst:
            torch._foreach_copy_(dst, src)


class _Packed:
    """The engine's buffers for one :class:`KoalaPP`: layouts, flat tensors, per-block state."""

    def __init__(self, opt: KoalaPP) -> None:
        self.opt = opt
        groups = opt.param_groups
        params = [(gi, p) for gi, g in enumerate(groups) for p in g["params"]]
        devices = {_local(p).device for _, p in params}
        if len(devices) > 1:
            raise ValueError(
                "KoalaPP's engine needs every parameter on one device, got "
                f"{sorted(map(str, devices))}; use KoalaPP(..., impl='reference') or one "
                "optimizer per device"
            )
        self.device = devices.pop() if devices else torch.device("cpu")
        self.cdt = cdt = _scalar_dtype(p for _, p in params)
        # blocks: one per tensor, or one per group (global)
        block_of, block_group = [], []
        for gi, g in enumerate(groups):
            if g["granularity"] == "global" and g["params"]:
                block_group.append(gi)
            for _ in g["params"]:
                if g["granularity"] == "tensor":
                    block_group.append(gi)
                block_of.append(len(block_group) - 1)
        T = len(block_group)
        self.n_blocks = T
        dev = self.device
        self.block_group = torch.tensor(block_group, dtype=torch.long, device=dev)
        # one layout per (param dtype, state dtype); DTensors in layouts of their own, the
        # sharded ones (partial sums, all-reduced) apart from the replicated ones
        buckets: dict[tuple, list[int]] = {}
        for i, (gi, p) in enumerate(params):
            sd = groups[gi]["state_dtype"] or p.dtype
            dt = _is_dtensor(p)
            buckets.setdefault((p.dtype, sd, dt, dt and _sharded(p)), []).append(i)
        self.layouts, self.flats, self.sharded, self.slots = [], [], [], []
        for (dtype, sd, dt, sh), idx in buckets.items():
            locs = [_local(params[i][1]) for i in idx]
            strides = [t.stride() if (not t.is_contiguous() and _dense(t)) else None for t in locs]
            layout = Layout(
                [t.shape for t in locs], dtype, dev, [block_of[i] for i in idx], strides=strides
            )
            theta, grad = layout.zeros(), layout.zeros()
            v, h = layout.zeros(dtype=sd), layout.zeros(dtype=sd)
            self.layouts.append(layout)
            self.flats.append((theta, grad, v, h))
            self.sharded.append(sh)
            tv, gv, vv, hv = (layout.views(t) for t in (theta, grad, v, h))
            for j, i in enumerate(idx):
                gi, p = params[i]
                st = opt.state[p]
                tv[j].copy_(locs[j])
                vv[j].copy_(_local(st["v"]))
                hv[j].copy_(_local(st["h_prev"]))
                g = p.grad
                if g is not None:
                    gv[j].copy_(_local(g))
                if not dt:
                    p.data = tv[j]
                    if g is not None:
                        p.grad = gv[j]  # else None until zero_grad attaches the view
                st["v"], st["h_prev"] = _wrap_like(vv[j], p), _wrap_like(hv[j], p)
                self.slots.append(_Slot(p, tv[j], gv[j], block_of[i], dt))
        # per-block state, carried over from the parameters' state
        self.blocks = Blocks(
            torch.zeros(T, dtype=cdt, device=dev),
            torch.zeros(T, dtype=torch.long, device=dev),
            torch.zeros(T, dtype=torch.long, device=dev),
            torch.zeros(T, dtype=cdt, device=dev),
        )
        self.steps = torch.zeros(T, dtype=torch.long, device=dev)
        arrays = dict(zip(_BLOCK_KEYS, (*self.blocks, self.steps), strict=True))
        for s in self.slots:
            st = opt.state[s.param]
            for k, arr in arrays.items():
                arr[s.block].copy_(st[k])
            for k, arr in arrays.items():
                st[k] = arr[s.block]  # a 0-d view: state_dict shows the live value
        self.hyper = torch.zeros(len(groups), len(HYPERPARAMETERS), dtype=cdt, device=dev)
        self._hyper_values: list | None = None  # the Python values last written into hyper
        self._local_slots = [s for s in self.slots if not s.dtensor]
        self._dtensor_slots = [s for s in self.slots if s.dtensor]
        # The step's buffer arguments, fixed until the next rebuild; and the hyperparameters
        # per block, until _fill_hyper writes new values.
        self._buffers = tuple([f[i] for f in self.flats] for i in range(4))
        self._owners = [layout.owner for layout in self.layouts]
        self._block_hyper: Hyper | None = None
        self.replaced = False  # a parameter object was replaced (_replace_parameter)
        # What stale() compares against: where our views point, as built.
        self._ptrs = [s.theta.data_ptr() for s in self._local_slots]
        self._gptrs = [s.grad.data_ptr() for s in self._local_slots]
        self._kinds = [(s.theta.dtype, s.theta.stride()) for s in self._local_slots]
        self.structure = self._structure()
        self.cfg = self._config()
        self.reduce = _all_reduce_fn(params) if any(self.sharded) else None
        want = opt._compile
        if want is None:
            want = _compile_available(self.device)
        # decided here, not at the first step: a user's torch.compile around step() would
        # otherwise guard on the lazy attribute and recompile on its second call
        self.compiled: Callable = _compiled_step() if want else _packed_step

    # -- structure ----------------------------------------------------------------------
    def _structure(self) -> list[tuple]:
        return [
            tuple(g[k] if k != "r" else g[k] is None for k in _STRUCTURE)
            for g in self.opt.param_groups
        ]

    def _config(self) -> BlockConfig:
        groups = self.opt.param_groups

        def per_block(fn, dtype=torch.bool):
            vals = torch.tensor([fn(g) for g in groups], dtype=dtype, device=self.device)
            return vals[self.block_group]

        return BlockConfig(
            symmetric=per_block(lambda g: bool(g["symmetric"])),
            online=per_block(lambda g: g["r"] is None),
            variance=per_block(lambda g: g["r_statistic"] == "variance"),
            eps=per_block(lambda g: float(g["eps"]), self.cdt),
        )

    def stale(self) -> bool:
        """Whether a parameter (its object or its data), a group's structure or the groups
        were changed."""
        if self.replaced or self._structure() != self.structure:
            return True
        n = sum(len(g["params"]) for g in self.opt.param_groups)
        if n != len(self.slots):
            return True
        # One comprehension per property (this runs every step): a replaced parameter
        # (p.data = ..., model.to(...)), and a gradient view whose data Module._apply swapped.
        local = self._local_slots
        return (
            [s.param.data_ptr() for s in local] != self._ptrs
            or [s.grad.data_ptr() for s in local] != self._gptrs
            or [(s.param.dtype, s.param.stride()) for s in local] != self._kinds
        )

    # -- step -----------------------------------------------------------------------------
    def step(self, moments, grad_scale, found_inf) -> None:
        if not self.slots:  # only empty groups: nothing to update
            return
        mean, mean_sq, _ = moments
        present = self._gather_grads()
        thetas, grads, vs, hs = self._buffers
        if grad_scale is not None:
            torch._foreach_mul_(grads, (1.0 / grad_scale.double()).to(self.cdt).to(self.device))
        decay = self._fill_hyper()
        compiling = torch.compiler.is_compiling()
        hyper = None if compiling else self._block_hyper
        if hyper is None:
            hyper = Hyper(*self.hyper[self.block_group].unbind(-1))
            if not compiling:
                self._block_hyper = hyper
        skip_all = None if found_inf is None else (found_inf.to(self.device) != 0)
        raise_groups = [g for g in self.opt.param_groups if g["nonfinite"] == "raise"]
        before = self.blocks.skipped.clone() if raise_groups else None
        args = (
            thetas,
            grads,
            vs,
            hs,
            self._owners,
            self.blocks,
            self.steps,
            hyper,
            self.cfg,
            mean.to(self.device, self.cdt),
            mean_sq.to(self.device, self.cdt),
            present,
            skip_all,
            decay,
            self.reduce,
            self.sharded,
            moments[2],
        )
        self._run(args)
        self._scatter_params()
        if before is not None and bool(torch.any(self.blocks.skipped != before)):
            raise FloatingPointError(
                "KOALA++ step met a NaN or inf (loss, gradient or denominator) or a negative "
                "residual; use nonfinite='skip' to skip such blocks instead"
            )

    def _run(self, args) -> None:
        if torch.compiler.is_compiling():  # the caller compiles: trace the engine inline
            _packed_step(*args)
            return
        if self.compiled is _packed_step:
            _packed_step(*args)
            return
        try:
            self.compiled(*args)
        except Exception as err:  # a compiler that does not work on this machine
            if self.opt._compile:
                raise
            warnings.warn(
                f"KoalaPP: torch.compile failed here ({type(err).__name__}: {err}); running "
                "the eager engine instead (same results, slower). Pass compile=False to "
                "silence this.",
                RuntimeWarning,
                stacklevel=4,
            )
            self.compiled = _packed_step
            _packed_step(*args)

    def _gather_grads(self) -> torch.Tensor | None:
        """Make the flat gradient buffer hold every gradient; returns the present mask."""
        self._scatter_params(into_buffers=True)
        missing = []
        for s in self.slots:
            g = s.param.grad
            if g is s.grad:
                continue
            if g is None:
                s.grad.zero_()
                missing.append(s.block)
                continue
            if g.is_sparse:
                raise RuntimeError("KoalaPP does not support sparse gradients")
            if s.dtensor and (not _is_dtensor(g) or g.placements != s.param.placements):
                raise ValueError(
                    f"KoalaPP: a DTensor parameter with placements {s.param.placements} got a "
                    f"gradient with placements {getattr(g, 'placements', None)}"
                )
            # a replaced gradient: copy it in (slower), then re-attach the view
            s.grad.copy_(_local(g))
            if not s.dtensor:
                s.param.grad = s.grad
        if not missing:
            return None
        have = torch.zeros(self.n_blocks, dtype=torch.bool)
        for s in self.slots:
            if s.param.grad is not None:
                have[s.block] = True
        return have.to(self.device)

    def _scatter_params(self, into_buffers: bool = False) -> None:
        # DTensor parameters keep their own storage (FSDP2 all-gathers from it): their local
        # shards are copied into theta before a step (a checkpoint load or the user may have
        # written them since) and back after it.
        if not self._dtensor_slots:
            return
        local = [_local(s.param) for s in self._dtensor_slots]
        theta = [s.theta for s in self._dtensor_slots]
        if into_buffers:
            torch._foreach_copy_(theta, local)
        else:
            torch._foreach_copy_(local, theta)

    def _fill_hyper(self) -> bool:
        """Write the groups' hyperparameters into ``hyper`` (one row per group); returns
        whether weight decay is on. Eagerly, Python numbers are written only when they changed
        (one copy); tensors (schedules on the device) are copied every step and count as
        decay, so that no value is read back to the host."""
        values = []
        for g in self.opt.param_groups:
            values.append([g[k] if k != "r" or g[k] is not None else 1.0 for k in HYPERPARAMETERS])
        wd = HYPERPARAMETERS.index("weight_decay")
        decay = any(isinstance(r[wd], torch.Tensor) or float(r[wd]) != 0 for r in values)
        plain = all(not isinstance(v, torch.Tensor) for row in values for v in row)
        # Inside a user's torch.compile: write every row, keep no cache (a cache attribute
        # mutated in the graph would fail its guard on the next call).
        compiling = torch.compiler.is_compiling()
        cache = plain and not compiling
        if cache and values == self._hyper_values:
            return decay
        if not compiling:
            self._block_hyper = None  # hyper changes now (every step, for tensor values)
        if cache:
            self.hyper.copy_(torch.tensor(values, dtype=self.hyper.dtype))
        else:
            for row, vals in zip(self.hyper, values, strict=True):
                for j, val in enumerate(vals):
                    if isinstance(val, torch.Tensor):
                        row[j].copy_(val.detach())
                    else:
                        row[j] = val
        if not compiling:
            self._hyper_values = values if cache else None
        return decay

    def zero_grad(self) -> None:
        for f in self.flats:
            f[1].zero_()
        for s in self.slots:
            if s.dtensor:
                s.param.grad = None
            elif s.param.requires_grad and s.param.grad is not s.grad:
                s.param.grad = s.grad
            elif not s.param.requires_grad:
                s.param.grad = None


def _scalar_dtype(params: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype of the per-block scalars and the loss: float32 at least, promoted over the
    parameters' dtypes (once per distinct dtype)."""
    dtype = torch.float32
    for d in {p.dtype for p in params}:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory exactly (a permutation of a contiguous layout, e.g.
    channels_last), so that a view of a flat buffer can carry its strides."""
    expected = 1
    for d in sorted(range(t.dim()), key=lambda i: t.stride(i)):
        if t.size(d) == 1:
            continue
        if t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _compile_available(device: torch.device) -> bool:
    env = os.environ.get("KOALA_FUNC_COMPILE")
    if env is not None:  # "0": the eager engine everywhere (e.g. quick test runs)
        return env not in ("0", "false", "False", "")
    try:
        return bool(torch._dynamo.is_dynamo_supported()) and device.type in ("cpu", "cuda", "xpu")
    except Exception:
        return False


def _fresh_state(p: torch.Tensor, group: dict[str, Any]) -> dict[str, torch.Tensor]:
    cdt = torch.promote_types(torch.float32, p.dtype)
    dev = _local(p).device
    sd = group["state_dtype"] or p.dtype
    r = 1.0 if group["r"] is None else group["r"]
    r = r.detach() if isinstance(r, torch.Tensor) else r
    return {
        "v": torch.zeros_like(p, dtype=sd).detach(),
        "h_prev": torch.zeros_like(p, dtype=sd).detach(),
        "s": torch.zeros((), dtype=cdt, device=dev),
        "count": torch.zeros((), dtype=torch.long, device=dev),
        "skipped": torch.zeros((), dtype=torch.long, device=dev),
        "r_est": torch.as_tensor(r, dtype=cdt).to(dev).reshape(()).clone(),
        "step": torch.zeros((), dtype=torch.long, device=dev),
    }


def _transform(group: dict[str, Any]):
    return KoalaPPTransform(
        r=group["r"],
        symmetric=bool(group["symmetric"]),
        granularity=group["granularity"],
        r_statistic=group["r_statistic"],
        eps=float(group["eps"]),
        state_dtype=group["state_dtype"],
        nonfinite=group["nonfinite"],
    )


def _group_state(opt: KoalaPP, group: dict[str, Any], keys: list[str]) -> KoalaPPState:
    params = group["params"]
    sts = [opt.state[p] for p in params]
    first = sts[0]
    glob = group["granularity"] == "global"
    like = first["r_est"]

    def td(name):
        return TensorDict({k: s[name] for k, s in zip(keys, sts, strict=True)})

    def blocks(name):
        return first[name].reshape(1) if glob else torch.stack([s[name] for s in sts])

    def as_t(x):
        x = 1.0 if x is None else x
        if isinstance(x, torch.Tensor):
            return x.detach().to(like)
        return torch.tensor(x, dtype=like.dtype, device=like.device)

    return KoalaPPState(
        v=td("v"),
        h_prev=td("h_prev"),
        s=blocks("s"),
        count=blocks("count"),
        skipped=blocks("skipped"),
        r_est=first["r_est"],
        step=first["step"],
        hyper=KoalaPPHyperparams(**{k: as_t(group[k]) for k in HYPERPARAMETERS}),
    )


def _loss_with_moments(mean, mean_sq, per_sample, dtype, device) -> torch.Tensor:
    """A loss tensor the reference step reads as these moments (two samples for 1-d)."""
    mean, mean_sq = mean.to(device, dtype), mean_sq.to(device, dtype)
    if not per_sample:
        return mean
    sd = (mean_sq - mean * mean).clamp_min(0).sqrt()
    return torch.stack([mean - sd, mean + sd])


def _check_nonfinite(group, skipped, before) -> None:
    if group["nonfinite"] == "raise" and bool(torch.any(skipped != before)):
        raise FloatingPointError(
            "KOALA++ step met a NaN or inf (loss, gradient or denominator) or a negative "
            "residual; use nonfinite='skip' to skip such blocks instead"
        )


def _check_group(group: dict[str, Any]) -> None:
    check_hyperparameters(
        lr=group["lr"],
        sigma=group["sigma"],
        q=group["q"],
        r=group["r"],
        alpha_r=group["alpha_r"],
        weight_decay=group["weight_decay"],
        loss_target=group["loss_target"],
        eps=group["eps"],
    )
    check_choice("granularity", group["granularity"], ("tensor", "global"))
    check_choice("nonfinite", group["nonfinite"], ("skip", "raise"))
    check_choice("r_statistic", group["r_statistic"], ("second_moment", "variance"))
    for p in group["params"]:
        if p.is_complex():
            raise TypeError(f"KoalaPP does not support complex parameters, got {p.dtype}")
        if not p.is_floating_point():
            raise TypeError(f"KoalaPP can only optimize floating-point tensors, got {p.dtype}")
