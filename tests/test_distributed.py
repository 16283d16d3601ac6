"""KOALA++ under FSDP2 and DDP: 2 gloo processes on CPU, loopback only.

Each spawn is slow to start, so each worker packs several checks; a failing assertion in a
worker surfaces in pytest as the worker's traceback.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)

WORLD = 2
STEPS = 50
# Uneven shards over 2 ranks: 5 rows -> 3 + 2, 7 -> 4 + 3, 1 -> 1 + 0 (an empty local shard).
SHAPES = {"w": (5, 3), "b": (7,), "one": (1, 4), "even": (4, 2, 3)}
REPLICATED = {"rep": (3,)}  # a plain tensor (its sums are already global)
FROZEN = {"frozen": (3, 2)}  # never receives a gradient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=True)


def _setup(rank: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    return init_device_mesh("cpu", (WORLD,))


def _full_params(dtype):
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(0)
    shapes = {**SHAPES, **REPLICATED, **FROZEN}
    return TensorDict({k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()})


def _shard(full, mesh):
    from tensordict import TensorDict
    from torch.distributed.tensor import Shard, distribute_tensor

    return TensorDict(
        {
            k: distribute_tensor(v, mesh, [Shard(0)]) if k != "rep" else v.clone()
            for k, v in full.items()
        }
    )


def _grads_and_losses(params_full, k: int, dtype, per_sample: bool):
    """Step k's full gradients (dependent on the parameters) and each rank's losses."""
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(1000 + k)
    grads = {}
    for key in (*SHAPES, *REPLICATED):
        p = params_full[key]
        noise = torch.randn(p.shape, generator=gen, dtype=dtype)
        grads[key] = 0.3 * p + 0.1 * noise
    if k == 10:  # a zero gradient: that block is skipped by the eps rule
        grads["b"] = torch.zeros_like(grads["b"])
    losses = [
        torch.rand(4 if per_sample else (), generator=gen, dtype=dtype) + 0.5 for _ in range(WORLD)
    ]
    return TensorDict(grads), losses


def _to_full(td):
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in td.items()}


def _shard_grads(full_td, mesh):
    """Full gradients as a dict with the placements of the sharded parameters."""
    return dict(_shard(full_td, mesh).items())


def _parity_worker(rank: int, port: int) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    from koala_func import koala_pp
    from koala_func.distributed import sharded

    mesh = _setup(rank, port)
    cases = [
        (torch.float64, "tensor", False, 1e-12),
        (torch.float64, "global", True, 1e-12),
        (torch.float32, "tensor", True, 1e-6),
        (torch.float32, "global", False, 1e-6),
    ]
    for dtype, granularity, per_sample, tol in cases:
        ref = koala_pp(lr=0.1, sigma=0.1, q=0.1, weight_decay=1e-3, granularity=granularity)
        opt = sharded(ref)
        full = _full_params(dtype)
        params = _shard(full, mesh)
        ref_state, state = ref.init(full), opt.init(params)
        for k in range(STEPS):
            g_full, losses = _grads_and_losses(full, k, dtype, per_sample)
            # the sharded run: each rank sees its local loss and its shards of the gradients
            grads = _shard_grads(g_full, mesh)
            with CommDebugMode() as comm:
                params, state = opt.step(params, grads, losses[rank], state)
            assert comm.get_total_counts() == 1, comm.get_comm_counts()
            (op,) = comm.get_comm_counts()
            assert "all_reduce" in str(op), op
            # the single-process run over the whole batch
            loss_all = torch.cat(losses) if per_sample else torch.stack(losses).mean()
            full, ref_state = ref.step(full, g_full, loss_all, ref_state)
        got, got_v, got_h = _to_full(params), _to_full(state.v), _to_full(state.h_prev)
        case = (dtype, granularity, per_sample)
        for key in full.keys():
            torch.testing.assert_close(got[key], full[key], rtol=tol, atol=tol, msg=f"{case} {key}")
            torch.testing.assert_close(got_v[key], ref_state.v[key], rtol=tol, atol=tol)
            torch.testing.assert_close(got_h[key], ref_state.h_prev[key], rtol=tol, atol=tol)
        torch.testing.assert_close(state.s, ref_state.s, rtol=tol, atol=0)
        torch.testing.assert_close(state.r_est, ref_state.r_est, rtol=tol, atol=0)
        assert torch.equal(state.count, ref_state.count), case
        assert torch.equal(state.skipped, ref_state.skipped)
        assert int(state.step) == STEPS
        if granularity == "tensor":  # the zero gradient of step 10 skipped block "b" once
            assert int(state.count[1]) == STEPS - 1 and int(state.count[-1]) == 0
            assert torch.equal(got["frozen"], _full_params(dtype)["frozen"])
        # the state keeps the parameters' placements: each rank holds its shard only
        assert state.v["w"].placements == params["w"].placements
        assert state.v["w"].to_local().shape[0] == (3 if rank == 0 else 2)
    dist.destroy_process_group()


def test_sharded_step_equals_single_process_with_one_all_reduce():
    """50 steps, float64 and float32, both granularities, uneven and empty shards, a
    replicated tensor, a tensor without gradient, scalar and per-sample losses."""
    _spawn(_parity_worker)


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).to(
        dtype
    )


def _batch(k: int, rank: int, dtype):
    gen = torch.Generator().manual_seed(100 * k + rank)
    x = torch.randn(8, 3, generator=gen, dtype=dtype)
    return x, x.sum(1, keepdim=True).sin()


def _modules_worker(rank: int, port: int) -> None:
    from tensordict import TensorDict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    from koala_func import koala_pp, params_of
    from koala_func.distributed import ShardedKoalaPP, sharded

    mesh = _setup(rank, port)
    dtype, n_steps = torch.float64, 15
    ref = koala_pp(lr=0.2, weight_decay=1e-3)

    # --- FSDP2 module, in place, vs a single process on the union of the ranks' data ---
    model = _mlp(dtype)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = ShardedKoalaPP(model, ref)
    single = _mlp(dtype)
    s_params, s_state = params_of(single), ref.init(params_of(single))
    for k in range(n_steps):
        x, y = _batch(k, rank, dtype)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # FSDP averages the gradients over the ranks
        opt.step(loss)
        opt.zero_grad()
        # the reference: mean loss over both ranks' samples (equal batch sizes)
        batches = [_batch(k, r, dtype) for r in range(WORLD)]

        def total(p, batches=batches):
            out = torch.func.functional_call(single, p, (torch.cat([b[0] for b in batches]),))
            return torch.nn.functional.mse_loss(out, torch.cat([b[1] for b in batches]))

        flat = s_params.flatten_keys(".").to_dict()
        flat = {n: t.requires_grad_() for n, t in flat.items()}
        L = total(flat)
        gs = torch.autograd.grad(L, list(flat.values()))
        grads = TensorDict(dict(zip(flat, gs, strict=True))).unflatten_keys(".")
        # the released loss: per-rank means averaged (what each rank passes) = the global mean
        s_params, s_state = ref.step(s_params, grads, L.detach(), s_state)
    ref_flat = s_params.flatten_keys(".")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.full_tensor(), ref_flat[n], rtol=1e-10, atol=1e-12)

    # --- compiled sharded step (fullgraph, the functional all-reduce inside) == eager ---
    full = _full_params(torch.float32)
    eager, compiled = sharded(ref), sharded(ref, compile=True)
    pe = pc = _shard(full, mesh)
    se, sc = eager.init(pe), compiled.init(pc)
    for k in range(4):
        g_full, losses = _grads_and_losses(full, k, torch.float32, per_sample=False)
        grads = _shard_grads(g_full, mesh)
        pe, se = eager.step(pe, grads, losses[rank], se)
        pc, sc = compiled.step(pc, grads, losses[rank], sc)
        full = TensorDict(_to_full(pe))
    for key in full.keys():
        torch.testing.assert_close(_to_full(pc)[key], _to_full(pe)[key], rtol=1e-6, atol=1e-6)
    assert len(compiled._steps) == 1
    # the compiled step is one Dynamo graph holding exactly one all-reduce
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    torch.compile = lambda fn, **kw: compile_(fn, backend=keep_graph, **kw)
    try:
        counted = sharded(ref, compile=True)
        counted.step(pe, grads, losses[rank], counted.init(pe))
    finally:
        torch.compile = compile_
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert sum("all_reduce" in t for t in targets) == 1, targets

    # --- DDP: the gradients are averaged, the optimizer needs no collective of its own ---
    def ddp_run(loss_mode: str):
        model = DDP(_mlp(dtype))
        params = params_of(model.module)
        state = ref.init(params)
        opt = sharded(ref)  # all tensors replicated: only the loss moments travel
        for k in range(n_steps):
            x, y = _batch(k, rank, dtype)  # different data on each rank
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            grads = {n: p.grad for n, p in model.module.named_parameters()}
            grads = TensorDict(grads).unflatten_keys(".")
            if loss_mode == "sharded":
                with CommDebugMode() as comm:
                    params, state = opt.step(params, grads, loss, state)
                assert comm.get_total_counts() == 1
            else:
                L = loss.detach().clone()
                if loss_mode == "global":  # the user averages the loss themselves
                    dist.all_reduce(L)
                    L /= WORLD
                params, state = ref.step(params, grads, L, state)
            with torch.no_grad():
                for n, p in model.module.named_parameters():
                    p.copy_(params.flatten_keys(".")[n])
                    p.grad = None
        flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        return flat, gathered

    flat_g, gathered = ddp_run("global")
    assert torch.equal(gathered[0], gathered[1]), "DDP ranks drifted apart"
    flat_s, gathered = ddp_run("sharded")
    assert torch.equal(gathered[0], gathered[1])
    torch.testing.assert_close(flat_s, flat_g, rtol=1e-12, atol=1e-14)
    # the pitfall: each rank's own loss sets its own step size, and the replicas diverge
    _, gathered = ddp_run("local")
    assert not torch.allclose(gathered[0], gathered[1], rtol=1e-6, atol=0)
    dist.destroy_process_group()


def test_fsdp_module_compile_and_ddp():
    """FSDP2 module in place == single process; compiled == eager; DDP ranks stay equal."""
    _spawn(_modules_worker)


def test_rejects_partial_placements_and_mismatched_shards():
    """Structural errors are raised before any collective (one process, a 1-rank group)."""
    from tensordict import TensorDict
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from koala_func import koala_pp
    from koala_func.distributed import sharded

    port = _free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (1,))
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
        # a 1-rank group: the sharded step is the single-process step
        grads = {"w": distribute_tensor(torch.full((4, 2), 0.5), mesh, [Shard(0)])}
        new, new_state = opt.step(params, grads, torch.tensor(0.7), state)
        ref_new, ref_state = koala_pp().step(
            TensorDict(w=torch.ones(4, 2)),
            TensorDict(w=torch.full((4, 2), 0.5)),
            torch.tensor(0.7),
            koala_pp().init(TensorDict(w=torch.ones(4, 2))),
        )
        torch.testing.assert_close(new["w"].full_tensor(), ref_new["w"])
        torch.testing.assert_close(new_state.s, ref_state.s)
    finally:
        dist.destroy_process_group()


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
