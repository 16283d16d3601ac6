r"""KOALA++ as a drop-in ``torch.optim.Optimizer``.

Reference: Zixuan Xia, Aram Davtyan, Paolo Favaro, "KOALA++: Efficient Kalman-Based Optimization
of Neural Networks with Gradient-Covariance Products", NeurIPS 2025, arXiv:2506.04432.

:class:`KoalaPP` is a thin shell around the functional core: every :meth:`KoalaPP.step` packs
each parameter group into a TensorDict and a :class:`~koala_func.koala_pp.KoalaPPState`, calls
:meth:`KoalaPPTransform.step <koala_func.koala_pp.KoalaPPTransform.step>` (the same math, see
``docs/torch-optim.md``) and copies the results back in place. It is tested step by step to be
bit-identical to the functional step.

State layout (``optimizer.state[p]``), chosen so that ``state_dict`` stays per-parameter like
every ``torch.optim`` optimizer:

- ``v``, ``h_prev``: tensors like ``p`` (dtype ``state_dtype`` or ``p.dtype``).
- ``s``, ``count``, ``skipped``: 0-d, the scalars of the filtered block ``p`` belongs to. With
  ``granularity="global"`` the whole group is one block and these tensors are shared by all of
  its parameters.
- ``r_est``, ``step``: 0-d, shared by all parameters of the group. Each group keeps its own R
  estimate; with the same ``r``/``alpha_r`` in every group (the default) all estimates see the
  same losses and are identical, i.e. one shared R as in the authors' released optimizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from tensordict import TensorDict

from koala_func._validation import check_choice, check_hyperparameters
from koala_func.koala_pp import KoalaPPHyperparams, KoalaPPState, KoalaPPTransform

__all__ = ["KoalaPP"]

_HYPER = ("lr", "sigma", "q", "r", "alpha_r", "weight_decay")
_BLOCK_KEYS = ("s", "count", "skipped")
_GROUP_KEYS = ("r_est", "step")
_STATE_KEYS = ("v", "h_prev", *_BLOCK_KEYS, *_GROUP_KEYS)


class KoalaPP(torch.optim.Optimizer):
    r"""KOALA++ (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432) as a ``torch.optim``
    optimizer.

    Each filtered block (one per tensor, or the whole group with ``granularity="global"``)
    runs, with :math:`H_k = g_k + \mathrm{wd}\,\theta_{k-1}` and the loss :math:`L`:

    .. math::

        v_k = (\alpha_k - \lambda_k) v_{k-1} + Q (H_k - \lambda_k H_{k-1}) + w_k H_{k-1},\quad
        S_k = (v_k + Q H_k) H_k^\top + R,\quad
        \theta_k = \theta_{k-1} - \eta\,L_k\,\frac{v_k + Q H_k}{S_k}

    (see :mod:`koala_func.koala_pp` for :math:`\lambda_k, \alpha_k, w_k` and the first step).

    The step needs the loss, because the step length is proportional to it::

        def closure():
            opt.zero_grad()
            losses = F.cross_entropy(model(x), y, reduction="none")
            losses.mean().backward()  # gradients of the MEAN loss
            return losses             # per-sample losses (or losses.mean())

        opt.step(closure)
        # or: loss.backward(); opt.step(loss=loss)

    Per-sample losses (1-d) feed the online R estimate with their second moment
    ``mean(losses**2)``; a 0-d mean loss uses ``loss**2``. The gradients must always be those
    of the mean loss.

    Args:
        params: parameters or parameter groups (dicts); every key below can be set per group.
        lr: learning rate :math:`\eta`. Stored in ``param_groups`` as a 0-d tensor so that
            learning-rate schedulers update it in place and a compiled step does not recompile.
        sigma: initial covariance variance, :math:`P_0 = \sigma I`.
        q: process noise :math:`Q`.
        r: fixed observation noise :math:`R`; ``None`` estimates it online from the loss.
        alpha_r: smoothing of the online R estimate (which starts at 1.0).
        weight_decay: L2 coefficient coupled into the filter (:math:`H = g + \mathrm{wd}\,\theta`).
        symmetric: keep the :math:`w_k` term (``False``: the cheaper asymmetric variant).
        granularity: ``"tensor"`` (one filter per tensor, as released) or ``"global"`` (one
            filter over the whole group, the paper's equations).
        eps: a block whose raw gradient norm is below ``eps`` is left unchanged.
        state_dtype: dtype of ``v`` and ``h_prev``; ``None`` uses each parameter's dtype.
            Use ``torch.float32`` with float16/bfloat16 parameters (see ``docs/safety.md``).
        nonfinite: ``"skip"`` (a block that meets NaN or inf is left unchanged, parameters and
            state, and counted in ``state[p]["skipped"]``) or ``"raise"``
            (``FloatingPointError``; reads a value on the host, so eager only).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = KoalaPP(model.parameters(), lr=0.5)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> for _ in range(4):
        ...     opt.zero_grad()
        ...     losses = F.cross_entropy(model(x), y, reduction="none")
        ...     losses.mean().backward()
        ...     _ = opt.step(loss=losses.detach())
        ...     sched.step()
        >>> group = opt.param_groups[0]
        >>> float(group["lr"])
        0.125
    """

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
        symmetric: bool = True,
        granularity: str = "tensor",
        eps: float = 1e-9,
        state_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
    ) -> None:
        defaults = dict(
            lr=lr,
            sigma=sigma,
            q=q,
            r=r,
            alpha_r=alpha_r,
            weight_decay=weight_decay,
            symmetric=symmetric,
            granularity=granularity,
            eps=eps,
            state_dtype=state_dtype,
            nonfinite=nonfinite,
        )
        self._transforms: dict[tuple, KoalaPPTransform] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (checks its hyperparameters; ``lr`` becomes a 0-d tensor)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group(group)
        group["lr"] = _lr_tensor(group["lr"], group["params"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_transforms", {})
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)
            group["lr"] = _lr_tensor(group["lr"], group["params"])

    def _transform(self, group: dict[str, Any]) -> KoalaPPTransform:
        # Only structural options select the transform: its numeric fields are used by init
        # alone, every step reads the hyperparameters from the state.
        key = (
            group["r"] is None,
            bool(group["symmetric"]),
            group["granularity"],
            float(group["eps"]),
            group["state_dtype"],
            group["nonfinite"],
        )
        t = self._transforms.get(key)
        if t is None:
            t = KoalaPPTransform(
                r=None if key[0] else 1.0,
                symmetric=key[1],
                granularity=key[2],
                eps=key[3],
                state_dtype=key[4],
                nonfinite=key[5],
            )
            self._transforms[key] = t
        return t

    # ------------------------------------------------------- functional views
    @staticmethod
    def _keys(group: dict[str, Any]) -> list[str]:
        return [str(i) for i in range(len(group["params"]))]

    def _params_td(self, group: dict[str, Any]) -> TensorDict:
        return TensorDict(
            {k: p.detach() for k, p in zip(self._keys(group), group["params"], strict=True)},
            batch_size=[],
        )

    def _init_state(self, group: dict[str, Any]) -> None:
        """Lazily create the state of a group, from the functional ``init``."""
        transform = self._transform(group)
        params = group["params"]
        # validated by add_param_group; init only reads these to fill the state
        values = {k: group[k] for k in _HYPER}
        fresh = dataclasses.replace(transform, **values).init(self._params_td(group))
        shared = {k: fresh.get(k) for k in _GROUP_KEYS}
        for i, (key, p) in enumerate(zip(self._keys(group), params, strict=True)):
            st = self.state[p]
            st["v"] = fresh.v.get(key)
            st["h_prev"] = fresh.h_prev.get(key)
            for k in _BLOCK_KEYS:
                # global: one block, the same 0-d tensors for every parameter of the group
                st[k] = fresh.get(k)[0 if transform.granularity == "global" else i]
            st.update(shared)

    def _hyper(self, group: dict[str, Any], like: torch.Tensor) -> KoalaPPHyperparams:
        def as_tensor(x):
            if isinstance(x, torch.Tensor):
                return x.to(dtype=like.dtype, device=like.device)
            return torch.tensor(x, dtype=like.dtype, device=like.device)

        values = {k: group[k] for k in _HYPER}
        values["r"] = 1.0 if values["r"] is None else values["r"]  # unused when online
        return KoalaPPHyperparams(**{k: as_tensor(v) for k, v in values.items()})

    def functional_state(self, group_index: int = 0) -> KoalaPPState:
        """The state of one group as a :class:`KoalaPPState` (keys ``"0"``, ``"1"``, ... in the
        group's parameter order). The tensors are the optimizer's own (not copies).
        """
        group = self.param_groups[group_index]
        if group["params"] and group["params"][0] not in self.state:
            self._init_state(group)
        return self._group_state(group)

    def _group_state(self, group: dict[str, Any]) -> KoalaPPState:
        params = group["params"]
        sts = [self.state[p] for p in params]
        first = sts[0]
        glob = group["granularity"] == "global"
        keys = self._keys(group)

        def td(name):
            return TensorDict({k: s[name] for k, s in zip(keys, sts, strict=True)}, batch_size=[])

        def blocks(name):
            if glob:
                return first[name].reshape(1)
            return torch.stack([s[name] for s in sts])

        return KoalaPPState(
            v=td("v"),
            h_prev=td("h_prev"),
            s=blocks("s"),
            count=blocks("count"),
            skipped=blocks("skipped"),
            r_est=first["r_est"],
            step=first["step"],
            hyper=self._hyper(group, first["r_est"]),
        )

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], torch.Tensor] | None = None,
        *,
        loss: torch.Tensor | float | None = None,
    ) -> torch.Tensor | None:
        """One KOALA++ update of every group.

        Args:
            closure: re-evaluates the model, calls ``backward`` on the *mean* loss and returns
                the loss: the mean (0-d) or the per-sample losses (1-d).
            loss: the loss, when the gradients are already computed (``loss.backward()``);
                the mean (0-d) or the per-sample losses (1-d). Give ``closure`` or ``loss``.

        Returns:
            the loss (as returned by ``closure``, or ``loss``).
        """
        if closure is not None:
            if loss is not None:
                raise ValueError("KoalaPP.step takes a closure or a loss, not both")
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError(
                "KoalaPP.step needs the loss: call step(closure) or step(loss=loss) "
                "(the step length is proportional to the loss)"
            )
        out = loss
        loss_t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))

        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            if params[0] not in self.state:
                self._init_state(group)
            grads = {}
            for key, p in zip(self._keys(group), params, strict=True):
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("KoalaPP does not support sparse gradients")
                    grads[key] = p.grad
            state = self._group_state(group)
            new_params, new_state = self._transform(group).step(
                self._params_td(group),
                TensorDict(grads, batch_size=[]),
                loss_t.to(params[0].device),
                state,
            )
            self._write_back(group, new_params, new_state)
        return out

    def _write_back(
        self, group: dict[str, Any], new_params: TensorDict, new_state: KoalaPPState
    ) -> None:
        params = group["params"]
        keys = self._keys(group)
        sts = [self.state[p] for p in params]
        dst = list(params)
        src = [new_params.get(k) for k in keys]
        for name in ("v", "h_prev"):
            dst += [s[name] for s in sts]
            src += [getattr(new_state, name).get(k) for k in keys]
        if group["granularity"] == "global":
            first = sts[0]
            for name in _BLOCK_KEYS:
                dst.append(first[name])
                src.append(getattr(new_state, name)[0])
        else:
            for name in _BLOCK_KEYS:
                dst += [s[name] for s in sts]
                src += list(getattr(new_state, name).unbind())
        dst += [sts[0][k] for k in _GROUP_KEYS]
        src += [new_state.r_est, new_state.step]
        torch._foreach_copy_(dst, src)

    # ------------------------------------------------------------- state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`: an exact (bit-identical) continuation.

        ``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to the
        parameter's dtype, which would round a float32 state of a bfloat16 parameter and turn
        the int64 counters into floats; this override keeps the saved dtypes and only moves the
        tensors to the parameter's device, and re-links the tensors shared by a group.
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
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"], strict=True):
            ids = saved_group["params"]
            if not ids or ids[0] not in saved_state:
                continue  # this group had not stepped yet: it initializes lazily
            missing = [i for i in ids if i not in saved_state]
            if missing:
                raise ValueError(f"loaded state dict lacks the state of parameters {missing}")
            device = group["params"][0].device
            moved: dict[int, torch.Tensor] = {}  # keep tensors shared in the checkpoint shared

            def load(t, device=device, moved=moved):
                if id(t) not in moved:
                    moved[id(t)] = t.to(device=device, copy=True)
                return moved[id(t)]

            first = saved_state[ids[0]]
            shared = {k: load(first[k]) for k in _GROUP_KEYS}
            glob = group["granularity"] == "global"
            for i in ids:
                saved = saved_state[i]
                absent = [k for k in _STATE_KEYS if k not in saved]
                if absent:
                    raise KeyError(f"loaded state of parameter {i} lacks {absent}")
                p = id_map[i]
                st = {
                    "v": saved["v"].to(device=p.device, copy=True),
                    "h_prev": saved["h_prev"].to(device=p.device, copy=True),
                }
                for k in _BLOCK_KEYS:
                    st[k] = load(first[k] if glob else saved[k])
                st.update(shared)
                if st["v"].shape != p.shape:
                    raise ValueError(
                        f"loaded state of shape {tuple(st['v'].shape)} does not match "
                        f"parameter shape {tuple(p.shape)}"
                    )
                self.state[p] = st


def _check_group(group: dict[str, Any]) -> None:
    check_hyperparameters(
        lr=group["lr"],
        sigma=group["sigma"],
        q=group["q"],
        r=group["r"],
        alpha_r=group["alpha_r"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
    )
    check_choice("granularity", group["granularity"], ("tensor", "global"))
    check_choice("nonfinite", group["nonfinite"], ("skip", "raise"))
    for p in group["params"]:
        if p.is_complex():
            raise TypeError(f"KoalaPP does not support complex parameters, got {p.dtype}")
        if not p.is_floating_point():
            raise TypeError(f"KoalaPP can only optimize floating-point tensors, got {p.dtype}")


def _lr_tensor(lr: float | torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``lr`` as a 0-d tensor of the group's scalar dtype (schedulers then ``fill_`` it)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    device = params[0].device if params else None
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.dtype == dtype and lr.dim() == 0 and (device is None or lr.device == device):
            return lr
        return lr.detach().reshape(()).to(dtype=dtype, device=device)
    return torch.tensor(lr, dtype=dtype, device=device)
