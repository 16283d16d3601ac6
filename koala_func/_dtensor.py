"""DTensor helpers shared by the doors that accept FSDP2 / DDP tensors (``KoalaPP`` and the
functional sharded step): local shards, placements, and the engine's one-all-reduce hook.

Nothing here imports ``torch.distributed`` at module import: a process that never creates a
DTensor does not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _is_dtensor(t: torch.Tensor) -> bool:
    import sys

    # No DTensor exists unless torch.distributed.tensor was imported: do not import it here.
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import Partial, Shard

    if any(isinstance(pl, Partial) for pl in p.placements):
        raise ValueError(
            f"KoalaPP needs Shard or Replicate placements, got {p.placements}; redistribute "
            "Partial tensors first"
        )
    return any(isinstance(pl, Shard) for pl in p.placements)


def _wrap_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _local_like(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a loaded state tensor, laid out as ``like`` (a DTensor or not)."""
    if not _is_dtensor(like):
        return (saved.full_tensor() if _is_dtensor(saved) else saved).to(like.device)
    if _is_dtensor(saved):
        if saved.device_mesh != like.device_mesh or saved.placements != like.placements:
            saved = saved.redistribute(like.device_mesh, like.placements)
        return saved.to_local()
    from torch.distributed.tensor import distribute_tensor

    # a full tensor (e.g. a single-process checkpoint): each rank keeps its shard, no collective
    return distribute_tensor(
        saved.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    ).to_local()


def _all_reduce_fn(params) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reduce hook for sharded layouts: one all-reduce over the parameters' mesh."""
    meshes = {p.device_mesh for _, p in params if _is_dtensor(p) and _sharded(p)}
    if len(meshes) != 1:
        raise ValueError("KoalaPP: sharded parameters must live on one device mesh")
    (mesh,) = meshes
    if mesh.ndim != 1:
        raise ValueError(f"KoalaPP supports parameters sharded on a 1-D mesh, got {mesh.ndim}-D")
    group = mesh.get_group()

    return _all_reduce_hook(group)


def _all_reduce_hook(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """The engine's ``reduce`` hook: one functional all-reduce (sum) of ``[sums..., L, m2, 1]``
    over ``group``, so that the engine averages the loss moments over the ranks."""
    import torch.distributed._functional_collectives as funcol

    def reduce(vec: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(vec, "sum", group))

    return reduce
