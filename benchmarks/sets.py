"""Parameter sets of the benchmark suite, as ``name -> list of shapes`` (no torchvision needed)."""

from __future__ import annotations

import torch
from tensordict import TensorDict


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


def make_params(shapes, seed: int = 0, dtype=torch.float32) -> TensorDict:
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            f"p{i:03d}": torch.randn(s, generator=g, dtype=dtype) * 0.05
            for i, s in enumerate(shapes)
        },
        batch_size=[],
    )
