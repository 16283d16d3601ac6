"""KOALA++ under FSDP2 and DDP: both doors, 2 gloo ranks on CPU.

Each test launches ``torchrun --standalone --nproc_per_node 2`` on this file, which then runs
one worker (``python tests/test_distributed.py optim|functional CKPT_DIR``); a worker batches
many cases, since a launch costs seconds. A failing assertion in a worker surfaces in pytest as
the worker's traceback. The worker prints its worst deviations (visible with ``pytest -s``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
STEPS = 50
TOL = {torch.float64: 1e-10, torch.float32: 1e-6}
# Uneven shards over 2 ranks: 5 rows -> 3 + 2, 7 -> 4 + 3, 1 -> 1 + 0 (an empty local shard).
SHAPES = {"w": (5, 3), "b": (7,), "one": (1, 4), "even": (4, 2, 3)}
REPLICATED = {"rep": (3,), "repd": (2, 2)}  # a plain tensor, a Replicate DTensor
FROZEN = {"frozen": (3, 2)}  # never receives a gradient


def _launch(worker: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", __file__, worker, str(tmp_path),
    ]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    print(out.stdout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-8000:]


def test_koalapp_on_fully_shard_ddp_and_checkpoint(tmp_path):
    """``KoalaPP(model.parameters())`` on a ``fully_shard`` model equals the single process
    (float64 1e-10 and float32 1e-6 after 50 steps; uneven and empty shards; both
    granularities; 0-d and per-sample losses) with exactly one all-reduce per step; hand-made
    Shard/Replicate/plain parameters; compiled; DCP round trip; DDP."""
    _launch("optim", tmp_path)


def test_functional_sharded_transform(tmp_path):
    """``sharded(koala_pp(...))`` on TensorDicts of DTensors equals the single-process step,
    with one all-reduce per step; compiled == eager; DDP-style replicated tensors."""
    _launch("functional", tmp_path)


# ------------------------------------------------------------------------------ one process
@contextlib.contextmanager
def _one_rank_group():
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_rejects_partial_placements_and_mismatched_shards():
    """Structural errors are raised before any collective (a 1-rank group)."""
    from tensordict import TensorDict
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from koala_func import KoalaPP, koala_pp
    from koala_func.distributed import sharded

    with _one_rank_group() as mesh:
        p = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        opt = sharded(koala_pp())
        params = TensorDict(w=p)
        state = opt.init(params)
        g = DTensor.from_local(torch.ones(4, 2), mesh, [Partial()])
        with pytest.raises(ValueError, match="Partial"):
            opt.step(params, {"w": g}, torch.tensor(1.0), state)
        g = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
        with pytest.raises(ValueError, match="placements"):
            opt.step(params, {"w": g}, torch.tensor(1.0), state)
        with pytest.raises(TypeError, match="KoalaPPTransform"):
            sharded(object())
        with pytest.raises(ValueError, match="differentiable"):
            sharded(koala_pp(differentiable=True))
        with pytest.raises(ValueError, match="Partial"):
            KoalaPP([torch.nn.Parameter(DTensor.from_local(torch.ones(2), mesh, [Partial()]))])
        w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
        kopt = KoalaPP([w], compile=False)
        w.grad = distribute_tensor(torch.ones(4, 2), mesh, [Replicate()])
        with pytest.raises(ValueError, match="placements"):
            kopt.step(loss=1.0)
        # a 1-rank group: the sharded step is the single-process step
        grads = {"w": distribute_tensor(torch.full((4, 2), 0.5), mesh, [Shard(0)])}
        new, new_state = opt.step(params, grads, torch.tensor(0.7), state)
        ref = koala_pp()
        full = TensorDict(w=torch.ones(4, 2))
        ref_new, ref_state = ref.step(
            full, TensorDict(w=torch.full((4, 2), 0.5)), torch.tensor(0.7), ref.init(full)
        )
        torch.testing.assert_close(new["w"].full_tensor(), ref_new["w"])
        torch.testing.assert_close(new_state.s, ref_state.s)


def test_without_process_group_equals_single_process():
    """Not initialized: nothing is sharded or averaged, the step is the core step."""
    from tensordict import TensorDict

    from koala_func import koala_pp
    from koala_func.distributed import sharded

    assert not dist.is_initialized()
    gen = torch.Generator().manual_seed(0)
    params = TensorDict(w=torch.randn(5, 3, generator=gen, dtype=torch.float64))
    ref = koala_pp(lr=0.3, granularity="global")
    opt = sharded(ref)
    p_ref, s_ref, p, s = params, ref.init(params), params, opt.init(params)
    for _ in range(3):
        g = TensorDict(w=torch.randn(5, 3, generator=gen, dtype=torch.float64))
        loss = torch.rand(4, generator=gen, dtype=torch.float64)
        p_ref, s_ref = ref.step(p_ref, g, loss, s_ref)
        p, s = opt.step(p, g, loss, s)
    torch.testing.assert_close(p["w"], p_ref["w"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s.r_est, s_ref.r_est, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------- torchrun workers
def _count_one_all_reduce(comm) -> None:
    counts = comm.get_comm_counts()
    assert comm.get_total_counts() == 1, counts
    (op,) = counts
    assert "all_reduce" in str(op), op


def _mlp(dtype):
    # odd widths: uneven shards; the last layer (1 row) leaves rank 1 an empty shard
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(7, 1)).to(dtype)


def _batch(k: int, rank: int, dtype):
    gen = torch.Generator().manual_seed(100 * k + rank)
    x = torch.randn(8, 3, generator=gen, dtype=dtype)
    return x, x.sum(1, keepdim=True).sin()


def _losses(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y, reduction="none").mean(1)


def _global_batch(k: int, dtype):
    xs, ys = zip(*(_batch(k, r, dtype) for r in range(WORLD)), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _max_diff(sharded_params, full_params) -> float:
    return max(
        (p.full_tensor() - q).abs().max().item()
        for p, q in zip(sharded_params, full_params, strict=True)
    )


def _optim_worker(rank: int, mesh, ckpt: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    from koala_func import KoalaPP
    from koala_func.optim import _packed_step

    def sharded_mlp(dtype):
        model = _mlp(dtype)
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def train(model, opt, k, per_sample, dtype, count=False):
        x, y = _batch(k, rank, dtype)
        losses = _losses(model, x, y)
        losses.mean().backward()  # FSDP averages the gradients over the ranks
        loss = losses.detach() if per_sample else losses.detach().mean()
        with CommDebugMode() if count else contextlib.nullcontext() as comm:
            opt.step(loss=loss)  # this rank's loss: averaged over the ranks in the all-reduce
        if count:
            _count_one_all_reduce(comm)
        opt.zero_grad()

    def single_step(model, opt, k, per_sample, dtype):
        losses = _losses(model, *_global_batch(k, dtype))
        losses.mean().backward()
        opt.step(loss=losses.detach() if per_sample else losses.detach().mean())
        opt.zero_grad()

    # --- parity with one process on the union of the ranks' data, one all-reduce per step ---
    cases = [
        (torch.float64, "tensor", True, 1e-3),
        (torch.float64, "tensor", False, 0.0),
        (torch.float64, "global", True, 0.0),
        (torch.float32, "tensor", False, 1e-3),
        (torch.float32, "global", True, 1e-3),
    ]
    for dtype, granularity, per_sample, wd in cases:
        hp = dict(lr=0.2, weight_decay=wd, granularity=granularity)
        model = sharded_mlp(dtype)
        opt = KoalaPP(model.parameters(), **hp, compile=False)
        single, ref = _mlp(dtype), _mlp(dtype)
        s_opt = KoalaPP(single.parameters(), **hp, compile=False)
        r_opt = KoalaPP(ref.parameters(), **hp, impl="reference")
        for k in range(STEPS):
            train(model, opt, k, per_sample, dtype, count=True)
            single_step(single, s_opt, k, per_sample, dtype)
            single_step(ref, r_opt, k, per_sample, dtype)
        d_single = _max_diff(model.parameters(), single.parameters())
        d_ref = _max_diff(model.parameters(), ref.parameters())
        case = (dtype, granularity, per_sample, wd)
        if rank == 0:
            print(f"FSDP2 KoalaPP {case}: max |diff| {d_single:.1e} (engine), {d_ref:.1e} (ref)")
        assert max(d_single, d_ref) <= TOL[dtype], case
        for p, q in zip(model.parameters(), single.parameters(), strict=True):
            st, sq = opt.state[p], s_opt.state[q]
            assert isinstance(st["v"], DTensor) and st["v"].placements == p.placements
            assert st["v"].to_local().shape == p.to_local().shape
            d = (st["v"].full_tensor() - sq["v"]).abs().max().item()
            assert d <= TOL[dtype] and int(st["count"]) == int(sq["count"]) == STEPS, case
            torch.testing.assert_close(st["r_est"], sq["r_est"], rtol=TOL[dtype], atol=0)
    assert model[4].weight.to_local().shape[0] == (1 if rank == 0 else 0)  # an empty shard

    # --- hand-made DTensor parameters: uneven Shard(0), Replicate and plain, mixed ---
    dtype = torch.float64
    gen = torch.Generator().manual_seed(0)
    fulls = [torch.randn(s, generator=gen, dtype=dtype) for s in ((5, 3), (1, 4), (3,), (2, 2))]
    placed = [
        distribute_tensor(fulls[0], mesh, [Shard(0)]),
        distribute_tensor(fulls[1], mesh, [Shard(0)]),
        distribute_tensor(fulls[2], mesh, [Replicate()]),
        fulls[3].clone(),
    ]
    params = [torch.nn.Parameter(t) for t in placed]
    singles = [torch.nn.Parameter(t.clone()) for t in fulls]
    opt = KoalaPP(params, lr=0.1, weight_decay=1e-3, compile=False)
    s_opt = KoalaPP(singles, lr=0.1, weight_decay=1e-3, compile=False)
    for k in range(STEPS):
        g = torch.Generator().manual_seed(1000 + k)
        for p, q in zip(params, singles, strict=True):
            grad = 0.3 * q.detach() + 0.1 * torch.randn(q.shape, generator=g, dtype=dtype)
            q.grad = grad
            p.grad = distribute_tensor(grad, mesh, p.placements) if isinstance(p, DTensor) else grad
        losses = torch.rand(WORLD, 4, generator=g, dtype=dtype) + 0.5
        with CommDebugMode() as comm:
            opt.step(loss=losses[rank])
        _count_one_all_reduce(comm)
        s_opt.step(loss=losses.reshape(-1))
    for p, q in zip(params, singles, strict=True):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        assert (full - q).abs().max().item() <= 1e-10

    # --- the default (compiled) KoalaPP under FSDP2 equals the eager one ---
    model, eager = sharded_mlp(dtype), sharded_mlp(dtype)
    opt = KoalaPP(model.parameters(), lr=0.2, weight_decay=1e-3)
    e_opt = KoalaPP(eager.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    for k in range(5):
        train(model, opt, k, True, dtype)
        train(eager, e_opt, k, True, dtype)
    assert opt._packed.compiled not in (None, _packed_step)  # no fallback to eager
    d = _max_diff(model.parameters(), [p.full_tensor() for p in eager.parameters()])
    if rank == 0:
        print(f"FSDP2 KoalaPP compiled vs eager, 5 steps: max |diff| {d:.1e}")
    assert d <= 1e-12

    # --- torch.distributed.checkpoint round trip (sharded state dicts), exact continuation ---
    model = sharded_mlp(dtype)
    opt = KoalaPP(model.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    for k in range(10):
        train(model, opt, k, True, dtype)
    osd = get_optimizer_state_dict(model, opt)
    assert isinstance(osd["state"]["0.weight"]["v"], DTensor)
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=ckpt)
    for k in range(10, 20):
        train(model, opt, k, True, dtype)
    expected = [p.full_tensor() for p in model.parameters()]
    resumed = sharded_mlp(dtype)  # a fresh model and optimizer, loaded
    r_opt = KoalaPP(resumed.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, r_opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, r_opt, sd["optim"])
    for k in range(10, 20):
        train(resumed, r_opt, k, True, dtype)
    assert _max_diff(resumed.parameters(), expected) == 0.0
    assert int(r_opt.state[resumed[0].weight]["count"]) == 20
    # a plain state dict of a single process loads into the sharded optimizer (sliced locally)
    single = _mlp(dtype)
    s_opt = KoalaPP(single.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    for k in range(3):
        single_step(single, s_opt, k, True, dtype)
    model = sharded_mlp(dtype)
    opt = KoalaPP(model.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    # full tensors into the local shards (in place: the optimizer copies them in at the step)
    set_model_state_dict(model, single.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt.load_state_dict(s_opt.state_dict())
    for k in range(3, 8):
        single_step(single, s_opt, k, True, dtype)
        train(model, opt, k, True, dtype)
    assert _max_diff(model.parameters(), list(single.parameters())) <= 1e-10

    # --- DDP: gradients already averaged; no reduce hook; the user averages the loss ---
    model, single = DDP(_mlp(dtype)), _mlp(dtype)
    opt = KoalaPP(model.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    s_opt = KoalaPP(single.parameters(), lr=0.2, weight_decay=1e-3, compile=False)
    assert opt._packed.reduce is None
    for k in range(STEPS):
        x, y = _batch(k, rank, dtype)
        loss = _losses(model, x, y).mean()
        loss.backward()  # DDP averages the gradients
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # one scalar: every replica must take the same step
        with CommDebugMode() as comm:
            opt.step(loss=mean / WORLD)
        assert comm.get_total_counts() == 0
        opt.zero_grad()
        single_step(single, s_opt, k, False, dtype)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "DDP replicas drifted apart"
    pairs = zip(model.parameters(), single.parameters(), strict=True)
    d = max((p - q).abs().max().item() for p, q in pairs)
    if rank == 0:
        print(f"DDP KoalaPP (loss averaged by the user): max |diff| {d:.1e}")
    assert d <= 1e-10


def _functional_worker(rank: int, mesh, ckpt: str) -> None:
    from tensordict import TensorDict
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from koala_func import koala_pp
    from koala_func.distributed import sharded

    def full_params(dtype):
        gen = torch.Generator().manual_seed(0)
        shapes = {**SHAPES, **REPLICATED, **FROZEN}
        return TensorDict(
            {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
        )

    def place(full):
        def one(k, v):
            if k == "rep":
                return v.clone()
            return distribute_tensor(v, mesh, [Replicate() if k == "repd" else Shard(0)])

        return TensorDict({k: one(k, v) for k, v in full.items()})

    def grads_and_losses(params_full, k, dtype, per_sample):
        gen = torch.Generator().manual_seed(1000 + k)
        grads = {}
        for key in (*SHAPES, *REPLICATED):
            p = params_full[key]
            grads[key] = 0.3 * p + 0.1 * torch.randn(p.shape, generator=gen, dtype=dtype)
        if k == 10:  # a zero gradient: that block is skipped by the eps rule
            grads["b"] = torch.zeros_like(grads["b"])
        shape = (4,) if per_sample else ()
        losses = [torch.rand(shape, generator=gen, dtype=dtype) + 0.5 for _ in range(WORLD)]
        return TensorDict(grads), losses

    def to_full(td):
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in td.items()}

    cases = [
        (torch.float64, "tensor", False),
        (torch.float64, "global", True),
        (torch.float32, "tensor", True),
        (torch.float32, "global", False),
    ]
    for dtype, granularity, per_sample in cases:
        tol = TOL[dtype]
        ref = koala_pp(lr=0.1, sigma=0.1, q=0.1, weight_decay=1e-3, granularity=granularity)
        opt = sharded(ref)
        full = full_params(dtype)
        params = place(full)
        ref_state, state = ref.init(full), opt.init(params)
        for k in range(STEPS):
            g_full, losses = grads_and_losses(full, k, dtype, per_sample)
            grads = dict(place(g_full).items())  # each rank: its shards, its own loss
            with CommDebugMode() as comm:
                params, state = opt.step(params, grads, losses[rank], state)
            _count_one_all_reduce(comm)
            loss_all = torch.cat(losses) if per_sample else torch.stack(losses).mean()
            full, ref_state = ref.step(full, g_full, loss_all, ref_state)
        got, got_v, got_h = to_full(params), to_full(state.v), to_full(state.h_prev)
        case = (dtype, granularity, per_sample)
        worst = max((got[k] - full[k]).abs().max().item() for k in full.keys())
        if rank == 0:
            print(f"sharded(koala_pp) {case}: max |diff| {worst:.1e}")
        for key in full.keys():
            torch.testing.assert_close(got[key], full[key], rtol=tol, atol=tol, msg=str(case))
            torch.testing.assert_close(got_v[key], ref_state.v[key], rtol=tol, atol=tol)
            torch.testing.assert_close(got_h[key], ref_state.h_prev[key], rtol=tol, atol=tol)
        torch.testing.assert_close(state.s, ref_state.s, rtol=tol, atol=0)
        torch.testing.assert_close(state.r_est, ref_state.r_est, rtol=tol, atol=0)
        assert torch.equal(state.count, ref_state.count), case
        assert torch.equal(state.skipped, ref_state.skipped)
        assert int(state.step) == STEPS
        if granularity == "tensor":  # the zero gradient of step 10 skipped block "b" once
            assert int(state.count[1]) == STEPS - 1 and int(state.count[-1]) == 0
            assert torch.equal(got["frozen"], full_params(dtype)["frozen"])
        assert state.v["w"].placements == params["w"].placements
        assert state.v["w"].to_local().shape[0] == (3 if rank == 0 else 2)
        assert state.v["repd"].placements == (Replicate(),)

    # --- compiled (the functional all-reduce inside the graph) == eager ---
    ref = koala_pp(lr=0.1, weight_decay=1e-3)
    eager, compiled = sharded(ref), sharded(ref, compile=True)
    full = full_params(torch.float64)
    pe = pc = place(full)
    se, sc = eager.init(pe), compiled.init(pc)
    for k in range(4):
        g_full, losses = grads_and_losses(full, k, torch.float64, per_sample=True)
        grads = dict(place(g_full).items())
        pe, se = eager.step(pe, grads, losses[rank], se)
        pc, sc = compiled.step(pc, grads, losses[rank], sc)
        full = TensorDict(to_full(pe))
    d = max((to_full(pc)[k] - full[k]).abs().max().item() for k in full.keys())
    if rank == 0:
        print(f"sharded(koala_pp, compile=True) vs eager, 4 steps: max |diff| {d:.1e}")
    assert d <= 1e-12

    # --- DDP: replicated tensors, averaged gradients, each rank's own loss ---
    ref = koala_pp(lr=0.1, weight_decay=1e-3)
    full = full_params(torch.float64)  # all plain tensors
    opt = sharded(ref)  # nothing sharded: only the loss moments travel (3 floats)
    params, state, ref_state, ref_params = full, opt.init(full), ref.init(full), full
    for k in range(10):
        g_full, losses = grads_and_losses(ref_params, k, torch.float64, per_sample=True)
        with CommDebugMode() as comm:
            params, state = opt.step(params, g_full, losses[rank], state)
        _count_one_all_reduce(comm)
        ref_params, ref_state = ref.step(ref_params, g_full, torch.cat(losses), ref_state)
    d = max((params[k] - ref_params[k]).abs().max().item() for k in full.keys())
    assert d <= 1e-10, d


if __name__ == "__main__":  # a torchrun worker: python tests/test_distributed.py WORKER DIR
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        worker = {"optim": _optim_worker, "functional": _functional_worker}[sys.argv[1]]
        worker(dist.get_rank(), init_device_mesh("cpu", (WORLD,)), sys.argv[2])
    finally:
        dist.destroy_process_group()
