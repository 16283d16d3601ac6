"""Ensembles and sweeps: one vmapped (and compiled) call equals a loop of single-model steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ce_per_sample, make_data, make_mlp
from tensordict import TensorDict

import koala_func.ensemble as ke
from koala_func import koala_pp, value_and_grad
from koala_func.ensemble import (
    ensemble_init,
    ensemble_size,
    ensemble_step,
    ensemble_train_step,
    member_views,
    stack_params,
)

TOL = 1e-12
N_STEPS = 4


def make_params(n: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "a": torch.randn(n, 3, 2, generator=g, dtype=torch.float64),
            "b": {"c": torch.randn(n, 4, generator=g, dtype=torch.float64)},
            "d": torch.randn(n, 5, generator=g, dtype=torch.float64),
        },
        batch_size=[n],
    )


def make_grads(params: TensorDict, k: int, seed: int = 1) -> TensorDict:
    """Step ``k``'s gradients: random, with member-dependent zero blocks (skipped only there)."""
    g = torch.Generator().manual_seed(seed + 100 * k)
    grads = params.apply(lambda p: torch.randn(p.shape, generator=g, dtype=p.dtype))
    n = ensemble_size(params)
    first, second = list(params.keys(include_nested=True, leaves_only=True))[:2]
    if n > 1:
        grads[first][k % n] = 0.0  # a different member skips the first block at every step
    if n > 2:
        grads[second][(k + 1) % n] = 0.0
    return grads


def make_loss(n: int, k: int, per_sample: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(7 + k)
    shape = (n, 6) if per_sample else (n,)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.1


def member_hyper(n: int) -> dict[str, torch.Tensor]:
    return {
        "lr": torch.linspace(0.05, 1.0, n, dtype=torch.float64),
        "q": torch.linspace(0.01, 0.3, n, dtype=torch.float64),
        "sigma": torch.linspace(0.05, 0.5, n, dtype=torch.float64),
        "alpha_r": torch.linspace(0.5, 0.95, n, dtype=torch.float64),
        "weight_decay": torch.linspace(0.0, 1e-2, n, dtype=torch.float64),
    }


def loop_reference(opt, params, hyper, n_steps, per_sample, r=None):
    """Each member alone, with the plain single-model API (opt.init, with_hyperparams, step)."""
    n = ensemble_size(params)
    outs = []
    for e in range(n):
        p = params[e]
        state = opt.init(p)
        state = state.with_hyperparams(**{k: v[e] for k, v in hyper.items()})
        if r is not None:
            state = state.with_hyperparams(r=r[e]).replace(r_est=r[e].clone())
        for k in range(n_steps):
            grads = make_grads(params, k)[e]
            p, state = opt.step(p, grads, make_loss(n, k, per_sample)[e], state)
        outs.append((p, state))
    return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


def run_ensemble(step, opt, params, hyper, n_steps, per_sample):
    state = ensemble_init(opt, params, **hyper)
    p = params
    for k in range(n_steps):
        p, state = step(
            p, make_grads(params, k), make_loss(ensemble_size(params), k, per_sample), state
        )
    return p, state


def assert_close_td(a, b, tol=TOL):
    for key, x in a.items(include_nested=True, leaves_only=True):
        y = b.get(key)
        assert x.shape == y.shape, key
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=0, atol=tol, msg=f"at {key}")
        else:
            assert torch.equal(x, y), key


def assert_same_state(a, b, tol=TOL):
    assert_close_td(a.v, b.v, tol)
    assert_close_td(a.h_prev, b.h_prev, tol)
    for name in ("s", "r_est"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=tol)
    for name in ("count", "skipped", "step"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# -- parity, eager vmap ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("per_member", [False, True])
def test_eager_vmap_matches_loop(n, per_member):
    opt = koala_pp(lr=0.3, sigma=0.2, q=0.05, weight_decay=1e-3)
    params = make_params(n)
    hyper = member_hyper(n) if per_member else {}
    loop_hyper = hyper or {
        k: torch.full((n,), float(getattr(opt, k)), dtype=torch.float64) for k in ("lr", "q")
    }
    ref_p, ref_s = loop_reference(opt, params, loop_hyper, N_STEPS, per_sample=True)
    p, s = run_ensemble(ensemble_step(opt, compile=False), opt, params, hyper, N_STEPS, True)
    assert tuple(s.batch_size) == (n,)
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)
    # members skip different blocks: "a" is skipped by member k % n at step k
    if n == 3:
        assert s.count[:, 0].tolist() == [2, 3, 3]  # member 0 skipped "a" at steps 0 and 3
        assert s.skipped.sum().item() == 0  # a zero gradient is a skip, not a refusal


@pytest.mark.parametrize(
    "kw",
    [
        dict(granularity="global"),
        dict(symmetric=False),
        dict(r=0.5),
    ],
    ids=["global", "asymmetric", "fixed_r"],
)
def test_eager_vmap_variants(kw):
    n = 3
    opt = koala_pp(lr=0.4, **kw)
    params = make_params(n)
    hyper = member_hyper(n)
    r = None
    if "r" in kw:
        del hyper["alpha_r"]
        r = torch.tensor([0.2, 0.5, 2.0], dtype=torch.float64)
        hyper["r"] = r
    ref_hyper = {k: v for k, v in hyper.items() if k != "r"}
    ref_p, ref_s = loop_reference(opt, params, ref_hyper, N_STEPS, per_sample=False, r=r)
    p, s = run_ensemble(ensemble_step(opt, compile=False), opt, params, hyper, N_STEPS, False)
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)


def test_missing_key_and_nonfinite_member():
    """A gradient key missing for all members skips that block; a NaN skips one member only."""
    n = 3
    opt = koala_pp(lr=0.3)
    params = make_params(n)
    state = ensemble_init(opt, params)
    step = ensemble_step(opt, compile=False)
    grads = make_grads(params, 1).exclude("d")
    grads["b", "c"][1, 2] = float("nan")
    p, s = step(params, grads, make_loss(n, 0, True), state)
    assert torch.equal(p["d"], params["d"])
    assert torch.equal(p["b", "c"][1], params["b", "c"][1])
    assert not torch.equal(p["b", "c"][0], params["b", "c"][0])
    assert s.skipped.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert torch.isfinite(s.v["b", "c"]).all()
    for e in range(n):
        pe, se = opt.step(params[e], grads[e], make_loss(n, 0, True)[e], state[e])
        assert_close_td(p[e], pe)
        assert_same_state(s[e], se)


# -- parity, compiled vmap (one graph, shared by the tests of this module) --------------------


@pytest.fixture(scope="module")
def compiled_opt_step():
    """The door table's compiled ensemble step (tests/doors.py): its one model shape and E=2,
    so that this module compiles no graph of its own."""
    from doors import COMPILED_F64, _td, ensemble_fn, initial_params

    opt, step = ensemble_fn(COMPILED_F64, "auto", True)
    params = torch.stack([_td(initial_params(s, torch.float64)) for s in (3, 4)])
    return opt, step, params


@pytest.mark.parametrize("per_member", [True, False])
def test_compiled_vmap_matches_loop(compiled_opt_step, per_member):
    opt, step, params = compiled_opt_step
    n = ensemble_size(params)
    hyper = member_hyper(n) if per_member else {"lr": 0.7}  # a float: no recompile
    loop_hyper = {k: torch.as_tensor(v, dtype=torch.float64).expand(n) for k, v in hyper.items()}
    ref_p, ref_s = loop_reference(opt, params, loop_hyper, N_STEPS, per_sample=True)
    p, s = run_ensemble(step, opt, params, hyper, N_STEPS, True)
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)


def _count_packs(monkeypatch) -> list:
    """Every pack of a step from now on: an eager ``Layout.pack``, tensors handed to the graph
    to pack (a small layout's), or the step's own gradient buffer refilled."""
    from koala_func.engine import Layout

    packs: list = []
    original = Layout.pack
    monkeypatch.setattr(Layout, "pack", lambda *a, **k: packs.append(1) or original(*a, **k))
    fill = ke._GradBuffer.fill
    monkeypatch.setattr(ke._GradBuffer, "fill", lambda *a: packs.append(1) or fill(*a))
    in_place = ke._in_place

    def counted(*args):
        found = in_place(*args)
        if isinstance(found, tuple):
            packs.append(1)
        return found

    monkeypatch.setattr(ke, "_in_place", counted)
    return packs


def test_small_ensembles_are_read_where_they_are(compiled_opt_step, monkeypatch):
    """A small ensemble (at most PER_TENSOR_LAYOUTS tensors a dtype) has one layout per
    tensor, the tensor itself: member_views gives contiguous leaves of their own (values
    kept, integer leaves untouched), and the step, functional or in place, packs nothing:
    not its params, not its state, not its gradients (fresh contiguous tensors at every
    step). Its results are contiguous, and no graph is compiled for any of it."""
    from doors import COMPILED_F64, ensemble_fn

    from koala_func.functional import PER_TENSOR_LAYOUTS

    opt, step, params = compiled_opt_step
    _, step_ip = ensemble_fn(COMPILED_F64, "auto", True, inplace=True)
    n = ensemble_size(params)
    mixed = params.clone()
    mixed["count"] = torch.arange(n)  # an integer leaf passes through
    views = member_views(mixed)
    assert torch.equal(views["count"], mixed["count"])
    floats = [k for k, v in params.items(True, True) if v.is_floating_point()]
    assert 1 < len(floats) <= PER_TENSOR_LAYOUTS
    assert len({views.get(k).untyped_storage().data_ptr() for k in floats}) == len(floats)
    for k in floats:
        assert torch.equal(views.get(k), params.get(k))
        assert views.get(k).is_contiguous()

    hyper = member_hyper(n)
    ref_p, ref_s = run_ensemble(step, opt, params, hyper, 3, True)
    run_ensemble(step_ip, opt, params.clone(), hyper, 1, True)  # compiled, if it was not yet
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for door in (step, step_ip):
        p = member_views(params)
        state = ensemble_init(opt, p, **hyper)  # packs v and h_prev, before the count
        with monkeypatch.context() as m:
            packs = _count_packs(m)
            for k in range(3):
                out = door(p, make_grads(params, k), make_loss(n, k, True), state)
                if door is step_ip:
                    assert out[0] is p and out[1] is state
                p, state = out
        assert packs == []
        assert_close_td(p, ref_p, 0)
        assert_same_state(state, ref_s, 0)
        assert all(p.get(k).is_contiguous() for k in floats)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def _many_tensors(n: int, seed: int = 0) -> TensorDict:
    """Members of more tensors than PER_TENSOR_LAYOUTS: one packed layout for them all."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,), (5,), (2, 2), (3,), (6,), (1, 4), (2,), (3, 3)]
    leaves = {
        f"t{i}": torch.randn(n, *s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)
    }
    return TensorDict(leaves, batch_size=[n])


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
def test_larger_ensembles_share_one_packed_layout(inplace, monkeypatch):
    """More tensors than PER_TENSOR_LAYOUTS (of a dtype) share one packed layout, whose
    compile time does not grow with them: member_views re-homes the leaves as views of one
    buffer, which the compiled step reads and writes where it is (only the gradients are
    packed, one copy a step) and returns packed views of again; every member equals its own
    single-model run."""
    from koala_func.functional import PER_TENSOR_LAYOUTS

    n = 3
    opt = koala_pp(lr=0.3, sigma=0.2, q=0.05, weight_decay=1e-3)
    plain = _many_tensors(n)
    assert len(plain.keys(True, True)) > PER_TENSOR_LAYOUTS
    params = member_views(plain)
    keys = list(params.keys(True, True))
    assert len({params.get(k).untyped_storage().data_ptr() for k in keys}) == 1
    assert not any(params.get(k).is_contiguous() for k in keys)
    hyper = member_hyper(n)
    ref_p, ref_s = loop_reference(opt, plain, hyper, N_STEPS, per_sample=True)
    step = ensemble_step(opt, inplace=inplace)
    state = ensemble_init(opt, params, **hyper)
    packs = _count_packs(monkeypatch)
    p = params
    for k in range(N_STEPS):
        out = step(p, make_grads(plain, k), make_loss(n, k, True), state)
        if inplace:
            assert out[0] is p and out[1] is state
        p, state = out
    assert len(packs) == N_STEPS  # the gradients, once a step
    assert_close_td(p, ref_p)
    assert_same_state(state, ref_s)
    for k in keys:
        assert p.get(k).stride() == params.get(k).stride()  # packed views out


def test_recycled_buffers_never_overwrite_live_results(compiled_opt_step):
    """On CPU the step writes into buffers of earlier results that nothing references any
    more; results the caller still holds are never written."""
    opt, step, params = compiled_opt_step
    n = ensemble_size(params)
    state = ensemble_init(opt, params, **member_hyper(n))
    p, ptrs, kept = params, [], {}
    for k in range(8):
        p, state = step(p, make_grads(params, k), make_loss(n, k, True), state)
        ptrs.append(p.get(("0", "weight")).untyped_storage().data_ptr())
        if k == 2:  # the caller keeps this step's results
            kept = {"p": p, "state": state, "values": p.clone(), "v": state.v.clone()}
    assert len(set(ptrs)) < len(ptrs)  # buffers came back
    assert ptrs[2] not in ptrs[3:]  # ... but never one the caller holds
    assert_close_td(kept["p"], kept["values"], 0)
    assert_close_td(kept["state"].v, kept["v"], 0)


def test_results_fed_back_are_read_in_place_and_moved_leaves_are_read(
    compiled_opt_step, monkeypatch
):
    """A step fed its own results reads their packed buffers in place; a result leaf replaced
    in its TensorDict, moved onto other memory with ``set_`` or restrided in place is read
    where and as it now is, never from the buffer it left."""
    from koala_func.engine import Layout
    from koala_func.state import replace_fields, replace_leaves

    opt, step, params = compiled_opt_step
    n = ensemble_size(params)
    key = ("0", "weight")
    misses = []  # inputs that are not views of a packed buffer (packed by a copy)
    original = Layout.packed_base

    def packed_base(*a):
        found = original(*a)
        misses.extend([1] if found is None else [])
        return found

    monkeypatch.setattr(Layout, "packed_base", packed_base)

    def steps(edit):
        state = ensemble_init(opt, params, **member_hyper(n))
        p = params
        for k in range(3):
            p, state = step(p, make_grads(params, k), make_loss(n, k, True), state)
            if k == 0:
                p, state = edit(p, state)
        return p, state

    def replaced(p, s):
        p = p.apply(lambda t: t + 0.25)  # new leaves everywhere
        return p, replace_fields(s, v=s.v.clone())

    ref_p, ref_s = steps(replaced)
    misses.clear()
    chained_p, _ = steps(lambda p, s: (p, s))
    # a small ensemble: every leaf, the gradients included, is contiguous, the buffer of its
    # own layout (one per tensor), so nothing is packed
    assert misses == []

    def moved(p, s):
        for k in p.keys(True, True):
            leaf = p.get(k)
            leaf.set_(leaf + 0.25)  # the same tensor objects, on new memory
        v = s.v
        for k in v.keys(True, True):
            leaf = v.get(k)
            leaf.set_(leaf.clone())
        return p, s

    got_p, got_s = steps(moved)
    assert_close_td(got_p, ref_p, 0)
    assert_same_state(got_s, ref_s, 0)
    assert not torch.equal(chained_p.get(key), ref_p.get(key))  # the edit mattered

    # Restrided in place (same object, same memory, same shape): read as the new strides say.
    def column_major(t):
        return t.shape, (t.stride(0), 1, t.shape[1]), t.storage_offset()

    def restrided(p, s):
        p.get(key).as_strided_(*column_major(p.get(key)))
        return p, s

    def restrided_copy(p, s):
        leaf = p.get(key)
        return replace_leaves(p, {key: leaf.as_strided(*column_major(leaf)).clone()}), s

    got_p, got_s = steps(restrided)
    ref_p, ref_s = steps(restrided_copy)
    assert_close_td(got_p, ref_p, 0)
    assert_same_state(got_s, ref_s, 0)
    assert not torch.equal(chained_p.get(key), ref_p.get(key))


def test_functional_step_fed_its_results_plans_once_and_keeps_nothing_alive(
    compiled_opt_step, monkeypatch
):
    """A training loop that feeds the functional step its own results plans once: later
    calls skip the checks and the planning and read the results' buffers where they are. A
    result of an earlier call is planned again and gives what it gave the first time, and
    the remembered plan keeps no result alive."""
    import gc

    opt, step, params = compiled_opt_step
    n = ensemble_size(params)
    plans = []
    real = ke.engine_plan
    monkeypatch.setattr(ke, "engine_plan", lambda *a, **k: plans.append(1) or real(*a, **k))
    p, s = params, ensemble_init(opt, params, **member_hyper(n))
    history = []
    for k in range(4):
        p, s = step(p, make_grads(params, k), make_loss(n, k, True), s)
        history.append((p, s))
    assert len(plans) == 1
    eager = ensemble_step(opt, compile=False)
    ref_p, ref_s = params, ensemble_init(opt, params, **member_hyper(n))
    for k in range(4):
        ref_p, ref_s = eager(ref_p, make_grads(params, k), make_loss(n, k, True), ref_s)
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)
    old_p, old_s = history[1]
    again_p, again_s = step(old_p, make_grads(params, 2), make_loss(n, 2, True), old_s)
    assert len(plans) == 2
    assert_close_td(again_p, history[2][0], 0)
    assert_same_state(again_s, history[2][1], 0)
    hot = step._hot
    assert hot is not None and all(r() is not None for r in hot.refs)
    del p, s, history, old_p, old_s, again_p, again_s
    gc.collect()
    assert all(r() is None for r in hot.refs)


def test_lazily_stacked_members_step_like_dense_ones(compiled_opt_step):
    """Member params and states joined by ``LazyStackedTensorDict.lazy_stack`` (not copied
    into one TensorDict) step exactly like ``torch.stack``-ed ones."""
    from tensordict import LazyStackedTensorDict

    opt, step, params = compiled_opt_step
    n = ensemble_size(params)
    members = [params[e].clone() for e in range(n)]
    states = [opt.init(p) for p in members]

    def run(p, state):
        for k in range(2):
            p, state = step(p, make_grads(params, k), make_loss(n, k, True), state)
        return p, state

    ref_p, ref_s = run(torch.stack(members), torch.stack(states))
    lazy_state = type(states[0])._from_tensordict(
        LazyStackedTensorDict.lazy_stack([s._tensordict for s in states])
    )
    lazy_p = LazyStackedTensorDict.lazy_stack(members)
    got_p, got_s = run(lazy_p, lazy_state)
    assert_close_td(got_p, ref_p, 0)
    assert_same_state(got_s, ref_s, 0)


@pytest.mark.parametrize("door", ["ensemble_step(opt)", "ensemble_step(fn)", "train_step"])
def test_lazily_stacked_members_through_the_vmapped_doors(door):
    """``torch.vmap`` batches a lazy stack's leaves but not its ``batch_size``: the vmapped
    doors (``compile=False``, custom step functions, ``ensemble_train_step``) stack lazily
    stacked params, grads and states, step exactly like stacked ones and give lazily stacked
    params back."""
    from tensordict import LazyStackedTensorDict

    opt = koala_pp(lr=0.3)
    n = 5  # no leaf dimension of size n: a member's leaf must not pass for a batch of n
    module = torch.nn.Linear(4, 3).double()
    models = [torch.nn.Linear(4, 3).double() for _ in range(n)]
    members = [TensorDict.from_module(m).detach().clone() for m in models]
    x, y = make_data(n=12, d_in=4)

    def custom(p, g, loss, state):
        return opt.step(p, g, loss, state)

    if door == "train_step":
        train = ensemble_train_step(opt, module, ce_per_sample, compile=False)

        def run(p, state):
            for _ in range(2):
                p, state, _ = train(p, state, x, y)
            return p, state
    else:
        step = ensemble_step(opt if door == "ensemble_step(opt)" else custom, compile=False)
        dense = torch.stack(members)

        def run(p, state):
            for k in range(2):
                grads = make_grads(dense, k)
                if isinstance(p, LazyStackedTensorDict):
                    grads = LazyStackedTensorDict.lazy_stack(list(grads.unbind(0)))
                p, state = step(p, grads, make_loss(n, k, True), state)
            return p, state

    states = [opt.init(p) for p in members]
    lazy_state = type(states[0])._from_tensordict(
        LazyStackedTensorDict.lazy_stack([s._tensordict for s in states])
    )
    ref_p, ref_s = run(torch.stack(members), torch.stack(states))
    got_p, got_s = run(LazyStackedTensorDict.lazy_stack(members), lazy_state)
    assert isinstance(got_p, LazyStackedTensorDict)
    assert_close_td(got_p, ref_p, 0)
    assert_same_state(got_s, ref_s, 0)


# -- in place --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_inplace_step():
    """The door table's compiled in-place ensemble step (tests/doors.py, same graphs)."""
    from doors import COMPILED_F64, ensemble_fn

    return ensemble_fn(COMPILED_F64, "auto", True, inplace=True)[1]


def _lazy(p, state):
    from tensordict import LazyStackedTensorDict

    members = [state[e] for e in range(ensemble_size(p))]
    lazy_state = type(state)._from_tensordict(
        LazyStackedTensorDict.lazy_stack([m._tensordict for m in members])
    )
    return LazyStackedTensorDict.lazy_stack(list(p.unbind(0))), lazy_state


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("leaves", ["views", "contiguous", "lazy"])
def test_in_place_step_equals_the_functional_step(
    compiled_opt_step, compiled_inplace_step, compiled, leaves
):
    """``ensemble_step(opt, inplace=True)`` returns its own inputs, with the functional
    step's results written into their tensors: packed member views (updated where they are),
    contiguous leaves and lazily stacked members (given the results by a copy); eagerly with
    a missing gradient too."""
    opt, step, params = compiled_opt_step
    if compiled:
        in_place = compiled_inplace_step
    else:
        step = ensemble_step(opt, compile=False)
        in_place = ensemble_step(opt, compile=False, inplace=True)
    n, key = ensemble_size(params), ("0", "weight")
    ref_p, ref_s = params, ensemble_init(opt, params, **member_hyper(n))
    p, s = params.clone(), ensemble_init(opt, params, **member_hyper(n))
    if leaves == "views":
        p = member_views(p)
    elif leaves == "contiguous":
        s = s.apply(lambda t: t.contiguous())
    else:
        p, s = _lazy(p, s)
    kept = [] if leaves == "lazy" else [p.get(key), s.v.get(key), s.s, s.count, s.step]
    for k in range(3):
        grads = make_grads(params, k)
        if not compiled and k == 1:
            grads = grads.exclude(key)
        loss = make_loss(n, k, True)
        ref_p, ref_s = step(ref_p, grads, loss, ref_s)
        out_p, out_s = in_place(p, grads, loss, s)
        assert out_p is p and out_s is s
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)
    now = [] if leaves == "lazy" else [p.get(key), s.v.get(key), s.s, s.count, s.step]
    assert all(a is b for a, b in zip(kept, now, strict=True))  # written, not replaced
    assert not torch.equal(p.get(key), params.get(key))


def test_in_place_step_reads_edited_leaves_and_state_not_remembered_buffers(
    compiled_opt_step, compiled_inplace_step
):
    """The in-place step remembers the buffers of its last call (the fast path of a training
    loop); a leaf replaced, moved (``set_``, ``.data =``) or restrided in place, or new
    hyperparameters, are used as they now are: the results equal the functional step's
    after the same edit."""
    from koala_func.state import replace_leaves

    opt, step, params = compiled_opt_step
    n, key = ensemble_size(params), ("0", "weight")

    def column_major(t):
        return t.shape, (t.stride(0), 1, t.shape[1]), t.storage_offset()

    def moved(p, s):
        for k in p.keys(True, True):
            leaf = p.get(k)
            leaf.set_(leaf + 0.25)
        return p, s

    def data(p, s):
        p.get(key).data = p.get(key) * 2
        s.v.get(key).data = s.v.get(key).clone()
        return p, s

    def restrided(p, s):
        p.get(key).as_strided_(*column_major(p.get(key)))
        return p, s

    edits = {
        "none": lambda p, s: (p, s),
        "replaced": lambda p, s: (replace_leaves(p, {key: p.get(key) + 0.25}), s),
        "moved": moved,
        "data": data,
        "restrided": restrided,
        "hyper": lambda p, s: (p, s.with_hyperparams(lr=torch.full((n,), 0.05).double())),
    }

    def run(door, edit):
        p = member_views(params.clone())
        s = ensemble_init(opt, p, **member_hyper(n))
        for k in range(4):
            p, s = door(p, make_grads(params, k), make_loss(n, k, True), s)
            if k == 0:
                assert door is step or compiled_inplace_step._hot is not None  # remembered
            if k == 1:
                p, s = edit(p, s)
        return p, s

    plain = run(compiled_inplace_step, edits["none"])[0]
    for name, edit in edits.items():
        got_p, got_s = run(compiled_inplace_step, edit)
        ref_p, ref_s = run(step, edit)
        assert_close_td(got_p, ref_p)
        assert_same_state(got_s, ref_s)
        if name != "none":
            assert not torch.equal(got_p.get(key), plain.get(key)), name  # the edit mattered


def test_in_place_step_remembers_weakly_and_only_views(compiled_opt_step, compiled_inplace_step):
    """The remembered plan holds no tensor alive, serves new hyperparameters (a schedule),
    and is kept only when every leaf was a packed buffer or a view of one (else the leaves
    are packed again at every call)."""
    import gc

    opt, _, params = compiled_opt_step
    n = ensemble_size(params)
    p = member_views(params.clone())
    s = ensemble_init(opt, p)
    compiled_inplace_step(p, make_grads(params, 0), make_loss(n, 0, True), s)
    hot = compiled_inplace_step._hot
    assert hot is not None
    fast = compiled_inplace_step._fast
    assert not fast.available or fast.entries  # the graph is called without Dynamo's guards
    s = s.with_hyperparams(lr=torch.full((n,), 0.1, dtype=torch.float64))
    compiled_inplace_step(p, make_grads(params, 1), make_loss(n, 1, True), s)
    assert compiled_inplace_step._hot is hot  # not planned again
    del p, s
    gc.collect()
    assert all(r() is None for r in hot.refs)
    # strided params (not the buffer of a layout, nor a view of one): copies
    p, s = params.apply(lambda t: t.mT.contiguous().mT), ensemble_init(opt, params)
    assert not any(t.is_contiguous() for t in p.values(True, True))
    compiled_inplace_step(p, make_grads(params, 0), make_loss(n, 0, True), s)
    assert compiled_inplace_step._hot is None


def test_gradient_buffer_refills_and_zeroes_what_went_missing():
    """The step's own packed gradient buffer: zero padding, every gradient copied in, and a
    gradient that goes missing is zeros at the next fill, not the last one's values."""
    from koala_func.engine import Layout

    layout = Layout([(2, 3), (5,)], torch.float64, "cpu", chunk_size=4)
    buf = ke._GradBuffer(layout, 3, torch.float64)
    g = [torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    packed = buf.fill(g)
    assert torch.equal(packed, layout.pack(g, torch.float64, 1))
    packed = buf.fill([None, g[1] * 2])
    assert torch.equal(packed, layout.pack([None, g[1] * 2], torch.float64, 1))
    assert buf.fill([g[0].mT.contiguous().mT, g[1]]) is packed  # any strides, same buffer
    assert torch.equal(packed, layout.pack(g, torch.float64, 1))


def test_layout_without_gradients_gets_the_kept_buffer_of_zeros(compiled_inplace_step):
    """A layout none of whose tensors has a gradient is read from the step's kept buffer,
    zeros, not from a new buffer of zeros at every call (on CPU, a fresh mapping that pays a
    page fault per 4 KiB); values a previous call copied in are zeroed."""
    from koala_func.engine import Layout

    door = compiled_inplace_step
    layout = Layout([(2, 3), (5,)], torch.float64, "cpu", chunk_size=4)
    first = door._packed_grads(layout, [None, None], torch.float64, 3)
    assert first.shape == (3, *layout.zeros().shape) and not first.any()
    g = [torch.randn(3, 2, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)]
    assert door._packed_grads(layout, g, torch.float64, 3) is first
    assert torch.equal(first, layout.pack(g, torch.float64, 1))
    again = door._packed_grads(layout, [None, None], torch.float64, 3)
    assert again is first and not again.any()


@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_steps_with_a_gradient_missing_then_back(
    compiled_opt_step, compiled_inplace_step, inplace
):
    """A gradient missing at one step and given again at the next (a new plan and graph each
    time): the compiled doors, which copy the gradients into a packed buffer of their own,
    equal the eager vmapped reference. (Here the missing tensor is a block of its own, which
    is skipped; the unit test above checks that its stale values would not be read.)"""
    opt, step, params = compiled_opt_step
    door = compiled_inplace_step if inplace else step
    reference = ensemble_step(opt, compile=False)
    n, key = ensemble_size(params), ("2", "bias")
    ref_p, ref_s = params, ensemble_init(opt, params, **member_hyper(n))
    p, s = member_views(params.clone()), ensemble_init(opt, params, **member_hyper(n))
    for k in range(3):
        grads = make_grads(params, k)
        if k == 1:
            grads = grads.exclude(key)
        loss = make_loss(n, k, True)
        ref_p, ref_s = reference(ref_p, grads, loss, ref_s)
        p, s = door(p, grads, loss, s)
    assert_close_td(p, ref_p)
    assert_same_state(s, ref_s)


def test_in_place_step_refuses_a_differentiable_optimizer():
    with pytest.raises(ValueError, match="cannot be in place with a differentiable"):
        ensemble_step(koala_pp(differentiable=True), inplace=True)


def test_compiled_vmap_one_graph(compiled_opt_step):
    opt, step, params = compiled_opt_step
    run_ensemble(step, opt, params, member_hyper(2), 1, True)  # warm
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run_ensemble(step, opt, params.apply(lambda t: t * 1.1), member_hyper(2), 2, True)
    run_ensemble(step, opt, params, {"lr": 0.1, "q": 0.2}, 2, True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before  # no new graph


@pytest.fixture(scope="module")
def tiny_task():
    module = torch.nn.Linear(4, 3).double()
    x, y = make_data(n=24, d_in=4)
    return module, x, y


def test_train_step_matches_loop(tiny_task):
    # eager vmap: the compiled form is covered by the step tests and the benchmark (compiling a
    # forward + grad + step graph costs ~20 s of CPU, too much for the shared CI budget)
    module, x, y = tiny_task
    n = 4
    members = [torch.nn.Linear(4, 3).double() for _ in range(n)]
    params = stack_params(members)
    opt = koala_pp(lr=0.5)
    lrs = torch.tensor([0.1, 0.3, 0.5, 1.0], dtype=torch.float64)
    train = ensemble_train_step(opt, module, ce_per_sample, compile=False)
    p, s = params, ensemble_init(opt, params, lr=lrs)
    for _ in range(3):
        p, s, losses = train(p, s, x, y)
    assert losses.shape == (n, len(y))
    grad_fn = value_and_grad(module, ce_per_sample)
    for e in range(n):
        pe, se = params[e], opt.init(params[e]).with_hyperparams(lr=lrs[e])
        for _ in range(3):
            grads, le = grad_fn(pe, x, y)
            pe, se = opt.step(pe, grads, le, se)
        assert_close_td(p[e], pe)
        assert_same_state(s[e], se)
        torch.testing.assert_close(losses[e], le, rtol=0, atol=TOL)


def test_eager_train_step_in_place_equals_the_functional_one(tiny_task):
    """``ensemble_train_step(..., inplace=True)`` returns its own params and state, with the
    functional train step's results written into them (the compiled form writes them inside
    its graph: checked by hand, not here, for the CI budget, see above)."""
    module, x, y = tiny_task
    params = stack_params([torch.nn.Linear(4, 3).double() for _ in range(3)])
    opt = koala_pp(lr=0.5)
    train = ensemble_train_step(opt, module, ce_per_sample, compile=False)
    train_ip = ensemble_train_step(opt, module, ce_per_sample, compile=False, inplace=True)
    p, s = params, ensemble_init(opt, params)
    p_ip, s_ip = params.clone(), ensemble_init(opt, params)
    kept = p_ip.get("weight")
    for _ in range(3):
        p, s, losses = train(p, s, x, y)
        out_p, out_s, losses_ip = train_ip(p_ip, s_ip, x, y)
        assert out_p is p_ip and out_s is s_ip
        torch.testing.assert_close(losses_ip, losses, rtol=0, atol=0)
    assert_close_td(p_ip, p, 0)
    assert_same_state(s_ip, s, 0)
    assert p_ip.get("weight") is kept
    with pytest.raises(ValueError, match="cannot be in place with a differentiable"):
        ensemble_train_step(koala_pp(differentiable=True), module, ce_per_sample, inplace=True)


def test_eager_train_step_per_member_inputs(tiny_task):
    module, x, y = tiny_task
    n = 2
    params = stack_params([torch.nn.Linear(4, 3).double() for _ in range(n)])
    opt = koala_pp(lr=0.5)
    xs, ys = torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)])
    train = ensemble_train_step(opt, module, ce_per_sample, shared_inputs=False, compile=False)
    p, _, losses = train(params, ensemble_init(opt, params), xs, ys)
    grad_fn = value_and_grad(module, ce_per_sample)
    for e in range(n):
        grads, le = grad_fn(params[e], xs[e], ys[e])
        pe, _ = opt.step(params[e], grads, le, opt.init(params[e]))
        assert_close_td(p[e], pe)
        torch.testing.assert_close(losses[e], le, rtol=0, atol=TOL)


# -- init and API ----------------------------------------------------------------------------


def test_init_matches_single_init():
    n = 3
    opt = koala_pp(lr=0.2, granularity="tensor")
    params = make_params(n)
    state = ensemble_init(opt, params)
    for e in range(n):
        assert_same_state(state[e], opt.init(params[e]))
        assert state[e].hyper.lr.item() == pytest.approx(0.2)
    assert state.hyper.lr.shape == (n,)
    assert state.s.shape == (n, 3)


def test_init_hyperparams_from_builder_and_overrides():
    n = 4
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    opt = koala_pp(lr=lrs, q=0.2, r=0.5)
    state = ensemble_init(
        opt,
        make_params(n),
        sigma=torch.tensor(0.3, dtype=torch.float64),
        r=torch.tensor([1.0, 2.0, 3.0, 4.0]),
    )
    assert state.hyper.lr.dtype == torch.float64
    assert torch.equal(state.hyper.lr, lrs.double())
    assert torch.equal(state.hyper.q, torch.full((n,), 0.2, dtype=torch.float64))
    assert torch.equal(state.hyper.sigma, torch.full((n,), 0.3, dtype=torch.float64))
    assert state.r_est.tolist() == [1.0, 2.0, 3.0, 4.0]
    # each member has its own storage: compiled steps see the same strides either way
    assert state.hyper.q.stride() == (1,)


def test_init_errors():
    opt = koala_pp()
    params = make_params(3)
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        ensemble_init(opt, params, lr=torch.ones(4))
    with pytest.raises(TypeError, match="unexpected keyword argument 'beta'"):
        ensemble_init(opt, params, beta=0.1)
    with pytest.raises(ValueError, match="r is unused"):
        ensemble_init(opt, params, r=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ensemble_init(opt, params, lr=torch.tensor([0.1, -1.0, 0.1]))
    with pytest.raises(ValueError, match="leading member dimension"):
        ensemble_init(opt, TensorDict(w=torch.ones(3)))
    with pytest.raises(ValueError, match="nonfinite='raise'"):
        ensemble_step(koala_pp(nonfinite="raise"))


def test_compiled_function_is_unwrapped():
    opt = koala_pp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = ensemble_step(torch.compile(opt.step), compile=False)
    assert any("already compiled" in str(w.message) for w in caught)
    params = make_params(2)
    grads = make_grads(params, 0)
    p, _ = fn(params, grads, make_loss(2, 0, False), ensemble_init(opt, params))
    p0, _ = opt.step(params[0], grads[0], make_loss(2, 0, False)[0], opt.init(params[0]))
    assert_close_td(p[0], p0)


def test_stack_params_members_differ():
    members = [make_mlp(seed=i) for i in range(3)]
    params = stack_params(members)
    assert tuple(params.batch_size) == (3,)
    assert params["0", "weight"].shape == (3, 16, 8)
    assert not torch.equal(params["0", "weight"][0], params["0", "weight"][1])
    assert torch.equal(params["0", "weight"][2], members[2][0].weight.detach())
    assert not params["0", "weight"].requires_grad


def test_vmapped_random_init_differs():
    """randomness='different': one vmapped init call gives members that really differ."""

    def init(_):
        return TensorDict(w=torch.rand(5, dtype=torch.float64) * 2 - 1)

    params = torch.vmap(init, randomness="different")(torch.arange(4))
    w = params["w"]
    assert w.shape == (4, 5)
    assert all(not torch.equal(w[i], w[j]) for i in range(4) for j in range(i + 1, 4))


def test_each_compiled_helper_has_its_own_dynamo_cache():
    """Every torch.vmap(f) shares one wrapper code object, hence one Dynamo cache (and its
    recompile limit of 8): the helpers give each compiled function its own code object."""
    opt = koala_pp()
    assert torch.vmap(opt.step).__code__ is torch.vmap(len).__code__  # the trap itself
    module = torch.nn.Linear(2, 2)
    fns = [
        ensemble_step(opt),
        ensemble_step(opt),
        ensemble_train_step(opt, module, ce_per_sample),
        ensemble_train_step(opt, module, ce_per_sample),
    ]
    # an optimizer's ensemble_step compiles its packed core (``_packed``), the vmapped doors
    # their vmapped step (``_compiled``)
    compiled = [getattr(f, "_packed", None) or f._compiled for f in fns]
    codes = {id(f._torchdynamo_orig_callable.__code__) for f in compiled}  # nothing compiled yet
    assert len(codes) == len(fns)
