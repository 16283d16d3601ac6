"""Mixed precision: float16/bfloat16 parameters with float32 scalars, the state_dtype choice,
tolerances against a float64 run, torch.autocast, and complex parameters."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from koala_func import KoalaPP, koala_pp

SHAPES = {"w": (8, 16), "b": (16,)}
STEPS = 10


def problem():
    g = torch.Generator().manual_seed(0)
    theta0 = TensorDict(
        {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    )
    target = theta0.apply(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype))
    return theta0, target


def run(dtype, state_dtype):
    """A quadratic problem with gradients and losses formed in float64, then rounded to ``dtype``
    as a low-precision backward would deliver them."""
    theta0, target = problem()
    opt = koala_pp(lr=0.5, weight_decay=1e-3, state_dtype=state_dtype)
    params = theta0.to(dtype)
    state = opt.init(params)
    for _ in range(STEPS):
        diff = params.to(torch.float64) - target
        loss = 0.5 * sum(d.square().sum() for d in diff.values()) / 100
        grads = diff.apply(lambda d: d / 100).to(dtype)
        losses = torch.stack([0.9 * loss, 1.1 * loss]).to(dtype)
        params, state = opt.step(params, grads, losses, state)
    return params, state


@pytest.fixture(scope="module")
def reference():
    return run(torch.float64, None)


def rel_err(a: TensorDict, b: TensorDict) -> float:
    return max(float((a[k].double() - b[k]).abs().max() / b[k].abs().max()) for k in SHAPES)


# Stated tolerances (max error relative to the largest entry, after 10 steps). Measured values
# on this problem: float32 2e-7; float16 6e-4 (params), 4e-4 (v, float32 state) and 9e-4
# (v, float16 state); bfloat16 1.1e-2 (params), 5.7e-3 (v, float32 state), 1.1e-2 (v, bfloat16
# state). About 2x margin, i.e. a few units in the last place of the parameter dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_low_precision_tracks_float64(reference, dtype, state_dtype):
    p64, s64 = reference
    params, state = run(dtype, state_dtype)
    # scalars (S, R, hyperparameters) are at least float32; v and h_prev follow state_dtype
    assert state.s.dtype == torch.float32 and state.r_est.dtype == torch.float32
    assert state.hyper.lr.dtype == torch.float32
    assert state.v["w"].dtype == (state_dtype or dtype)
    assert params["w"].dtype == dtype
    assert state.count.tolist() == [STEPS, STEPS] and state.skipped.tolist() == [0, 0]
    assert rel_err(params, p64) < TOL[dtype]
    assert rel_err(state.v, s64.v) < TOL[dtype]
    torch.testing.assert_close(state.r_est.double(), s64.r_est, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_state_is_closer_than_low_precision_state(reference, dtype):
    _, s64 = reference
    _, low = run(dtype, None)
    _, f32 = run(dtype, torch.float32)
    assert rel_err(f32.v, s64.v) < rel_err(low.v, s64.v)


def test_adapter_bfloat16_parameters_with_float32_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).to(torch.bfloat16)
    opt = KoalaPP(model.parameters(), lr=0.5, state_dtype=torch.float32, compile=False)
    x, y = torch.randn(32, 6, dtype=torch.bfloat16), torch.randn(32, 3, dtype=torch.bfloat16)
    first = None
    for _ in range(15):
        opt.zero_grad()
        losses = (model(x) - y).float().square().mean(1)
        losses.mean().backward()
        opt.step(loss=losses)
        first = float(losses.detach().mean()) if first is None else first
    st = opt.state[model.weight]
    assert st["v"].dtype == torch.float32 and st["s"].dtype == torch.float32
    assert model.weight.dtype == torch.bfloat16 and torch.isfinite(model.weight).all()
    assert float(losses.detach().mean()) < first


def test_step_inside_autocast_equals_step_outside():
    """A torch.autocast training loop: float32 parameters, bfloat16 forward, the step's own
    arithmetic (sums and elementwise ops) is not autocast and matches an eager step exactly."""
    torch.manual_seed(0)
    models = [
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    opts = [KoalaPP(m.parameters(), lr=0.5, compile=False) for m in models]
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    losses_seen = []
    for _ in range(8):
        for i, (m, o) in enumerate(zip(models, opts, strict=True)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x)
                assert out.dtype == torch.bfloat16
                losses = (out.float() - y).square().mean(1)
                losses.mean().backward()
                if i == 0:
                    o.step(loss=losses)
            if i == 1:
                o.step(loss=losses)
            if i == 0:
                losses_seen.append(float(losses.detach().mean()))
        for pa, pb in zip(*(m.parameters() for m in models), strict=True):
            assert torch.equal(pa, pb) and pa.dtype == torch.float32
    assert losses_seen[-1] < losses_seen[0]


def test_complex_parameters_are_rejected():
    params = TensorDict(w=torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        koala_pp().init(params)
    with pytest.raises(TypeError, match="complex"):
        KoalaPP([torch.zeros(2, dtype=torch.complex128, requires_grad=True)])


@pytest.mark.parametrize("impl", ["engine", "reference"])
def test_adapter_low_precision_loss_is_reduced_in_the_scalar_dtype(impl):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, generator=g).to(torch.bfloat16)
    grad = torch.randn(5, generator=g).to(torch.bfloat16)
    losses = (torch.rand(64, generator=g) + 0.5).to(torch.bfloat16)
    p = torch.nn.Parameter(w.clone())
    opt = KoalaPP([p], lr=0.5, state_dtype=torch.float32, impl=impl, compile=False)
    p.grad = grad.clone()
    opt.step(loss=losses)
    fn = koala_pp(lr=0.5, state_dtype=torch.float32)
    _, state = fn.step(TensorDict(w=w), TensorDict(w=grad), losses, fn.init(TensorDict(w=w)))
    torch.testing.assert_close(opt.state[p]["r_est"], state.r_est, rtol=1e-6, atol=0)
    torch.testing.assert_close(opt.state[p]["s"], state.s[0], rtol=1e-6, atol=0)
