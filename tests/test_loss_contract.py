"""The loss contract of ``KoalaPP`` that the framework integrations rely on, without any
framework: ``step(closure, loss=...)`` precedence, ``observe_loss`` accumulation, the bare
``step()`` of DCP's init, eager state, GradScaler (AMP) scaling, DCP round trips,
``torch.compile`` without a recompile, cyclic schedulers, and the functional API's contract
(validation, mismatched states, negative residuals).

The reference in every row is a plain loop fed the true mean loss of the (accumulated) batch.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tensordict import TensorDict

from koala_func import KoalaPP, koala_pp


def koala(params, **kwargs) -> KoalaPP:
    """``KoalaPP`` on the eager engine where it has a ``compile`` switch: the compiled engine
    gives the same numbers (tests/test_optim.py) but would compile once per model here."""
    if "compile" in inspect.signature(KoalaPP).parameters:
        kwargs.setdefault("compile", False)
    return KoalaPP(params, **kwargs)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(
        dtype
    )


def batch(k: int, dtype: torch.dtype = torch.float32, n: int = 16):
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(n, 4, generator=g).to(dtype)
    y = torch.randn(n, 2, generator=g).to(dtype)
    return x, y


def per_sample(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).square().mean(1)


def max_dev(m1: torch.nn.Module, m2: torch.nn.Module) -> float:
    return max(
        (a.detach().double() - b.detach().double()).abs().max().item()
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True)
    )


def snapshot(model: torch.nn.Module, opt: KoalaPP):
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())
    }
    return params, state


def assert_unchanged(model: torch.nn.Module, opt: KoalaPP, snap) -> None:
    params, state = snap
    for i, p in enumerate(model.parameters()):
        assert torch.equal(p.detach(), params[i])
        for k, v in state[i].items():
            assert torch.equal(opt.state[p][k], v), k


def plain_step(model, opt, k, n_micro=1, per_sample_loss=False):
    """The reference: one backward of the whole batch's mean loss, ``step(loss=true mean)``."""
    opt.zero_grad()
    x, y = batch(k, next(model.parameters()).dtype)
    losses = per_sample(model, x, y)
    losses.mean().backward()
    return opt.step(loss=losses.detach() if per_sample_loss else losses.mean().detach())


def accumulated_step(model, opt, k, n_micro=2, per_sample_loss=False):
    """``n_micro`` micro-batches, each loss divided by ``n_micro`` (as the frameworks do),
    observed and backpropagated; then a bare ``step()``."""
    opt.zero_grad()
    x, y = batch(k, next(model.parameters()).dtype)
    for xs, ys in zip(x.chunk(n_micro), y.chunk(n_micro), strict=True):
        losses = per_sample(model, xs, ys) / n_micro
        opt.observe_loss(losses.detach() if per_sample_loss else losses.mean().detach())
        losses.mean().backward()
    return opt.step()


# ---------------------------------------------------------------- eager state, bare step
def test_state_is_created_eagerly_by_the_constructor_and_add_param_group():
    model = make_model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = koala(first)
    assert opt.state, "no state before the first step"
    assert all({"v", "h_prev", "step"} <= set(opt.state[p]) for p in first)
    opt.add_param_group({"params": second, "lr": 0.5})
    assert all({"v", "h_prev", "step"} <= set(opt.state[p]) for p in second)


def test_bare_step_without_gradients_and_losses_changes_nothing():
    model = make_model()
    opt = koala(model.parameters())
    snap = snapshot(model, opt)
    assert opt.step() is None
    assert_unchanged(model, opt, snap)


def test_bare_step_with_gradients_needs_the_loss():
    model = make_model()
    opt = koala(model.parameters())
    per_sample(model, *batch(0)).mean().backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    assert_unchanged(model, opt, snap)


# ------------------------------------------------------------------------- precedence
def test_closure_and_loss_together_the_explicit_loss_wins_and_the_closure_runs():
    m1, m2 = make_model(), make_model()
    o1, o2 = koala(m1.parameters(), lr=0.5), koala(m2.parameters(), lr=0.5)
    for k in range(3):
        calls, returned = [], []

        def closure(k=k, calls=calls, returned=returned):
            o1.zero_grad()
            losses = per_sample(m1, *batch(k))
            losses.mean().backward()
            calls.append(torch.is_grad_enabled())
            returned.append(3 * losses.mean().detach())  # a wrong loss: must not be used
            return returned[-1]

        with torch.no_grad():
            true = per_sample(m1, *batch(k))
        out = o1.step(closure, loss=true)
        assert calls == [True], "the closure must run, under enable_grad"
        assert out is returned[0], "step returns the closure's return value"
        plain_step(m2, o2, k, per_sample_loss=True)
    assert max_dev(m1, m2) == 0.0


def test_observed_losses_win_over_the_closure_return_value():
    """Lightning's automatic optimization: the closure zeroes the gradients on the first
    micro-batch, the callback observes each (normalised) micro-batch loss before backward, and
    the closure returns only the last micro-batch's loss."""
    m1, m2 = make_model(), make_model()
    o1, o2 = koala(m1.parameters(), lr=0.5), koala(m2.parameters(), lr=0.5)
    for k in range(3):
        x, y = batch(k)
        (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)
        o1.zero_grad()
        first = per_sample(m1, x1, y1).mean() / 2
        o1.observe_loss(first.detach())
        first.backward()

        def closure(x2=x2, y2=y2):
            last = per_sample(m1, x2, y2).mean() / 2
            o1.observe_loss(last.detach())
            last.backward()
            return last

        returned = o1.step(closure)
        assert returned.dim() == 0
        plain_step(m2, o2, k)
    dev = max_dev(m1, m2)
    print(f"observed micro-batch means vs plain loop: max |dtheta| = {dev:.2e}")
    assert dev < 1e-6


def test_closure_return_value_is_used_when_nothing_is_observed():
    m1, m2 = make_model(), make_model()
    o1, o2 = koala(m1.parameters()), koala(m2.parameters())

    def closure():
        o1.zero_grad()
        losses = per_sample(m1, *batch(0))
        losses.mean().backward()
        return losses

    assert o1.step(closure).dim() == 1
    plain_step(m2, o2, 0, per_sample_loss=True)
    assert max_dev(m1, m2) == 0.0


# --------------------------------------------------------------------- observe_loss sums
@pytest.mark.parametrize("per_sample_loss", [False, True], ids=["mean", "per-sample"])
@pytest.mark.parametrize("n_micro", [2, 4])
def test_observed_micro_batch_losses_add_up_to_the_true_mean(per_sample_loss, n_micro):
    # float64: the only difference to the plain loop is the order of the gradient sums;
    # the online R (r=None) checks that the second moment accumulates consistently
    m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    o1 = koala(m1.parameters(), lr=0.5, weight_decay=1e-3)
    o2 = koala(m2.parameters(), lr=0.5, weight_decay=1e-3)
    for k in range(4):
        used = accumulated_step(m1, o1, k, n_micro, per_sample_loss)
        ref = plain_step(m2, o2, k, per_sample_loss=per_sample_loss)
        assert torch.allclose(used.mean(), ref.mean(), rtol=1e-12, atol=0)
    assert max_dev(m1, m2) < 1e-12
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(o1.state[p1]["r_est"], o2.state[p2]["r_est"], rtol=1e-12, atol=0)


def test_float32_accumulation_matches_the_plain_loop_to_1e6():
    m1, m2 = make_model(), make_model()
    o1, o2 = koala(m1.parameters(), lr=0.5), koala(m2.parameters(), lr=0.5)
    for k in range(5):
        accumulated_step(m1, o1, k, 2)
        plain_step(m2, o2, k)
    dev = max_dev(m1, m2)
    print(f"float32 accumulation (2 micro-batches) vs plain loop: max |dtheta| = {dev:.2e}")
    assert dev < 1e-6


def test_a_step_consumes_the_observed_losses():
    model = make_model()
    opt = koala(model.parameters())
    accumulated_step(model, opt, 0)
    per_sample(model, *batch(1)).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()  # nothing left from the previous step


def test_an_explicit_loss_also_consumes_the_observed_losses():
    m1, m2 = make_model(), make_model()
    o1, o2 = koala(m1.parameters()), koala(m2.parameters())
    o1.observe_loss(torch.tensor(123.0))  # ignored: loss= wins
    plain_step(m1, o1, 0)
    plain_step(m2, o2, 0)
    assert max_dev(m1, m2) == 0.0
    per_sample(m1, *batch(1)).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        o1.step()


def test_zero_grad_discards_the_observed_losses():
    model = make_model()
    opt = koala(model.parameters())
    opt.observe_loss(torch.tensor(0.5))
    opt.zero_grad()
    per_sample(model, *batch(0)).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()


def test_bare_step_returns_the_loss_it_used():
    model = make_model(dtype=torch.float64)
    opt = koala(model.parameters())
    per_sample(model, *batch(0, torch.float64)).mean().backward()
    opt.observe_loss(torch.tensor(0.25, dtype=torch.float64))
    opt.observe_loss(torch.tensor(0.5, dtype=torch.float64))
    assert float(opt.step()) == 0.75


# ------------------------------------------------------------------------- GradScaler
def _amp_run(dtype, scaled, steps=4, clip=None, seed=0):
    model = make_model(seed)
    opt = koala(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    for k in range(steps):
        opt.zero_grad()
        x, y = batch(k)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            losses = per_sample(model, x, y).float()
        scaler.scale(losses.mean()).backward()
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt, loss=losses.detach())
        scaler.update()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("clip", [None, 0.5], ids=["no-clip", "unscale_+clip"])
def test_grad_scaler_step_with_loss_matches_the_unscaled_run(dtype, clip):
    assert KoalaPP._step_supports_amp_scaling is True
    scaled, _ = _amp_run(dtype, scaled=True, clip=clip)
    unscaled, _ = _amp_run(dtype, scaled=False, clip=clip)
    fp32, _ = _amp_run(torch.float32, scaled=False, clip=clip)
    same_precision, vs_fp32 = max_dev(scaled, unscaled), max_dev(scaled, fp32)
    print(
        f"{dtype} GradScaler clip={clip}: vs unscaled {same_precision:.2e}, vs fp32 {vs_fp32:.2e}"
    )
    # the scale is a power of two: the unscaled gradients are the same up to rounding
    assert same_precision < 1e-6
    # autocast itself (measured: 5e-5 for float16, 5e-4 for bfloat16, 4 steps)
    assert vs_fp32 < (1e-3 if dtype == torch.float16 else 5e-3)


def test_grad_scaler_skips_the_whole_update_on_inf_and_consumes_the_observed_losses():
    model = make_model()
    opt = koala(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad()
    losses = per_sample(model, *batch(0))
    scaler.scale(losses.mean()).backward()
    model[0].weight.grad[0, 0] = float("inf")
    opt.observe_loss(losses.mean().detach())
    snap = snapshot(model, opt)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert_unchanged(model, opt, snap)  # parameters, v, h_prev and the step count
    assert scaler.get_scale() < scale  # the scaler saw the skipped step
    # the observed loss belonged to the skipped step
    opt.zero_grad()
    scaler.scale(per_sample(model, *batch(1)).mean()).backward()
    with pytest.raises(ValueError, match="needs the loss"):
        scaler.step(opt)


def test_a_closure_under_grad_scaler_is_refused():
    model = make_model()
    opt = koala(model.parameters())
    scaler = torch.amp.GradScaler("cpu")

    def closure():
        opt.zero_grad()
        loss = per_sample(model, *batch(0)).mean()
        scaler.scale(loss).backward()
        return loss

    closure()
    snap = snapshot(model, opt)
    with pytest.raises(RuntimeError, match=r"(?=.*GradScaler)(?=.*closure)"):
        scaler.step(opt, closure)
    assert_unchanged(model, opt, snap)


# --------------------------------------------------------------------------------- DCP
dcp_state = pytest.importorskip("torch.distributed.checkpoint.state_dict")


def _state_equal(o1: KoalaPP, o2: KoalaPP, m1, m2) -> None:
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert set(o1.state[p1]) == set(o2.state[p2])
        for k, v in o1.state[p1].items():
            assert torch.equal(v, o2.state[p2][k]) and v.dtype == o2.state[p2][k].dtype, k


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("stepped", [False, True], ids=["never-stepped", "stepped"])
def test_dcp_optimizer_state_dict_round_trip(stepped):
    m1, m2 = make_model(), make_model()
    o1 = koala(m1.parameters(), lr=0.5, weight_decay=1e-3)
    o2 = koala(m2.parameters(), lr=0.5, weight_decay=1e-3)
    if stepped:
        for k in range(2):
            plain_step(m1, o1, k)
        m2.load_state_dict(m1.state_dict())
    sd = dcp_state.get_optimizer_state_dict(m1, o1)  # never-stepped: DCP calls step(None)
    assert set(sd["state"]) == {n for n, _ in m1.named_parameters()}
    dcp_state.set_optimizer_state_dict(m2, o2, sd)
    _state_equal(o1, o2, m1, m2)
    for k in range(2, 5):  # an exact continuation
        plain_step(m1, o1, k)
        plain_step(m2, o2, k)
    assert max_dev(m1, m2) == 0.0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dcp_save_and_load_resume_equals_an_uninterrupted_run(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    ref, run = make_model(), make_model()
    o_ref = koala(ref.parameters(), lr=0.5, weight_decay=1e-3)
    o_run = koala(run.parameters(), lr=0.5, weight_decay=1e-3)
    for k in range(3):
        plain_step(ref, o_ref, k)
        plain_step(run, o_run, k)
    dcp.save(
        {"model": run.state_dict(), "optim": dcp_state.get_optimizer_state_dict(run, o_run)},
        checkpoint_id=str(tmp_path / "ckpt"),
    )
    # a fresh process would do this: new model and optimizer, load in place
    resumed = make_model(seed=1)
    o_res = koala(resumed.parameters(), lr=0.5, weight_decay=1e-3)
    target = {
        "model": resumed.state_dict(),
        "optim": dcp_state.get_optimizer_state_dict(resumed, o_res),
    }
    dcp.load(target, checkpoint_id=str(tmp_path / "ckpt"))
    resumed.load_state_dict(target["model"])
    dcp_state.set_optimizer_state_dict(resumed, o_res, target["optim"])
    for k in range(3, 6):
        plain_step(ref, o_ref, k)
        plain_step(resumed, o_res, k)
    dev = max_dev(ref, resumed)
    print(f"DCP save/load resume vs uninterrupted: max |dtheta| = {dev:.2e}")
    assert dev == 0.0


# ----------------------------------------------------------------------------- compile
def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend, graphs


@pytest.mark.filterwarnings("ignore:Using lock_\\(\\) inside a compiled graph")
def test_compiled_step_with_loss_does_not_recompile_on_its_second_call():
    torch._dynamo.reset()
    m_c, m_e = make_model(), make_model()
    o_c, o_e = KoalaPP(m_c.parameters(), lr=0.5), KoalaPP(m_e.parameters(), lr=0.5)
    backend, graphs = _counting_backend()

    @torch.compile(backend=backend)
    def opt_step(loss):
        o_c.step(loss=loss)

    counts = []
    for k in range(3):  # no warm-up: the state exists before the first call
        for model, opt, step in ((m_c, o_c, opt_step), (m_e, o_e, None)):
            opt.zero_grad()
            losses = per_sample(model, *batch(k))
            losses.mean().backward()
            if step is None:
                opt.step(loss=losses.detach())
            else:
                step(losses.detach())
        counts.append(len(graphs))
    assert counts[0] > 0, "nothing was compiled"
    assert counts[1] == counts[0] == counts[2], f"recompiled: graphs after each call {counts}"
    assert max_dev(m_c, m_e) < 1e-6
    torch._dynamo.reset()


# -------------------------------------------------------------------------- schedulers
CYCLIC = {
    "OneCycleLR": lambda o, **kw: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=1.0, total_steps=6, **kw
    ),
    "CyclicLR": lambda o, **kw: torch.optim.lr_scheduler.CyclicLR(
        o, base_lr=0.1, max_lr=1.0, step_size_up=2, **kw
    ),
}


@pytest.mark.parametrize("name", list(CYCLIC))
def test_cyclic_schedulers_need_cycle_momentum_false(name):
    model = make_model()
    with pytest.raises(ValueError, match="momentum"):
        CYCLIC[name](koala(model.parameters()))  # their default cycle_momentum=True
    ref = make_model()
    opt = koala(model.parameters(), lr=0.5)
    o_ref = koala(ref.parameters(), lr=0.5)
    sched = CYCLIC[name](opt, cycle_momentum=False)
    lrs = []
    for k in range(6):
        lrs.append(float(opt.param_groups[0]["lr"]))
        o_ref.param_groups[0]["lr"] = lrs[-1]  # the plain loop sets the same lr by hand
        plain_step(model, opt, k)
        plain_step(ref, o_ref, k)
        sched.step()
    assert len(set(lrs)) >= 3, lrs  # the schedule really moved the lr
    assert max_dev(model, ref) == 0.0


# ---------------------------------------------------------- the functional API's contract
def test_with_hyperparams_validates_like_the_builder():
    state = koala_pp().init(TensorDict(w=torch.ones(3)))
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):
        state.with_hyperparams(lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1\.0"):
        koala_pp(lr=-1.0)
    assert float(state.with_hyperparams(lr=0.25).hyper.lr) == 0.25


def test_builder_type_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"\blr\b"):
        koala_pp(lr="a")
    with pytest.raises(TypeError, match=r"\bq\b"):
        koala_pp(q="a")


def test_a_state_built_for_other_parameters_is_refused_with_key_and_shapes():
    t = koala_pp()
    state = t.init(TensorDict(w=torch.ones(5), b=torch.ones(2)))
    params = TensorDict(w=torch.ones(3), b=torch.ones(2))
    grads = TensorDict(w=torch.full((3,), 0.1), b=torch.full((2,), 0.1))
    with pytest.raises(ValueError) as info:
        t.step(params, grads, torch.tensor(0.5), state)
    msg = str(info.value)
    assert "'w'" in msg or '"w"' in msg or " w " in msg or "w:" in msg, msg
    assert "5" in msg and "3" in msg, msg
    assert "size of tensor a" not in msg


def test_r_statistic_variance_needs_per_sample_losses():
    t = koala_pp(r_statistic="variance")
    params = TensorDict(w=torch.ones(3))
    state = t.init(params)
    grads = TensorDict(w=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match="variance"):
        t.step(params, grads, torch.tensor(0.5), state)
    t.step(params, grads, torch.tensor([0.4, 0.6]), state)  # per-sample: fine


def _two_blocks(dtype=torch.float64):
    # |w|^2 = 4 * 4 = 16, |b|^2 = 0.01: with wd = 0.1 the weight-decay terms are 0.8 and 5e-4
    return TensorDict(w=torch.full((4,), 2.0, dtype=dtype), b=torch.full((1,), 0.1, dtype=dtype))


def test_negative_residual_skips_the_block_functional():
    t = koala_pp(weight_decay=0.1, r=0.5)
    params = _two_blocks()
    state = t.init(params)
    grads = TensorDict(
        w=torch.full((4,), 0.3, dtype=torch.float64), b=torch.full((1,), -0.2, dtype=torch.float64)
    )
    # L = -0.1: w's residual -0.1 + 0.8 > 0 (steps), b's -0.1 + 5e-4 < 0 (skipped, counted)
    new, new_state = t.step(params, grads, torch.tensor(-0.1, dtype=torch.float64), state)
    assert not torch.equal(new["w"], params["w"])
    assert torch.equal(new["b"], params["b"])
    assert sorted(new_state.skipped.tolist()) == [0, 1]  # one block of the two
    assert torch.equal(new_state.v["b"], state.v["b"])
    assert torch.equal(new_state.h_prev["b"], state.h_prev["b"])


def test_negative_residual_skips_the_block_koalapp_identically():
    w = torch.nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    b = torch.nn.Parameter(torch.full((1,), 0.1, dtype=torch.float64))
    opt = koala([w, b], weight_decay=0.1, r=0.5)
    w.grad = torch.full((4,), 0.3, dtype=torch.float64)
    b.grad = torch.full((1,), -0.2, dtype=torch.float64)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt.step(loss=torch.tensor(-0.1, dtype=torch.float64))
    assert not torch.equal(w.detach(), w0)
    assert torch.equal(b.detach(), b0)
    assert int(opt.state[b]["skipped"]) == 1 and int(opt.state[w]["skipped"]) == 0
    # the functional door gives the same parameters
    t = koala_pp(weight_decay=0.1, r=0.5)
    params = TensorDict(**{"0": w0, "1": b0})
    new, _ = t.step(
        params,
        TensorDict(**{"0": w.grad, "1": b.grad}),
        torch.tensor(-0.1, dtype=torch.float64),
        t.init(params),
    )
    assert torch.equal(new["0"], w.detach()) and torch.equal(new["1"], b0)


def test_loss_target_shifts_the_residual():
    # with a fixed R the residual L - target is all that the loss changes in a step
    def run(loss, target):
        w = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
        opt = koala([w], r=0.5, loss_target=target)
        w.grad = torch.linspace(0.1, 0.5, 5, dtype=torch.float64)
        opt.step(loss=torch.tensor(loss, dtype=torch.float64))
        return w.detach(), int(opt.state[w]["skipped"])

    shifted, skipped = run(0.6, 0.5)
    plain, _ = run(0.1, 0.0)
    torch.testing.assert_close(shifted, plain, rtol=1e-12, atol=1e-12)
    assert skipped == 0
    below, skipped = run(0.4, 0.5)
    assert skipped == 1
    assert torch.equal(below, torch.linspace(-1, 1, 5, dtype=torch.float64))
