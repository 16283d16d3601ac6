"""Embedded data sets and small models of the experiments (no download).

Vision: scikit-learn's bundled 8x8 digits (or a synthetic Gaussian mixture that needs nothing),
with an MLP or a small CNN. Language: the public-domain text shipped in ``koala_func/data``,
with a Bengio-style character model.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import torch
from torch import nn

__all__ = [
    "CharMLP",
    "Data",
    "TextData",
    "load_data",
    "load_text",
    "make_model",
    "split_validation",
]


@dataclass(frozen=True)
class Data:
    """A classification split: inputs are flat ``[N, 64]`` float32, targets int64.

    Examples:
        >>> data = load_data("synthetic")
        >>> data.x_test.dtype, data.y_test.dtype, len(data.y_test)
        (torch.float32, torch.int64, 250)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int = 10

    def to(self, device: torch.device | str) -> Data:
        """The same split on ``device``.

        Examples:
            >>> load_data("synthetic").to("cpu").x_train.device
            device(type='cpu')
        """
        return Data(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.classes,
        )


def load_data(name: str = "digits", seed: int = 0) -> Data:
    """``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled
    to [0, 1], a fixed 80/20 split. ``"synthetic"``: 10 Gaussian classes in 64 dimensions
    (1000 train, 250 test), generated from ``seed``; needs no extra package.

    Examples:
        >>> data = load_data("synthetic")
        >>> tuple(data.x_train.shape), data.classes
        ((1000, 64), 10)
    """
    gen = torch.Generator().manual_seed(seed)
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the digits dataset needs scikit-learn: pip install 'koala_func[examples]' "
                "(or use --dataset synthetic)"
            ) from e
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32) / 16.0
        y = torch.tensor(d.target, dtype=torch.int64)
    elif name == "synthetic":
        centers = torch.randn(10, 64, generator=gen)
        y = torch.randint(0, 10, (1250,), generator=gen)
        x = centers[y] + 1.5 * torch.randn(1250, 64, generator=gen)
    else:
        raise ValueError(f"Invalid dataset: {name!r} (expected 'digits' or 'synthetic')")
    perm = torch.randperm(len(y), generator=gen)
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return Data(name, x[train], y[train], x[test], y[test])


def split_validation(data: Data, fraction: float = 0.2) -> Data:
    """The training set split again: the last ``fraction`` of it becomes the "test" part.

    Choosing hyperparameters on this split never looks at ``data``'s test set.

    Examples:
        >>> val = split_validation(load_data("synthetic"))
        >>> len(val.y_train), len(val.y_test)
        (800, 200)
    """
    n = len(data.y_train) - round(fraction * len(data.y_train))
    return Data(
        f"{data.name}-val",
        data.x_train[:n],
        data.y_train[:n],
        data.x_train[n:],
        data.y_train[n:],
        data.classes,
    )


def make_model(name: str = "mlp", classes: int = 10) -> nn.Module:
    """``"mlp"``: 64-128-10 with ReLU. ``"cnn"``: the 64 inputs as a 1x8x8 image, two 3x3
    convolutions (16 and 32 channels, the second with stride 2) and a linear head.

    Examples:
        >>> sum(p.numel() for p in make_model("mlp").parameters())
        9610
    """
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, classes))
    if name == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, classes),
        )
    raise ValueError(f"Invalid model: {name!r} (expected 'mlp' or 'cnn')")


@dataclass(frozen=True)
class TextData:
    """Character windows of a text: each row of ``train``/``val``/``test`` holds ``context``
    input characters and the next one (``[N, context + 1]`` int64), from a contiguous
    80/10/10 split.

    Examples:
        >>> text = load_text(context=8)
        >>> text.train.shape[1], text.vocab > 40
        (9, True)
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    vocab: int
    context: int
    chars: int


def load_text(context: int = 16) -> TextData:
    """The public-domain text of ``koala_func/data`` as character windows (see
    :class:`TextData`); the splits are contiguous and do not share windows.

    Examples:
        >>> text = load_text()
        >>> len(text.train) > 5 * len(text.test) > 0
        True
    """
    text = files("koala_func").joinpath("data/public_domain.txt").read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, context + 1, 1)
    n = len(windows)
    a, b = int(0.8 * n), int(0.9 * n)
    # skip `context` windows at each boundary so that no character is in two splits
    return TextData(
        windows[:a].contiguous(),
        windows[a + context : b].contiguous(),
        windows[b + context :].contiguous(),
        len(chars),
        context,
        len(text),
    )


class CharMLP(nn.Module):
    """A Bengio-style character model: ``context`` previous characters -> the next one
    (embedding, one tanh layer, a linear head).

    Examples:
        >>> model = CharMLP(vocab=69, context=16)
        >>> model(torch.zeros(2, 16, dtype=torch.int64)).shape
        torch.Size([2, 69])
    """

    def __init__(self, vocab: int, context: int = 16, embed: int = 16, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(vocab, embed),
            nn.Flatten(),
            nn.Linear(embed * context, hidden),
            nn.Tanh(),
            nn.Linear(hidden, vocab),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
