"""Train a small MLP with FSDP2 (``fully_shard``) and ``KoalaPP``, on CPU with gloo.

Run::

    torchrun --standalone --nproc_per_node 2 docs/examples/fsdp_train.py
    torchrun --standalone --nproc_per_node 2 docs/examples/fsdp_train.py --granularity global

Each rank draws its own minibatches of a synthetic regression task; FSDP2 shards every
parameter on dim 0 (unevenly where the size is odd) and averages the gradients; ``KoalaPP``
works on the local shards and does one all-reduce of the ``[T, 7]`` partial sums plus the loss
moments per step (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from koala_func import KoalaPP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--granularity", choices=("tensor", "global"), default="tensor")
    parser.add_argument("--eager", action="store_true", help="do not compile the step")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)  # the same initial model on every rank (FSDP shards it)
    teacher = nn.Linear(16, 1)
    model = nn.Sequential(
        nn.Linear(16, 63), nn.GELU(), nn.Linear(63, 33), nn.GELU(), nn.Linear(33, 1)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    opt = KoalaPP(
        model.parameters(),
        lr=args.lr,
        weight_decay=1e-4,
        granularity=args.granularity,
        compile=False if args.eager else None,
    )
    gen = torch.Generator().manual_seed(1 + rank)  # each rank has its own data
    start = None
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch_size, 16, generator=gen)
        with torch.no_grad():
            y = torch.sin(teacher(x)) + 0.05 * torch.randn(args.batch_size, 1, generator=gen)
        losses = nn.functional.mse_loss(model(x), y, reduction="none").mean(1)
        losses.mean().backward()
        opt.step(loss=losses.detach())  # this rank's losses: averaged over the ranks
        opt.zero_grad()
        if step == 1:  # time from here: the first step includes compilation
            start = time.perf_counter()
        if step == 1 or step % 20 == 0:
            mean = losses.detach().mean()
            dist.all_reduce(mean)  # for printing only
            r_est = opt.state[model[0].weight]["r_est"]
            if rank == 0:
                print(
                    f"step {step:4d}  loss {mean.item() / world:.5f}  R {r_est.item():.4g}",
                    flush=True,
                )
    if rank == 0:
        ms = 1e3 * (time.perf_counter() - start) / max(args.steps - 1, 1)
        print(f"{world} ranks, {ms:.1f} ms/step (forward, backward, FSDP and KOALA++)")
        print("updates per tensor:", [int(opt.state[p]["count"]) for p in model.parameters()])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
