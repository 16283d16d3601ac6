"""KOALA-V against an independent float64 reference written from algorithm.md's last section."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from koala_func.koala_v import KoalaVState, koala_v

STEPS = 200


def _problem(seed: int = 0):
    """A tiny tanh MLP regression in float64, plus a parameter the loss never uses."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    params = TensorDict(
        layer=TensorDict(
            w=0.5 * torch.randn(5, 8, generator=gen, dtype=torch.float64),
            b=torch.zeros(8, dtype=torch.float64),
        ),
        head=0.5 * torch.randn(8, 1, generator=gen, dtype=torch.float64),
        unused=torch.ones(3, dtype=torch.float64),
    )

    def losses_of(p: dict) -> torch.Tensor:
        h = torch.tanh(x @ p["layer", "w"] + p["layer", "b"])
        return 0.5 * ((h @ p["head"]) - y).squeeze(1) ** 2 + 0.0 * p["unused"].sum()

    keys = list(params.keys(True, True))

    def grads_and_losses(p):
        leaves = {k: p[k].detach().requires_grad_(True) for k in keys}
        losses = losses_of(leaves)
        gs = torch.autograd.grad(losses.mean(), list(leaves.values()))
        return dict(zip(keys, gs, strict=True)), losses.detach()

    return params, grads_and_losses


def _reference_step(theta, grads, losses, P, R, *, lr, sigma, q, r, alpha_r, wd, per_sample):
    """One KOALA-V step as algorithm.md states it, with Python floats and dicts (no shared code).

    Returns the new parameters and the new shared covariance P and noise R.
    """
    L = float(losses.mean())
    m2 = float((losses**2).mean()) if per_sample else L**2
    R = alpha_r * R + (1 - alpha_r) * m2 if r is None else r
    P = P + q
    largest = 0.0
    theta = dict(theta)
    for k in theta:
        g = grads[k].reshape(-1)
        if float(g.norm()) < 1e-9:
            continue  # the released skip rule
        t = theta[k].reshape(-1)
        gp = g + wd * t
        norm2 = float(gp @ gp)
        s = P * norm2 + R
        L_blk = L + 0.5 * wd * float(t @ t)
        theta[k] = (t - lr * L_blk * P / s * g).reshape(theta[k].shape)  # raw g, not g'
        largest = max(largest, P * P * norm2 / s)
    return theta, P - largest, R


CONFIGS = {
    "online-r-per-sample-wd": dict(
        lr=0.5, sigma=0.1, q=0.1, r=None, alpha_r=0.9, wd=5e-4, per_sample=True
    ),
    "online-r-scalar-loss": dict(
        lr=1.0, sigma=0.3, q=0.01, r=None, alpha_r=0.5, wd=0.0, per_sample=False
    ),
    "fixed-r": dict(lr=0.05, sigma=0.1, q=0.1, r=0.05, alpha_r=0.9, wd=1e-3, per_sample=True),
}


def _build(cfg):
    return koala_v(
        lr=cfg["lr"],
        sigma=cfg["sigma"],
        q=cfg["q"],
        r=cfg["r"],
        alpha_r=cfg["alpha_r"],
        weight_decay=cfg["wd"],
    )


def _check_counts(params, state, steps):
    keys = list(params.keys(True, True))
    counts = dict(zip(keys, state.count.tolist(), strict=True))
    assert counts == {("layer", "w"): steps, ("layer", "b"): steps, "head": steps, "unused": 0}


@pytest.mark.parametrize("name", ["online-r-per-sample-wd", "online-r-scalar-loss"])
def test_matches_reference_step_by_step(name):
    """200 steps; each step starts from our parameters (the online-R runs are chaotic, so
    float64 rounding would otherwise grow), while the reference carries its own P and R."""
    cfg = CONFIGS[name]
    params, gl = _problem()
    opt = _build(cfg)
    state = opt.init(params)
    P = cfg["sigma"]
    R = 1.0 if cfg["r"] is None else cfg["r"]
    first = gl(params)[1].mean()
    for t in range(STEPS):
        grads, losses = gl(params)
        theta = {k: v for k, v in params.items(True, True)}
        expected, P, R = _reference_step(theta, grads, losses, P, R, **cfg)
        loss = losses if cfg["per_sample"] else losses.mean()
        params, state = opt.step(params, TensorDict(grads), loss, state)
        for k, v in expected.items():
            torch.testing.assert_close(params.get(k), v, rtol=1e-12, atol=1e-14, msg=f"step {t}")
        assert state.p.item() == pytest.approx(P, rel=1e-10, abs=1e-14), t
        assert state.r_est.item() == pytest.approx(R, rel=1e-12), t
    assert gl(params)[1].mean() < 0.5 * first  # it trains
    _check_counts(params, state, STEPS)


def test_matches_reference_trajectory_with_fixed_r():
    """Fully independent 200-step trajectories (the fixed-R run is stable)."""
    cfg = CONFIGS["fixed-r"]
    params, gl = _problem()
    theta = {k: v for k, v in params.items(True, True)}
    P, R = cfg["sigma"], cfg["r"]
    opt = _build(cfg)
    ours, state = params, opt.init(params)
    for t in range(STEPS):
        grads, losses = gl(TensorDict(theta))
        theta, P, R = _reference_step(theta, grads, losses, P, R, **cfg)
        grads, losses = gl(ours)
        ours, state = opt.step(ours, TensorDict(grads), losses, state)
        for k, v in theta.items():
            torch.testing.assert_close(ours.get(k), v, rtol=1e-10, atol=1e-12, msg=f"step {t}")
        assert state.p.item() == pytest.approx(P, rel=1e-10), t
    assert torch.equal(ours["unused"], params["unused"])
    _check_counts(params, state, STEPS)


def test_state_is_tensors_and_hyperparams_are_in_state():
    params, _ = _problem()
    state = koala_v(lr=0.3).init(params)
    assert isinstance(state, KoalaVState)
    assert state.p.dtype == torch.float64 and state.p.dim() == 0
    assert state.hyper.lr.item() == pytest.approx(0.3)
    # the step reads lr from the state, not from the builder
    grads = TensorDict(head=torch.ones(8, 1, dtype=torch.float64))
    loss = torch.tensor(1.0, dtype=torch.float64)
    a, _ = koala_v(lr=0.3).step(params, grads, loss, state.with_hyperparams(lr=0.0))
    torch.testing.assert_close(a["head"], params["head"])
    with pytest.raises(AttributeError):
        state.p = torch.tensor(1.0)  # frozen


def test_missing_and_nonfinite_gradients_are_skipped():
    params, gl = _problem()
    opt = koala_v()
    state = opt.init(params)
    grads, losses = gl(params)
    bad = dict(grads)
    bad["head"] = torch.full_like(grads["head"], float("nan"))
    del bad[("layer", "b")]
    new, state2 = opt.step(params, TensorDict(bad), losses, state)
    assert torch.equal(new["head"], params["head"])
    assert torch.equal(new["layer", "b"], params["layer", "b"])
    assert not torch.equal(new["layer", "w"], params["layer", "w"])
    keys = list(params.keys(True, True))
    counts = dict(zip(keys, state2.count.tolist(), strict=True))
    skipped = dict(zip(keys, state2.skipped.tolist(), strict=True))
    assert counts == {("layer", "w"): 1, ("layer", "b"): 0, "head": 0, "unused": 0}
    assert skipped["head"] == 1 and sum(skipped.values()) == 1
    assert torch.isfinite(state2.p)


def test_invalid_hyperparameters_raise():
    with pytest.raises(ValueError, match="Invalid learning rate"):
        koala_v(lr=-1.0)
    with pytest.raises(ValueError, match="Invalid sigma"):
        koala_v(sigma=0.0)


def _float32_problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen)
    y = torch.randn(16, generator=gen)
    params = TensorDict(w=torch.randn(4, generator=gen), b=torch.zeros(()))

    def grads_and_losses(p):
        def mean_loss(p):
            losses = 0.5 * (x @ p["w"] + p["b"] - y) ** 2
            return losses.mean(), losses

        return torch.func.grad(mean_loss, has_aux=True)(p)

    return params, grads_and_losses


def test_vmap_over_members_equals_separate_runs():
    params, gl = _float32_problem()
    lrs = torch.tensor([0.1, 0.5, 1.0])
    opt = koala_v(weight_decay=1e-3)

    def train(p, lr):
        state = opt.init(p).with_hyperparams(lr=lr)
        for _ in range(5):
            grads, losses = gl(p)
            p, state = opt.step(p, grads, losses, state)
        return p, state.p

    stacked = torch.stack([params.clone() for _ in lrs])
    batched, p_batched = torch.vmap(train)(stacked, lrs)
    for i, lr in enumerate(lrs):
        single, p_single = train(params, lr)
        torch.testing.assert_close(batched[i]["w"], single["w"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_batched[i], p_single, rtol=1e-5, atol=1e-7)


def test_compiles_in_one_graph_and_matches_eager():
    params, gl = _float32_problem()
    opt = koala_v(weight_decay=1e-3)
    compiled = torch.compile(opt.step, fullgraph=True)
    eager_p, eager_s = params, opt.init(params)
    comp_p, comp_s = params, opt.init(params)
    for _ in range(4):
        grads, losses = gl(eager_p)
        eager_p, eager_s = opt.step(eager_p, grads, losses, eager_s)
        grads, losses = gl(comp_p)
        comp_p, comp_s = compiled(comp_p, grads, losses, comp_s)
        comp_s = comp_s.with_hyperparams(lr=comp_s.hyper.lr)  # new tensors: no recompile
    torch.testing.assert_close(comp_p["w"], eager_p["w"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(comp_s.p, eager_s.p, rtol=1e-5, atol=1e-7)
