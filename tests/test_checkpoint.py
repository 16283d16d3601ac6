"""Checkpoints of the functional state: torch.save/torch.load(weights_only=True) and TensorDict
memmap round trips, bit-identical continuation for 50 steps, one member out of an ensemble."""

from __future__ import annotations

import io

import pytest
import torch
from tensordict import TensorDict

from koala_func import KoalaPPState, koala_pp
from koala_func.checkpoint import load_state, save_state, state_from_dict, state_to_dict

SHAPES = {"w": (6, 5), "b": (5,), "head": {"w": (5, 3)}}


def make_params(seed: int) -> TensorDict:
    g = torch.Generator().manual_seed(seed)

    def build(shapes):
        return {
            k: build(v) if isinstance(v, dict) else torch.randn(*v, generator=g)
            for k, v in shapes.items()
        }

    td = TensorDict(build(SHAPES), batch_size=[])
    td["n"] = torch.tensor(7)  # an integer leaf passes through
    return td


def grads_and_loss(params: TensorDict, k: int):
    """A deterministic quadratic problem: minimise 0.5 |theta - target_k|^2 / n."""
    g = torch.Generator().manual_seed(1000 + k)
    floats = params.exclude("n")
    target = floats.apply(lambda t: torch.randn(t.shape, generator=g))
    diff = floats - target
    n = 100.0
    grads = diff.apply(lambda d: d / n)
    loss = sum(d.square().sum() for d in diff.values(include_nested=True, leaves_only=True)) / n
    return grads, torch.stack([0.5 * loss, 1.5 * loss])  # per-sample losses


OPT = koala_pp(lr=0.5, weight_decay=1e-3)


def run(params, state, start, stop):
    for k in range(start, stop):
        grads, loss = grads_and_loss(params, k)
        params, state = OPT.step(params, grads, loss, state)
    return params, state


@pytest.fixture(scope="module")
def uninterrupted():
    params = make_params(0)
    state = OPT.init(params)
    p10, s10 = run(params, state, 0, 10)
    p60, s60 = run(p10, s10, 10, 60)
    return p10, s10, p60, s60


def assert_identical(a, b):
    assert set(a.keys(include_nested=True, leaves_only=True)) == set(
        b.keys(include_nested=True, leaves_only=True)
    )
    for k in a.keys(include_nested=True, leaves_only=True):
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x, y), k


def test_torch_save_weights_only_round_trip_continues_bit_identically(uninterrupted, tmp_path):
    p10, s10, p60, s60 = uninterrupted
    path = tmp_path / "koala.pt"
    save_state(s10, path, params=p10)
    raw = torch.load(path, weights_only=True)  # only tensors, dicts, lists and ints inside
    assert raw["format"].startswith("koala_func.KoalaPPState")
    state, params = load_state(path)
    assert isinstance(state, KoalaPPState)
    assert_identical(state, s10)
    assert_identical(params, p10)
    p, s = run(params, state, 10, 60)
    assert_identical(p, p60)
    assert_identical(s, s60)


def test_pickling_the_tensorclass_is_refused_by_weights_only(uninterrupted):
    # why the helpers exist: the TensorClass itself is not on the safe-unpickling list
    buf = io.BytesIO()
    torch.save(uninterrupted[1], buf)
    buf.seek(0)
    with pytest.raises(Exception, match=r"[Ww]eights only load failed"):
        torch.load(buf, weights_only=True)


def test_memmap_round_trip_continues_bit_identically(uninterrupted, tmp_path):
    p10, s10, p60, s60 = uninterrupted
    s10.memmap(tmp_path / "state")
    p10.memmap(tmp_path / "params")
    state = KoalaPPState.load_memmap(tmp_path / "state")
    params = TensorDict.load_memmap(tmp_path / "params")
    assert_identical(state, s10)
    # work on in-memory copies: the loaded memmaps are read-only views of the files
    p, s = run(params.clone(), state.clone(), 10, 60)
    assert_identical(p, p60)
    assert_identical(s, s60)


def test_one_member_out_of_an_ensemble_checkpoint(tmp_path):
    members = []
    for seed in range(3):
        params = make_params(seed)
        members.append(run(params, OPT.init(params), 0, 4))
    ens_params = torch.stack([m[0] for m in members])
    ens_state = torch.stack([m[1] for m in members])
    assert ens_state.batch_size == (3,) and ens_state.s.shape == (3, 3)

    save_state(ens_state, tmp_path / "ens.pt", params=ens_params)
    state, params = load_state(tmp_path / "ens.pt")
    assert state.batch_size == (3,)
    s1, p1 = load_state(tmp_path / "ens.pt", member=1)
    assert s1.batch_size == () and s1.v["w"].shape == (6, 5)
    assert_identical(s1, members[1][1])
    assert_identical(p1, members[1][0])
    # the sliced member continues exactly like the member run alone
    ref_p, ref_s = run(*members[1], 4, 9)
    p, s = run(p1, s1, 4, 9)
    assert_identical(p, ref_p)
    assert_identical(s, ref_s)

    # memmap: slicing a lazily mapped ensemble reads one member
    ens_state.memmap(tmp_path / "ens_mm")
    mm = KoalaPPState.load_memmap(tmp_path / "ens_mm")
    assert_identical(mm[2].clone(), members[2][1])


def test_dict_form_and_format_check(uninterrupted):
    s10 = uninterrupted[1]
    d = state_to_dict(s10)
    assert isinstance(d["state"]["hyper"]["lr"], torch.Tensor)
    assert_identical(state_from_dict(d), s10)
    with pytest.raises(ValueError, match="not a KOALA\\+\\+ state checkpoint"):
        state_from_dict({"state": {}})


def test_empty_state_round_trip():
    state = OPT.init(TensorDict())
    buf = io.BytesIO()
    save_state(state, buf)
    buf.seek(0)
    assert_identical(load_state(buf), state)
