"""The packed fast path (koala_func.packed): parity with the reference step, compile behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from koala_func import koala_pp
from koala_func.fused import fused_step, fused_step_
from koala_func.packed import PackedLayout, choose_chunk_size, packed

# Every distinct (optimizer, layout) compiled here is one more cache entry on the code objects
# of PackedKoalaPP.step / step_; keep them well under Dynamo's recompile_limit.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)

STEPS = 200


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a loaded machine two OpenMP
    # threads made these steps ~18x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- a tiny task with hand-written forward, so gradients are cheap -----------------------------


def make_params(dtype: torch.dtype, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).contiguous()

    return TensorDict(
        {
            "l1": {"weight": rnd(16, 8, scale=0.35), "bias": rnd(16, scale=0.1)},
            "l2": {"weight": rnd(3, 16, scale=0.25), "bias": rnd(3, scale=0.1)},
        },
        batch_size=[],
    )


def make_data(dtype: torch.dtype, n: int = 128):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()).clamp_max(2)
    return x, y


def losses_of(p, x, y) -> torch.Tensor:
    h = torch.tanh(F.linear(x, p.get(("l1", "weight")), p.get(("l1", "bias"))))
    out = F.linear(h, p.get(("l2", "weight")), p.get(("l2", "bias")))
    return F.cross_entropy(out, y, reduction="none")


def grads_td(params: TensorDict, x, y):
    leaves = params.apply(lambda t: t.detach().requires_grad_())
    losses = losses_of(leaves, x, y)
    keys = list(leaves.keys(include_nested=True, leaves_only=True))
    gs = torch.autograd.grad(losses.mean(), [leaves.get(k) for k in keys])
    return TensorDict(dict(zip(keys, gs, strict=True)), batch_size=[]), losses.detach()


def grads_flat(popt, flat: torch.Tensor, x, y):
    """Gradients taken with respect to views of the packed buffer: already packed."""
    leaf = flat.detach().requires_grad_()
    losses = losses_of(popt.unpack(leaf), x, y)
    (g,) = torch.autograd.grad(losses.mean(), leaf)
    return g, losses.detach()


def lr_at(k: int, base: float) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * k / STEPS)) + 0.01


def run_parity(opt, dtype, step_fn, popt, inplace: bool | str):
    """Train the reference and the packed step side by side; worst relative deviation."""
    x, y = make_data(dtype)
    params = make_params(dtype)
    state = opt.init(params)
    flat = popt.pack(params)
    pstate = popt.init(flat)
    worst = 0.0
    for k in range(STEPS):
        lr = lr_at(k, float(opt.lr))
        idx = torch.arange(k * 24, k * 24 + 32) % x.shape[0]
        state = state.with_hyperparams(lr=lr, q=0.1 + 1e-4 * k)
        pstate = pstate.with_hyperparams(lr=lr, q=0.1 + 1e-4 * k)
        g, loss = grads_td(params, x[idx], y[idx])
        params, state = opt.step(params, g, loss, state)
        fg, floss = grads_flat(popt, flat, x[idx], y[idx])
        if inplace == "adopt":  # the fresh gradient becomes h_prev, the rest is in place
            v = pstate.v
            pstate = step_fn(flat, fg, floss, pstate)
            assert pstate.h_prev is fg and pstate.v is v
        elif inplace:
            out = step_fn(flat, fg, floss, pstate)
            assert out is pstate
        else:
            flat, pstate = step_fn(flat, fg, floss, pstate)
        got = popt.unpack(flat)
        for key in popt.layout.keys:
            ref = params.get(key)
            err = ((got.get(key) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
            worst = max(worst, err)
    assert torch.equal(pstate.count, state.count)
    assert torch.equal(pstate.step, state.step)
    back = popt.to_reference_state(pstate)
    for name in ("v", "h_prev"):
        for key in popt.layout.keys:
            ref = getattr(state, name).get(key)
            err = (getattr(back, name).get(key) - ref).abs().max() / ref.abs().max()
            worst = max(worst, err.item())
    torch.testing.assert_close(pstate.s, state.s, rtol=1e-5, atol=0)
    torch.testing.assert_close(pstate.r_est, state.r_est, rtol=1e-5, atol=0)
    # the task is learned, so the comparison is not between two frozen trajectories
    assert losses_of(params, x, y).mean() < 0.8
    return worst


CASES = {
    # name: (dtype, granularity, symmetric, weight_decay, inplace: False, True or "adopt")
    "f64-tensor-sym-wd-functional": (torch.float64, "tensor", True, 5e-4, False),
    "f64-tensor-sym-wd-inplace": (torch.float64, "tensor", True, 5e-4, True),
    "f64-global-asym-wd-functional": (torch.float64, "global", False, 5e-4, False),
    "f64-global-asym-wd-inplace": (torch.float64, "global", False, 5e-4, True),
    "f64-tensor-asym-nodecay-inplace": (torch.float64, "tensor", False, 0.0, True),
    "f64-global-sym-nodecay-functional": (torch.float64, "global", True, 0.0, False),
    "f32-tensor-sym-wd-inplace": (torch.float32, "tensor", True, 5e-4, True),
    "f32-global-sym-nodecay-functional": (torch.float32, "global", True, 0.0, False),
    "f64-tensor-sym-nodecay-adopt": (torch.float64, "tensor", True, 0.0, "adopt"),
    "f32-global-asym-nodecay-adopt": (torch.float32, "global", False, 0.0, "adopt"),
}


@pytest.fixture(scope="module")
def compiled():
    """One compiled step per case, shared by every test of this module."""
    out = {}
    for name, (dtype, gran, sym, wd, inplace) in CASES.items():
        opt = koala_pp(lr=0.5, weight_decay=wd, granularity=gran, symmetric=sym)
        popt = packed(opt, make_params(dtype), adopt_grads=inplace == "adopt")
        fn = torch.compile(popt.step_ if inplace else popt.step, fullgraph=True)
        out[name] = (opt, popt, fn)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_reference(compiled, name):
    dtype, _, _, _, inplace = CASES[name]
    opt, popt, fn = compiled[name]
    worst = run_parity(opt, dtype, fn, popt, inplace)
    print(f"{name}: worst relative deviation over {STEPS} steps {worst:.1e}")  # pytest -s
    assert worst < (1e-10 if dtype == torch.float64 else 1e-5), worst


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_eager_matches_reference(granularity, inplace):
    opt = koala_pp(lr=0.5, weight_decay=5e-4, granularity=granularity)
    popt = packed(opt, make_params(torch.float64))
    fn = popt.step_ if inplace else popt.step
    assert run_parity(opt, torch.float64, fn, popt, inplace) < 1e-10


def _warm_start(popt, fn):
    """Data, packed parameters and the state after one (warm-up) step of ``fn``."""
    x, y = make_data(torch.float64)
    flat = popt.pack(make_params(torch.float64))
    g, loss = grads_flat(popt, flat, x[:32], y[:32])
    state = fn(flat, g, loss, popt.init(flat))  # may be a cache hit from the parity test
    return x, y, flat, state


def test_no_recompiles_over_1000_steps(compiled):
    _, popt, fn = compiled["f64-tensor-sym-wd-inplace"]
    x, y, flat, state = _warm_start(popt, fn)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(1000):
            state = state.with_hyperparams(lr=0.5 / (1 + 0.01 * k))
            if k % 100 == 50:  # hyperparameters edited between steps
                state = state.with_hyperparams(q=0.05, sigma=0.2, weight_decay=1e-3, alpha_r=0.8)
            idx = torch.arange(k * 16, k * 16 + 32) % x.shape[0]
            g, loss = grads_flat(popt, flat, x[idx], y[idx])
            assert fn(flat, g, loss, state) is state
    assert int(state.step) == 1001
    assert torch.isfinite(flat).all()


def test_adopt_grads_no_recompiles(compiled):
    _, popt, fn = compiled["f64-tensor-sym-nodecay-adopt"]
    x, y, flat, state = _warm_start(popt, fn)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(300):
            state = state.with_hyperparams(lr=0.5 / (1 + 0.01 * k))
            idx = torch.arange(k * 16, k * 16 + 32) % x.shape[0]
            g, loss = grads_flat(popt, flat, x[idx], y[idx])
            if k == 100:  # a skipped block goes through the opaque fix-up op
                popt.unpack(g).get(("l1", "bias")).zero_()
            state = fn(flat, g, loss, state)
            assert state.h_prev is g
    assert int(state.step) == 301 and state.count.tolist() == [301, 300, 301, 301]


def test_adopt_grads_skipped_block_keeps_h_prev_and_errors():
    """A skipped block's h_prev survives adoption (written into the gradient tensor)."""
    params = make_params(torch.float64)
    opt = koala_pp(lr=0.5)
    plain, adopt = packed(opt, params), packed(opt, params, adopt_grads=True)
    assert not plain.adopt_grads and adopt.adopt_grads
    f1, f2 = plain.pack(params), adopt.pack(params)
    s1, s2 = plain.init(f1), adopt.init(f2)
    x, y = make_data(torch.float64)
    for k in range(6):
        g, loss = grads_flat(plain, f1, x[k * 16 : k * 16 + 32], y[k * 16 : k * 16 + 32])
        bias = plain.unpack(g).get(("l2", "bias"))
        if k == 2:  # l2.bias: a zero gradient, then a NaN (skipped both times)
            bias.zero_()
        elif k == 3:
            bias[0] = float("nan")
        g2 = g.clone()
        plain.step_(f1, g, loss, s1)
        s2 = adopt.step_(f2, g2, loss, s2)
        assert torch.equal(f1, f2) and torch.equal(s1.v, s2.v)
        assert torch.equal(s1.h_prev, s2.h_prev)
        assert s2.h_prev is g2
    # the zero gradient is below eps (not counted); the NaN is a skip
    assert s2.count.tolist() == [6, 6, 6, 4] and s2.skipped.tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="fresh gradient tensor"):
        adopt.step_(f2, s2.h_prev, loss, s2)
    with pytest.raises(ValueError, match="cannot become the state's h_prev"):
        adopt.step_(f2, s2.h_prev.float(), loss, s2)
    with pytest.raises(ValueError, match="without weight decay"):
        packed(koala_pp(weight_decay=1e-3), params, adopt_grads=True)
    with pytest.raises(ValueError, match="state in the parameters' dtype"):
        packed(koala_pp(state_dtype=torch.float32), params, adopt_grads=True)


def _param_set(n_tensors: int, seed: int = 0) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    shapes = [(int(a), int(b)) for a, b in torch.randint(1, 40, (n_tensors, 2), generator=g)]
    return TensorDict({f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}, [])


def test_kernel_count_does_not_grow_with_tensors():
    from torch._inductor import metrics

    counts = {}
    for n in (5, 60):
        params = _param_set(n)
        popt = packed(koala_pp(weight_decay=1e-4), params)
        flat = popt.pack(params)
        state = popt.init(flat)
        grads = popt.pack(params.apply(lambda t: torch.randn_like(t) * 0.1))
        fn = torch.compile(popt.step_, fullgraph=True)
        metrics.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            fn(flat, grads, torch.tensor(0.5), state)
        counts[n] = metrics.generated_kernel_count
    assert counts[5] > 0
    print("generated kernels", counts)
    assert counts[60] == counts[5], counts


# -- behaviour --------------------------------------------------------------------------------


def test_first_step_and_zero_grad_block_skipped():
    params = make_params(torch.float64)
    opt = koala_pp(lr=0.5, sigma=0.3, weight_decay=1e-3)
    popt = packed(opt, params)
    flat = popt.pack(params)
    state = popt.init(flat)
    x, y = make_data(torch.float64)
    g, loss = grads_td(params, x[:32], y[:32])
    missing = g.exclude(("l2", "bias"))
    ref_params, ref_state = opt.step(params, missing, loss, opt.init(params))
    new_flat, new_state = popt.step(flat, popt.pack(missing), loss, state)
    got = popt.unpack(new_flat)
    skipped = popt.layout.keys.index(("l2", "bias"))
    assert new_state.count.tolist() == [0 if i == skipped else 1 for i in range(4)]
    assert torch.equal(new_state.count, ref_state.count)
    assert torch.equal(got.get(("l2", "bias")), params.get(("l2", "bias")))
    for key in popt.layout.keys:
        torch.testing.assert_close(got.get(key), ref_params.get(key), rtol=1e-12, atol=1e-15)
    back = popt.to_reference_state(new_state)
    # first step: v = (alpha - lambda) * sigma * H + Q * (H - lambda * H) + w * H, H_prev = H
    for key in popt.layout.keys:
        torch.testing.assert_close(back.v.get(key), ref_state.v.get(key), rtol=1e-12, atol=0)
        torch.testing.assert_close(
            back.h_prev.get(key), ref_state.h_prev.get(key), rtol=1e-12, atol=0
        )
    assert torch.count_nonzero(back.v.get(("l2", "bias"))) == 0
    # inputs untouched by the functional step; padding stays zero
    assert torch.equal(popt.unpack(flat).get(("l1", "weight")), params.get(("l1", "weight")))
    pad = torch.ones_like(new_flat, dtype=torch.bool)
    for view in popt.layout.views(pad):
        view.fill_(False)
    assert torch.count_nonzero(new_flat[pad]) == 0
    assert torch.count_nonzero(new_state.v[pad]) == 0


def test_nonfinite_gradient_skips_block():
    params = make_params(torch.float64)
    popt = packed(koala_pp(), params)
    flat = popt.pack(params)
    state = popt.init(flat)
    grads = popt.pack(params.apply(torch.ones_like))
    popt.unpack(grads).get(("l1", "bias"))[3] = float("nan")
    state = popt.step_(flat, grads, torch.tensor(0.5, dtype=torch.float64), state)
    assert state.count.tolist() == [1, 0, 1, 1]  # l1.bias is block 1
    assert int(state.skipped.sum()) == 1
    assert torch.isfinite(flat).all() and torch.isfinite(state.v).all()


def test_reference_state_round_trip():
    params = make_params(torch.float64)
    opt = koala_pp(granularity="global")
    popt = packed(opt, params)
    state = opt.init(params)
    x, y = make_data(torch.float64)
    for k in range(3):
        g, loss = grads_td(params, x[k * 32 : k * 32 + 32], y[k * 32 : k * 32 + 32])
        params, state = opt.step(params, g, loss, state)
    pstate = popt.from_reference_state(state)
    back = popt.to_reference_state(pstate)
    assert (back.v == state.v).all() and (back.h_prev == state.h_prev).all()
    assert torch.equal(back.s, state.s) and torch.equal(back.count, state.count)
    # and stepping from the converted state agrees with the reference
    g, loss = grads_td(params, x[96:], y[96:])
    p_ref, _ = opt.step(params, g, loss, state)
    flat, _ = popt.step(popt.pack(params), popt.pack(g), loss, pstate)
    for key in popt.layout.keys:
        torch.testing.assert_close(popt.unpack(flat).get(key), p_ref.get(key), rtol=1e-12, atol=0)


def test_differentiable_functional_step_gives_hypergradient():
    params = make_params(torch.float64)
    opt = koala_pp(lr=0.5, differentiable=True)
    popt = packed(opt, params)
    x, y = make_data(torch.float64)
    g, loss = grads_td(params, x[:32], y[:32])
    state = opt.init(params).with_hyperparams(lr=torch.tensor(0.5, dtype=torch.float64))
    lr_ref = state.hyper.lr.clone().requires_grad_()
    new, _ = opt.step(params, g, loss, state.with_hyperparams(lr=lr_ref))
    (g_ref,) = torch.autograd.grad(losses_of(new, x, y).mean(), lr_ref)
    pstate = popt.init(popt.pack(params))
    lr_p = pstate.hyper.lr.clone().requires_grad_()
    flat, _ = popt.step(
        popt.pack(params), popt.pack(g), loss, pstate.replace(hyper=pstate.hyper.replace(lr=lr_p))
    )
    (g_p,) = torch.autograd.grad(losses_of(popt.unpack(flat), x, y).mean(), lr_p)
    torch.testing.assert_close(g_p, g_ref, rtol=1e-10, atol=0)
    with pytest.raises(RuntimeError, match="differentiated"):
        popt.step_(popt.pack(params), popt.pack(g), loss, pstate)


def test_layout_pack_unpack_and_errors():
    params = make_params(torch.float32)
    params.set("steps", torch.tensor(3))  # non-float leaves are not packed
    layout = PackedLayout(params, chunk_size=8)
    assert layout.keys == [("l1", "weight"), ("l1", "bias"), ("l2", "weight"), ("l2", "bias")]
    assert layout.owner.tolist() == [0] * 16 + [1] * 2 + [2] * 6 + [3]
    flat = layout.pack(params)
    assert flat.shape == (25, 8)
    views = layout.unpack(flat)
    assert (views == params.exclude("steps")).all()
    views.get(("l2", "bias")).fill_(7.0)  # views write through
    assert flat[24, :3].tolist() == [7.0] * 3 and flat[24, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="packed buffer of shape"):
        layout.views(torch.zeros(3, 8))
    mixed = TensorDict(a=torch.zeros(3), b=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="one dtype and device"):
        PackedLayout(mixed)
    assert choose_chunk_size([11_000_000, 512 * 512]) == 2048
    assert choose_chunk_size([300] * 500) <= 64


# -- the eager fallback (koala_func.fused) ----------------------------------------------------


@pytest.mark.parametrize(
    "granularity,symmetric,inplace",
    [("tensor", True, False), ("tensor", False, True), ("global", True, True)],
)
def test_fused_eager_matches_reference(granularity, symmetric, inplace):
    opt = koala_pp(lr=0.5, weight_decay=5e-4, granularity=granularity, symmetric=symmetric)
    x, y = make_data(torch.float64)
    params = make_params(torch.float64)
    mine = params.clone()
    state, my_state = opt.init(params), opt.init(params)
    for k in range(STEPS):
        idx = torch.arange(k * 24, k * 24 + 32) % x.shape[0]
        state = state.with_hyperparams(lr=lr_at(k, 0.5))
        my_state = my_state.with_hyperparams(lr=lr_at(k, 0.5))
        g, loss = grads_td(params, x[idx], y[idx])
        if k == 5:  # a missing gradient: that block is skipped
            g = g.exclude(("l1", "bias"))
        params, state = opt.step(params, g, loss, state)
        g, loss = grads_td(mine, x[idx], y[idx])
        if k == 5:
            g = g.exclude(("l1", "bias"))
        if inplace:
            assert fused_step_(opt, mine, g, loss, my_state) is my_state
        else:
            mine, my_state = fused_step(opt, mine, g, loss, my_state)
    for key in params.keys(include_nested=True, leaves_only=True):
        torch.testing.assert_close(mine.get(key), params.get(key), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(my_state.v.get(key), state.v.get(key), rtol=1e-9, atol=1e-13)
    assert torch.equal(my_state.count, state.count)
    torch.testing.assert_close(my_state.r_est, state.r_est, rtol=1e-12, atol=0)
    if granularity == "tensor":
        assert my_state.count[1] == STEPS - 1


def test_fused_inplace_refuses_differentiable():
    params = make_params(torch.float64)
    opt = koala_pp(differentiable=True)
    g = params.apply(torch.ones_like)
    with pytest.raises(RuntimeError, match="differentiated"):
        fused_step_(opt, params, g, torch.tensor(1.0, dtype=torch.float64), opt.init(params))


def test_module_trains_on_views_of_the_packed_buffer():
    """The recommended setup: the module computes with views, gradients land packed."""
    from koala_func import params_of

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    params = params_of(model)
    opt = koala_pp(lr=0.1)
    popt = packed(opt, params)
    flat = popt.pack(params).requires_grad_()
    popt.unpack(flat).to_module(model)
    assert model[0].weight.data_ptr() == flat.data_ptr()
    state = popt.init(flat)
    ref_params, ref_state = params.clone(), opt.init(params)
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    for _ in range(5):
        flat.grad = None
        losses = ((model(x) - y) ** 2).mean(1)
        losses.mean().backward()
        grads = popt.unpack(flat.grad).clone()
        ref_params, ref_state = opt.step(ref_params, grads, losses.detach(), ref_state)
        popt.step_(flat, flat.grad, losses.detach(), state)
    for key in popt.layout.keys:
        torch.testing.assert_close(popt.unpack(flat.detach()).get(key), ref_params.get(key))
    assert torch.equal(state.count, ref_state.count)
