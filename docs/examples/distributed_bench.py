"""Collectives and time of one KOALA++ step on sharded DTensors: DTensor-propagated vs sharded.

Run::

    torchrun --standalone --nproc_per_node 2 docs/examples/distributed_bench.py

Compares the single-process ``KoalaPPTransform.step`` run directly on ``Shard(0)`` DTensors
(DTensor decides the communication op by op) with ``koala_func.distributed.sharded`` (local
partial sums, one all-reduce), eager and compiled. Collectives are counted with
``CommDebugMode`` on the eager steps (compiled code does not run under a dispatch mode).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from koala_func import koala_pp
from koala_func.distributed import sharded


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
    results = {}
    for name, opt in (
        ("single-process step on DTensors", ref),
        ("sharded, eager", sharded(ref)),
        ("sharded, compiled", sharded(ref, compile=True)),
    ):
        state, p = opt.init(params), params
        for _ in range(3):  # warm-up (and compilation)
            p, state = opt.step(p, grads, loss, state)
        comm = CommDebugMode()
        if "compiled" not in name:
            with comm:
                p, state = opt.step(p, grads, loss, state)
        times = []
        for _ in range(21):
            dist.barrier()
            t0 = time.perf_counter()
            p, state = opt.step(p, grads, loss, state)
            times.append(time.perf_counter() - t0)
        results[name] = p
        if rank == 0:
            counts = {str(k): v for k, v in comm.get_comm_counts().items()}
            counted = f"{comm.get_total_counts()} collectives {counts}"
            if "compiled" in name:
                counted = "(not counted)"
            print(f"{name:34s} {counted}; median {1e3 * sorted(times)[10]:.2f} ms per step")
    a, b = results["single-process step on DTensors"], results["sharded, eager"]
    diff = max((a[k].full_tensor() - b[k].full_tensor()).abs().max().item() for k in shapes)
    if rank == 0:
        print(f"max |difference| after 25 steps, DTensor-propagated vs sharded: {diff:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
