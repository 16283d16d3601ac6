"""Non-finite safety (skip or raise) and awkward inputs, for the functional core and the adapter."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from koala_func import KoalaPP, koala_pp

NAN, INF = float("nan"), float("inf")


def setup(**opts):
    opt = koala_pp(lr=0.5, **opts)
    g = torch.Generator().manual_seed(0)
    params = TensorDict(w=torch.randn(4, 3, generator=g), b=torch.randn(3, generator=g))
    grads = params.apply(lambda t: torch.randn(t.shape, generator=g))
    state = opt.init(params)
    params, state = opt.step(params, grads, torch.tensor([0.6, 0.8]), state)  # past the first step
    return opt, params, grads, state


def assert_unchanged(new_p, p, new_s, s, keys=("w", "b")):
    for k in keys:
        assert torch.equal(new_p[k], p[k])
        assert torch.equal(new_s.v[k], s.v[k]) and torch.equal(new_s.h_prev[k], s.h_prev[k])


@pytest.mark.parametrize(
    "loss",
    [torch.tensor(NAN), torch.tensor(INF), torch.tensor([0.5, NAN]), torch.tensor([INF, 1.0])],
)
def test_nonfinite_loss_skips_every_block(loss):
    opt, params, grads, state = setup()
    new_p, new_s = opt.step(params, grads, loss, state)
    assert_unchanged(new_p, params, new_s, state)
    assert torch.equal(new_s.s, state.s) and torch.equal(new_s.count, state.count)
    assert new_s.skipped.tolist() == [1, 1]
    assert int(new_s.step) == int(state.step) + 1


def test_nonfinite_loss_does_not_poison_the_r_estimate():
    opt, params, grads, state = setup()
    _, bad = opt.step(params, grads, torch.tensor(NAN), state)
    assert torch.equal(bad.r_est, state.r_est)
    new_p, new_s = opt.step(params, grads, torch.tensor(0.7), bad)
    assert new_s.count.tolist() == [2, 2]
    assert not torch.equal(new_p["w"], params["w"])


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_nonfinite_gradient_skips_only_its_block(value):
    opt, params, grads, state = setup()
    grads = grads.clone()
    grads["w"][1, 2] = value
    new_p, new_s = opt.step(params, grads, torch.tensor(0.7), state)
    assert_unchanged(new_p, params, new_s, state, keys=("w",))
    assert not torch.equal(new_p["b"], params["b"])
    expected = [int(k == "w") for k in params.keys()]  # block order = key order
    assert new_s.skipped.tolist() == expected and sum(expected) == 1
    assert all(torch.isfinite(t).all() for t in new_p.values())


def test_global_block_skips_as_a_whole():
    opt, params, grads, state = setup(granularity="global")
    grads = grads.clone()
    grads["b"][0] = NAN
    new_p, new_s = opt.step(params, grads, torch.tensor(0.7), state)
    assert_unchanged(new_p, params, new_s, state)
    assert new_s.skipped.tolist() == [1]


def test_zero_and_overflowing_denominators_skip():
    # |H_prev|^2 = 0 at the first step: weight decay cancels the gradient exactly
    opt = koala_pp(lr=0.5, weight_decay=0.1)
    params = TensorDict(w=torch.randn(3))
    state = opt.init(params)
    new_p, new_s = opt.step(params, TensorDict(w=-0.1 * params["w"]), torch.tensor(1.0), state)
    assert torch.equal(new_p["w"], params["w"]) and new_s.skipped.tolist() == [1]
    assert new_s.count.tolist() == [0]

    # S = 0: with Q = 0 and R = 0 the first update gives v = 0 (the rank-one P0 = sigma I is
    # exactly explained by H), so S = (v + Q H).H + R = 0
    opt = koala_pp(lr=0.5, q=0.0, r=1.0)
    params = TensorDict(w=torch.randn(2))
    state = opt.init(params)  # R = 0 is refused by the builders: set it in the state
    state = state.replace(hyper=state.hyper.replace(r=torch.zeros_like(state.hyper.r)))
    new_p, new_s = opt.step(
        params, TensorDict(w=torch.tensor([1.0, 0.5])), torch.tensor(1.0), state
    )
    assert torch.equal(new_p["w"], params["w"]) and new_s.skipped.tolist() == [1]
    assert new_s.count.tolist() == [0] and torch.equal(new_s.s, state.s)

    # |H|^2 overflows float32
    opt, params, grads, state = setup()
    new_p, new_s = opt.step(params, grads.apply(lambda g: g * 1e30), torch.tensor(0.7), state)
    assert_unchanged(new_p, params, new_s, state)
    assert new_s.skipped.tolist() == [1, 1]


def test_raise_policy():
    opt, params, grads, state = setup(nonfinite="raise")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        opt.step(params, grads, torch.tensor(NAN), state)
    bad = grads.clone()
    bad["b"][0] = INF
    with pytest.raises(FloatingPointError):
        opt.step(params, bad, torch.tensor(0.7), state)
    opt.step(params, grads, torch.tensor(0.7), state)  # finite: no error


def test_adapter_never_writes_nonfinite_values():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = KoalaPP(model.parameters(), lr=0.5, compile=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    gen = torch.Generator().manual_seed(1)
    n_bad = 0
    for k in range(12):
        opt.zero_grad()
        losses = (model(x) - y).square().mean(1)
        losses.mean().backward()
        if k % 3 == 1:  # poison one gradient entry
            p = list(model.parameters())[int(torch.randint(4, (1,), generator=gen))]
            p.grad.view(-1)[0] = NAN if k % 2 else INF
            n_bad += 1
        opt.step(loss=losses)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    skipped = sum(int(opt.state[p]["skipped"]) for p in model.parameters())
    assert skipped == n_bad
    # a NaN loss: nothing moves, every block counts a skip
    before = [p.clone() for p in model.parameters()]
    opt.step(loss=torch.tensor(NAN))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sum(int(opt.state[p]["skipped"]) for p in model.parameters()) == n_bad + 4
    strict = KoalaPP(model.parameters(), nonfinite="raise", compile=False)
    with pytest.raises(FloatingPointError):
        strict.step(loss=torch.tensor(INF))


# ---------------------------------------------------------------- awkward inputs
def test_noncontiguous_and_channels_last_parameters():
    g = torch.Generator().manual_seed(0)
    base = {
        "t": torch.randn(5, 4, generator=g).t(),  # transposed view
        "c": torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last),
        "s": torch.randn(6, 4, generator=g)[::2],  # strided slice
    }
    assert not any(v.is_contiguous() for v in base.values())
    grads = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    opt = koala_pp(lr=0.5)
    awkward = TensorDict(base, batch_size=[])
    plain = TensorDict({k: v.contiguous() for k, v in base.items()}, batch_size=[])
    sa, sp = opt.init(awkward), opt.init(plain)
    pa, pp = awkward, plain
    for _ in range(3):
        pa, sa = opt.step(pa, TensorDict(grads), torch.tensor(0.7), sa)
        pp, sp = opt.step(pp, TensorDict(grads), torch.tensor(0.7), sp)
    for k in base:
        assert torch.equal(pa[k], pp[k]) and torch.equal(sa.v[k], sp.v[k])

    # KoalaPP with such parameters: test_optim.py::test_noncontiguous_and_channels_last_parameters


def test_zero_size_and_zero_dim_parameters():
    opt = koala_pp(lr=0.5)
    params = TensorDict(e=torch.zeros(0, 3), z=torch.tensor(2.0), w=torch.ones(3))
    grads = TensorDict(e=torch.zeros(0, 3), z=torch.tensor(0.5), w=torch.full((3,), 0.1))
    state = opt.init(params)
    new_p, new_s = opt.step(params, grads, torch.tensor(1.0), state)
    assert new_p["e"].shape == (0, 3) and new_p["z"].shape == ()
    assert new_s.count.tolist() == [0, 1, 1]  # the empty block has no gradient to follow
    assert new_s.skipped.tolist() == [0, 0, 0]
    # a 0-d parameter is the same filter as its 1-element version
    p1, _ = opt.step(
        TensorDict(z=torch.tensor([2.0])),
        TensorDict(z=torch.tensor([0.5])),
        torch.tensor(1.0),
        opt.init(TensorDict(z=torch.tensor([2.0]))),
    )
    assert torch.equal(new_p["z"].reshape(1), p1["z"])

    # KoalaPP: a zero-size parameter is a block without gradient, a 0-d one a filter
    for impl in ("engine", "reference"):
        a, b, c = (
            torch.zeros(0, 3, requires_grad=True),
            torch.tensor(2.0, requires_grad=True),
            torch.ones(3, requires_grad=True),
        )
        o = KoalaPP([a, b, c], lr=0.5, impl=impl, compile=False)
        o.zero_grad()
        (a.sum() + 0.5 * b + 0.1 * c.sum()).backward()
        o.step(loss=torch.tensor(1.0))
        torch.testing.assert_close(b.detach(), new_p["z"], rtol=1e-6, atol=0)
        torch.testing.assert_close(c.detach(), new_p["w"], rtol=1e-6, atol=0)
        assert int(o.state[a]["count"]) == 0 and int(o.state[c]["count"]) == 1


def test_empty_parameter_sets():
    opt = koala_pp()
    state = opt.init(TensorDict())
    params, new_state = opt.step(TensorDict(), TensorDict(), torch.tensor(1.0), state)
    assert len(params.keys()) == 0 and new_state.s.shape == (0,) and int(new_state.step) == 1
    with pytest.raises(ValueError, match="empty parameter list"):  # torch.optim's own rule
        KoalaPP([])


def test_empty_group_steps_and_does_nothing():
    o = KoalaPP([{"params": []}], compile=False)  # an empty group is allowed and does nothing
    assert o.step(loss=torch.tensor(1.0)) is not None


def test_integer_and_boolean_leaves_pass_through():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model.register_buffer("mask", torch.tensor([True, False, True]))
    params = TensorDict.from_module(model)
    assert params["1", "num_batches_tracked"].dtype == torch.int64
    opt = koala_pp(lr=0.5)
    state = opt.init(params)
    assert ("1", "num_batches_tracked") not in state.v.keys(include_nested=True)
    assert "mask" not in state.v.keys()
    floats = [k for k, v in params.items(True, True) if v.is_floating_point()]
    grads = params.select(*floats).apply(lambda t: torch.full_like(t, 0.1))
    new_p, new_s = opt.step(params, grads, torch.tensor(1.0), state)
    assert new_p["1", "num_batches_tracked"] is params["1", "num_batches_tracked"]
    assert new_p["mask"] is params["mask"]
    assert new_s.count.shape == (len(floats),)
    # a gradient given for a non-float leaf is ignored: that leaf is not optimized
    new_p, _ = opt.step(params, grads.update({"mask": torch.ones(3)}), torch.tensor(1.0), state)
    assert new_p["mask"] is params["mask"]
