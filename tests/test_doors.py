"""Generic tests over the door table (tests/doors.py): every door, in every configuration it
supports, step by step against the independent oracle (float64) or the readable reference
(lower precisions); skip semantics; checkpoint resume."""

from __future__ import annotations

import pytest
import torch
from doors import (
    COMPILED,
    DOOR,
    DOORS,
    F64,
    NAMES,
    blocks_of,
    checkpoint_configs,
    configs_for,
    truth_for,
)

from koala_func.engine import passes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine two
    # OpenMP threads made such steps many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fail_instead_of_eager_fallback():
    # a compiled door that silently fell back to eager would not test the door
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def _cases(fn):
    out = []
    for door in DOORS:
        for config in fn(door):
            marks = [pytest.mark.slow] if door.compiled else []
            out.append(pytest.param(door, config, id=f"{door.name}-{config.id}", marks=marks))
    return out


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest deviation relative to the largest entry of ``b``."""
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    if b.numel() == 0:
        return 0.0
    den = b.abs().max().clamp_min(1e-300)
    return float(((a - b).abs().max() / den).nan_to_num(float("inf")))


def compare(got, want, tol: float, where: str) -> float:
    """Parameters and states of every member; returns the worst relative deviation."""
    worst = 0.0
    (gp, gs), (wp, ws) = got, want
    assert len(gp) == len(wp)
    for m, (p, q, s, t) in enumerate(zip(gp, wp, gs, ws, strict=True)):
        for name in ("count", "skipped", "step"):
            assert torch.equal(s[name].cpu().long(), t[name].cpu().long()), (
                f"{where} member {m}: {name} {s[name].tolist()} != {t[name].tolist()}"
            )
        pairs = [(f"param {n}", p[n], q[n]) for n in NAMES]
        pairs += [(f"{f} {n}", s[f][n], t[f][n]) for f in ("v", "h_prev") for n in NAMES]
        pairs += [("s", s["s"], t["s"]), ("r_est", s["r_est"], t["r_est"])]
        for label, a, b in pairs:
            d = rel_dev(a, b)
            assert d <= tol, f"{where} member {m}: {label} deviates by {d:.2e} > {tol:.0e}"
            worst = max(worst, d)
    return worst


def snapshot(runner):
    def clone(x):
        if isinstance(x, dict):
            return {k: clone(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clone(v) for v in x]
        return x.detach().clone()

    return clone(runner.params()), clone(runner.state())


def assert_refused_blocks_unchanged(before, after, config, where):
    """A block whose count did not grow is bit-identical: parameters, v, h_prev and S."""
    (bp, bs), (ap, as_) = before, after
    for m in range(len(bp)):
        for b, names in enumerate(blocks_of(config)):
            if as_[m]["count"][b] != bs[m]["count"][b]:
                continue
            for n in names:
                assert torch.equal(ap[m][n], bp[m][n]), f"{where}: refused block moved {n}"
                for f in ("v", "h_prev"):
                    assert torch.equal(as_[m][f][n], bs[m][f][n]), f"{where}: {f} {n} changed"
            assert torch.equal(as_[m]["s"][b], bs[m]["s"][b]), f"{where}: S changed"


@pytest.mark.parametrize("door,config", _cases(configs_for))
def test_door_matches_the_reference_step_by_step(door, config):
    _check_against_truth(door, config)


#: Eager engine doors, run in row tiles (koala_func.engine.passes.TILE, as large buffers run
#: on CPU): the test model's buffers are split into tiles of two chunk rows, the last partial.
TILED = [
    (DOOR[name], config)
    for name in ("functional-engine", "optim-engine", "ensemble-vmap-engine")
    for config in (*COMPILED, checkpoint_configs(DOOR[name])[-1])
]


@pytest.mark.parametrize("door,config", TILED, ids=[f"{d.name}-{c.id}" for d, c in TILED])
def test_eager_engine_in_row_tiles_matches_the_reference(door, config, monkeypatch):
    monkeypatch.setattr(passes, "TILE", 40)
    calls = []
    tiles = passes._tiles
    monkeypatch.setattr(passes, "_tiles", lambda g: calls.append(tiles(g)) or calls[-1])
    _check_against_truth(door, config)
    assert max(len(t) for t in calls) > 2  # the tiled path ran, in several tiles


def _check_against_truth(door, config):
    runner = door.make(config)
    truth, tol = truth_for(door, config, runner)
    start = snapshot(runner)[0]
    worst = 0.0
    for k in range(config.steps):
        before = snapshot(runner)
        runner.step()
        truth.step()
        after = snapshot(runner)
        where = f"{door.name} step {k}"
        worst = max(worst, compare(after, (truth.params(), truth.state()), tol, where))
        assert_refused_blocks_unchanged(before, after, config, where)
    print(f"{door.name} {config.id}: worst relative deviation {worst:.1e}")  # pytest -s
    # the run really trained: not a comparison of two frozen trajectories
    final, state = runner.params(), runner.state()
    for m in range(len(final)):
        moved = max(rel_dev(final[m][n], start[m][n]) for n in NAMES)
        assert moved > 1e-3, f"member {m} did not move"
        assert int(state[m]["count"].min()) > 0
        assert int(state[m]["step"]) == config.steps
    # every scheduled refusal was counted (a zero or missing gradient is not a refusal)
    refusals = {"nan_grad", "inf_grad", "nan_loss", "inf_loss", "low_loss"}
    if set(config.events) & refusals:
        skipped = sum(int(s["skipped"].sum()) for s in state)
        assert skipped > 0


@pytest.mark.parametrize("door,config", _cases(checkpoint_configs))
def test_checkpoint_resume_continues_bit_identically(door, config):
    """Interrupted after 7 steps, saved (weights_only-loadable), restored into fresh objects
    built with other values: the next steps equal the uninterrupted run's, bit for bit."""
    whole = door.make(config)
    for _ in range(7):
        whole.step()
    resumed = whole.restore(whole.checkpoint())
    for k in range(7, config.steps):
        whole.step()
        resumed.step()
        a, b = snapshot(whole), snapshot(resumed)
        for m in range(len(a[0])):
            for n in NAMES:
                assert torch.equal(a[0][m][n], b[0][m][n]), f"step {k}: param {n}"
                assert a[0][m][n].dtype == b[0][m][n].dtype
                for f in ("v", "h_prev"):
                    assert torch.equal(a[1][m][f][n], b[1][m][f][n]), f"step {k}: {f} {n}"
                    assert a[1][m][f][n].dtype == b[1][m][f][n].dtype
            for f in ("s", "count", "skipped", "r_est", "step"):
                x, y = a[1][m][f], b[1][m][f]
                assert torch.equal(x, y) and x.dtype == y.dtype, f"step {k}: {f}"
    assert int(whole.state()[0]["step"]) == config.steps


def test_table_covers_what_the_issue_asks():
    """Every door is tested; the eager doors see both granularities, both variants, online
    and fixed R, both R statistics, weight decay on and off, float64/float32/bfloat16, skips,
    missing gradients and the loss target."""
    for door in DOORS:
        cs = configs_for(door)
        assert cs, door
        assert checkpoint_configs(door)
        if door.compiled:
            assert len({(c.granularity, c.symmetric, c.r is None, c.dtype) for c in cs}) <= 3
            continue
        assert {c.granularity for c in cs} == {"tensor", "global"}, door
        assert {c.symmetric for c in cs} == {True, False}, door
        assert {c.r is None for c in cs} == {True, False}, door
        assert {c.r_statistic for c in cs} == {"second_moment", "variance"}, door
        assert {c.weight_decay > 0 for c in cs} == {True, False}, door
        assert {c.dtype for c in cs} == {F64, torch.float32, torch.bfloat16}, door
        events = set().union(*(c.events for c in cs))
        assert {"missing", "nan_grad", "inf_loss", "low_loss", "zero_grad"} <= events, door
        assert any(c.dtype == F64 and c.steps >= 200 for c in cs), door


# ------------------------------------------------- properties of the engine behind the doors


def test_functional_compiled_door_does_not_recompile_over_1000_steps():
    """The shared compiled ``opt.step`` of the table: 1000 steps with a changing loss, lr and
    other hyperparameters edited between steps, one graph."""
    from doors import COMPILED_F64, FunctionalRunner, batch, grads_and_losses

    runner = FunctionalRunner(COMPILED_F64, compiled=True)
    runner.step()  # compiles, or hits the graph the parity test compiled
    op_graphs = _op_graphs()
    fn, state, params = runner.step_fn, runner.st, runner.p
    x, y = batch(0, F64)
    g, losses = grads_and_losses(runner.params()[0], x, y)
    from doors import _td

    grads = _td(g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1000):
            state = state.with_hyperparams(lr=0.5 / (1 + 0.01 * k))
            if k % 100 == 50:
                state = state.with_hyperparams(q=0.05, sigma=0.2, weight_decay=1e-3, alpha_r=0.8)
            params, state = fn(params, grads, losses * (1 + 0.001 * k), state)
    assert int(state.step) == 1001
    # nor does the update op's own kernel compile again (its inputs' dispatch keys once
    # differed between a graph's first call and the later ones)
    assert _op_graphs() == op_graphs
    assert all(torch.isfinite(t).all() for t in params.values(True, True))


def test_compiled_step_over_raw_from_module_compiles_one_graph():
    """``torch.compile(opt.step)`` over ``TensorDict.from_module(model)`` as it comes
    (``nn.Parameter`` leaves, an integer buffer): the first call and the later ones, on the
    steps' own plain tensors, share one graph over 20 steps with a changing loss and lr, and
    every step equals the eager reference."""
    from tensordict import TensorDict
    from torch._dynamo.utils import counters

    import koala_func as kf

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2)
    ).double()
    params = TensorDict.from_module(model)
    assert isinstance(params["0", "weight"], torch.nn.Parameter)
    floats = [k for k, v in params.items(True, True) if v.is_floating_point()]
    g = torch.Generator().manual_seed(1)
    grads = TensorDict(
        {k: torch.randn(params.get(k).shape, generator=g, dtype=F64) for k in floats}
    )
    opt = kf.koala_pp(lr=0.5, weight_decay=1e-3)
    state = ref_state = opt.init(params)
    ref = params
    # backend "eager": Dynamo's capture and guards, the part that decides the graph count
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    before = counters["stats"]["unique_graphs"] - _op_graphs()
    for i in range(20):
        # from the second call on, a recompile raises (the first compiles: another test's
        # graph of the same frame may exist, for other shapes)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            loss = torch.tensor(0.9 - 0.01 * i, dtype=F64)
            params, state = step(params, grads, loss, state)
            ref, ref_state = opt.step(ref, grads, loss, ref_state)
            lr = torch.tensor(0.5 * 0.95**i, dtype=F64)
            state, ref_state = state.with_hyperparams(lr=lr), ref_state.with_hyperparams(lr=lr)
            for k in floats:
                assert rel_dev(params.get(k), ref.get(k)) < 1e-12, (i, k)
        if i == 0:
            op_graphs = _op_graphs()
    assert counters["stats"]["unique_graphs"] - _op_graphs() - before == 1
    # nor does the update op's own kernel compile again (its inputs' dispatch keys once
    # differed between the first call and the later ones)
    assert _op_graphs() == op_graphs
    assert params["1", "num_batches_tracked"] is ref["1", "num_batches_tracked"]
    assert not any(params.get(k).requires_grad for k in floats)


def test_compiled_step_reads_its_own_results_in_place_and_leaves_them_unchanged(monkeypatch):
    """Fed its own results, ``torch.compile(opt.step)`` packs only the gradients (the
    parameters, ``v`` and ``h_prev`` are views of the last step's result buffers, read where
    they are), writes into new buffers, and leaves the inputs, which the caller may keep,
    as they were; every step equals the eager reference."""
    from tensordict import TensorDict

    import koala_func as kf
    import koala_func.functional as kfun

    packed = []
    spare_pack = kfun.spare_pack
    monkeypatch.setattr(
        kfun,
        "spare_pack",
        lambda layout, t, dtype, *a: packed.append(1) or spare_pack(layout, t, dtype, *a),
    )
    g = torch.Generator().manual_seed(3)
    params = TensorDict(
        w=torch.randn(5, 3, generator=g, dtype=F64), b=torch.randn(3, generator=g, dtype=F64)
    )
    grads = params.apply(lambda p: torch.randn(p.shape, generator=g, dtype=F64))
    opt = kf.koala_pp(lr=0.5, weight_decay=1e-3)
    state = ref_state = opt.init(params)
    ref = params
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for i in range(3):
        packed.clear()
        kept_p, kept_s = params.clone(), state.clone()
        loss = torch.tensor(0.8 - 0.1 * i, dtype=F64)
        new, new_state = step(params, grads, loss, state)
        ref, ref_state = opt.step(ref, grads, loss, ref_state)
        # the first step packs params, grads, v and h_prev; later ones the gradients only
        assert len(packed) == (4 if i == 0 else 1), (i, len(packed))
        for td, kept in ((params, kept_p), (state.v, kept_s.v), (state.h_prev, kept_s.h_prev)):
            assert all(torch.equal(td[k], kept[k]) for k in ("w", "b")), i
        for k in ("w", "b"):
            assert rel_dev(new[k], ref[k]) < 1e-12, (i, k)
            assert new[k].untyped_storage().data_ptr() != params[k].untyped_storage().data_ptr()
        params, state = new, new_state


def test_compiled_step_reads_a_dtype_group_without_gradients_from_a_recycled_buffer(
    monkeypatch,
):
    """A dtype group none of whose tensors has a gradient: ``torch.compile(opt.step)`` reads
    zeros for it from a zeroed spare buffer, not from a new buffer of zeros at every call (on
    CPU a fresh mapping that pays a page fault per 4 KiB), even after a step wrote that spare
    buffer; every step equals the eager reference."""
    from tensordict import TensorDict

    import koala_func as kf
    from koala_func.engine import Layout
    from koala_func.engine.layout import SPARE, _unreferenced

    g = torch.Generator().manual_seed(4)
    params = TensorDict(w=torch.randn(5, 3, generator=g, dtype=F64), b=torch.randn(3, generator=g))
    grads = TensorDict(w=torch.randn(5, 3, generator=g, dtype=F64))  # none for float32 b
    # one block for both: values other than zeros for b would change the step of w
    opt = kf.koala_pp(lr=0.5, weight_decay=1e-3, granularity="global")
    state = ref_state = opt.init(params)
    ref = params
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    made = []
    zeros = Layout.zeros
    for i in range(4):
        if i == 1:  # after the first (tracing) call
            monkeypatch.setattr(Layout, "zeros", lambda *a, **k: made.append(1) or zeros(*a, **k))
            for buf in SPARE.buffers():  # every free spare dirty: the zeros must be written
                if _unreferenced(buf):
                    buf.fill_(float("nan"))
        loss = torch.tensor(0.8 - 0.1 * i, dtype=F64)
        params, state = step(params, grads, loss, state)
        ref, ref_state = opt.step(ref, grads, loss, ref_state)
        assert rel_dev(params["w"], ref["w"]) < 1e-12, i
        assert rel_dev(params["b"], ref["b"]) < 1e-6, i
    assert made == []


def test_step_inlined_into_a_users_compiled_function_is_one_graph():
    """A user's compiled function that calls ``opt.step`` traces it into its own graph (one
    graph, fullgraph), equal to the eager reference."""
    from tensordict import TensorDict

    import koala_func as kf

    g = torch.Generator().manual_seed(2)
    params = TensorDict(w=torch.randn(3, 4, generator=g, dtype=F64), b=torch.zeros(4, dtype=F64))
    opt = kf.koala_pp(lr=0.5)

    def train(params, state, target):
        grads = params.apply(lambda p: p - target)
        loss = sum((p - target).square().sum() for p in params.values()) / 2
        return opt.step(params, grads, loss, state)

    compiled = torch.compile(train, fullgraph=True, backend="eager")
    state = ref_state = opt.init(params)
    ref = params
    target = torch.tensor(0.3, dtype=F64)
    for i in range(5):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            params, state = compiled(params, state, target)
            ref, ref_state = train(ref, ref_state, target)
    for k in ("w", "b"):
        assert rel_dev(params[k], ref[k]) < 1e-12
    assert torch.equal(state.count, ref_state.count)


def test_compiled_step_takes_a_second_model_with_the_same_keys_and_other_sizes():
    """A sweep over widths in one process: Dynamo sees the same leaf names with new sizes,
    which would make them dynamic; the compiled step stays static and correct."""
    from tensordict import TensorDict

    import koala_func as kf

    for width in (9, 5, 7):
        torch.manual_seed(width)
        model = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2)).double()
        params = TensorDict.from_module(model)
        grads = params.apply(lambda t: torch.randn_like(t) * 0.1)
        opt = kf.koala_pp(lr=0.5)
        step = torch.compile(opt.step, fullgraph=True, backend="eager")
        new, state = step(params, grads, torch.tensor(0.7, dtype=F64), opt.init(params))
        ref, ref_state = opt.step(params, grads, torch.tensor(0.7, dtype=F64), opt.init(params))
        for k in ref.keys(True, True):
            assert rel_dev(new.get(k), ref.get(k)) < 1e-12, (width, k)
        assert torch.equal(state.count, ref_state.count)


def _op_graphs() -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return sum(
        len(_debug_get_cache_entry_list(f.__code__))
        for f in (passes._overwrite, passes._overwrite_plain)
    )


@pytest.mark.slow
def test_engine_kernel_count_does_not_grow_with_tensors():
    """The compiled functional step runs the engine on packed buffers: the number of
    generated kernels is the same for 5 and 60 tensors."""
    from tensordict import TensorDict
    from torch._inductor import metrics

    import koala_func as kf

    counts = {}
    for n in (3, 5, 60):  # 3: a first compile, whatever a process compiles once
        g = torch.Generator().manual_seed(0)
        shapes = [(int(a), int(b)) for a, b in torch.randint(1, 40, (n, 2), generator=g)]
        params = TensorDict({f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)})
        grads = params.apply(lambda t, g=g: torch.randn(t.shape, generator=g) * 0.1)
        opt = kf.koala_pp(weight_decay=1e-4)
        fn = torch.compile(opt.step, fullgraph=True)
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fn(params, grads, torch.tensor(0.5), opt.init(params))
        counts[n] = metrics.generated_kernel_count
    print("generated kernels", counts)
    assert counts[5] > 0
    assert counts[60] == counts[5], counts


def test_compiled_step_graph_inputs_do_not_grow_with_tensors():
    """``torch.compile(opt.step)`` packs the leaves before its one compiled frame: the graph
    takes the same number of inputs, and returns the same number of outputs, for 4 tensors
    and for 40 (so its guards and compile time do not grow with them), and equals the
    eager reference."""
    from tensordict import TensorDict

    import koala_func as kf

    seen = {}

    def counting(gm, example_inputs):
        nodes = list(gm.graph.nodes)
        out = next(n for n in nodes if n.op == "output")
        n_out = len(torch.utils._pytree.tree_leaves(out.args))
        seen.setdefault("graphs", []).append((sum(n.op == "placeholder" for n in nodes), n_out))
        return gm.forward

    sizes = {}
    for n in (4, 40):
        g = torch.Generator().manual_seed(n)
        shapes = [(int(a), int(b)) for a, b in torch.randint(1, 9, (n, 2), generator=g)]
        nested: dict = {}
        for i, s in enumerate(shapes):  # 4 tensors per submodule, as from_module nests them
            nested.setdefault(f"m{i // 4}", {})[f"p{i}"] = torch.randn(s, generator=g, dtype=F64)
        params = TensorDict(nested)
        assert len(list(params.keys(True, True))) == n
        grads = params.apply(lambda t, g=g: torch.randn(t.shape, generator=g, dtype=F64) * 0.1)
        opt = kf.koala_pp(lr=0.5, weight_decay=1e-3)
        seen.clear()
        step = torch.compile(opt.step, fullgraph=True, backend=counting)
        new, state = step(params, grads, torch.tensor(0.5, dtype=F64), opt.init(params))
        ref, ref_state = opt.step(params, grads, torch.tensor(0.5, dtype=F64), opt.init(params))
        assert len(seen["graphs"]) == 1, seen
        sizes[n] = seen["graphs"][0]
        for k in ref.keys(True, True):
            assert rel_dev(new.get(k), ref.get(k)) < 1e-12, (n, k)
        assert torch.equal(state.count, ref_state.count)
    assert sizes[40] == sizes[4], sizes


def test_layout_views_padding_and_errors():
    from koala_func.engine import (
        BlockConfig,
        Blocks,
        Buffers,
        Hyper,
        Layout,
        choose_chunk_size,
        run,
    )

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (3, 16), (3,)]
    tensors = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    layout = Layout(shapes, F64, "cpu", chunk_size=8)
    assert layout.owner.tolist() == [0] * 16 + [1] * 2 + [2] * 6 + [3]
    assert layout.n_chunks == 25 and layout.padding == 25 * 8 - sum(t.numel() for t in tensors)
    flat = layout.pack(tensors)
    views = layout.views(flat)
    assert all(torch.equal(v, t) for v, t in zip(views, tensors, strict=True))
    views[3].fill_(7.0)  # views write through
    assert flat[24, :3].tolist() == [7.0] * 3 and flat[24, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="packed buffer of shape"):
        layout.views(torch.zeros(3, 8, dtype=F64))
    assert choose_chunk_size([11_000_000, 512 * 512]) == 2048
    assert choose_chunk_size([300] * 500) <= 64

    # one engine step: the padding stays zero in every output (a zero H moves nothing)
    grads = layout.pack([torch.randn(s, generator=g, dtype=F64) for s in shapes])
    zeros = layout.zeros()
    T = len(shapes)
    one = torch.ones(1, dtype=F64)
    out, u = run(
        [layout.owner],
        [Buffers(flat, grads, zeros, zeros.clone())],
        Blocks(
            torch.zeros(T, dtype=F64),
            torch.zeros(T, dtype=torch.long),
            torch.zeros(T, dtype=torch.long),
            one.clone(),
        ),
        torch.tensor(0.7, dtype=F64),
        torch.tensor(0.6, dtype=F64),
        Hyper(0.5 * one, 0.1 * one, 0.1 * one, one, 0.9 * one, 1e-3 * one, 0 * one),
        BlockConfig(symmetric=True, online=True, variance=False, eps=1e-9),
    )
    assert u.count.tolist() == [1] * T
    pad = torch.ones_like(flat, dtype=torch.bool)
    for view in layout.views(pad):
        view.fill_(False)
    for t in out[0]:
        assert torch.count_nonzero(t[pad]) == 0
        assert not torch.equal(t[~pad], flat[~pad])


def test_compiled_functional_step_reuses_only_dead_buffers():
    """On CPU the compiled step packs into spare buffers of earlier steps (a fresh buffer pays
    a page fault per 4 KiB) and writes its results into those packs: buffers come back once
    nothing references them, results the caller still holds are never written, and no result
    is a buffer of inductor's own."""
    from doors import COMPILED_F64, _td, functional_step, grads_and_losses, initial_params

    from koala_func.engine.layout import SPARE, empty_cache

    empty_cache()  # spares of earlier tests would make the rotation longer than 6 steps
    opt, step = functional_step(COMPILED_F64, "auto", True)
    params = _td(initial_params(0, F64))
    state = opt.init(params)
    x = torch.randn(16, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(4))
    kept, sizes = {}, []
    for k in range(7):
        grads, losses = grads_and_losses(params.flatten_keys(".").to_dict(), x, y)
        params, state = step(params, _td(grads), losses, state)
        sizes.append(len(SPARE.buffers()))
        if k == 1:  # the caller keeps this step's results
            kept = {"p": params, "v": state.v, "copy": params.clone(), "v_copy": state.v.clone()}
    # 4 packs a step, 3 of them the results: once the pool has its rotation (the kept results
    # included), the last steps allocate nothing new
    assert 0 < sizes[-1] == sizes[-3] < SPARE.limit
    pooled = {b.untyped_storage().data_ptr() for b in SPARE.buffers()}
    results = [*params.values(True, True), *state.v.values(True, True)]
    results += list(state.h_prev.values(True, True))
    assert all(t.untyped_storage().data_ptr() in pooled for t in results)
    for name in NAMES:  # ... and no result that the caller holds was written
        key = tuple(name.split("."))
        assert torch.equal(kept["p"][key], kept["copy"][key])
        assert torch.equal(kept["v"][key], kept["v_copy"][key])


def test_blocks_not_updated_keep_their_values_exactly_whatever_their_inputs():
    """The elementwise update has no ``where``: a block that is not updated gets the
    identity's coefficients, even where its own are NaN, and its NaN or inf gradient is
    multiplied by zero only after ``nan_to_num``; its theta, v and h come back bit for bit."""
    from koala_func.engine import passes
    from koala_func.engine.math import BlockUpdate

    nan, inf = float("nan"), float("inf")
    ok = torch.tensor([True, False, False, False])
    vals = torch.tensor([0.5, nan, inf, 0.3], dtype=F64)
    u = BlockUpdate(vals, vals, vals, vals, ok, *(None,) * 4)
    cf = passes._coefficients(u, torch.tensor([0.1], dtype=F64))
    assert cf[1:].tolist() == [[1.0, 0, 0, 0, 0, 0]] * 3
    assert cf[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.05, 1.0])
    gen = torch.Generator().manual_seed(0)
    theta, g, v, h = (torch.randn(4, 8, generator=gen, dtype=F64) for _ in range(4))
    g[1, 3], g[2, 0], g[3, 5] = nan, inf, -inf
    theta[3, 1] = inf  # a parameter that is already inf stays so
    wd = torch.full((4, 1), 5e-4, dtype=F64)
    new = passes._updated(passes.Buffers(theta, g, v, h), wd, cf, None, torch.float64)
    for got, old in zip(new, (theta, v, h), strict=True):
        assert torch.equal(got[1:], old[1:])
        assert not torch.equal(got[0], old[0]) and bool(torch.isfinite(got[0]).all())
    want_v = 0.5 * v[0] + 0.5 * (g[0] + 5e-4 * theta[0]) + 0.5 * h[0]
    assert torch.allclose(new[1][0], want_v, rtol=0, atol=1e-15)


def test_update_op_falls_back_to_eager_when_its_kernel_does_not_compile(monkeypatch):
    """The opaque update op of the compiled functional step compiles its own kernel; where
    that fails (a backend that works for the caller, inductor that does not), it warns once
    and runs the same update eagerly."""
    from koala_func.engine import passes

    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(passes, "_COMPILED", {True: broken, False: broken})
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randn(4, 8, generator=gen, dtype=F64) for _ in range(4)]
    cf = torch.rand(4, 6, generator=gen, dtype=F64)
    cf[2] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # one chunk not updated: the identity
    before = [b.clone() for b in bufs]
    expected = [b.clone() for b in bufs]
    passes._overwrite_plain(*expected, cf)
    with pytest.warns(RuntimeWarning, match="compiling the update kernel failed"):
        passes.overwrite_update(*bufs, cf, None)
    for got, want in zip(bufs, expected, strict=True):
        assert torch.equal(got, want)
    assert passes._COMPILED[False] is passes._overwrite_plain  # no second warning
    theta, v = bufs[0], bufs[2]
    assert torch.equal(theta[2], before[0][2]) and torch.equal(v[2], before[2][2])
    assert not torch.equal(theta[0], before[0][0]) and not torch.equal(v[0], before[2][0])


def test_packed_base_of_one_tensor_layouts():
    """A one-tensor layout without padding takes a contiguous tensor (with member dims) as
    its own buffer, and nothing else: not a restrided, retyped or sliced tensor, nor a
    contiguous one where the layout's views have other strides (channels_last)."""
    from koala_func.engine import Layout

    row = Layout([(3, 4)], F64, "cpu", chunk_size=12)
    t = torch.randn(5, 3, 4, dtype=F64)
    base = row.packed_base([t], 1, F64)
    assert base.shape == (5, 1, 12) and base.data_ptr() == t.data_ptr()
    assert [torch.equal(v, t) for v in row.views(base)] == [True]
    assert row.packed_base([t.transpose(1, 2).contiguous().transpose(1, 2)], 1, F64) is None
    assert row.packed_base([t.float()], 1, F64) is None  # another dtype
    wide = torch.randn(5, 3, 8, dtype=F64)[..., :4]  # a slice: rows not contiguous
    assert row.packed_base([wide], 1, F64) is None
    shape, cl = (2, 3, 2, 2), (12, 1, 6, 3)  # channels_last strides
    lay = Layout([shape], F64, "cpu", chunk_size=24, strides=[cl])
    flat = lay.pack([torch.randn(shape, dtype=F64)])
    (view,) = lay.views(flat)
    assert view.stride() == cl and lay.packed_base([view], 0, F64).data_ptr() == flat.data_ptr()
    assert lay.packed_base([view.contiguous()], 0, F64) is None
