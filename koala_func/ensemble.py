r"""Ensembles, sweeps and meta-learning: many independent KOALA++ filters in one call.

An ensemble of ``E`` members is a TensorDict of parameters with a leading member dimension
(``batch_size=[E]``, e.g. from :func:`stack_params` or ``TensorDict.from_modules(*models)``) and
one :class:`~koala_func.KoalaPPState` with ``batch_size=[E]``: each member has its own
:math:`v`, :math:`H_{k-1}`, :math:`S_{k-1}`, R estimate, counts and step, and its own
hyperparameters (shape ``[E]``; equal entries for a shared value). Because the KOALA++ step
(Xia, Davtyan, Favaro, NeurIPS 2025, arXiv:2506.04432) is a pure, branch-free function of
``(params, grads, loss, state)``, member ``e`` of the ensemble step is exactly
``step(params[e], grads[e], loss[e], state[e])``.

Compiled (the default), :func:`ensemble_step` and :func:`ensemble_train_step` run the engine
(:mod:`koala_func.engine`) with the member dimension as a leading dimension of its packed
buffers: no vmap of the step, one graph whose size does not grow with the number of tensors per
member (only the forward and backward of :func:`ensemble_train_step` are vmapped). Eager
(``compile=False``), differentiable optimizers and custom step functions use
``torch.vmap(step)`` of the reference; ``torch.compile(torch.vmap(step))`` is then the order
that compiles (``torch.vmap(torch.compile(step))`` silently runs eager, torch 2.13).

A sweep is an ensemble whose members differ only in their hyperparameters: 16 learning rates are
``ensemble_init(opt, params, lr=torch.logspace(-3, 0, 16))`` and one call per step.
"""

from __future__ import annotations

import copy
import itertools
import operator
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, is_tensorclass

from koala_func._precompiled import Precompiled, signature
from koala_func._validation import Scalar, check_hyperparameters
from koala_func.engine import Blocks, Buffers, Hyper
from koala_func.engine.layout import SPARE, pack_in_graph
from koala_func.functional import (
    KoalaPPTransform,
    blocks_in,
    blocks_out,
    engine_plan,
    engine_run,
    engine_state,
    engine_views,
    layouts_for,
    params_of,
    spare_pack,
    value_and_grad,
)
from koala_func.state import (
    HYPERPARAMETERS,
    KoalaPPHyperparams,
    KoalaPPState,
    float_keys,
    leaves,
    replace_fields,
    replace_leaves,
)

__all__ = [
    "ensemble_init",
    "ensemble_size",
    "ensemble_step",
    "ensemble_train_step",
    "member_views",
    "stack_params",
]

StepFn = Callable[..., Any]
_HYPER = HYPERPARAMETERS


def stack_params(modules: Sequence[torch.nn.Module]) -> TensorDictBase:
    """The parameters of ``modules`` (same architecture) stacked along a new member dim.

    Returns a detached TensorDict with ``batch_size=[E]`` and leaves ``[E, *shape]``, the
    layout of :func:`ensemble_init` and :func:`ensemble_step`. Initialise the modules separately
    (different seeds) so that the members really differ. Buffers are not included, as in
    :func:`koala_func.params_of`.

    Examples:
        >>> import torch
        >>> params = stack_params([torch.nn.Linear(3, 2) for _ in range(5)])
        >>> tuple(params.batch_size), tuple(params["weight"].shape)
        ((5,), (5, 2, 3))
    """
    if len(modules) == 0:
        raise ValueError("stack_params() expects at least one module")
    return member_views(torch.stack([params_of(m) for m in modules]))


def member_views(td: TensorDictBase) -> TensorDictBase:
    """``td`` (``batch_size=[E]``) with its floating-point leaves copied into the engine's
    packed member buffers and returned as views of them.

    These are the buffers that the compiled ensemble step reads and writes in place, so a step
    fed them packs nothing (a step fed other leaves packs them by a copy). A small model, at
    most :data:`~koala_func.functional.PER_TENSOR_LAYOUTS` tensors of a dtype, gets one buffer
    per tensor, the tensor itself: contiguous ``[E, *shape]`` leaves (the step reads any
    contiguous leaf in place, its gradients too). A larger one gets one ``[E, n_chunks, C]``
    buffer per dtype, whose views are not contiguous across members (use ``reshape`` rather
    than ``view`` on them). :func:`stack_params` and :func:`ensemble_init` return such views.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> small = member_views(TensorDict(w=torch.ones(4, 3), batch_size=[4]))
        >>> small["w"].shape, small["w"].is_contiguous(), bool((small["w"] == 1).all())
        (torch.Size([4, 3]), True, True)
        >>> big = member_views(TensorDict({f"w{i}": torch.ones(4, 3) for i in range(9)}, [4]))
        >>> big["w0"].is_contiguous()
        False
        >>> len({big[f"w{i}"].untyped_storage().data_ptr() for i in range(9)})  # one buffer
        1
    """
    found = leaves(td)
    keys = float_keys(found)
    if not keys:
        return td
    tensors = [found[k] for k in keys]
    views: dict = {}
    for layout, idx in layouts_for(tensors, list(range(len(keys))), None, 1):  # one dtype each
        flat = layout.pack([tensors[i] for i in idx], layout.dtype, 1)
        for i, view in zip(idx, layout.views(flat), strict=True):
            views[keys[i]] = view
    return replace_leaves(td, views)


def ensemble_size(params: TensorDictBase) -> int:
    """``E``, the leading batch dimension of an ensemble's parameters.

    Raises ``ValueError`` when ``params`` has no batch dimension: an ensemble's leaves are
    ``[E, *shape]`` and its TensorDict says so with ``batch_size=[E]``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> ensemble_size(TensorDict(w=torch.zeros(4, 3), batch_size=[4]))
        4"""
    if not isinstance(params, TensorDictBase):
        raise TypeError(f"params must be a TensorDict, got {type(params).__name__}")
    if params.batch_dims < 1:
        raise ValueError(
            "ensemble params need a leading member dimension: a TensorDict with batch_size "
            "[E] (e.g. stack_params(models), TensorDict.from_modules(*models) or "
            "params.auto_batch_size_(1)); got batch_size []"
        )
    return params.batch_size[0]


def _member_values(name: str, value: Scalar, n: int, dtype, device) -> torch.Tensor:
    # Python numbers go straight to the scalar dtype (via float32 they would lose digits)
    t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
    if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != n):
        raise ValueError(
            f"hyperparameter {name} must be a scalar or have shape [{n}] (one per member), "
            f"got shape {tuple(t.shape)}"
        )
    # clone keeps the autograd graph (hypergradients) but gives each member its own storage,
    # so that a compiled step sees the same strides whether a value was shared or not
    return torch.broadcast_to(t.to(dtype=dtype, device=device), (n,)).clone()


def ensemble_init(
    opt: KoalaPPTransform, params: TensorDictBase, **hyperparams: Scalar
) -> KoalaPPState:
    """One state for all ``E`` members of ``params`` (``batch_size=[E]``).

    Every member starts as ``opt.init`` would start it alone; the state has
    ``batch_size=[E]``, so ``state[e]`` is member ``e``'s state.

    Args:
        opt: the optimizer (from :func:`koala_func.koala_pp`).
        params: the stacked parameters, leaves ``[E, *shape]``.
        **hyperparams: per-member or shared values of ``lr``, ``sigma``, ``q``, ``r``,
            ``alpha_r``, ``weight_decay`` (a float, a 0-d tensor, or a tensor of shape
            ``[E]``); they override the builder's values. Tensors that require grad keep their
            graph, so hypergradients flow to them through a differentiable step.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> params = TensorDict(w=torch.ones(4, 3), batch_size=[4])  # 4 members
        >>> state = ensemble_init(koala_pp(), params, lr=torch.tensor([0.1, 0.2, 0.5, 1.0]))
        >>> tuple(state.batch_size), tuple(state.hyper.lr.shape), tuple(state.v["w"].shape)
        ((4,), (4,), (4, 3))
    """
    unknown = set(hyperparams) - set(_HYPER)
    if unknown:
        raise TypeError(
            f"ensemble_init() got an unexpected keyword argument {sorted(unknown)[0]!r}"
        )
    if "r" in hyperparams and opt.online_r:
        raise ValueError(
            "r is unused when R is estimated online: build the optimizer with a fixed r "
            "(koala_pp(r=...)) to give members a fixed R"
        )
    n = ensemble_size(params)
    values = {k: getattr(opt, k) for k in _HYPER}
    if opt.online_r:
        values["r"] = 1.0
    values.update(hyperparams)
    check_hyperparameters(**values, eps=opt.eps)

    # Every member's state as opt.init builds it; init is shape-only, so vmap just batches it.
    # contiguous: vmap may return expanded zeros, and a compiled step guards on strides
    state = torch.vmap(opt.init)(params).contiguous()
    # v and h_prev as packed member views: the strides the compiled step returns for them
    state = replace_fields(state, v=member_views(state.v), h_prev=member_views(state.h_prev))
    ref = state.hyper.lr
    hyper = {k: _member_values(k, v, n, ref.dtype, ref.device) for k, v in values.items()}
    r_est = state.r_est if opt.online_r else hyper["r"].detach().clone()
    return state.replace(hyper=KoalaPPHyperparams(**hyper, batch_size=[n]), r_est=r_est)


def _plain_step(step: KoalaPPTransform | StepFn) -> StepFn:
    if isinstance(step, KoalaPPTransform):
        if step.nonfinite == "raise":
            raise ValueError(
                "an ensemble step cannot use nonfinite='raise' (it reads tensor values on the "
                "host, which vmap and compile forbid); use nonfinite='skip' and check "
                "state.skipped"
            )
        return step.step
    if not callable(step):
        raise TypeError(f"expected an optimizer or a step function, got {type(step).__name__}")
    orig = getattr(step, "_torchdynamo_orig_callable", None)
    if orig is not None:
        # vmap(compile(f)) would silently run eager: undo the inner compile, compile outside
        warnings.warn(
            "ensemble_step() got an already compiled function; vmapping it would run eager, "
            "so the original function is vmapped and compiled instead",
            UserWarning,
            stacklevel=3,
        )
        return orig
    return step


_fresh_ids = itertools.count()


def _with_own_code(fn: StepFn, name: str) -> StepFn:
    """``fn`` behind a wrapper with its own code object, hence its own Dynamo cache.

    Dynamo caches compiled graphs on the code object of the compiled frame, and every
    ``torch.vmap(f)`` returns the same functorch wrapper code: all ``torch.compile(torch.vmap(f))``
    of a process would share one cache, each new one recompiling over the others' guards until
    the recompile limit (8), after which Dynamo silently runs eager.
    """

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    qualname = f"{name}_{next(_fresh_ids)}"
    code = call.__code__.replace(co_name=qualname)
    return types.FunctionType(code, call.__globals__, qualname, None, call.__closure__)


def ensemble_step(
    step: KoalaPPTransform | StepFn,
    *,
    compile: bool = True,
    inplace: bool = False,
    fullgraph: bool = True,
    **compile_kwargs: Any,
) -> StepFn:
    """The step of every member in one call.

    Args:
        step: an optimizer (its ``step`` is used) or any function with the signature
            ``(params, grads, loss, state) -> (params, state)``.
        compile: compile the step (one graph for all members; changing ``E`` recompiles):
            the engine with a member dimension for an optimizer, ``torch.compile(torch.vmap
            (step))`` for a step function or a differentiable optimizer. ``False`` runs the
            eager ``torch.vmap(step)``. The vmapped forms stack lazily stacked inputs
            (``LazyStackedTensorDict.lazy_stack``) densely first and give lazily stacked
            params back, as the engine does.
        inplace: write the new parameters and state into ``params`` and ``state`` (their
            tensors) and return those same objects, as a ``torch.optim`` step does; the
            results equal those of ``inplace=False``. The engine then updates the packed
            member buffers where they are (:func:`stack_params`, :func:`ensemble_init` and
            :func:`member_views` make them): no new buffers, and the writes go to memory
            the step has just read. Other leaves (strided, lazily stacked, or contiguous ones
            of a member of more than ``PER_TENSOR_LAYOUTS`` tensors) get the results by a
            copy. Not with a differentiable optimizer (it would overwrite
            the values its graph saved).
        fullgraph: passed to ``torch.compile``; the KOALA++ step has no graph breaks.
        **compile_kwargs: other ``torch.compile`` arguments (``mode``, ``dynamic``, ...).

    Returns:
        ``fn(params, grads, loss, state) -> (params, state)`` where ``params`` and ``grads``
        have leaves ``[E, *shape]``, ``loss`` is ``[E]`` (mean losses) or ``[E, B]``
        (per-sample losses) and ``state`` comes from :func:`ensemble_init`. Member ``e`` of
        the result equals ``step(params[e], grads[e], loss[e], state[e])``.

    The order is what matters: ``torch.vmap(torch.compile(step))`` compiles nothing (or errors
    with ``fullgraph=True``); a compiled function passed here is unwrapped with a warning.
    Each returned function has its own Dynamo cache: every ``torch.vmap(f)`` shares one wrapper
    code object, so plain ``torch.compile(torch.vmap(f))`` functions would share one cache and
    its recompile limit.
    With an optimizer built with ``differentiable=True`` the result is differentiable; the
    compiled form gives first-order gradients equal to the eager ones (tested), and the eager
    form (``compile=False``) is the one to use for second-order gradients (MAML).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3, 2), batch_size=[3])  # 3 members
        >>> g = torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.3, -0.1]])
        >>> grads = TensorDict(w=g, batch_size=[3])
        >>> state = ensemble_init(opt, params, lr=torch.tensor([0.1, 0.5, 1.0]))
        >>> step = ensemble_step(opt, compile=False)  # compile=True (default) for speed
        >>> params, state = step(params, grads, torch.tensor([0.7, 0.7, 0.7]), state)
        >>> state.count.tolist()  # member 1 had a zero gradient: skipped there only
        [[1], [0], [1]]

        In place, the same objects come back, updated:

        >>> step = ensemble_step(opt, compile=False, inplace=True)
        >>> new_params, new_state = step(params, grads, torch.tensor([0.7, 0.7, 0.7]), state)
        >>> new_params is params, new_state is state, state.step.tolist()
        (True, True, [2, 2, 2])
    """
    if inplace and isinstance(step, KoalaPPTransform) and step.differentiable:
        raise ValueError(
            "ensemble_step() cannot be in place with a differentiable optimizer: the update "
            "would overwrite values that its autograd graph saved; use inplace=False"
        )
    if compile and _uses_engine(step):
        return _EngineEnsembleStep(step, inplace=inplace, fullgraph=fullgraph, **compile_kwargs)
    fn = torch.vmap(_plain_step(step))
    if compile:
        fn = torch.compile(
            _with_own_code(fn, "ensemble_step"), fullgraph=fullgraph, **compile_kwargs
        )

    def vmapped_step(params, grads, loss, state):
        new_params, new_state = fn(_stacked(params), _stacked(grads), loss, _stacked(state))
        if inplace:
            return _written_back(params, state, new_params, new_state)
        return _as_given(params, new_params), new_state

    vmapped_step._compiled = fn if compile else None
    return vmapped_step


class _EngineEnsembleStep:
    """:func:`ensemble_step` of an optimizer: the engine with a member dimension.

    Called eagerly, the TensorDicts are taken apart in Python and only the packed buffers
    enter a compiled graph: leaves that are the engine's packed member buffers or views of
    them (:func:`stack_params`, :func:`ensemble_init`, :func:`member_views`, and this step's
    own results) are read in place, others are packed by one copy each. A member of at most
    :data:`~koala_func.functional.PER_TENSOR_LAYOUTS` tensors of a dtype has a layout per
    tensor, whose buffer is the contiguous tensor itself, so its gradients are read in place
    too; a larger one shares one buffer per dtype, and the graph then has a handful of inputs
    whatever the number of tensors, so its guards, its compile time and its steady-state
    overhead do not grow with them. The results are views of new packed buffers (on CPU a
    set from :data:`koala_func.engine.layout.SPARE`: buffers of earlier results that nothing
    references any more). Traced inside a user's ``torch.compile``, the step is
    the engine in that graph.

    In place, the graph writes into the packed member buffers themselves (leaves that are not
    views of one are packed into a spare buffer first and get their results back by a copy)
    and the block state and step count where they are.
    """

    def __init__(
        self,
        opt: KoalaPPTransform,
        *,
        inplace: bool = False,
        fullgraph: bool = True,
        **compile_kwargs: Any,
    ):
        self.opt = opt
        self.inplace = inplace

        def packed_step(bufs, specs, outs, owners, present, blocks, step, loss, hyper):
            # outs None: in place, into bufs (theta, v, h as [rows, C]) and blocks
            kept = outs if outs is not None else [(b[0], b[2], b[3]) for b in bufs]
            _, u = engine_run(
                opt,
                owners,
                present,
                [
                    Buffers(*map(_packed, b, (spec,) * 4, (t.dtype, t.dtype, v.dtype, h.dtype)))
                    for b, spec, (t, v, h) in zip(bufs, specs, kept, strict=True)
                ],
                Blocks(*blocks),
                Hyper(*(x.unsqueeze(-1) for x in hyper)),
                loss,
                1,
                out=outs,
                inplace=outs is None,
            )
            if outs is None:
                step.add_(1)
                return None
            return blocks_out(u), step + 1

        def members(params, grads, loss, state):
            return opt._step(params, grads, loss, state, n_lead=1)

        kwargs = {"fullgraph": fullgraph, **compile_kwargs}
        if kwargs.get("backend", "inductor") == "inductor" and "mode" not in kwargs:
            # The graph's own checks of its inputs' sizes and strides, tens of them for a
            # member of a few tensors, at every call: its callers have checked them (see _call)
            kwargs["options"] = {"size_asserts": False, **kwargs.get("options", {})}
        fn = _with_own_code(packed_step, "ensemble_step")
        self._packed = torch.compile(fn, **kwargs)
        # The graph is called without Dynamo's guards (see _call): a signature of its inputs
        # stands in for them; the remembered plan's check covers theta, v and h.
        self._fast = Precompiled(fn, self._packed, **kwargs) if fullgraph else None
        self._members = members
        self._kwargs = kwargs
        self._traced = None  # the whole step compiled over TensorDicts (no float leaves)
        self._hot: _Hot | None = None  # the plan for the next call (see _Hot)
        self._grads: dict[tuple, _GradBuffer] = {}  # see _packed_grads

    def __call__(self, params, grads, loss, state):
        if not self.inplace:
            return self._step(params, grads, loss, state)
        if _is_lazy(params) or _is_lazy(state):  # its leaves are copies: step dense ones
            dense = _stacked(params), _stacked(state)
            self._step(dense[0], grads, loss, dense[1], inplace=True)
            return _written_back(params, state, *dense)
        return self._step(params, grads, loss, state, inplace=True)

    def _step(self, params, grads, loss, state, inplace: bool = False):
        if torch.compiler.is_compiling():
            new = self._members(params, grads, loss, state)
            return _written_back(params, state, *new) if inplace else new
        state = _stacked(state)
        fields = state._tensordict._tensordict  # a TensorClass's fields: read once, directly
        hot = self._hot
        found = hot.match(params, grads, loss, fields) if hot is not None else None
        if found is not None:  # the usual training loop: no planning, no checks again
            with torch.no_grad():
                return self._run(hot, *found, params, loss, state, fields, inplace)
        opt = self.opt
        keys, p_leaves, g_leaves, v_leaves = opt._checked_leaves(params, grads, loss, state, 1)
        if not keys:
            if self._traced is None:
                fn = _with_own_code(self._members, "ensemble_step")
                self._traced = torch.compile(fn, **self._kwargs)
            new = self._traced(params, grads, loss, state)
            return _written_back(params, state, *new) if inplace else new
        n = ensemble_size(params)
        h_leaves = leaves(fields["h_prev"])
        own = [p_leaves[k] for k in keys] + [v_leaves[k] for k in keys]
        own += [h_leaves[k] for k in keys]
        with torch.no_grad():
            plan = engine_plan(opt, keys, p_leaves, g_leaves, 1)
            bufs, copies = _input_buffers(opt, plan, own, n, inplace)
            hot = _Hot(opt, plan, own, (p_leaves, g_leaves), bufs, n)
            # in place, kept where every leaf is a view (the same buffers next time);
            # functionally, _run keeps the plan for its results
            self._hot = None if copies else hot
            out = self._run(hot, bufs, g_leaves, params, loss, state, fields, inplace)
            for leaves_of, buf, layout in copies:  # leaves that were not packed views
                for t, view in zip(leaves_of, layout.views(buf), strict=True):
                    t.copy_(view)
        return out

    def _run(self, hot: _Hot, bufs, g_leaves, params, loss, state, fields, inplace: bool):
        """The compiled call on the buffers ``bufs`` (per layout ``theta, v, h``) that
        ``hot`` describes, and the results: in place, ``params`` and ``state`` (written);
        else new TensorDicts over new packed buffers, which ``self._hot`` then describes."""
        keys, n = hot.keys, hot.members
        grads = [
            self._packed_grads(layout, [g_leaves.get(keys[i]) for i in idx], layout.dtype, n)
            for layout, idx in hot.groups
        ]
        blocks = tuple(blocks_in(fields))
        hyper = fields["hyper"]._tensordict._tensordict
        frame = (fields["step"], loss, tuple(hyper[k] for k in _HYPER))
        args = [[(t, g, v, h) for (t, v, h), g in zip(bufs, grads, strict=True)], hot.specs]
        if inplace:
            outs = None
            written = [t for b in bufs for t in b] + [*blocks, frame[0]]
            read = [g for g in grads if g is not None]
            outs_key = None
        else:
            found = SPARE.empty_set(hot.out_specs, hot.device)
            outs = [tuple(found[i : i + 3]) for i in range(0, len(found), 3)]
            # as [rows, C], the shape the update is computed in: inductor then writes each
            # result in the loop that computes it (a [E, n_chunks, C] output would be a
            # second loop, re-reading v_k from a temporary)
            rows = [tuple(_rows(t) for t in o) for o in outs]
            written = [t for o in rows for t in o]
            read = [t for b in args[0] for t in b if isinstance(t, torch.Tensor)]
            if hot.outs_signature is None:  # spare buffers: the same for every call
                hot.outs_signature = signature(rows)
            outs_key = hot.outs_signature
        args.append(rows if outs is not None else None)
        args += [hot.owners, hot.present, blocks, *frame]
        key = (hot.signature, signature(grads), outs_key, signature((blocks, frame)))
        result = self._call(args, written, read, key)
        if inplace:
            return params, state
        block_state, step = result
        new = engine_views(hot.plan, outs, 1)
        own = [new[j][k] for j in range(3) for k in keys]
        self._hot = hot.moved(own, outs)
        v, h_prev = replace_leaves(fields["v"], new[1]), replace_leaves(fields["h_prev"], new[2])
        return replace_leaves(params, new[0]), engine_state(state, v, h_prev, block_state, step)

    def _packed_grads(
        self, layout, tensors: list, dtype: torch.dtype, members: int
    ) -> torch.Tensor:
        """A layout's gradients (``None`` where missing: zeros) of ``members`` members as a
        packed buffer: the buffer they are views of, else this step's own gradient buffer for
        the layout, refilled by one copy. One buffer per thread, kept for the next call: a
        gradient packed inside the graph, or a buffer of zeros, is a new buffer on every
        call, and on CPU the allocator often returns a freed buffer of this size (2.5 MB for
        the report's E=64 MLP) to the OS, so that the next call pays a page fault per 4 KiB
        (0.2-0.3 ms of a 0.7 ms step on this project's machine)."""
        base = layout.packed_base(tensors, 1, dtype)
        if base is not None:
            return base
        key = (threading.get_ident(), layout, members, dtype)
        buf = self._grads.get(key)
        if buf is None:
            if len(self._grads) >= _GRAD_BUFFERS:  # other models or threads: start afresh
                self._grads.clear()
            buf = self._grads[key] = _GradBuffer(layout, members, dtype)
        return buf.fill(tensors)

    def _call(self, args: Sequence, written: list, read: Sequence, key):
        """``self._packed(*args)``; through :class:`~koala_func._precompiled.Precompiled`
        (no guard evaluation) where the tensors the graph writes have storages of their own,
        apart from each other and from the tensors in ``read``: Dynamo guards on aliasing.
        ``key``: what the graph specializes on in ``args`` (see :meth:`_run`)."""
        if self._fast is None:
            return self._packed(*args)
        storages = {t.untyped_storage().data_ptr() for t in written}
        if len(storages) != len(written) or any(
            t.untyped_storage().data_ptr() in storages for t in read
        ):
            return self._packed(*args)
        return self._fast(key, *args)


#: Gradient buffers one ensemble step keeps (layouts times threads) before it drops them all.
_GRAD_BUFFERS = 4


class _GradBuffer:
    """A packed gradient buffer ``[E, n_chunks, C]`` of one layout, zeroed once (its padding
    stays zero) and refilled by one ``_foreach_copy_`` into views cached with it."""

    def __init__(self, layout, members: int, dtype: torch.dtype):
        self.buf = layout.zeros(members, dtype=dtype)
        self.views = layout.views(self.buf)
        self.filled = [False] * len(self.views)  # which views hold a gradient, not zeros

    def fill(self, tensors: list[torch.Tensor | None]) -> torch.Tensor:
        if all(self.filled) and all(t is not None for t in tensors):  # the usual call
            torch._foreach_copy_(self.views, tensors)
            return self.buf
        dst, src, stale = [], [], []
        for i, t in enumerate(tensors):
            if t is not None:
                dst.append(self.views[i])
                src.append(t)
            elif self.filled[i]:  # missing now: zeros again
                stale.append(self.views[i])
            self.filled[i] = t is not None
        if stale:
            torch._foreach_zero_(stale)
        if dst:
            torch._foreach_copy_(dst, src)
        return self.buf


class _Hot:
    """What an ensemble step planned, kept for the next call on the same tensors: the
    layouts, the checks that passed, and where the packed buffers of theta, v and h are.

    In place, the leaves are the call's own inputs (params, v, h), views of the packed
    member buffers; functionally, the leaves of the call's results, which the next call of a
    training loop gets back. It holds weak references only, so it keeps no buffer or state
    alive, and it answers only for the same leaf keys, the same leaves (params, v, h) with the
    same addresses, strides and shapes (``p.data =``, ``set_`` or ``as_strided_`` change
    them), gradients with the same keys, shapes and dtypes, and a state with as many blocks.
    """

    def __init__(self, opt, plan, own, found, bufs, members: int):
        p_leaves, g_leaves = found
        self.opt = opt
        self.keys = list(plan.keys)
        self.plan = plan._replace(params=[], grads=[])  # no tensor: the layouts and keys
        self.groups = plan.groups
        self.members = members
        self.n_blocks = len(plan.present)
        state_dtypes = [opt.state_dtype or layout.dtype for layout, _ in plan.groups]
        # functional: the result buffers, theta, v and h of each layout (SPARE.empty_set)
        self.out_specs = tuple(
            ((members, layout.n_chunks, layout.chunk_size), dtype)
            for (layout, _), sd in zip(plan.groups, state_dtypes, strict=True)
            for dtype in (layout.dtype, sd, sd)
        )
        self.device = plan.groups[0][0].device
        self.specs = [(tuple(layout.counts), layout.chunk_size) for layout, _ in plan.groups]
        self.owners = [layout.owner for layout, _ in plan.groups]
        self.present = tuple(plan.present)
        self.all_keys = tuple(p_leaves)
        self.grad_keys = tuple(g_leaves)
        self.grad_meta = [(g.shape, g.dtype) for g in g_leaves.values()]
        self.outs_signature = None  # functional: of the result buffers (see _run)
        self.of_results = False  # the leaves are a functional call's results (see moved)
        self._track(own, bufs)

    def _track(self, own, bufs=None) -> None:
        """Point the plan at the leaves ``own``, views of ``bufs`` (``None``: buffers alike
        the ones it describes, so their signature and geometry stay)."""
        self.refs = [weakref.ref(t) for t in own]
        self.where = [(t.data_ptr(), t.stride(), t.shape) for t in own]
        if bufs is None:
            return
        # what the compiled graph specializes on in these inputs (all but the gradients, the
        # block state, the step, the loss and the hyperparameters, which the caller adds)
        self.signature = signature((bufs, self.specs, self.owners, self.present))
        # each buffer again from the first leaf of its layout (a view of it); None where a
        # layout's tensors are packed inside the graph (a tuple)
        self.geometry = None
        if any(isinstance(b, tuple) for row in bufs for b in row):
            return
        n = len(self.keys)
        self.geometry = [
            tuple(
                (m * n + idx[0], tuple(b.shape), b.stride(), b.storage_offset())
                for m, b in enumerate(row)
            )
            for row, (_, idx) in zip(bufs, self.groups, strict=True)
        ]

    def moved(self, own, outs) -> _Hot:
        """This plan for the leaves ``own`` of a functional call's results, views of the
        packed buffers ``outs`` (per layout ``theta, v, h``: new spare buffers, alike at
        every call, so a plan that already describes results keeps its geometry)."""
        hot = copy.copy(self)
        hot._track(own, None if self.of_results else outs)
        hot.of_results = True
        return hot

    def match(self, params, grads, loss, fields) -> tuple | None:
        """Per layout ``(theta, v, h)``, and the gradients by key, for a call on the tensors
        this plan was made for (``fields``: the state's); ``None`` where anything differs."""
        if (
            self.geometry is None
            or type(params) is not TensorDict
            or not isinstance(grads, TensorDictBase)
            or not isinstance(loss, torch.Tensor)
            or loss.dim() not in (1, 2)
        ):
            return None
        p_leaves = leaves(params)
        if tuple(p_leaves) != self.all_keys:
            return None
        v_leaves, h_leaves = leaves(fields["v"]), leaves(fields["h_prev"])
        keys = self.keys
        try:
            own = [p_leaves[k] for k in keys] + [v_leaves[k] for k in keys]
            own += [h_leaves[k] for k in keys]
        except KeyError:
            return None
        if not all(map(operator.is_, [r() for r in self.refs], own)):
            return None
        if [(t.data_ptr(), t.stride(), t.shape) for t in own] != self.where:
            return None
        g_leaves = leaves(grads)
        if tuple(g_leaves) != self.grad_keys:
            return None
        if [(g.shape, g.dtype) for g in g_leaves.values()] != self.grad_meta:
            return None
        if fields["s"].shape[-1] != self.n_blocks:
            return None
        self.opt._check_loss(loss, 1)
        bufs = [tuple(own[j].as_strided(*g) for j, *g in row) for row in self.geometry]
        return bufs, g_leaves


def _input_buffers(opt: KoalaPPTransform, plan, own: list, n: int, inplace: bool):
    """Per layout ``(theta, v, h)`` from the leaves ``own`` (params, v, h in key order), and
    the copies to write back. In place: as ``[rows, C]``, the packed member buffers that the
    leaves are views of, else spare packed copies (listed in ``copies`` as ``(leaves, buffer,
    layout)``, for the write-back). Functionally: see :func:`_in_place`."""
    bufs, copies = [], []
    k = len(plan.keys)
    sets = (own[:k], own[k : 2 * k], own[2 * k :])
    for layout, idx in plan.groups:
        sd = opt.state_dtype or layout.dtype
        row = []
        for tensors, dtype in zip(sets, (layout.dtype, sd, sd), strict=True):
            chosen = [tensors[i] for i in idx]
            if not inplace:
                row.append(_in_place(layout, chosen, dtype))
                continue
            buf = layout.packed_base(chosen, 1, dtype)
            if buf is None:
                buf = spare_pack(layout, chosen, dtype, 1)
                copies.append((chosen, buf, layout))
            row.append(_rows(buf))
        bufs.append(tuple(row))
    return bufs, copies


def _rows(buf: torch.Tensor) -> torch.Tensor:
    """A packed buffer ``[E, n_chunks, C]`` as ``[rows, C]``, the shape the engine writes in:
    written through a ``[E, n_chunks, C]`` graph input, inductor (torch 2.13, CPU) computes
    the results into a temporary first, a fresh mapping of page faults every call."""
    return buf.view(-1, buf.shape[-1])


def _is_lazy(x) -> bool:
    """Whether ``x`` is a lazy stack, or a TensorClass over one (its leaves are copies)."""
    if type(x) is TensorDict:  # the usual case, first: this runs at every call
        return False
    return isinstance(x, LazyStackedTensorDict) or (
        is_tensorclass(x) and type(x._tensordict) is not TensorDict
    )


def _written_back(params, state, new_params, new_state):
    """``params`` and ``state`` with the results of a step copied into their tensors (the
    hyperparameters do not change), returned."""
    with torch.no_grad():
        params.update_(new_params)
        state._tensordict.update_(new_state._tensordict.exclude("hyper"))
    return params, state


def _stacked(x):
    """``x`` densely stacked if it is a lazy stack (``LazyStackedTensorDict.lazy_stack``), or a
    TensorClass over anything but a plain TensorDict, such as a state of stacked member states;
    else ``x`` itself. ``torch.vmap`` batches a lazy stack's leaves but not its ``batch_size``,
    so a member's step would see ``[E]`` there; the engine reads one plain dict of fields."""
    return torch.stack(x.unbind(0)) if _is_lazy(x) else x


def _as_given(params, new_params):
    """``new_params`` lazily stacked where ``params`` were, as the engine door returns them."""
    if not isinstance(params, LazyStackedTensorDict):
        return new_params
    return replace_leaves(params, leaves(new_params))


def _in_place(layout, tensors, dtype):
    """The packed member buffer that ``tensors`` (a layout's parameters, ``v`` or ``h``) are
    views of; else, for a small layout (``Layout.fuses_pack``), the tensors as a tuple, which
    the compiled graph packs fused into its kernels (no packed copy); else a packed copy into a
    spare buffer. The gradients go through ``_EngineEnsembleStep._packed_grads`` instead."""
    base = layout.packed_base(tensors, 1, dtype)
    if base is not None:
        return base
    first = next((t for t in tensors if t is not None), None)
    if first is not None and layout.fuses_pack(first.shape[0]):
        return tuple(tensors)
    return spare_pack(layout, tensors, dtype, 1)  # None when all are missing


def _packed(x, spec: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a packed buffer ``[E, n_chunks, C]``, inside the compiled graph: a tuple of
    tensors is packed, a ``[rows, C]`` buffer viewed (``spec``: the layout's chunk counts and
    chunk size)."""
    if isinstance(x, tuple):
        return pack_in_graph(x, *spec, dtype, 1)
    if x.dim() == 2:
        return x.view(-1, sum(spec[0]), spec[1])
    return x


def ensemble_train_step(
    opt: KoalaPPTransform | StepFn,
    module: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    shared_inputs: bool = True,
    compile: bool = True,
    inplace: bool = False,
    fullgraph: bool = True,
    **compile_kwargs: Any,
) -> Callable[..., tuple[TensorDictBase, KoalaPPState, torch.Tensor]]:
    """A whole training step for every member in one call: forward, gradient and KOALA++ step.

    Args:
        opt: the optimizer (or a step function with the signature of ``opt.step``).
        module: the architecture shared by the members; its parameters are replaced by each
            member's (``torch.func.functional_call``), its own values are not used.
        loss_fn: ``loss_fn(outputs, targets)`` returning one loss per sample, e.g.
            ``lambda out, y: F.cross_entropy(out, y, reduction="none")``.
        shared_inputs: all members see the same minibatch (``inputs [B, ...]``); ``False``
            gives each its own (``inputs [E, B, ...]``, e.g. bootstrapped ensembles).
        compile: compile the vmapped training step (as in :func:`ensemble_step`).
        inplace: write the new parameters and state into ``params`` and ``state`` and return
            those same objects (as in :func:`ensemble_step`); compiled, inside the graph.
        fullgraph: passed to ``torch.compile``.
        **compile_kwargs: other ``torch.compile`` arguments.

    Returns:
        ``fn(params, state, inputs, targets) -> (params, state, losses)`` with ``losses`` of
        shape ``[E, B]``, the per-sample losses of each member before its update.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from koala_func import koala_pp
        >>> models = [torch.nn.Linear(4, 3) for _ in range(8)]
        >>> params, opt = stack_params(models), koala_pp(lr=0.5)
        >>> state = ensemble_init(opt, params)
        >>> def ce(out, y):
        ...     return F.cross_entropy(out, y, reduction="none")
        >>> train = ensemble_train_step(opt, models[0], ce, compile=False)  # default: compiled
        >>> x, y = torch.randn(16, 4), torch.randint(3, (16,))
        >>> params, state, losses = train(params, state, x, y)
        >>> tuple(losses.shape), state.step.tolist() == [1] * 8
        ((8, 16), True)
    """
    if inplace and isinstance(opt, KoalaPPTransform) and opt.differentiable:
        raise ValueError(
            "ensemble_train_step() cannot be in place with a differentiable optimizer: the "
            "update would overwrite values that its autograd graph saved; use inplace=False"
        )
    dim = None if shared_inputs else 0
    grad_fn = value_and_grad(module, loss_fn)
    if compile and _uses_engine(opt):
        grads_of = torch.vmap(grad_fn, in_dims=(0, dim, dim))

        def train(params, state, inputs, targets):
            grads, losses = grads_of(params, inputs, targets)
            new_params, new_state = opt._step(params, grads, losses, state, n_lead=1)
            if inplace:  # in the graph: written into the inputs, which come back
                new_params, new_state = _written_back(params, state, new_params, new_state)
            return new_params, new_state, losses

        fn = train
    else:
        step = _plain_step(opt)

        def member_step(params, state, inputs, targets):
            grads, losses = grad_fn(params, inputs, targets)
            new_params, new_state = step(params, grads, losses, state)
            return new_params, new_state, losses

        fn = torch.vmap(member_step, in_dims=(0, 0, dim, dim))
    if compile:
        fn = _with_own_code(fn, "ensemble_train_step")
        fn = torch.compile(fn, fullgraph=fullgraph, **compile_kwargs)

    def train_step(params, state, inputs, targets):
        new_params, new_state, losses = fn(_stacked(params), _stacked(state), inputs, targets)
        if not inplace:
            return _as_given(params, new_params), new_state, losses
        if new_params is not params or new_state is not state:  # results elsewhere: copied
            _written_back(params, state, new_params, new_state)
        return params, state, losses

    train_step._compiled = fn if compile else None
    return train_step


def _uses_engine(step: Any) -> bool:
    """Whether ``step`` is an optimizer whose compiled step runs the engine."""
    return (
        isinstance(step, KoalaPPTransform)
        and not step.differentiable
        and step.impl != "reference"
        and _plain_step(step) is not None
    )
