"""The sharded doors beside ``Adam(fused=True)``: one optimizer step on ``Shard(0)`` DTensors.

    python -m benchmarks.sharded              # launches 2 gloo ranks (torchrun) and prints
    torchrun --standalone --nproc_per_node 2 -m benchmarks.sharded --worker   # one worker

The parameters are ``nn.Parameter``s over ``Shard(0)`` DTensors with DTensor gradients, which
is what ``fully_shard`` (FSDP2) hands an optimizer; the step alone is timed. The doors:

- ``Adam(fused=True)`` on those parameters (the peer; it needs no collective);
- the single-process reference step run on the DTensors, where DTensor decides the
  communication op by op;
- ``KoalaPP`` (compiled, the default, and ``compile=False``);
- the functional ``koala_func.distributed.sharded(koala_pp)``, eager and compiled.

Every door steps its own copy of the same parameters, one call of each per round (the rounds
are interleaved, with a barrier before every call); the parameters are then compared with the
reference's. Collectives are counted with ``CommDebugMode`` on one eager step of each door
(compiled code does not run under a dispatch mode; it is traced from the same code). Rank 0
prints ``RESULT <json>``; :func:`measure` launches the workers and reads it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from .cold_compile import run_worker

ADAM = "Adam(fused=True)"
REFERENCE = "reference step on DTensors"
KOALA = "KoalaPP (compiled, the default)"
KOALA_EAGER = "KoalaPP(compile=False)"
SHARDED = "sharded(koala_pp), eager"
SHARDED_COMPILED = "sharded(koala_pp, compile=True)"
DOORS = (ADAM, REFERENCE, KOALA, KOALA_EAGER, SHARDED, SHARDED_COMPILED)
COMPILED = (KOALA, SHARDED_COMPILED)
#: Even shards on 2 ranks (the reference step on DTensors cannot ``reshape(-1)`` uneven ones).
SHAPES = {"w1": (1024, 512), "b1": (1024,), "w2": (256, 1024), "b2": (256,)}
WORLD = 2
LR = 0.1


def worker(reps: int, compiled: bool) -> list[dict] | None:
    """One rank's part (``torch.distributed`` initialised); rank 0 returns the rows."""
    import torch.distributed as dist
    from tensordict import TensorDict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    from koala_func import KoalaPP, koala_pp
    from koala_func.distributed import sharded

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)

    def shard(t: torch.Tensor):
        return distribute_tensor(t, mesh, [Shard(0)])

    params = TensorDict({k: shard(torch.randn(s)) for k, s in SHAPES.items()})
    grads = TensorDict({k: shard(0.1 * torch.randn(s)) for k, s in SHAPES.items()})
    loss = torch.tensor(0.5)

    def functional(opt):
        box = {"p": params, "s": opt.init(params)}

        def step():
            box["p"], box["s"] = opt.step(box["p"], grads, loss, box["s"])

        return step, lambda: box["p"]

    def torch_optim(make):
        ps = [torch.nn.Parameter(params[k].detach().clone()) for k in SHAPES]
        opt = make(ps)

        def step():
            for p, k in zip(ps, SHAPES, strict=True):
                p.grad = grads[k]  # FSDP2 hands over a new DTensor gradient every step
            if isinstance(opt, KoalaPP):
                opt.step(loss=loss)
            else:
                opt.step()

        return step, lambda: TensorDict(dict(zip(SHAPES, ps, strict=True)))

    ref = koala_pp(lr=LR)
    doors = {
        ADAM: torch_optim(lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
        REFERENCE: functional(ref),
        KOALA: torch_optim(lambda ps: KoalaPP(ps, lr=LR)),
        KOALA_EAGER: torch_optim(lambda ps: KoalaPP(ps, lr=LR, compile=False)),
        SHARDED: functional(sharded(ref)),
        SHARDED_COMPILED: functional(sharded(ref, compile=True)),
    }
    if not compiled:
        doors = {k: v for k, v in doors.items() if k not in COMPILED}
    comms: dict[str, dict | None] = {}
    for name, (step, _) in doors.items():
        step()  # builds (and compiles)
        step()
        if name in COMPILED:  # the same number of steps as the others
            step()
            comms[name] = None
            continue
        comm = CommDebugMode()
        with comm:
            step()
        ops = {str(k).split(".")[-1]: v for k, v in comm.get_comm_counts().items()}
        comms[name] = {"total": comm.get_total_counts(), "ops": ops}
    times: dict[str, list[float]] = {k: [] for k in doors}
    for _ in range(reps):
        for name, (step, _) in doors.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    # every KOALA++ door took the same steps as the reference: compare the parameters
    base = doors[REFERENCE][1]()
    rows = []
    for name, (_, result) in doors.items():
        diff = None
        if name not in (ADAM, REFERENCE):
            got = result()
            diff = max(
                (got[k].full_tensor() - base[k].full_tensor()).abs().max().item() for k in SHAPES
            )
        rows.append(
            {
                "door": name,
                "collectives": comms[name],
                "median_s": statistics.median(times[name]),
                "times_s": times[name],
                "max_diff": diff,
            }
        )
    return rows if dist.get_rank() == 0 else None


def measure(reps: int = 20, compiled: bool = True, timeout: float = 600) -> dict:
    """Launch :func:`worker` on 2 gloo ranks; its rows, or an ``error``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(WORLD), "-m", "benchmarks.sharded", "--worker"]
    cmd += ["--reps", str(reps)] + ([] if compiled else ["--no-compiled"])
    info = {
        "world": WORLD,
        "shapes": {k: list(v) for k, v in SHAPES.items()},
        "floats": sum(torch.Size(s).numel() for s in SHAPES.values()),
        "reps": reps,
    }
    rows, error = run_worker(cmd, timeout=timeout)
    return {**info, "error": error} if error else {**info, "rows": rows}


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help="run as one torchrun rank")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compiled", dest="compiled", action="store_false")
    args = p.parse_args(argv)
    if not args.worker:
        print(json.dumps(measure(args.reps, args.compiled), indent=1))
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # two ranks share the machine's cores
    try:
        rows = worker(args.reps, args.compiled)
        if rows is not None:
            print("RESULT " + json.dumps(rows), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
