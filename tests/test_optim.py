"""The torch.optim door, KoalaPP: parity with the functional step, closures, param groups,
schedulers, state_dict continuation, and what the flat buffers must survive (replaced
gradients and data, dtype changes, tied, frozen, non-contiguous and channels_last
parameters, zero_grad) without ever updating a stale buffer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tensordict import TensorDict

from koala_func import KoalaPP, KoalaPPState, koala_pp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads; on a loaded 2-core machine two OpenMP
    # threads made such steps many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(
        dtype
    )


def batch(k: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(
        16, 2, generator=g, dtype=dtype
    )


def per_sample(model, k):
    x, y = batch(k, next(model.parameters()).dtype)
    return (model(x) - y).square().mean(1)


def functional_state(opt: KoalaPP, group: int = 0) -> KoalaPPState:
    """The functional state of one group, read from ``opt.state`` (the per-parameter view)."""
    g = opt.param_groups[group]
    sts = [opt.state[p] for p in g["params"]]
    blocks = sts if g["granularity"] == "tensor" else sts[:1]
    return KoalaPPState(
        v=TensorDict({str(i): s["v"] for i, s in enumerate(sts)}),
        h_prev=TensorDict({str(i): s["h_prev"] for i, s in enumerate(sts)}),
        s=torch.stack([b["s"] for b in blocks]),
        count=torch.stack([b["count"] for b in blocks]),
        skipped=torch.stack([b["skipped"] for b in blocks]),
        r_est=sts[0]["r_est"],
        step=sts[0]["step"],
        hyper=koala_pp().init(TensorDict(w=torch.zeros(1))).hyper,
    )


class FunctionalTwin:
    """The same training run through ``KoalaPPTransform.step`` (one state per group)."""

    def __init__(self, model, groups, **opts):
        self.model = model
        params = list(model.parameters())
        self.groups = []
        for idx, hyper in groups:
            t = koala_pp(**{**opts, **hyper})
            td = TensorDict({str(i): params[j].detach() for i, j in enumerate(idx)}, batch_size=[])
            self.groups.append([t, idx, t.init(td)])

    def step(self, k, mean_loss=False, lrs=None):
        self.model.zero_grad()
        losses = per_sample(self.model, k)
        losses.mean().backward()
        loss = losses.mean().detach() if mean_loss else losses.detach()
        params = list(self.model.parameters())
        for gi, (t, idx, state) in enumerate(self.groups):
            if lrs is not None:
                state = state.with_hyperparams(lr=lrs[gi])
            td = TensorDict({str(i): params[j].detach() for i, j in enumerate(idx)}, batch_size=[])
            grads = TensorDict({str(i): params[j].grad for i, j in enumerate(idx)}, batch_size=[])
            new, state = t.step(td, grads, loss, state)
            with torch.no_grad():
                for i, j in enumerate(idx):
                    params[j].copy_(new[str(i)])
            self.groups[gi][2] = state


def closure_for(opt, model, k, mean_loss=False):
    def closure():
        opt.zero_grad()
        losses = per_sample(model, k)
        losses.mean().backward()
        return losses.mean() if mean_loss else losses

    return closure


def assert_close_models(a, b, tol=1e-6):
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def assert_state_close(opt: KoalaPP, twin: FunctionalTwin, tol=1e-6):
    for gi, (_, _, ref) in enumerate(twin.groups):
        got = functional_state(opt, gi)
        for name in ("v", "h_prev"):
            for k in ref.v.keys():
                torch.testing.assert_close(
                    getattr(got, name)[k], getattr(ref, name)[k], rtol=tol, atol=tol
                )
        for name in ("count", "skipped", "step"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        for name in ("s", "r_est"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=tol, atol=0)


@pytest.mark.parametrize(
    "opts",
    [
        dict(lr=0.5),
        dict(lr=0.3, weight_decay=1e-2, symmetric=False),
        dict(lr=0.2, granularity="global", r=0.5),
        dict(lr=0.4, q=0.05, sigma=0.3, alpha_r=0.5, granularity="global", weight_decay=1e-3),
    ],
)
@pytest.mark.parametrize("mean_loss", [False, True])
@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_parity_with_functional_step(opts, mean_loss, impl):
    m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt = KoalaPP(m1.parameters(), **opts, impl=impl, compile=False)
    n = len(list(m2.parameters()))
    twin = FunctionalTwin(m2, [(list(range(n)), {})], **opts)
    for k in range(6):
        opt.step(closure_for(opt, m1, k, mean_loss))
        twin.step(k, mean_loss)
        assert_close_models(m1, m2, 1e-12)
    assert_state_close(opt, twin, 1e-12)
    assert int(functional_state(opt).step) == 6


def test_loss_keyword_equals_closure_and_observe_loss():
    ms = [make_model() for _ in range(3)]
    os_ = [KoalaPP(m.parameters(), lr=0.5, compile=False) for m in ms]
    for k in range(4):
        os_[0].step(closure_for(os_[0], ms[0], k))
        os_[1].zero_grad()
        losses = per_sample(ms[1], k)
        losses.mean().backward()
        assert os_[1].step(loss=losses) is losses
        os_[2].zero_grad()
        losses = per_sample(ms[2], k)
        losses.mean().backward()
        os_[2].observe_loss(losses)
        os_[2].step()
    assert_same(ms[0], ms[1])
    assert_same(ms[0], ms[2])


def test_step_requires_a_loss():
    m = make_model()
    opt = KoalaPP(m.parameters(), compile=False)
    per_sample(m, 0).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(loss=torch.ones(2, 2))
    with pytest.raises(ValueError, match="variance"):
        KoalaPP(m.parameters(), r_statistic="variance", compile=False).step(loss=torch.tensor(1.0))


def test_param_groups_have_their_own_hyperparameters():
    m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    p = list(m1.parameters())
    g0 = dict(lr=0.5)
    g1 = dict(lr=0.1, weight_decay=1e-2, q=0.2, symmetric=False)
    opt = KoalaPP([{"params": p[:2], **g0}, {"params": p[2:], **g1}], sigma=0.2, compile=False)
    twin = FunctionalTwin(m2, [([0, 1], g0), ([2, 3], g1)], sigma=0.2)
    for k in range(5):
        opt.step(closure_for(opt, m1, k))
        twin.step(k)
        assert_close_models(m1, m2, 1e-12)
    assert_state_close(opt, twin, 1e-12)
    # same r/alpha_r in both groups: the two R estimates are the single shared R
    assert torch.equal(functional_state(opt, 0).r_est, functional_state(opt, 1).r_est)


def test_missing_gradients_leave_blocks_unchanged():
    m = make_model()
    opt = KoalaPP(m.parameters(), lr=0.5, compile=False)
    opt.step(closure_for(opt, m, 0))
    for p in m.parameters():
        p.grad = None
    before = [p.clone() for p in m.parameters()]
    count = functional_state(opt).count.clone()
    opt.step(loss=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert torch.equal(functional_state(opt).count, count)
    # a gradient for one tensor only updates that tensor's block
    p0 = next(m.parameters())
    p0.grad = torch.ones_like(p0)
    opt.step(loss=torch.tensor(1.0))
    assert functional_state(opt).count.tolist() == [2, 1, 1, 1]


def test_invalid_arguments_are_rejected():
    m = make_model()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        KoalaPP(m.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="Invalid sigma"):
        KoalaPP(m.parameters(), sigma=0.0)
    with pytest.raises(ValueError, match="Invalid alpha_r"):
        KoalaPP(m.parameters(), alpha_r=1.0)
    with pytest.raises(ValueError, match="Invalid granularity"):
        KoalaPP(m.parameters(), granularity="layer")
    with pytest.raises(ValueError, match="Invalid impl"):
        KoalaPP(m.parameters(), impl="fused")
    with pytest.raises(TypeError, match="complex"):
        KoalaPP([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(TypeError, match="floating-point"):
        KoalaPP([torch.zeros(3, dtype=torch.int64)])


SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_drive_the_lr(name):
    m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    p = list(m1.parameters())
    opt = KoalaPP([{"params": p[:2]}, {"params": p[2:], "lr": 0.2}], lr=0.5, compile=False)
    sched = SCHEDULERS[name](opt)
    twin = FunctionalTwin(m2, [([0, 1], dict(lr=0.5)), ([2, 3], dict(lr=0.2))])
    seen = []
    for k in range(6):
        lrs = [float(g["lr"]) for g in opt.param_groups]
        seen.append(lrs[0])
        loss = opt.step(closure_for(opt, m1, k))
        twin.step(k, lrs=lrs)
        assert_close_models(m1, m2, 1e-12)
        # plateau: a rising metric makes it reduce the lr every step
        sched.step(float(k)) if name == "plateau" else sched.step()
        assert loss.dim() == 1
    assert len(set(seen)) > 2, seen  # the lr really changed


@pytest.mark.parametrize("impl", ["engine", "reference"])
@pytest.mark.parametrize(
    "opts",
    [
        dict(lr=0.5, weight_decay=1e-3),
        dict(lr=0.3, granularity="global"),
        dict(lr=0.3, state_dtype=torch.float32, dtype=torch.bfloat16),
    ],
)
def test_state_dict_gives_an_exact_continuation(opts, impl):
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float32)
    m_ref = make_model(dtype=dtype)
    o_ref = KoalaPP(m_ref.parameters(), **opts, impl=impl, compile=False)
    sched_ref = torch.optim.lr_scheduler.StepLR(o_ref, step_size=3, gamma=0.5)
    for k in range(5):
        o_ref.step(closure_for(o_ref, m_ref, k))
        sched_ref.step()
    buf = io.BytesIO()
    torch.save(
        {"model": m_ref.state_dict(), "opt": o_ref.state_dict(), "sched": sched_ref.state_dict()},
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    m_new = make_model(seed=1, dtype=dtype)
    m_new.load_state_dict(ckpt["model"])
    others = {k: v for k, v in opts.items() if k != "lr"}
    o_new = KoalaPP(m_new.parameters(), lr=123.0, **others, impl=impl, compile=False)
    o_new.load_state_dict(ckpt["opt"])
    sched_new = torch.optim.lr_scheduler.StepLR(o_new, step_size=3, gamma=0.5)
    sched_new.load_state_dict(ckpt["sched"])

    ref_state, new_state = functional_state(o_ref), functional_state(o_new)
    assert new_state.v["0"].dtype == ref_state.v["0"].dtype
    assert new_state.count.dtype == torch.int64 and new_state.s.dtype == ref_state.s.dtype
    assert (ref_state == new_state).all()  # the round trip is exact
    assert o_new.param_groups[0]["lr"] == o_ref.param_groups[0]["lr"]
    for k in range(5, 12):
        o_ref.step(closure_for(o_ref, m_ref, k))
        o_new.step(closure_for(o_new, m_new, k))
        sched_ref.step()
        sched_new.step()
        assert_same(m_ref, m_new)
    assert (functional_state(o_ref) == functional_state(o_new)).all()
    if opts.get("granularity") == "global":  # the group's block scalars are shared
        st = o_new.state
        ps = list(m_new.parameters())
        assert torch.equal(st[ps[0]]["count"], st[ps[-1]]["count"])


def test_state_dict_before_the_first_step_and_deepcopy():
    m = make_model()
    opt = KoalaPP(m.parameters(), lr=0.5, compile=False)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"v", "h_prev", "s", "count", "skipped", "r_est", "step"}
    opt2 = KoalaPP(make_model().parameters(), lr=0.1, compile=False)
    opt2.load_state_dict(sd)
    assert float(opt2.param_groups[0]["lr"]) == 0.5
    m2 = copy.deepcopy(m)
    opt3 = KoalaPP(m2.parameters(), lr=0.5, compile=False)
    opt.step(closure_for(opt, m, 0))
    opt3.step(closure_for(opt3, m2, 0))
    assert_same(m, m2)


# ------------------------------------------------------------------ the flat buffers


def _train(model, opt, k):
    opt.zero_grad()
    losses = per_sample(model, k)
    losses.mean().backward()
    opt.step(loss=losses.detach())


def _pair(**kw):
    """Two identical models: one trained by the engine, one by the reference door."""
    m1, m2 = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    return (
        m1,
        KoalaPP(m1.parameters(), lr=0.5, compile=False, **kw),
        m2,
        KoalaPP(m2.parameters(), lr=0.5, impl="reference", **kw),
    )


def test_gradients_are_views_of_one_buffer_and_zero_grad_keeps_them():
    m, opt, _, _ = _pair()
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        ps = list(m.parameters())
        assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in ps)
        bases = {p.grad.untyped_storage().data_ptr() for p in ps}
        assert len(bases) == 1  # all views of one flat buffer
        datas = {p.untyped_storage().data_ptr() for p in ps}
        assert len(datas) == 1
        per_sample(m, 0).mean().backward()  # lands in the buffer
        assert {p.grad.untyped_storage().data_ptr() for p in ps} == bases


def test_replaced_and_none_gradients_are_used_not_stale():
    m1, o1, m2, o2 = _pair()
    for k in range(6):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            per_sample(m, k).mean().backward()
            ps = list(m.parameters())
            if k == 2:  # a gradient the user replaced by a new tensor
                ps[0].grad = ps[0].grad * 3.0 + 0.1
            if k == 3:  # set to None: that block is skipped
                ps[1].grad = None
            if k == 4:  # replaced without zero_grad afterwards
                ps[2].grad = torch.full_like(ps[2], 0.05)
            o.step(loss=per_sample(m, k).detach())
        assert_close_models(m1, m2, 1e-12)
    assert functional_state(o1).count.tolist() == [6, 5, 6, 6]
    assert torch.equal(functional_state(o1).count, functional_state(o2).count)
    # after the step the replaced gradient is a view of the buffer again
    o1.zero_grad()
    ps = list(m1.parameters())
    assert len({p.grad.untyped_storage().data_ptr() for p in ps}) == 1


def test_replaced_data_and_dtype_are_repacked_never_stale():
    m1, o1, m2, o2 = _pair()
    _train(m1, o1, 0)
    _train(m2, o2, 0)
    new_w = torch.randn_like(m1[0].weight)
    for m in (m1, m2):  # p.data = ... after construction
        m[0].weight.data = new_w.clone()
    _train(m1, o1, 1)
    _train(m2, o2, 1)
    assert_close_models(m1, m2, 1e-12)
    assert not torch.equal(m1[0].weight, new_w)  # the new data was updated, not the old buffer

    # load_state_dict(assign=True) swaps in new Parameter objects: both doors take them over,
    # with the old ones' state (torch.optim would keep updating the detached old objects)
    sd = {k: v.clone() + 0.01 for k, v in m2.state_dict().items()}
    for m in (m1, m2):
        m.load_state_dict(sd, assign=True)
    loaded = {k: v.clone() for k, v in m1.state_dict().items()}
    for m, o in ((m1, o1), (m2, o2)):
        mine = {id(p) for g in o.param_groups for p in g["params"]}
        assert mine == {id(p) for p in m.parameters()}
    _train(m1, o1, 2)
    _train(m2, o2, 2)
    assert_close_models(m1, m2, 1e-12)
    for name, p in m1.named_parameters():
        assert not torch.equal(p, loaded[name]), f"{name}: the loaded parameter did not move"
    assert all(int(o1.state[p]["step"]) == 3 for p in m1.parameters())  # state carried over
    # a module attribute re-pointed at another parameter of ours (tying) changes nothing
    detached = m1[2].weight
    m1[2].weight = m1[0].weight
    mine = [p for g in o1.param_groups for p in g["params"]]
    assert len(mine) == 4 and any(p is detached for p in mine)


def test_parameter_registry_keeps_nothing_alive():
    """The registry behind the take-over (parameter -> its optimizers) holds weak references
    only: a dropped optimizer is freed, and a new one over the same parameters takes over."""
    import gc
    import weakref

    from koala_func.optim import _owners_of

    m = make_model(dtype=torch.float64)
    opt = KoalaPP(m.parameters(), lr=0.5, compile=False)
    gone = weakref.ref(opt)
    assert all(_owners_of(p) == [opt] for p in m.parameters())
    del opt
    gc.collect()
    assert gone() is None and all(_owners_of(p) == [] for p in m.parameters())
    opt = KoalaPP(m.parameters(), lr=0.5, compile=False)
    m[0].weight = torch.nn.Parameter(m[0].weight.detach().clone())
    assert any(p is m[0].weight for p in opt.param_groups[0]["params"])


def test_model_to_another_dtype_after_construction():
    m1 = make_model(dtype=torch.float32)
    o1 = KoalaPP(m1.parameters(), lr=0.5, compile=False)
    _train(m1, o1, 0)
    m2 = copy.deepcopy(m1)
    o2 = KoalaPP(m2.parameters(), lr=0.5, impl="reference")
    o2.load_state_dict(o1.state_dict())
    for m in (m1, m2):
        m.to(torch.float64)
    for k in range(1, 4):
        _train(m1, o1, k)
        _train(m2, o2, k)
    assert m1[0].weight.dtype == torch.float64
    assert_close_models(m1, m2, 1e-6)
    assert functional_state(o1).count.tolist() == [4, 4, 4, 4]


def test_loss_is_read_in_the_dtype_of_the_parameters_as_they_are_now():
    """After ``model.to(float64)`` the step reads the loss in float64: a loss that float32
    cannot tell from 1 still changes the step (the engine's buffers are re-packed before the
    loss is read in their scalar dtype)."""
    weights = []
    for loss in (1.0, 1.0 + 1e-10):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        o = KoalaPP(m.parameters(), lr=0.5, compile=False)
        m.to(torch.float64)
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        o.step(loss=torch.tensor(loss, dtype=torch.float64))
        weights.append(m.weight.detach().clone())
    assert weights[0].dtype == torch.float64
    assert not torch.equal(weights[0], weights[1])


def test_zero_grad_clears_after_model_to():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    o = KoalaPP(m.parameters(), lr=0.5, compile=False)
    _train_linear(m, o)
    m.double()
    o.zero_grad()
    assert m.weight.grad is None or torch.count_nonzero(m.weight.grad) == 0


def test_zero_grad_after_model_to_before_the_first_step():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    o = KoalaPP(m.parameters(), lr=0.5, compile=False)
    m.to(torch.float64)
    _train_linear(m, o)
    assert o.state[m.weight]["count"] == 1 and m.weight.dtype == torch.float64


def _train_linear(m, o):
    o.zero_grad()
    losses = m(torch.randn(8, 3, dtype=m.weight.dtype)).square().mean(1)
    losses.mean().backward()
    o.step(loss=losses.detach())


@pytest.mark.parametrize("door", ["optim", "functional"])
def test_zero_dim_parameter(door):
    if door == "optim":
        p = torch.nn.Parameter(torch.tensor(2.0))
        o = KoalaPP([p], lr=0.5, compile=False)
        p.grad = torch.tensor(0.5)
        o.step(loss=torch.tensor(1.0))
        got = p.detach()
    else:
        opt = koala_pp(lr=0.5, impl="engine")
        params = TensorDict(z=torch.tensor(2.0))
        got = opt.step(
            params, TensorDict(z=torch.tensor(0.5)), torch.tensor(1.0), opt.init(params)
        )[0]["z"]
    ref = koala_pp(lr=0.5)
    params = TensorDict(z=torch.tensor(2.0))
    want, _ = ref.step(params, TensorDict(z=torch.tensor(0.5)), torch.tensor(1.0), ref.init(params))
    torch.testing.assert_close(got, want["z"])


def _adam_and_koala(build):
    """The same module under Adam and KoalaPP, three steps each."""
    out = []
    for cls in ("adam", "koala"):
        torch.manual_seed(0)
        mod = build()
        ps = [p for p in mod.parameters()]
        opt = torch.optim.Adam(ps, lr=0.01) if cls == "adam" else KoalaPP(ps, lr=0.5, compile=False)
        before = {n: p.detach().clone() for n, p in mod.named_parameters()}
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            losses = mod(x).square().flatten(1).mean(1)
            losses.mean().backward()
            opt.step() if cls == "adam" else opt.step(loss=losses.detach())
        out.append((mod, before, opt))
    return out


def test_frozen_parameters_behave_as_under_adam():
    def build():
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 2, 1))
        m[0].bias.requires_grad_(False)
        return m

    (adam, a0, _), (koala, k0, opt) = _adam_and_koala(build)
    for mod, before in ((adam, a0), (koala, k0)):
        assert torch.equal(mod[0].bias, before["0.bias"])
        assert mod[0].bias.grad is None
        assert not torch.equal(mod[0].weight, before["0.weight"])
    assert not koala[0].bias.requires_grad
    opt.zero_grad()
    assert koala[0].bias.grad is None


def test_tied_parameters_behave_as_under_adam():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 6, bias=False)
            self.b = torch.nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight  # shared

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    (_adam, _, aopt), (koala, _, kopt) = _adam_and_koala(lambda: _ChannelsFirst(Tied()))
    assert len(kopt.param_groups[0]["params"]) == len(aopt.param_groups[0]["params"]) == 1
    assert koala.inner.a.weight is koala.inner.b.weight
    # the functional step on the one shared tensor is the same update
    torch.manual_seed(0)
    m = _ChannelsFirst(Tied())
    opt = koala_pp(lr=0.5)
    params = TensorDict(w=m.inner.a.weight.detach().clone())
    state = opt.init(params)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        m.zero_grad()
        losses = m(x).square().flatten(1).mean(1)
        losses.mean().backward()
        params, state = opt.step(
            params, TensorDict(w=m.inner.a.weight.grad), losses.detach(), state
        )
        with torch.no_grad():
            m.inner.a.weight.copy_(params["w"])
    torch.testing.assert_close(koala.inner.a.weight, params["w"], rtol=1e-6, atol=1e-7)


class _ChannelsFirst(torch.nn.Module):
    """[N, C, H, W] -> a module over the last dim."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_noncontiguous_and_channels_last_parameters():
    def build(channels_last):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3)
        lin = torch.nn.Linear(6, 5)
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last)
            lin.weight = torch.nn.Parameter(lin.weight.detach().t().contiguous().t())
        return conv, lin

    runs = []
    for awkward in (True, False):
        conv, lin = build(awkward)
        if awkward:
            assert not conv.weight.is_contiguous() and not lin.weight.is_contiguous()
        opt = KoalaPP([*conv.parameters(), *lin.parameters()], lr=0.5, compile=False)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        for _ in range(3):
            opt.zero_grad()
            losses = lin(conv(x)).square().flatten(1).mean(1)
            losses.mean().backward()
            opt.step(loss=losses.detach())
        runs.append((conv, lin))
    (c1, l1), (c2, l2) = runs
    assert c1.weight.is_contiguous(memory_format=torch.channels_last)  # layout kept
    assert l1.weight.stride() == (1, 5)  # the transposed layout kept
    torch.testing.assert_close(c1.weight, c2.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l1.weight, l2.weight, rtol=1e-5, atol=1e-6)


def test_reference_impl_equals_the_engine():
    m1, o1, m2, o2 = _pair(weight_decay=1e-3, granularity="global")
    for k in range(8):
        _train(m1, o1, k)
        _train(m2, o2, k)
    assert_close_models(m1, m2, 1e-12)
    a, b = functional_state(o1), functional_state(o2)
    assert torch.equal(a.count, b.count) and torch.equal(a.step, b.step)
    torch.testing.assert_close(a.s, b.s, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_compiled_param_groups_and_scheduler_do_not_recompile():
    """The default (compiled) KoalaPP with two param groups of their own hyperparameters
    and an lr scheduler: after the first step no new graph, and it equals the eager engine."""
    from torch._dynamo.utils import counters

    models = [make_model(dtype=torch.float64) for _ in range(2)]
    opts, scheds = [], []
    for m, compile in zip(models, (None, False), strict=True):
        p = list(m.parameters())
        groups = [{"params": p[:2], "weight_decay": 1e-3}, {"params": p[2:], "lr": 0.2, "q": 0.2}]
        o = KoalaPP(groups, lr=0.5, compile=compile)
        opts.append(o)
        scheds.append(torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4))
    for k in range(2):  # warm-up: compiles
        for m, o, s in zip(models, opts, scheds, strict=True):
            _train(m, o, k)
            s.step()
    before = counters["stats"]["unique_graphs"]
    lrs = set()
    for k in range(2, 8):
        lrs.add(float(opts[0].param_groups[0]["lr"]))
        for m, o, s in zip(models, opts, scheds, strict=True):
            _train(m, o, k)
            s.step()
        opts[0].param_groups[1]["q"] = 0.2 + 0.01 * k  # a hyperparameter edited by hand
        opts[1].param_groups[1]["q"] = 0.2 + 0.01 * k
    assert len(lrs) >= 4
    assert counters["stats"]["unique_graphs"] - before == 0, "recompiled"
    assert_close_models(models[0], models[1], 1e-10)
