r"""The functional door: ``koala_pp(...)`` builds an optimizer with pure ``init`` and ``step``.

``step(params, grads, loss, state) -> (params, state)`` over TensorDicts (nested keys, integer
leaves passed through). Which implementation runs:

- eagerly, the readable reference (:func:`koala_func.reference.reference_step`), exact;
- inside ``torch.compile`` (``torch.compile(opt.step, fullgraph=True)``), the engine
  (:mod:`koala_func.engine`), and the results come back as views of packed buffers. Compiled
  as a function of its own, ``step`` takes the TensorDicts apart and packs the leaves eagerly
  (leaves that are views of a previous step's results are read where they are), and only the
  engine on the packed buffers is traced (see ``_engine_frame``): its graph,
  guards and compile time do not grow with the number of tensors. Traced inside a user's
  compiled function, all of it is, the tensors packed by one opaque op per buffer.
  Differentiable optimizers keep the reference (the packing op has no autograd formula);
- ``impl="engine"`` forces the engine eagerly too, ``impl="reference"`` never uses it.

The in-place speed (no packing copies, no fresh outputs) is :class:`koala_func.KoalaPP`'s:
its parameters and gradients already live in the engine's buffers.

Also here: glue that turns a module and a loss into pure functions of the parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from tensordict import TensorDict, TensorDictBase

from koala_func._validation import (
    Scalar,
    check_choice,
    check_hyperparameters,
    check_state,
    check_step_inputs,
)
from koala_func.engine import BlockConfig, Blocks, Buffers, Hyper, Layout, loss_moments, run
from koala_func.engine.math import BlockUpdate
from koala_func.reference import reference_step
from koala_func.state import (
    HYPERPARAMETERS,
    Granularity,
    KoalaPPHyperparams,
    KoalaPPState,
    NestedKey,
    NonFinite,
    RStatistic,
    blocks_of,
    float_keys,
    leaves,
    replace_fields,
    replace_leaves,
    scalar_dtype,
    without_grad,
)

__all__ = ["KoalaPPTransform", "koala_pp", "params_of", "per_sample_loss", "value_and_grad"]

Impl = Literal["auto", "engine", "reference"]


@dataclass(frozen=True, eq=False)
class KoalaPPTransform:
    """The KOALA++ optimizer: two pure functions, :meth:`init` and :meth:`step`.

    Build it with :func:`koala_pp`. The hyperparameters given here are the initial values that
    :meth:`init` writes into the state; :meth:`step` reads them from the state only, so a
    compiled step never recompiles when they change (``state.with_hyperparams(lr=...)``).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3), b=torch.zeros(()))
        >>> state = opt.init(params)
        >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]), b=torch.tensor(0.5))
        >>> params, state = opt.step(params, grads, torch.tensor(0.7), state)
        >>> state = state.with_hyperparams(lr=0.25)  # a schedule: edit the state between steps
        >>> params, state = opt.step(params, grads, torch.tensor(0.6), state)
        >>> state.step.item(), state.count.tolist()
        (2, [2, 2])
    """

    lr: Scalar = 1.0
    sigma: Scalar = 0.1
    q: Scalar = 0.1
    r: Scalar | None = None
    alpha_r: Scalar = 0.9
    weight_decay: Scalar = 0.0
    loss_target: Scalar = 0.0
    symmetric: bool = True
    granularity: Granularity = "tensor"
    r_statistic: RStatistic = "second_moment"
    eps: float = 1e-9
    state_dtype: torch.dtype | None = None
    differentiable: bool = False
    nonfinite: NonFinite = "skip"
    impl: Impl = "auto"

    @property
    def online_r(self) -> bool:
        return self.r is None

    def init(self, params: TensorDictBase) -> KoalaPPState:
        """A fresh state for ``params`` (a TensorDict, e.g. ``TensorDict.from_module(model)``).

        ``v`` and ``h_prev`` start at zero; the first :meth:`step` of each block replaces them
        as the released optimizer does (``v_prev = sigma * H``), without branching.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> state = koala_pp(granularity="global").init(TensorDict(w=torch.ones(2, 2)))
            >>> state.s.shape, state.hyper.lr.item()
            (torch.Size([1]), 1.0)
        """
        keys = float_keys(params)
        dtype = scalar_dtype(params)
        device = params.get(keys[0]).device if keys else params.device or torch.device("cpu")
        n_blocks = len(blocks_of(keys, self.granularity))

        def state_like(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(p, dtype=self.state_dtype or p.dtype).detach()

        def scalar(x: Scalar) -> torch.Tensor:
            if isinstance(x, torch.Tensor):
                return x.to(dtype=dtype, device=device)
            return torch.tensor(x, dtype=dtype, device=device)

        zeros = params.select(*keys).apply(state_like) if keys else TensorDict()
        values = {k: getattr(self, k) for k in HYPERPARAMETERS}
        values["r"] = 1.0 if self.r is None else self.r
        state = KoalaPPState(
            v=zeros,
            h_prev=zeros.clone(),
            s=torch.zeros(n_blocks, dtype=dtype, device=device),
            count=torch.zeros(n_blocks, dtype=torch.int64, device=device),
            skipped=torch.zeros(n_blocks, dtype=torch.int64, device=device),
            r_est=scalar(values["r"]),
            step=torch.zeros((), dtype=torch.int64, device=device),
            hyper=KoalaPPHyperparams(**{k: scalar(v) for k, v in values.items()}),
        )
        # A state rebuilt by a compiled step comes back unlocked, and Dynamo guards on the
        # lock flag: start unlocked too, so that the second compiled call does not recompile.
        # The fields are still read-only (a frozen TensorClass); steps return new states.
        state._tensordict.unlock_()
        return state

    def step(
        self,
        params: TensorDictBase,
        grads: TensorDictBase,
        loss: torch.Tensor,
        state: KoalaPPState,
    ) -> tuple[TensorDictBase, KoalaPPState]:
        """One KOALA++ update: returns new parameters and a new state; inputs are not modified.

        Args:
            params: the parameters (TensorDict; non-float leaves pass through).
            grads: gradients of the mean loss, a TensorDict with a subset of the float keys of
                ``params``. A missing key, or a block whose raw gradient norm is below ``eps``,
                leaves that block and its state unchanged (with ``granularity="global"``, a
                missing gradient counts as zero).
            loss: the minibatch mean loss (0-d) or the per-sample losses (1-d).
            state: from :meth:`init` or a previous :meth:`step`.

        Examples:
            >>> import torch
            >>> from tensordict import TensorDict
            >>> opt = koala_pp(lr=1.0, r=0.5)
            >>> params = TensorDict(w=torch.tensor([1.0, 2.0]))
            >>> state = opt.init(params)
            >>> per_sample = torch.tensor([0.5, 0.9, 0.7])  # 1-d: per-sample losses
            >>> grads = TensorDict(w=torch.tensor([0.3, 0.4]))
            >>> new, state = opt.step(params, grads, per_sample, state)
            >>> bool((new["w"] < params["w"]).all())
            True
        """
        # A torch.compile frame hook is set: opt.step is called as a compiled function.
        # (Inlined here, not a helper: a function called from this frame is compiled.)
        hooked = not torch.compiler.is_compiling() and (
            _FRAME_HOOK is not None and _FRAME_HOOK() not in (None, False)
        )
        if hooked and not self.differentiable:
            # the compiled frame then sees the same leaf types on every call (see below)
            params = _without_grad(params)
            if self.impl != "reference":
                # torch.compile(opt.step): the TensorDict work runs here, eagerly, and only
                # _engine_frame (tensors in, tensors out) is traced and compiled.
                found = _engine_inputs(self, params, grads, loss, state)
                if found is not None:
                    plan, bufs, outs, frame = found
                    # Static shapes: _engine_frame is one code object for every model, and
                    # Dynamo would make a size dynamic on seeing a buffer again with another
                    # size (a second model in the process), which the layout cannot take.
                    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                        blocks, step = _engine_frame(self, bufs, outs, *frame)
                    return _frame_outputs(params, state, plan, outs, blocks, step)
        return self._step(params, grads, loss, state, n_lead=0)

    def _checked_leaves(self, params, grads, loss, state, n_lead: int):
        """``(keys, params, grads, v)``: the float keys and the leaves by key, once the inputs
        passed the structural checks (no values read)."""
        p_leaves, g_leaves = leaves(params), leaves(grads)
        keys = float_keys(p_leaves)
        check_step_inputs(keys, p_leaves, g_leaves, loss, n_lead)
        v_leaves = leaves(state.v)
        n_blocks = len(blocks_of(keys, self.granularity))
        check_state(keys, p_leaves, v_leaves, state.s.shape[-1], n_blocks)
        self._check_loss(loss, n_lead)
        return keys, p_leaves, g_leaves, v_leaves

    def _step(self, params, grads, loss, state, n_lead: int):
        keys, p_leaves, g_leaves, v_leaves = self._checked_leaves(
            params, grads, loss, state, n_lead
        )
        engine = self.impl == "engine" or (
            self.impl == "auto" and torch.compiler.is_compiling() and not self.differentiable
        )
        ctx = contextlib.nullcontext() if self.differentiable else torch.no_grad()
        with ctx:
            if engine and keys:
                new_params, new_state = engine_step(
                    self, keys, (p_leaves, g_leaves, v_leaves), params, loss, state, n_lead
                )
            else:
                new_params, new_state = reference_step(self, keys, params, grads, loss, state)
        if self.nonfinite == "raise" and not torch.compiler.is_compiling():
            if bool(torch.any(new_state.skipped != state.skipped)):  # eager only: a host sync
                raise FloatingPointError(
                    "KOALA++ step met a NaN or inf (loss, gradient or denominator) or a "
                    "negative residual; use nonfinite='skip' to skip such blocks instead"
                )
        return new_params, new_state

    def _check_loss(self, loss: torch.Tensor, n_lead: int) -> None:
        if self.r_statistic == "variance" and self.online_r and loss.dim() == n_lead:
            raise ValueError(
                "r_statistic='variance' needs the per-sample losses (a 1-d loss): the variance "
                "of a single mean loss is unavailable"
            )

    def block_config(self) -> BlockConfig:
        """The structural options as the engine takes them."""
        return BlockConfig(
            symmetric=self.symmetric,
            online=self.online_r,
            variance=self.r_statistic == "variance",
            eps=self.eps,
        )


def _engine_inputs(opt: KoalaPPTransform, params, grads, loss, state):
    """What :func:`_engine_frame` takes, built eagerly (the checks of ``_step``; each buffer
    read where it is when its leaves are views of one, a previous step's results, else packed
    by one copy into a spare buffer; three spare result buffers per layout), or ``None`` when
    ``params`` has no floating-point leaf: ``(plan, buffers, results, the frame's other
    arguments)``."""
    keys, p_leaves, g_leaves, v_leaves = opt._checked_leaves(params, grads, loss, state, 0)
    if not keys:
        return None
    h_leaves = leaves(state.h_prev)
    with torch.no_grad():
        plan = engine_plan(opt, keys, p_leaves, g_leaves, 0)
        v = [v_leaves[k] for k in keys]
        bufs = engine_buffers(opt, plan, v, [h_leaves[k] for k in keys], 0, _packed_or_copy)
    # Results in buffers of their own, never in the inputs (which may be the caller's): one
    # graph for both, with no aliasing between inputs and results to guard on.
    outs = [
        (layout.spare(), *(layout.spare(dtype=b.v.dtype) for _ in range(2)))
        for (layout, _), b in zip(plan.groups, bufs, strict=True)
    ]
    owners = [layout.owner for layout, _ in plan.groups]
    frame = (owners, tuple(plan.present), tuple(blocks_in(state)), tuple(hyper_of(state.hyper)))
    return plan, [tuple(b) for b in bufs], outs, (*frame, loss, state.step)


def _packed_or_copy(layout: Layout, tensors: list, dtype: torch.dtype) -> torch.Tensor | None:
    """The buffer that ``tensors`` are views of (a step fed its own results reads them where
    they are: no packing copy), else :func:`spare_pack`. A ``packed`` callback of
    :func:`engine_buffers`."""
    base = layout.packed_base(tensors, 0, dtype)
    return base if base is not None else spare_pack(layout, tensors, dtype)


def spare_pack(
    layout: Layout, tensors: list, dtype: torch.dtype, n_lead: int = 0
) -> torch.Tensor | None:
    """``tensors`` packed by direct copies into a spare buffer of ``layout``, the caller's own
    (``None``: all missing, :func:`engine_buffers` zeros them). A ``packed`` callback of
    :func:`engine_buffers`."""
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return None
    lead = first.shape[:n_lead]
    return layout.pack(tensors, dtype, n_lead, out=layout.spare(*lead, dtype=dtype))


def _engine_frame(opt: KoalaPPTransform, bufs, outs, owners, present, blocks, hyper, loss, step):
    """The compiled part of ``torch.compile(opt.step)``: the engine over the packed buffers
    of :func:`_engine_inputs`, its update written into the result buffers ``outs``. Its
    inputs are a few buffers whatever the number of tensors, so its guards, compile time and
    overhead do not grow with them; :func:`_frame_outputs` makes the views eagerly (a view
    that a graph returns is rebuilt by AOTAutograd, in Python, on every call)."""
    with torch.no_grad():
        _, u = engine_run(
            opt,
            owners,
            present,
            [Buffers(*b) for b in bufs],
            Blocks(*blocks),
            Hyper(*hyper),
            loss,
            0,
            out=outs,
        )
        return blocks_out(u), step + 1


@torch._dynamo.disable
def _frame_outputs(params, state, plan, outs, blocks, step):
    """The new params and state: views of the result buffers :func:`_engine_frame` wrote."""
    new = engine_views(plan, outs, 0)
    return engine_outputs(params, state, new, blocks, step)


# Dynamo compiles every frame that runs while a compiled function's hook is set, so that when a
# user compiles ``opt.step``: ``step``'s own frame is skipped (run as plain Python), the
# TensorDict work around the engine runs in disabled functions (plain Python, called only
# outside a trace, where they cannot break a graph), and the one compiled frame is
# ``_engine_frame``'s. Tracing TensorDicts costs about 15 ms per tensor at trace time; the
# step also detaches ``TensorDict.from_module``'s nn.Parameters there, so the first call and
# the later ones (on plain tensors) meet the same guards: one graph, not two. Inlined into a
# user's compiled function, ``step`` is traced as usual. On a torch without these hooks,
# Dynamo compiles ``step`` whole, TensorDicts included (slower to compile, same results).
_FRAME_HOOK = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
if hasattr(torch._dynamo.eval_frame, "skip_code") and _FRAME_HOOK is not None:
    torch._dynamo.eval_frame.skip_code(KoalaPPTransform.step.__code__)
else:  # pragma: no cover - a torch without them
    _FRAME_HOOK = None
_without_grad = torch._dynamo.disable(without_grad)
_engine_inputs = torch._dynamo.disable(_engine_inputs)


_LAYOUTS: dict[tuple, list[tuple[Layout, list[int]]]] = {}


#: With leading member dims (ensembles), a dtype group of at most this many tensors gets one
#: layout per tensor, of one chunk (the whole tensor): the packed buffer of a contiguous
#: ``[E, *shape]`` tensor is the tensor itself, so the step reads the members' parameters,
#: states and gradients where they are, with no packing copy and no padding. It costs graph
#: inputs and loops per tensor (compile time grows with them up to this bound); larger groups
#: share one layout, whose compile time does not grow with the number of tensors.
PER_TENSOR_LAYOUTS = 8


@torch._dynamo.assume_constant_result
def _groups(key: tuple) -> list[tuple]:
    # Plain Python even while Dynamo traces a step (a trace-time constant): interpreted, this
    # bookkeeping over every tensor costs about a second at 160 tensors.
    sig, blocks, state_dtype, flags, n_lead = key
    sig = tuple((tuple(shape[n_lead:]), dt, dev) for shape, dt, dev in sig)
    groups: dict[tuple, list[int]] = {}
    for i, (_, dt, dev) in enumerate(sig):
        groups.setdefault((dt, state_dtype or dt, dev, flags[i]), []).append(i)
    out = []
    for (dt, _, dev, _), idx in groups.items():
        if n_lead and len(idx) <= PER_TENSOR_LAYOUTS:  # (shapes, ..., idx, chunk size)
            out += [((sig[i][0],), dt, dev, (blocks[i],), [i], _numel(sig[i][0])) for i in idx]
        else:
            shapes = tuple(sig[i][0] for i in idx)
            out.append((shapes, dt, dev, tuple(blocks[i] for i in idx), idx, None))
    return out


def _numel(shape: tuple) -> int:
    return max(1, math.prod(shape))


def layouts_for(
    tensors: list[torch.Tensor],
    blocks: list[int],
    state_dtype,
    n_lead: int,
    sharded: list[bool] | None = None,
) -> list[tuple[Layout, list[int]]]:
    """One :class:`Layout` per (dtype, state dtype, device, sharded) group of ``tensors`` (or
    per tensor of a small group, with member dims: :data:`PER_TENSOR_LAYOUTS`), with the
    indices of its tensors; cached by structure, so a compiled step builds them once."""
    # Per tensor only what the guards fix; the rest is worked out in _groups (plain Python).
    sig = tuple((t.shape, t.dtype, t.device) for t in tensors)
    flags = tuple(sharded) if sharded is not None else (False,) * len(tensors)
    key = (sig, tuple(blocks), state_dtype, flags, n_lead)
    # Inside a compiled graph the layout is built at trace time only; a cache lookup there
    # would add a guard on the cache that fails once the entry exists (a recompile).
    compiling = torch.compiler.is_compiling()
    found = None if compiling else _LAYOUTS.get(key)
    if found is None:
        found = [
            (Layout(shapes, dt, dev, group_blocks, chunk_size=chunk), idx)
            for shapes, dt, dev, group_blocks, idx, chunk in _groups(key)
        ]
        if not compiling:
            _LAYOUTS[key] = found
    return found


def hyper_of(hyper: KoalaPPHyperparams) -> Hyper:
    """The state's hyperparameters as the engine takes them (``[..., 1]``: one for all blocks)."""
    return Hyper(*(getattr(hyper, k).unsqueeze(-1) for k in HYPERPARAMETERS))


class EnginePlan(NamedTuple):
    """What one step of the engine packs: the layouts and, by key order, the tensors."""

    keys: list[NestedKey]
    groups: list[tuple[Layout, list[int]]]  # one Layout per dtype group, with its tensors
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    present: list[bool]  # per block: it received a gradient


def engine_plan(
    opt: KoalaPPTransform,
    keys: list[NestedKey],
    p_leaves: dict,
    g_leaves: dict,
    n_lead: int,
    sharded: list[bool] | None = None,
) -> EnginePlan:
    """The layouts for ``keys`` of ``p_leaves`` (cached by structure) and the gradients."""
    tensors = [p_leaves[k] for k in keys]
    blocks = list(range(len(keys))) if opt.granularity == "tensor" else [0] * len(keys)
    present = [False] * len(blocks_of(keys, opt.granularity))
    grads = [g_leaves.get(k, None) for k in keys]
    for b, g in zip(blocks, grads, strict=True):
        present[b] |= g is not None
    groups = layouts_for(tensors, blocks, opt.state_dtype, n_lead, sharded)
    return EnginePlan(keys, groups, tensors, grads, present)


Packed = Callable[[Layout, list, torch.dtype], "torch.Tensor | None"]


def engine_buffers(
    opt: KoalaPPTransform,
    plan: EnginePlan,
    v: list[torch.Tensor],
    h: list[torch.Tensor],
    n_lead: int,
    packed: Packed | None = None,
) -> list[Buffers]:
    """Per layout, the :class:`~koala_func.engine.Buffers` of the step: ``packed(layout,
    tensors, dtype)`` may return an existing buffer that ``tensors`` are views of, or a copy
    (the functional door's :func:`_packed_or_copy`); otherwise the tensors are packed (a
    missing gradient is zeros)."""
    bufs = []
    for layout, idx in plan.groups:
        sd = opt.state_dtype or layout.dtype
        lead = plan.params[idx[0]].shape[:n_lead]

        def pk(items, dtype, layout=layout, idx=idx, lead=lead):
            chosen = [items[i] for i in idx]
            found = packed(layout, chosen, dtype) if packed is not None else None
            if found is not None:
                return found
            if all(t is None for t in chosen):  # no gradient in this layout
                if torch.compiler.is_compiling():  # a constant that inductor folds in
                    return layout.zeros(*lead, dtype=dtype)
                # a recycled buffer, zeroed: a new one is a fresh mapping on CPU each call
                return layout.spare(*lead, dtype=dtype).zero_()
            return layout.pack(chosen, dtype, n_lead)

        g = pk(plan.grads, layout.dtype)
        bufs.append(Buffers(pk(plan.params, layout.dtype), g, pk(v, sd), pk(h, sd)))
    return bufs


def engine_run(
    opt: KoalaPPTransform,
    owners: list[torch.Tensor],
    present: Sequence[bool],
    bufs: list[Buffers],
    blocks: Blocks,
    hyper: Hyper,
    loss: torch.Tensor,
    n_lead: int,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sharded: list[bool] | None = None,
    out: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    overwrite: bool = False,
    inplace: bool = False,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], BlockUpdate]:
    """:func:`~koala_func.engine.run` on packed buffers (``owners``: each layout's
    ``Layout.owner``; ``present``: per block, it received a gradient; ``sharded``: per
    layout; ``out``: buffers to write the results into; ``overwrite``: write them into
    ``bufs``, the caller's own copies; ``inplace``: write them into ``bufs`` and the block
    state into ``blocks``), with the loss moments of ``loss``."""
    cdt = blocks.s.dtype
    per_sample = loss.dim() == n_lead + 1
    if per_sample:
        mean, mean_sq = loss_moments(loss, cdt)
    else:
        mean = loss.to(cdt)
        mean_sq = mean.square()
    return run(
        owners,
        bufs,
        blocks,
        mean,
        mean_sq,
        hyper,
        opt.block_config(),
        present=None if all(present) else torch.tensor(list(present), device=blocks.s.device),
        reduce=reduce,
        per_sample=per_sample,
        sharded=sharded,
        out=out,
        overwrite=overwrite,
        inplace=inplace,
    )


def engine_views(
    plan: EnginePlan,
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_lead: int,
    like: tuple[dict, dict, dict] | None = None,
) -> tuple[dict, dict, dict]:
    """The new params, v and h_prev by key, as views of the packed results ``out``. With
    ``like`` (the inputs' leaves) and member dims, an output whose input was contiguous is a
    contiguous copy: a compiled step guards on strides, so outputs look like their inputs."""
    new: tuple[dict, dict, dict] = ({}, {}, {})
    keys = plan.keys
    for (layout, idx), bufs_out in zip(plan.groups, out, strict=True):
        for j, (flat, found_out) in enumerate(zip(bufs_out, new, strict=True)):
            for i, view in zip(idx, layout.views(flat), strict=True):
                # With member dims a view strides over the whole packed row.
                contiguous = like is not None and n_lead and like[j][keys[i]].is_contiguous()
                found_out[keys[i]] = view.contiguous() if contiguous else view
    return new


def engine_state(
    state: KoalaPPState,
    v: TensorDictBase,
    h_prev: TensorDictBase,
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    step: torch.Tensor,
) -> KoalaPPState:
    """``state`` after a step: new ``v`` and ``h_prev``, the new block state
    (:func:`blocks_out`) and step count."""
    s, count, skipped, r_est = blocks
    return replace_fields(
        state, v=v, h_prev=h_prev, s=s, count=count, skipped=skipped, r_est=r_est, step=step
    )


def blocks_out(u: BlockUpdate) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, count, skipped, r_est)`` after a step, as the state stores them."""
    return u.s, u.count, u.skipped, u.r.squeeze(-1)


def blocks_in(state: KoalaPPState | dict) -> Blocks:
    """The stored per-block state as the engine takes it (``state``: a state, or the dict of
    its fields, which an eager door reads directly: a TensorClass attribute costs
    microseconds)."""
    if isinstance(state, dict):
        s, count, skipped, r_est = (state[k] for k in ("s", "count", "skipped", "r_est"))
    else:
        s, count, skipped, r_est = state.s, state.count, state.skipped, state.r_est
    return Blocks(s, count, skipped, r_est.unsqueeze(-1))


def engine_leaves(
    opt: KoalaPPTransform,
    keys: list[NestedKey],
    found: tuple[dict, dict, dict, dict],
    loss: torch.Tensor,
    blocks: Blocks,
    hyper: Hyper,
    n_lead: int,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sharded: list[bool] | None = None,
) -> tuple[tuple[dict, dict, dict], BlockUpdate]:
    """The engine on leaf dicts: pack, :func:`~koala_func.engine.run`, unpack as views.
    ``found``: params, grads, v and h_prev by key; returns the new params, v and h_prev by
    key, and the block update."""
    p_leaves, g_leaves, v_leaves, h_leaves = found
    plan = engine_plan(opt, keys, p_leaves, g_leaves, n_lead, sharded)
    bufs = engine_buffers(
        opt, plan, [v_leaves[k] for k in keys], [h_leaves[k] for k in keys], n_lead
    )
    # The packed theta, v and h are this step's own copies (new buffers from the pack op,
    # pooled on CPU): the update overwrites them and the results are views of them. Under vmap
    # a result can be batched where its pack is not: new tensors there.
    batched = any(map(torch._C._functorch.is_batchedtensor, [loss, *(t for b in bufs for t in b)]))
    out, u = engine_run(
        opt,
        [layout.owner for layout, _ in plan.groups],
        plan.present,
        bufs,
        blocks,
        hyper,
        loss,
        n_lead,
        reduce=reduce,
        sharded=None if sharded is None else [sharded[idx[0]] for _, idx in plan.groups],
        overwrite=not batched,
    )
    return engine_views(plan, out, n_lead, like=(p_leaves, v_leaves, h_leaves)), u


def engine_outputs(
    params: TensorDictBase,
    state: KoalaPPState,
    new: tuple[dict, dict, dict],
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    step: torch.Tensor,
) -> tuple[TensorDictBase, KoalaPPState]:
    """The new params and state from :func:`engine_leaves`'s leaves, the block state
    (:func:`blocks_out`) and the step count."""
    v, h_prev = replace_leaves(state.v, new[1]), replace_leaves(state.h_prev, new[2])
    return replace_leaves(params, new[0]), engine_state(state, v, h_prev, blocks, step)


def engine_step(
    opt: KoalaPPTransform,
    keys: list[NestedKey],
    found: tuple[dict, dict, dict],
    params: TensorDictBase,
    loss: torch.Tensor,
    state: KoalaPPState,
    n_lead: int,
    *,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sharded: list[bool] | None = None,
) -> tuple[TensorDictBase, KoalaPPState]:
    """:meth:`KoalaPPTransform.step` through the engine (:func:`engine_leaves`). ``n_lead``
    leading member dimensions (ensembles) on every tensor. ``found``: the leaves of params,
    grads and ``state.v`` by key. ``reduce`` and ``sharded`` (per key: its sums are partial)
    are the engine's, for local shards (:mod:`koala_func.distributed`)."""
    new, u = engine_leaves(
        opt,
        keys,
        (*found, leaves(state.h_prev)),
        loss,
        blocks_in(state),
        hyper_of(state.hyper),
        n_lead,
        reduce=reduce,
        sharded=sharded,
    )
    return engine_outputs(params, state, new, blocks_out(u), state.step + 1)


def koala_pp(
    *,
    lr: Scalar = 1.0,
    sigma: Scalar = 0.1,
    q: Scalar = 0.1,
    r: Scalar | None = None,
    alpha_r: Scalar = 0.9,
    weight_decay: Scalar = 0.0,
    loss_target: Scalar = 0.0,
    symmetric: bool = True,
    granularity: Granularity = "tensor",
    r_statistic: RStatistic = "second_moment",
    eps: float = 1e-9,
    state_dtype: torch.dtype | None = None,
    differentiable: bool = False,
    nonfinite: NonFinite = "skip",
    impl: Impl = "auto",
) -> KoalaPPTransform:
    """Build a KOALA++ optimizer (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv:2506.04432).

    Args:
        lr: learning rate :math:`\\eta` (the released default for vision is 1.0).
        sigma: initial covariance variance, :math:`P_0 = \\sigma I` (``v_0 = sigma * H``).
        q: process noise :math:`Q`.
        r: fixed observation noise :math:`R`; ``None`` estimates it online from the loss.
        alpha_r: smoothing of the online R estimate (which starts at 1.0).
        weight_decay: L2 coefficient coupled into the filter (:math:`H = g + wd\\,\\theta`).
        loss_target: the observation the loss is driven to (default 0). The step is
            proportional to the residual ``L_blk - loss_target``; a block whose residual is
            negative is skipped and counted in ``state.skipped`` (it would move uphill). Set it
            to a lower bound of the loss for losses that can be negative.
        symmetric: keep the :math:`w_k` term (the symmetric least-squares estimate); ``False``
            is the cheaper asymmetric variant.
        granularity: ``"tensor"`` (one filter per tensor, as released) or ``"global"``.
        r_statistic: what feeds the online R: ``"second_moment"`` ``mean(l**2)`` (the authors'
            image scripts; ``L**2`` for a 0-d loss) or ``"variance"``
            ``mean(l**2) - mean(l)**2`` (their language-model script; needs per-sample losses).
        eps: blocks whose raw gradient norm is below ``eps`` are skipped.
        state_dtype: dtype of ``v`` and ``h_prev``; ``None`` uses each parameter's dtype
            (use ``torch.float32`` with float16/bfloat16 parameters).
        differentiable: let autograd flow through :meth:`KoalaPPTransform.step` (meta-learning,
            hypergradients). Otherwise the step runs under ``torch.no_grad()``.
        nonfinite: ``"skip"`` (a block that meets NaN or inf is left unchanged and counted in
            ``state.skipped``) or ``"raise"`` (eager only: raise ``FloatingPointError``).
        impl: ``"auto"`` (the reference eagerly, the engine under ``torch.compile``),
            ``"engine"`` or ``"reference"``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3))
        >>> state = opt.init(params)
        >>> grads = TensorDict(w=torch.tensor([0.1, -0.2, 0.3]))
        >>> params, state = opt.step(params, grads, torch.tensor(0.7), state)
        >>> state.count.tolist()
        [1]
    """
    check_hyperparameters(
        lr=lr,
        sigma=sigma,
        q=q,
        r=r,
        alpha_r=alpha_r,
        weight_decay=weight_decay,
        loss_target=loss_target,
        eps=eps,
    )
    check_choice("granularity", granularity, ("tensor", "global"))
    check_choice("nonfinite", nonfinite, ("skip", "raise"))
    check_choice("r_statistic", r_statistic, ("second_moment", "variance"))
    check_choice("impl", impl, ("auto", "engine", "reference"))
    if impl == "engine" and differentiable:
        raise ValueError(
            "impl='engine' cannot be differentiable=True (its packing op has no autograd "
            "formula); use impl='auto' or 'reference'"
        )
    if state_dtype is not None and not (
        isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
    ):
        raise TypeError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
    return KoalaPPTransform(
        lr=lr,
        sigma=sigma,
        q=q,
        r=r,
        alpha_r=alpha_r,
        weight_decay=weight_decay,
        loss_target=loss_target,
        symmetric=bool(symmetric),
        granularity=granularity,
        r_statistic=r_statistic,
        eps=float(eps),
        state_dtype=state_dtype,
        differentiable=bool(differentiable),
        nonfinite=nonfinite,
        impl=impl,
    )


def params_of(module: torch.nn.Module) -> TensorDict:
    """The module's parameters (no buffers) as a detached TensorDict with nested keys.

    Examples:
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

    Examples:
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

    Examples:
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
