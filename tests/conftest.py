"""Shared fixtures: small real tasks and the data they train on."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_mlp(seed: int = 0, dtype: torch.dtype = torch.float64, sizes=(8, 16, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers).to(dtype)


def make_data(n: int = 96, seed: int = 0, dtype: torch.dtype = torch.float64, d_in=8, n_cls=3):
    """A learnable 3-class problem: the label is a function of the first two inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp_max(n_cls - 1)


def ce_per_sample(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits (no download): standardized float64 train/test split."""
    sklearn = pytest.importorskip("sklearn.datasets")
    data = sklearn.load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])
