"""Collectives and time of one KOALA++ step on sharded DTensors: DTensor-propagated vs the engine.

Run::

    torchrun --standalone --nproc_per_node 2 docs/examples/distributed_bench.py

Compares the single-process ``KoalaPPTransform.step`` (the reference) run directly on
``Shard(0)`` DTensors, where DTensor decides the communication op by op, with the two doors
onto the engine, which all-reduce local partial sums once: ``KoalaPP`` over DTensor parameters
(what ``fully_shard`` gives it) and the functional ``koala_func.distributed.sharded``, eager
and compiled. Collectives are counted with ``CommDebugMode`` on the eager steps (compiled code
does not run under a dispatch mode; it is traced from the same code). Optimizer step only.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from koala_func import KoalaPP, koala_pp
from koala_func.distributed import sharded

WARMUP, TIMED = 3, 21


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    # even shards: the DTensor-propagated step cannot reshape(-1) uneven ones
    shapes = {"w1": (256, 128), "b1": (256,), "w2": (64, 256), "b2": (64,)}

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)])

    params = TensorDict({k: shard(torch.randn(s)) for k, s in shapes.items()})
    grads = TensorDict({k: shard(0.1 * torch.randn(s)) for k, s in shapes.items()})
    loss = torch.tensor(0.5)
    ref = koala_pp(lr=0.1)

    def functional(opt):
        state, p = opt.init(params), params

        def step():
            nonlocal p, state
            p, state = opt.step(p, grads, loss, state)

        return step, lambda: p

    def optim(compile_):
        ps = [torch.nn.Parameter(params[k].detach().clone()) for k in shapes]
        opt = KoalaPP(ps, lr=0.1, compile=compile_)

        def step():
            for p, k in zip(ps, shapes, strict=True):
                p.grad = grads[k]  # FSDP2 hands over a new DTensor gradient every step
            opt.step(loss=loss)

        return step, lambda: TensorDict(dict(zip(shapes, ps, strict=True)))

    doors = {
        "reference step on DTensors": functional(ref),
        "KoalaPP, eager": optim(False),
        "KoalaPP, compiled (default)": optim(None),
        "sharded(koala_pp), eager": functional(sharded(ref)),
        "sharded(koala_pp), compiled": functional(sharded(ref, compile=True)),
    }
    results = {}
    for name, (step, result) in doors.items():
        for _ in range(WARMUP):  # warm-up (and compilation)
            step()
        comm = CommDebugMode()
        if "compiled" not in name:
            with comm:
                step()
        else:
            step()
        times = []
        for _ in range(TIMED):
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        results[name] = result()
        if rank == 0:
            counts = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
            counted = f"{comm.get_total_counts()} {counts}" if "compiled" not in name else "-"
            ms = 1e3 * sorted(times)[TIMED // 2]
            print(f"| {name} | {counted} | {ms:.2f} ms |", flush=True)
    a = results["reference step on DTensors"]
    n = WARMUP + 1 + TIMED
    for name in list(doors)[1:]:
        b = results[name]
        diff = max((a[k].full_tensor() - b[k].full_tensor()).abs().max().item() for k in shapes)
        if rank == 0:
            print(f"after {n} steps, max |{name} - reference on DTensors|: {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
