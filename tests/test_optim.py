"""The torch.optim adapter: step-by-step parity with the functional core, closures, param
groups, schedulers, state_dict continuation and torch.compile without recompiles."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tensordict import TensorDict

from koala_func.koala_pp import koala_pp
from koala_func.optim import KoalaPP


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


def assert_same(a: torch.nn.Module, b: torch.nn.Module):
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def assert_state_same(opt: KoalaPP, twin: FunctionalTwin):
    for gi, (_, _, ref) in enumerate(twin.groups):
        got = opt.functional_state(gi)
        for name in ("v", "h_prev"):
            for k in ref.v.keys():
                assert torch.equal(getattr(got, name)[k], getattr(ref, name)[k]), name
        for name in ("s", "count", "skipped", "r_est", "step"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name


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
def test_parity_with_functional_step(opts, mean_loss):
    m1, m2 = make_model(), make_model()
    opt = KoalaPP(m1.parameters(), **opts)
    n = len(list(m2.parameters()))
    twin = FunctionalTwin(m2, [(list(range(n)), {})], **opts)
    for k in range(6):
        opt.step(closure_for(opt, m1, k, mean_loss))
        twin.step(k, mean_loss)
        assert_same(m1, m2)
    assert_state_same(opt, twin)
    assert int(opt.functional_state().step) == 6


def test_loss_keyword_equals_closure():
    m1, m2 = make_model(), make_model()
    o1, o2 = KoalaPP(m1.parameters(), lr=0.5), KoalaPP(m2.parameters(), lr=0.5)
    for k in range(4):
        o1.step(closure_for(o1, m1, k))
        o2.zero_grad()
        losses = per_sample(m2, k)
        losses.mean().backward()
        returned = o2.step(loss=losses)
        assert returned is losses
    assert_same(m1, m2)


def test_step_requires_a_loss():
    m = make_model()
    opt = KoalaPP(m.parameters())
    per_sample(m, 0).mean().backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="not both"):
        opt.step(lambda: torch.tensor(1.0), loss=torch.tensor(1.0))
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(loss=torch.ones(2, 2))


def test_param_groups_have_their_own_hyperparameters():
    m1, m2 = make_model(), make_model()
    p = list(m1.parameters())
    g0 = dict(lr=0.5)
    g1 = dict(lr=0.1, weight_decay=1e-2, q=0.2, symmetric=False)
    opt = KoalaPP([{"params": p[:2], **g0}, {"params": p[2:], **g1}], sigma=0.2)
    twin = FunctionalTwin(m2, [([0, 1], g0), ([2, 3], g1)], sigma=0.2)
    for k in range(5):
        opt.step(closure_for(opt, m1, k))
        twin.step(k)
        assert_same(m1, m2)
    assert_state_same(opt, twin)
    # same r/alpha_r in both groups: the two R estimates are the single shared R
    assert torch.equal(opt.functional_state(0).r_est, opt.functional_state(1).r_est)


def test_zero_grad_and_missing_gradients_leave_blocks_unchanged():
    m = make_model()
    opt = KoalaPP(m.parameters(), lr=0.5)
    opt.step(closure_for(opt, m, 0))
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    before = [p.clone() for p in m.parameters()]
    count = opt.functional_state().count.clone()
    opt.step(loss=torch.tensor(1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert torch.equal(opt.functional_state().count, count)
    # a gradient for one tensor only updates that tensor's block
    p0 = next(m.parameters())
    p0.grad = torch.ones_like(p0)
    opt.step(loss=torch.tensor(1.0))
    assert opt.functional_state().count.tolist() == [2, 1, 1, 1]


def test_lr_is_a_tensor_and_invalid_arguments_are_rejected():
    m = make_model()
    opt = KoalaPP(m.parameters(), lr=0.25)
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0 and float(lr) == 0.25
    with pytest.raises(ValueError, match="Invalid learning rate"):
        KoalaPP(m.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="Invalid sigma"):
        KoalaPP(m.parameters(), sigma=0.0)
    with pytest.raises(ValueError, match="Invalid alpha_r"):
        KoalaPP(m.parameters(), alpha_r=1.0)
    with pytest.raises(ValueError, match="Invalid granularity"):
        KoalaPP(m.parameters(), granularity="layer")
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
def test_schedulers_drive_the_functional_lr(name):
    m1, m2 = make_model(), make_model()
    p = list(m1.parameters())
    opt = KoalaPP([{"params": p[:2]}, {"params": p[2:], "lr": 0.2}], lr=0.5)
    lr_tensors = [g["lr"] for g in opt.param_groups]
    sched = SCHEDULERS[name](opt)
    twin = FunctionalTwin(m2, [([0, 1], dict(lr=0.5)), ([2, 3], dict(lr=0.2))])
    seen = []
    for k in range(6):
        lrs = [float(g["lr"]) for g in opt.param_groups]
        seen.append(lrs[0])
        loss = opt.step(closure_for(opt, m1, k))
        twin.step(k, lrs=lrs)
        assert_same(m1, m2)
        # plateau: a rising metric makes it reduce the lr every step
        sched.step(float(k)) if name == "plateau" else sched.step()
        assert loss.dim() == 1
    assert len(set(seen)) > 2, seen  # the lr really changed
    # updated in place: the same tensor objects (no recompiles under torch.compile)
    assert all(g["lr"] is t for g, t in zip(opt.param_groups, lr_tensors, strict=True))


@pytest.mark.parametrize(
    "opts",
    [
        dict(lr=0.5, weight_decay=1e-3),
        dict(lr=0.3, granularity="global"),
        dict(lr=0.3, state_dtype=torch.float32, dtype=torch.bfloat16),
    ],
)
def test_state_dict_gives_an_exact_continuation(opts):
    opts = dict(opts)
    dtype = opts.pop("dtype", torch.float32)
    m_ref = make_model(dtype=dtype)
    o_ref = KoalaPP(m_ref.parameters(), **opts)
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
    o_new = KoalaPP(m_new.parameters(), lr=123.0, **{k: v for k, v in opts.items() if k != "lr"})
    o_new.load_state_dict(ckpt["opt"])
    sched_new = torch.optim.lr_scheduler.StepLR(o_new, step_size=3, gamma=0.5)
    sched_new.load_state_dict(ckpt["sched"])

    ref_state = o_ref.functional_state()
    new_state = o_new.functional_state()
    assert new_state.v["0"].dtype == ref_state.v["0"].dtype
    assert new_state.count.dtype == torch.int64 and new_state.s.dtype == ref_state.s.dtype
    assert isinstance(o_new.param_groups[0]["lr"], torch.Tensor)
    for k in range(5, 12):
        o_ref.step(closure_for(o_ref, m_ref, k))
        o_new.step(closure_for(o_new, m_new, k))
        sched_ref.step()
        sched_new.step()
        assert_same(m_ref, m_new)
    a, b = o_ref.functional_state(), o_new.functional_state()
    assert (a == b).all()
    if opts.get("granularity") == "global":  # the group's block scalars stay one shared tensor
        st = o_new.state
        ps = list(m_new.parameters())
        assert st[ps[0]]["s"] is st[ps[-1]]["s"]


def test_load_state_dict_before_first_step_and_deepcopy():
    m = make_model()
    opt = KoalaPP(m.parameters(), lr=0.5)
    sd = opt.state_dict()
    assert sd["state"] == {}
    opt2 = KoalaPP(make_model().parameters(), lr=0.1)
    opt2.load_state_dict(sd)
    assert float(opt2.param_groups[0]["lr"]) == 0.5
    m2 = copy.deepcopy(m)
    opt3 = KoalaPP(m2.parameters(), lr=0.5)
    opt.step(closure_for(opt, m, 0))
    opt3.step(closure_for(opt3, m2, 0))
    assert_same(m, m2)


def counting_backend():
    """A torch.compile backend that counts compilations and calls of each graph."""
    compiled, calls = [], []

    def backend(gm, example_inputs):
        i = len(compiled)
        compiled.append(gm)
        calls.append(0)

        def run(*args):
            calls[i] += 1
            return gm.forward(*args)

        return run

    return backend, compiled, calls


@pytest.mark.filterwarnings("ignore:Using lock_\\(\\) inside a compiled graph")
def test_compiled_step_does_not_recompile_when_the_scheduler_changes_lr():
    torch._dynamo.reset()
    m_c, m_e = make_model(), make_model()
    o_c = KoalaPP(m_c.parameters(), lr=0.5)
    o_e = KoalaPP(m_e.parameters(), lr=0.5)
    s_c = torch.optim.lr_scheduler.CosineAnnealingLR(o_c, T_max=4)
    s_e = torch.optim.lr_scheduler.CosineAnnealingLR(o_e, T_max=4)
    backend, compiled, calls = counting_backend()

    @torch.compile(backend=backend)
    def opt_step(loss):
        o_c.step(loss=loss)

    def train(model, opt, k, step_fn):
        opt.zero_grad()
        losses = per_sample(model, k)
        losses.mean().backward()
        step_fn(losses.detach())

    for k in range(2):  # warm-up: the first step also creates the state
        train(m_c, o_c, k, opt_step)
        train(m_e, o_e, k, lambda loss: o_e.step(loss=loss))
        s_c.step()
        s_e.step()
    n_graphs, lrs = len(compiled), set()
    before = sum(calls)
    for k in range(2, 7):
        lrs.add(float(o_c.param_groups[0]["lr"]))
        train(m_c, o_c, k, opt_step)
        train(m_e, o_e, k, lambda loss: o_e.step(loss=loss))
        s_c.step()
        s_e.step()
    assert len(lrs) >= 4
    assert len(compiled) == n_graphs, "recompiled while the lr changed"
    assert sum(calls) - before >= 5, "the compiled step did not run"
    for pc, pe in zip(m_c.parameters(), m_e.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
