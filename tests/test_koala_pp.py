"""The reference path: parity with an independent implementation, the algorithm's identities,
the skip rule, validation, and training on a real task."""

from __future__ import annotations

import pytest
import torch
from conftest import ce_per_sample, make_mlp
from reference_koala import ReferenceKoalaPP
from tensordict import TensorDict

import koala_func as kf

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads; on a loaded 2-core machine two OpenMP
    # threads made such steps many times slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flat(td: TensorDict) -> dict:
    return {k: v for k, v in td.flatten_keys(".").items()}


# ---------------------------------------------------------------------------------------------
# Parity with the independent float64 reference: the 200-step runs over every configuration
# are in the door table (tests/doors.py, test_doors.py); here the late first updates.
# ---------------------------------------------------------------------------------------------


def test_parity_with_skips_and_late_first_updates():
    """Blocks skipped at the first steps start later, as in the released optimizer."""
    params = TensorDict(a=torch.randn(5, dtype=F64), b={"c": torch.randn(2, 3, dtype=F64)})
    opt = kf.koala_pp(lr=0.3, weight_decay=1e-3)
    state = opt.init(params)
    ref_params = _flat(params.clone())
    ref = ReferenceKoalaPP(list(ref_params), lr=0.3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        grads = {}
        if step >= 2:
            grads["a"] = torch.randn(5, generator=g, dtype=F64)
        if step % 3 != 0:
            grads["b.c"] = torch.randn(2, 3, generator=g, dtype=F64)
        if step == 7:
            grads["a"] = torch.zeros(5, dtype=F64)  # below eps: skipped
        loss = torch.rand((), generator=g, dtype=F64) + 0.5
        params, state = opt.step(params, TensorDict(grads).unflatten_keys("."), loss, state)
        ref.update(ref_params, grads, loss)
    ours = _flat(params)
    for k in ours:
        torch.testing.assert_close(ours[k], ref_params[k], rtol=0, atol=1e-12)
    # a: steps 2..11 except step 7 -> 9 updates; b.c: steps with step % 3 != 0 -> 8 updates
    assert state.count.tolist() == [9, 8]


# ---------------------------------------------------------------------------------------------
# Identities of algorithm.md
# ---------------------------------------------------------------------------------------------


def _random_run(n=6, steps=5, seed=0, wd=0.0, symmetric=True, r=None, collinear=False, impl="auto"):
    """Steps of one tensor with random gradients; yields (before, grads, loss, after)."""
    g = torch.Generator().manual_seed(seed)
    opt = kf.koala_pp(
        lr=0.7, sigma=0.2, q=0.05, r=r, weight_decay=wd, symmetric=symmetric, impl=impl
    )
    params = TensorDict(w=torch.randn(n, generator=g, dtype=F64))
    state = opt.init(params)
    u = torch.randn(n, generator=g, dtype=F64)
    for _ in range(steps):
        if collinear:
            grad = (torch.rand((), generator=g, dtype=F64) + 0.5) * u
        else:
            grad = torch.randn(n, generator=g, dtype=F64)
        loss = torch.rand(8, generator=g, dtype=F64) + 0.1
        new_params, new_state = opt.step(params, TensorDict(w=grad), loss, state)
        yield opt, (params, state), grad, loss, (new_params, new_state)
        params, state = new_params, new_state


@pytest.mark.parametrize("impl", ["reference", "engine"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_gain_identity(symmetric, wd, impl):
    """H.d = -lr * L_blk * s / (s + R) with s = H.v + Q|H|^2 (the new v)."""
    run = _random_run(wd=wd, symmetric=symmetric, impl=impl)
    for opt, (p0, _st0), grad, loss, (p1, st1) in run:
        theta = p0["w"]
        H = grad + wd * theta
        d = p1["w"] - theta
        s = H @ st1.v["w"] + opt.q * (H @ H)
        L_blk = loss.mean() + 0.5 * wd * (theta @ theta)
        expected = -opt.lr * L_blk * s / (s + st1.r_est)
        torch.testing.assert_close(H @ d, expected, rtol=1e-12, atol=0)


def test_collinear_gradients_follow_scalar_koala():
    """If every H is a multiple of one vector, w = 0 and v_k = p_k H_k, where p_k follows the
    scalar KOALA recursion p_k = (p_{k-1} + Q) R / ((p_{k-1} + Q) |H_{k-1}|^2 + R),
    with p_0 = sigma and H_0 = H_1 (the first-update initialisation)."""
    R = 0.3
    runs = list(_random_run(collinear=True, steps=8, r=R))
    Q, p = runs[0][0].q, runs[0][0].sigma
    for k, (_, _, grad, _, (_, st1)) in enumerate(runs):
        H_prev = runs[k - 1][2] if k > 0 else grad
        p = (p + Q) * R / ((p + Q) * (H_prev @ H_prev) + R)
        torch.testing.assert_close(st1.v["w"], p * grad, rtol=1e-10, atol=0)


def test_symmetric_least_squares_estimate():
    """v_k = H_k P_post where P is the minimum-norm symmetric solution of H_{k-1} P = v_{k-1}."""
    runs = list(_random_run(steps=4, r=0.4))
    Q = runs[0][0].q
    for _, (_, st0), grad, _, (_, st1) in runs[1:]:
        h, v = st0.h_prev["w"], st0.v["w"]
        x = h @ h
        P = (torch.outer(v, h) + torch.outer(h, v)) / x - (h @ v) * torch.outer(h, h) / x**2
        torch.testing.assert_close(P, P.T, rtol=0, atol=0)
        torch.testing.assert_close(h @ P, v, rtol=1e-10, atol=1e-12)
        H = grad
        alpha = (H @ h) / x
        w = (H @ v) / x - (H @ h) * (h @ v) / x**2
        torch.testing.assert_close(H @ P, alpha * v + w * h, rtol=1e-10, atol=1e-12)
        # the Kalman update of P + Q I with the previous innovation variance gives v_k
        P_minus = P + Q * torch.eye(len(h), dtype=F64)
        S_prev = st0.s[0]
        P_post = P_minus - torch.outer(P_minus @ h, h @ P_minus) / S_prev
        torch.testing.assert_close(st1.v["w"], H @ P_post, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(S_prev, h @ v + Q * x + st0.r_est, rtol=1e-12, atol=0)


def test_first_step_matches_released_initialisation():
    params = TensorDict(w=torch.tensor([1.0, -2.0, 0.5], dtype=F64))
    grad = torch.tensor([0.3, 0.1, -0.2], dtype=F64)
    opt = kf.koala_pp(lr=1.0, sigma=0.1, q=0.1, r=0.5)
    p1, st1 = opt.step(params, TensorDict(w=grad), torch.tensor(2.0, dtype=F64), opt.init(params))
    hh = grad @ grad
    # v_prev = sigma H, H_prev = H: alpha = 1, w = 0, lam = (sigma + q) hh / S_prev
    S_prev = (0.1 + 0.1) * hh + 0.5
    lam = (0.1 + 0.1) * hh / S_prev
    v = (1 - lam) * 0.1 * grad + 0.1 * (grad - lam * grad)
    S = (v + 0.1 * grad) @ grad + 0.5
    torch.testing.assert_close(st1.v["w"], v)
    torch.testing.assert_close(st1.s[0], S)
    torch.testing.assert_close(p1["w"], params["w"] - 2.0 * (v + 0.1 * grad) / S)
    assert st1.step.item() == 1


# ---------------------------------------------------------------------------------------------
# Skip rule, missing grads, pass-through leaves, hyperparameters in the state
# ---------------------------------------------------------------------------------------------


def test_skip_rule_leaves_block_and_state_unchanged():
    params = TensorDict(a=torch.randn(4, dtype=F64), b=torch.randn(3, dtype=F64))
    opt = kf.koala_pp(weight_decay=0.1)
    state = opt.init(params)
    grads = TensorDict(a=torch.randn(4, dtype=F64), b=torch.randn(3, dtype=F64))
    params, state = opt.step(params, grads, torch.tensor(1.0, dtype=F64), state)
    # b: gradient below eps (weight decay alone does not count: the raw gradient is tested)
    tiny = TensorDict(a=torch.randn(4, dtype=F64), b=torch.full((3,), 1e-11, dtype=F64))
    p2, s2 = opt.step(params, tiny, torch.tensor(1.0, dtype=F64), state)
    assert torch.equal(p2["b"], params["b"])
    assert torch.equal(s2.v["b"], state.v["b"]) and torch.equal(s2.h_prev["b"], state.h_prev["b"])
    assert s2.s[1] == state.s[1] and s2.count.tolist() == [2, 1]
    assert not torch.equal(p2["a"], params["a"])
    # missing gradient: same
    p3, s3 = opt.step(params, TensorDict(a=tiny["a"]), torch.tensor(1.0, dtype=F64), state)
    assert torch.equal(p3["b"], params["b"]) and s3.count.tolist() == [2, 1]
    torch.testing.assert_close(p3["a"], p2["a"], rtol=0, atol=0)
    assert s3.skipped.tolist() == [0, 0]  # ordinary skips are not counted as refusals


def test_skipped_first_step_keeps_zero_state():
    params = TensorDict(a=torch.randn(4, dtype=F64))
    opt = kf.koala_pp()
    state = opt.init(params)
    p1, s1 = opt.step(params, TensorDict(a=torch.zeros(4, dtype=F64)), torch.tensor(1.0), state)
    assert torch.equal(p1["a"], params["a"])
    assert torch.equal(s1.v["a"], torch.zeros(4, dtype=F64)) and s1.count.item() == 0
    assert s1.step.item() == 1


def test_global_granularity_treats_missing_gradient_as_zero():
    params = TensorDict(a=torch.randn(4, dtype=F64), b=torch.randn(3, dtype=F64))
    opt = kf.koala_pp(granularity="global", lr=0.5)
    grads = TensorDict(a=torch.randn(4, dtype=F64))
    full = TensorDict(a=grads["a"], b=torch.zeros(3, dtype=F64))
    loss = torch.tensor(0.8, dtype=F64)
    p1, s1 = opt.step(params, grads, loss, opt.init(params))
    p2, _s2 = opt.step(params, full, loss, opt.init(params))
    for k in ("a", "b"):
        torch.testing.assert_close(p1[k], p2[k], rtol=0, atol=0)
    assert s1.s.shape == (1,) and s1.count.item() == 1


def test_non_float_leaves_pass_through():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = TensorDict.from_module(model).detach()
    opt = kf.koala_pp()
    state = opt.init(params)
    assert ("1", "num_batches_tracked") not in state.v.keys(True, True)
    grads = params.select(("0", "weight"), ("0", "bias")).apply(torch.ones_like)
    new, state = opt.step(params, grads, torch.tensor(1.0), state)
    assert new["1", "num_batches_tracked"] is params["1", "num_batches_tracked"]
    assert not torch.equal(new["0", "weight"], params["0", "weight"])
    # float buffers without gradients are skipped blocks
    assert torch.equal(new["1", "running_mean"], params["1", "running_mean"])


def test_inputs_are_not_modified():
    params = TensorDict(a=torch.randn(4, dtype=F64))
    before = params.clone()
    opt = kf.koala_pp()
    state = opt.init(params)
    state_before = state.clone()
    opt.step(params, TensorDict(a=torch.randn(4, dtype=F64)), torch.tensor(1.0), state)
    assert torch.equal(params["a"], before["a"])
    assert (state == state_before).all()


@pytest.mark.parametrize("impl", ["reference", "engine"])
def test_old_results_are_freed_without_the_garbage_collector(impl):
    """A step builds no reference cycle: once the caller drops a step's results, their
    tensors are freed at once, not at the next collection (a cycle through a nested helper
    kept every step's parameters and state alive until gc ran)."""
    import gc
    import weakref

    params = TensorDict({"block": {"w": torch.randn(3, 2, dtype=F64)}, "b": torch.zeros(2)})
    grads = params.apply(torch.ones_like)
    opt = kf.koala_pp(impl=impl)
    state = opt.init(params)
    params, state = opt.step(params, grads, torch.tensor(1.0), state)
    gc.disable()
    try:
        refs = [weakref.ref(params), weakref.ref(state), weakref.ref(state.v)]
        params, state = opt.step(params, grads, torch.tensor(1.0), state)
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_hyperparameters_change_between_steps():
    params = TensorDict(a=torch.randn(4, dtype=F64))
    opt = kf.koala_pp(lr=1.0)
    state = opt.init(params).with_hyperparams(lr=0.0)
    assert state.hyper.lr.dtype == F64 and state.hyper.lr.dim() == 0
    grads = TensorDict(a=torch.randn(4, dtype=F64))
    p1, s1 = opt.step(params, grads, torch.tensor(1.0), state)
    assert torch.equal(p1["a"], params["a"]) and s1.count.item() == 1  # filter ran, lr = 0
    p2, _ = opt.step(p1, grads, torch.tensor(1.0), s1.with_hyperparams(lr=torch.tensor(0.5)))
    assert not torch.equal(p2["a"], p1["a"])


def test_fixed_r_is_used_and_online_r_updates_before_use():
    params = TensorDict(a=torch.randn(4, dtype=F64))
    grads = TensorDict(a=torch.randn(4, dtype=F64))
    losses = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    _, s = kf.koala_pp(r=0.25).step(params, grads, losses, kf.koala_pp(r=0.25).init(params))
    assert s.r_est.item() == 0.25
    opt = kf.koala_pp(alpha_r=0.8)
    _, s = opt.step(params, grads, losses, opt.init(params))
    torch.testing.assert_close(s.r_est, torch.tensor(0.8 * 1.0 + 0.2 * (14 / 3), dtype=F64))
    _, s = opt.step(params, grads, losses.mean(), opt.init(params))
    torch.testing.assert_close(s.r_est, torch.tensor(0.8 + 0.2 * 4.0, dtype=F64))


def test_nan_loss_skips_and_counts():
    params = TensorDict(a=torch.randn(4, dtype=F64), b=torch.randn(2, dtype=F64))
    opt = kf.koala_pp()
    state = opt.init(params)
    grads = params.apply(torch.ones_like)
    new, s1 = opt.step(params, grads, torch.tensor(float("nan"), dtype=F64), state)
    assert (new == params).all()
    assert s1.skipped.tolist() == [1, 1] and s1.count.tolist() == [0, 0]
    bad = grads.clone()
    bad["b"][0] = float("inf")
    new, s2 = opt.step(params, bad, torch.tensor(1.0, dtype=F64), opt.init(params))
    assert torch.equal(new["b"], params["b"]) and not torch.equal(new["a"], params["a"])
    assert s2.skipped.tolist() == [0, 1]
    with pytest.raises(FloatingPointError):
        kf.koala_pp(nonfinite="raise").step(params, bad, torch.tensor(1.0), state)


# ---------------------------------------------------------------------------------------------
# Validation and bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
        (dict(sigma=0.0), "Invalid sigma value: 0.0"),
        (dict(sigma=-0.1), "Invalid sigma value: -0.1"),
        (dict(q=-0.1), "Invalid q value: -0.1"),
        (dict(r=0.0), "Invalid r value: 0.0"),
        (dict(alpha_r=1.0), "Invalid alpha_r value: 1.0"),
        (dict(alpha_r=-0.5), "Invalid alpha_r value: -0.5"),
        (dict(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
        (dict(granularity="layer"), "Invalid granularity: 'layer'"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(lr=float("nan")), "Invalid learning rate: nan"),
        (dict(lr=torch.tensor([0.1, -0.1])), "Invalid learning rate"),
    ],
)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        kf.koala_pp(**kwargs)


def test_bad_step_inputs():
    params = TensorDict(a=torch.randn(4), b={"c": torch.randn(2)})
    opt = kf.koala_pp()
    state = opt.init(params)
    loss = torch.tensor(1.0)
    with pytest.raises(KeyError, match="grads hold keys that params lack"):
        opt.step(params, TensorDict(a=torch.ones(4), z=torch.ones(1)), loss, state)
    with pytest.raises(ValueError, match=r"gradient shape \(5,\) does not match"):
        opt.step(params, TensorDict(a=torch.ones(5)), loss, state)
    with pytest.raises(TypeError, match=r"gradient dtype torch\.float64 does not match"):
        opt.step(params, TensorDict(a=torch.ones(4, dtype=F64)), loss, state)
    with pytest.raises(ValueError, match=r"loss must be .* got \(2, 3\)"):
        opt.step(params, TensorDict(a=torch.ones(4)), torch.ones(2, 3), state)
    with pytest.raises(ValueError, match="loss must be"):
        opt.step(params, TensorDict(a=torch.ones(4)), 1.0, state)
    with pytest.raises(TypeError, match="complex"):
        opt.init(TensorDict(z=torch.ones(2, dtype=torch.complex64)))


# ---------------------------------------------------------------------------------------------
# Training on a real task; float32 close to float64
# ---------------------------------------------------------------------------------------------


def _train_digits(digits, dtype, epochs=3, steps_per_epoch=22):
    (xtr, ytr), (xte, yte) = digits
    xtr, xte = xtr.to(dtype), xte.to(dtype)
    model = make_mlp(seed=0, dtype=dtype, sizes=(64, 32, 10))
    vg = kf.value_and_grad(model, ce_per_sample)
    opt = kf.koala_pp(lr=1.0, weight_decay=5e-4)
    params = kf.params_of(model)
    state = opt.init(params)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * 64 : (i + 1) * 64]
            grads, loss = vg(params, xtr[idx], ytr[idx])
            params, state = opt.step(params, grads, loss, state)
            losses.append(loss.mean().item())
    out = torch.func.functional_call(model, params.flatten_keys(".").to_dict(), (xte,))
    acc = (out.argmax(-1) == yte).double().mean().item()
    return params, losses, acc


def test_loss_falls_on_digits_and_float32_tracks_float64(digits):
    p64, losses, acc = _train_digits(digits, F64)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.35 * first, (first, last)
    assert acc > 0.85, acc
    p32, _, acc32 = _train_digits(digits, torch.float32)
    for k, v in _flat(p64).items():
        torch.testing.assert_close(_flat(p32)[k].double(), v, rtol=1e-3, atol=2e-4)
    assert abs(acc32 - acc) < 0.02
