"""Parameter sets of the benchmark suite (no torchvision needed).

Each set is a list of shapes; :func:`module_of` turns one into an ``nn.Module`` whose parameters
are nested as ``TensorDict.from_module`` nests a real model's (groups of 8 per submodule), with a
BatchNorm-style ``num_batches_tracked`` integer buffer in every group.
"""

from __future__ import annotations

import itertools

import torch
from tensordict import TensorDict

GROUP = 8  # parameters per submodule


def mlp() -> list[tuple[int, ...]]:
    """A small MLP, 784-512-256-10: 6 tensors, 0.54M floats."""
    return [(512, 784), (512,), (256, 512), (256,), (10, 256), (10,)]


def resnet18() -> list[tuple[int, ...]]:
    """torchvision's resnet18 (1000 classes) parameter shapes, written out: 62 tensors, 11.7M."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c in (64, 128, 256, 512):
        for block in range(2):
            down = block == 0 and c != 64
            shapes += [(c, c_in if block == 0 else c, 3, 3), (c,), (c,)]
            shapes += [(c, c, 3, 3), (c,), (c,)]
            if down:
                shapes += [(c, c_in, 1, 1), (c,), (c,)]
        c_in = c
    return [*shapes, (1000, 512), (1000,)]


def transformer(layers: int = 13, d: int = 256, vocab: int = 4096, ctx: int = 256) -> list:
    """A GPT-style decoder: 12 tensors a layer plus embeddings and final norm (160 tensors)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
        shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return [*shapes, (d,), (d,)]


def tiny(n: int = 500, seed: int = 0) -> list[tuple[int, ...]]:
    """``n`` tiny tensors of 16 to 300 floats (the per-tensor-overhead stress test)."""
    g = torch.Generator().manual_seed(seed)
    return [(int(k),) for k in torch.randint(16, 301, (n,), generator=g)]


SETS = {"mlp": mlp, "resnet18": resnet18, "transformer": transformer, "tiny500": tiny}
ENSEMBLE_SIZES = (64, 64, 64, 10)  # the E=64 ensemble's member: MLP 64-64-64-10


def tensors(shapes, seed: int = 0, scale: float = 0.05, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype=dtype, device=device) for s in shapes]


def module_of(shapes, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.nn.Module:
    """A module with parameters of ``shapes`` (values fixed by ``seed``), nested in groups of
    :data:`GROUP`, each group with an int64 ``num_batches_tracked`` buffer."""
    root = torch.nn.Module()
    values = tensors(shapes, seed, dtype=dtype, device=device)
    for i in range(0, len(values), GROUP):
        sub = torch.nn.Module()
        for j, t in enumerate(values[i : i + GROUP]):
            sub.register_parameter(f"p{j}", torch.nn.Parameter(t))
        sub.register_buffer("num_batches_tracked", torch.tensor(0, device=device))
        root.add_module(f"g{i // GROUP:03d}", sub)
    return root


def grads_of(shapes, seed: int = 1, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    """Fixed gradients for a set (small, nonzero: no block is skipped)."""
    return tensors(shapes, seed, scale=0.005, dtype=dtype, device=device)


def make_params(shapes, seed: int = 0, dtype=torch.float32) -> TensorDict:
    """A flat TensorDict ``{"p000": ..., ...}`` of the set (the authors-shaped loop's input)."""
    vals = tensors(shapes, seed, dtype=dtype)
    return TensorDict({f"p{i:03d}": t for i, t in enumerate(vals)}, batch_size=[])


def ensemble_member(sizes=ENSEMBLE_SIZES) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)
