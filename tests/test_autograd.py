"""Differentiable KOALA++ step: autograd and torch.func through step, single and ensembled."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from koala_func import koala_pp
from koala_func.ensemble import ensemble_init, ensemble_step

DT = torch.float64


def problem(seed: int = 0):
    """A small quadratic: fixed matrices that turn parameters into gradients and losses."""
    g = torch.Generator().manual_seed(seed)
    m1 = torch.randn(4, 4, generator=g, dtype=DT) * 0.3 + torch.eye(4, dtype=DT)
    b1 = torch.randn(4, generator=g, dtype=DT)
    d2 = torch.rand(3, generator=g, dtype=DT) + 0.5
    e2 = torch.randn(3, generator=g, dtype=DT)
    return m1, b1, d2, e2


M1, B1, D2, E2 = problem()


def grads_and_loss(w1, w2, k):
    """Step k's gradients and per-sample losses: functions of the parameters (a real unroll)."""
    g1 = M1 @ w1 + B1 * (1 + 0.1 * k)
    g2 = D2 * w2 - E2
    base = 0.5 * (w1 * g1).sum() + 0.5 * (w2 * g2).sum()
    losses = torch.stack([base.abs() + 0.2, 0.5 * base.abs() + 0.3 + 0.1 * k])
    return g1, g2, losses


def unrolled(opt, n_steps, hyper_names):
    """``f(w1, w2, loss_scale, *hyper) -> (w1, w2, v, s, r_est)`` after ``n_steps`` steps."""

    def f(w1, w2, loss_scale, *hyper):
        params = TensorDict(w1=w1, w2=w2)
        state = opt.init(params.detach()).with_hyperparams(
            **dict(zip(hyper_names, hyper, strict=True))
        )
        for k in range(n_steps):
            g1, g2, losses = grads_and_loss(params["w1"], params["w2"], k)
            grads = TensorDict(w1=g1, w2=g2)
            params, state = opt.step(params, grads, losses * loss_scale, state)
        return params["w1"], params["w2"], state.v["w1"], state.v["w2"], state.s, state.r_est

    return f


def inputs(hyper_values):
    g = torch.Generator().manual_seed(3)
    w1 = torch.randn(4, generator=g, dtype=DT)
    w2 = torch.randn(3, generator=g, dtype=DT)
    vals = [torch.tensor(v, dtype=DT) for v in hyper_values]
    return tuple(t.requires_grad_() for t in (w1, w2, torch.tensor(1.0, dtype=DT), *vals))


CASES = [
    # (builder kwargs, names of the hyperparameters differentiated, their values)
    (dict(), ("lr", "q", "sigma", "alpha_r"), (0.3, 0.1, 0.2, 0.8)),
    (dict(r=0.5), ("lr", "q", "sigma", "r"), (0.3, 0.1, 0.2, 0.5)),
    (
        dict(symmetric=False, weight_decay=0.05),
        ("lr", "q", "sigma", "weight_decay"),
        (0.3, 0.1, 0.2, 0.05),
    ),
    (dict(granularity="global", r=0.7), ("lr", "q", "sigma", "r"), (0.2, 0.05, 0.3, 0.7)),
    (dict(granularity="global", symmetric=False), ("lr", "q", "sigma"), (0.2, 0.05, 0.3)),
]


@pytest.mark.parametrize("n_steps", [1, 3], ids=["first_step", "three_steps"])
@pytest.mark.parametrize("kw,names,values", CASES, ids=lambda c: repr(c)[:40])
def test_gradcheck(kw, names, values, n_steps):
    opt = koala_pp(differentiable=True, **kw)
    f = unrolled(opt, n_steps, names)
    assert torch.autograd.gradcheck(f, inputs(values), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_grad_reaches_every_input():
    """A nonzero gradient reaches params, grads, loss and each hyperparameter."""
    opt = koala_pp(differentiable=True, r=0.5, weight_decay=0.01)
    w = torch.randn(5, dtype=DT, requires_grad=True)
    g = torch.randn(5, dtype=DT, requires_grad=True)
    loss = torch.tensor(0.7, dtype=DT, requires_grad=True)
    hyper = {
        k: torch.tensor(v, dtype=DT, requires_grad=True)
        for k, v in dict(lr=0.3, q=0.1, sigma=0.2, r=0.5, weight_decay=0.01).items()
    }
    state = opt.init(TensorDict(w=w.detach())).with_hyperparams(**hyper)
    p, state = opt.step(TensorDict(w=w), TensorDict(w=g), loss, state)
    g2 = TensorDict(w=torch.randn(5, dtype=DT) + p["w"])  # second step: depends on the first
    p, state = opt.step(p, g2, loss * 1.1, state)
    target = (p["w"] ** 2).sum()
    leaves = [w, g, loss, *hyper.values()]
    grads = torch.autograd.grad(target, leaves)
    for name, gr in zip(["w", "g", "loss", *hyper], grads, strict=True):
        assert torch.isfinite(gr).all(), name
        assert gr.abs().sum() > 0, name


def test_torch_func_grad_matches_autograd():
    opt = koala_pp(differentiable=True)
    f = unrolled(opt, 3, ("lr", "q"))
    w1, w2, scale, lr, q = inputs((0.3, 0.1))

    def val(lr, q):
        out = f(w1.detach(), w2.detach(), scale.detach(), lr, q)
        return (out[0] ** 2).sum() + (out[1] ** 2).sum()

    d_lr, d_q = torch.func.grad(val, argnums=(0, 1))(lr.detach(), q.detach())
    a_lr, a_q = torch.autograd.grad(val(lr, q), (lr, q))
    torch.testing.assert_close(d_lr, a_lr, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_q, a_q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("later", [False, True], ids=["first_step", "later_step"])
def test_skipped_block_has_finite_grads(later):
    """A zero-gradient block is skipped; its zero denominators must not leak NaN into backward.

    At its first update a zero gradient makes ``|H_prev|^2 = 0``: the core's safe denominator
    replaces it before the division, so the backward pass stays finite and exact (the skipped
    block's new parameters are the old ones: identity Jacobian, nothing from lr).
    """
    opt = koala_pp(differentiable=True, r=0.5)
    w1, w2, scale, lr, q = inputs((0.3, 0.1))
    params = TensorDict(w1=w1, w2=w2)
    state = opt.init(params.detach()).with_hyperparams(lr=lr, q=q)
    if later:
        g1, g2, losses = grads_and_loss(w1, w2, 0)
        params, state = opt.step(params, TensorDict(w1=g1, w2=g2), losses, state)
    g1, g2, losses = grads_and_loss(params["w1"], params["w2"], 1)
    grads = TensorDict(w1=torch.zeros_like(g1), w2=g2)  # w1 skipped at this step
    new, new_state = opt.step(params, grads, losses * scale, state)
    assert torch.equal(new["w1"], params["w1"])
    assert new_state.count[0] == state.count[0]
    out = (new["w1"] ** 2).sum() + (new["w2"] ** 2).sum() + new_state.s.sum()
    d = torch.autograd.grad(out, (w1, w2, scale, lr, q), allow_unused=True)
    for name, gr in zip(("w1", "w2", "scale", "lr", "q"), d, strict=True):
        assert gr is not None and torch.isfinite(gr).all(), name
    if not later:  # the skipped block: d/dw1 of |w1|^2 only
        torch.testing.assert_close(d[0], 2 * w1.detach() + _w2_path(opt, w1, w2, lr, q)[0])


def _w2_path(opt, w1, w2, lr, q):
    """d/dw1 of the rest of the objective (through w2's gradient and the loss), by autograd."""
    w1 = w1.detach().requires_grad_()
    params = TensorDict(w1=w1, w2=w2.detach())
    state = opt.init(params.detach()).with_hyperparams(lr=lr.detach(), q=q.detach())
    g1, g2, losses = grads_and_loss(w1, w2.detach(), 1)
    grads = TensorDict(w1=torch.zeros_like(g1), w2=g2)
    new, new_state = opt.step(params, grads, losses, state)
    out = (new["w2"] ** 2).sum() + new_state.s.sum()
    return torch.autograd.grad(out, w1)


def test_gradcheck_through_skipped_block():
    opt = koala_pp(differentiable=True)

    def f(w1, w2, lr):
        params = TensorDict(w1=w1, w2=w2)
        state = opt.init(params.detach()).with_hyperparams(lr=lr)
        for k in range(2):
            _, g2, losses = grads_and_loss(params["w1"], params["w2"], k)
            grads = TensorDict(w1=torch.zeros_like(params["w1"]), w2=g2)
            params, state = opt.step(params, grads, losses, state)
        return params["w1"], params["w2"], state.s

    w1, w2, _, lr = inputs((0.4,))
    assert torch.autograd.gradcheck(f, (w1, w2, lr))


def test_default_step_is_not_differentiable():
    opt = koala_pp()
    w = torch.randn(3, dtype=DT, requires_grad=True)
    lr = torch.tensor(0.3, dtype=DT, requires_grad=True)
    state = opt.init(TensorDict(w=w.detach())).with_hyperparams(lr=lr)
    p, _ = opt.step(TensorDict(w=w), TensorDict(w=torch.ones(3, dtype=DT)), lr * 2, state)
    assert not p["w"].requires_grad


# -- ensembles: per-member hypergradients in one call ----------------------------------------


def _member_objective(step, params, state, n_steps):
    for k in range(n_steps):
        g1, g2, losses = grads_and_loss(params["w1"], params["w2"], k)
        params, state = step(params, TensorDict(w1=g1, w2=g2), losses, state)
    return (params["w1"] ** 2).sum() + (params["w2"] ** 2).sum()


def test_ensemble_hypergradients_match_single():
    """vmap(step) is differentiable: one backward gives every member's d(objective)/d(lr)."""
    n = 3
    opt = koala_pp(differentiable=True, r=0.5)
    g = torch.Generator().manual_seed(0)
    params = TensorDict(
        w1=torch.randn(n, 4, generator=g, dtype=DT),
        w2=torch.randn(n, 3, generator=g, dtype=DT),
        batch_size=[n],
    )
    lrs = torch.tensor([0.1, 0.3, 0.6], dtype=DT, requires_grad=True)
    qs = torch.tensor([0.05, 0.1, 0.2], dtype=DT, requires_grad=True)
    state = ensemble_init(opt, params, lr=lrs, q=qs)
    step = ensemble_step(opt, compile=False)

    def objective(params, state):
        return _member_objective(opt.step, params, state, 3)

    values = torch.vmap(objective)(params, state)
    d_lr, d_q = torch.autograd.grad(values.sum(), (lrs, qs))
    for e in range(n):
        lr, q = lrs[e].detach().requires_grad_(), qs[e].detach().requires_grad_()
        st = opt.init(params[e]).with_hyperparams(lr=lr, q=q, r=0.5)
        val = _member_objective(opt.step, params[e], st, 3)
        a, b = torch.autograd.grad(val, (lr, q))
        torch.testing.assert_close(d_lr[e], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(d_q[e], b, rtol=1e-12, atol=1e-14)

    # the ensemble step helper (eager) differentiates the same way, one step at a time
    values2 = _ensemble_objective(step, params, ensemble_init(opt, params, lr=lrs, q=qs), 3)
    d_lr2 = torch.autograd.grad(values2.sum(), lrs)[0]
    torch.testing.assert_close(d_lr2, d_lr, rtol=1e-12, atol=1e-14)


def test_vmap_of_grad_through_with_hyperparams():
    """torch.func: vmap of grad per member, the state built inside the vmapped function."""
    n = 3
    opt = koala_pp(differentiable=True, r=0.5)
    g = torch.Generator().manual_seed(0)
    params = TensorDict(
        w1=torch.randn(n, 4, generator=g, dtype=DT),
        w2=torch.randn(n, 3, generator=g, dtype=DT),
        batch_size=[n],
    )
    lrs = torch.tensor([0.1, 0.3, 0.6], dtype=DT)
    qs = torch.tensor([0.05, 0.1, 0.2], dtype=DT)

    def member_val(lr, q, p):
        st = opt.init(p).with_hyperparams(lr=lr, q=q, r=0.5)
        return _member_objective(opt.step, p, st, 3)

    d_lr = torch.vmap(torch.func.grad(member_val))(lrs, qs, params)
    for e in range(n):
        lr = lrs[e].clone().requires_grad_()
        val = _member_objective(
            opt.step, params[e], opt.init(params[e]).with_hyperparams(lr=lr, q=qs[e], r=0.5), 3
        )
        torch.testing.assert_close(d_lr[e], torch.autograd.grad(val, lr)[0], rtol=1e-12, atol=1e-14)


def _ensemble_objective(step, params, state, n_steps):
    for k in range(n_steps):
        g1, g2, losses = torch.vmap(grads_and_loss, in_dims=(0, 0, None))(
            params["w1"], params["w2"], k
        )
        params, state = step(params, TensorDict(w1=g1, w2=g2, batch_size=[len(g1)]), losses, state)
    return (params["w1"] ** 2).sum(-1) + (params["w2"] ** 2).sum(-1)


def test_ensemble_gradcheck():
    n = 2
    opt = koala_pp(differentiable=True)
    step = ensemble_step(opt, compile=False)

    def f(w1, w2, lrs):
        params = TensorDict(w1=w1, w2=w2, batch_size=[n])
        return _ensemble_objective(step, params, ensemble_init(opt, params.detach(), lr=lrs), 2)

    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(n, 4, generator=g, dtype=DT, requires_grad=True)
    w2 = torch.randn(n, 3, generator=g, dtype=DT, requires_grad=True)
    lrs = torch.tensor([0.2, 0.5], dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(f, (w1, w2, lrs))


def test_compiled_ensemble_step_is_differentiable():
    """First-order gradients through torch.compile(torch.vmap(step)) equal the eager ones."""
    n = 3
    opt = koala_pp(differentiable=True)
    g = torch.Generator().manual_seed(2)
    params = TensorDict(w=torch.randn(n, 4, generator=g, dtype=DT), batch_size=[n])
    grads = params.apply(lambda p: torch.randn(p.shape, generator=g, dtype=DT))
    l1, l2 = torch.rand(n, 5, generator=g, dtype=DT), torch.rand(n, 5, generator=g, dtype=DT)
    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=DT, requires_grad=True)
    out = []
    for compile in (False, True):
        step = ensemble_step(opt, compile=compile)
        p, s = step(params, grads, l1, ensemble_init(opt, params, lr=lrs))
        p, s = step(p, grads.add(p), l2, s)
        out.append(torch.autograd.grad((p["w"] ** 2).sum() + s.s.sum(), lrs)[0])
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)
