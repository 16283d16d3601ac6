"""The ``koala-func`` command line: ``train`` (KOALA++ against known optimizers) and ``bench``.

``koala-func train`` trains a small model on scikit-learn's bundled digits (no download) with
several optimizers; for each optimizer all seeds train in ONE ``torch.vmap``-ed call of the
functional step (an ensemble), and the command prints a table of test accuracy (mean and std
over seeds), final training loss and time, and writes the curves to a PNG.

The building blocks (:func:`load_data`, :func:`make_model`, :func:`make_optimizer`,
:func:`train_members`) are public so that ``scripts/reproduce.py`` and users reuse them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import nn

from koala_func.baselines import adam, adamw, sgd
from koala_func.functional import params_of, value_and_grad
from koala_func.koala_pp import koala_pp
from koala_func.koala_v import koala_v

__all__ = [
    "LR_GRIDS",
    "OPTIMIZERS",
    "Data",
    "OptimizerSpec",
    "RunResult",
    "load_data",
    "main",
    "make_model",
    "make_optimizer",
    "train_members",
]

WEIGHT_DECAY = 5e-4  # the paper's vision setting, used for every optimizer but AdamW


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer of the CLI: a builder ``lr -> transform``, its default lr, and how
    that default was chosen (the tuning budget it got).

    Example:
        >>> spec = OPTIMIZERS["adam"]
        >>> spec.lr, type(spec.build(spec.lr)).__name__
        (0.01, 'AdamTransform')
    """

    label: str
    build: Callable[[float], object]
    lr: float
    tuning: str


#: Tuning budget of every default lr below: the best of a 5-point lr grid (2 seeds, 20 epochs,
#: MLP, on a validation split of the digits training set; ``scripts/reproduce.py`` reruns it).
#: Every other hyperparameter is its published default.
TUNING = "best of a 5-point lr grid (2 seeds, 20 epochs, digits MLP, validation split)"
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "koala++": (0.1, 0.3, 1.0, 2.0, 4.0),
    "koala++-asym": (0.1, 0.3, 1.0, 2.0, 4.0),
    "koala-v": (0.1, 0.3, 1.0, 2.0, 4.0),
    "adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (0.01, 0.03, 0.1, 0.3, 1.0),
}

OPTIMIZERS: dict[str, OptimizerSpec] = {
    "koala++": OptimizerSpec(
        "KOALA++ (symmetric)",
        lambda lr: koala_pp(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY),
        2.0,
        TUNING + "; sigma = q = 0.1 and online R as released (released vision lr: 1.0)",
    ),
    "koala++-asym": OptimizerSpec(
        "KOALA++ (asymmetric)",
        lambda lr: koala_pp(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY, symmetric=False),
        2.0,
        TUNING + "; as symmetric KOALA++ without the w term",
    ),
    "koala-v": OptimizerSpec(
        "KOALA-V",
        lambda lr: koala_v(lr=lr, sigma=0.1, q=0.1, weight_decay=WEIGHT_DECAY),
        2.0,
        TUNING + "; sigma = q = 0.1 and online R",
    ),
    "adam": OptimizerSpec(
        "Adam",
        lambda lr: adam(lr=lr, weight_decay=WEIGHT_DECAY),
        1e-2,
        TUNING + "; betas (0.9, 0.999) (torch's default lr: 1e-3)",
    ),
    "adamw": OptimizerSpec(
        "AdamW",
        lambda lr: adamw(lr=lr, weight_decay=1e-2),
        1e-2,
        TUNING + "; weight decay 1e-2",
    ),
    "sgd": OptimizerSpec(
        "SGD + momentum 0.9",
        lambda lr: sgd(lr=lr, momentum=0.9, weight_decay=WEIGHT_DECAY),
        0.3,
        TUNING + "; momentum 0.9",
    ),
}
DEFAULT_OPTIMIZERS = ("koala++", "koala++-asym", "koala-v", "adam", "sgd")


@dataclass(frozen=True)
class Data:
    """A classification split: inputs are flat ``[N, 64]`` float32, targets int64.

    Example:
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

    def to(self, device: torch.device) -> Data:
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

    Example:
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


def make_model(name: str = "mlp", classes: int = 10) -> nn.Module:
    """``"mlp"``: 64-128-10 with ReLU. ``"cnn"``: the 64 inputs as a 1x8x8 image, two 3x3
    convolutions (16 and 32 channels, the second with stride 2) and a linear head.

    Example:
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


def make_optimizer(name: str, lr: float | None = None):
    """The functional optimizer registered as ``name`` in :data:`OPTIMIZERS`.

    Example:
        >>> make_optimizer("koala++").symmetric, make_optimizer("koala++-asym").symmetric
        (True, False)
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)})")
    spec = OPTIMIZERS[name]
    return spec.build(spec.lr if lr is None else lr)


@dataclass
class RunResult:
    """Curves of an ensemble run, one row per member: ``train_loss`` and ``test_acc`` are
    ``[members, epochs]``; ``time`` is the wall-clock seconds of the whole run.

    Example:
        >>> r = train_members(data=load_data("synthetic"), model="mlp", optimizer="sgd",
        ...                   seeds=[0, 1], epochs=2)
        >>> r.test_acc.shape, r.final_acc().shape
        (torch.Size([2, 2]), torch.Size([2]))
    """

    optimizer: str
    seeds: list[int]
    lrs: list[float]
    train_loss: torch.Tensor
    test_acc: torch.Tensor
    time: float
    extra: dict = field(default_factory=dict)

    def final_acc(self) -> torch.Tensor:
        return self.test_acc[:, -1]

    def final_loss(self) -> torch.Tensor:
        return self.train_loss[:, -1]


def _stack_params(model_name: str, classes: int, seeds: Sequence[int], device) -> TensorDict:
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        members.append(params_of(make_model(model_name, classes)).to(device))
    return torch.stack(members)


def train_members(
    *,
    data: Data,
    model: str,
    optimizer: str,
    seeds: Sequence[int],
    lrs: Sequence[float] | None = None,
    epochs: int,
    batch_size: int = 64,
    compile: bool = False,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, float, float], None] | None = None,
) -> RunResult:
    """Train ``len(seeds)`` members in one ``torch.vmap``-ed step per minibatch.

    Member ``i`` starts from the initialisation of ``seeds[i]``, sees the training set in its
    own random order, and uses learning rate ``lrs[i]`` (a per-member 0-d hyperparameter in the
    state, so an lr sweep is one call). ``compile=True`` wraps the vmapped step in
    ``torch.compile`` (``torch.compile(vmap(f))``; the other order runs eager).
    ``progress(epoch, epochs, mean_loss, mean_acc)`` is called after each epoch.

    Example:
        >>> data = load_data("synthetic")
        >>> sweep = train_members(data=data, model="mlp", optimizer="koala++",
        ...                       seeds=[0, 0, 0], lrs=[0.5, 1.0, 2.0], epochs=1)
        >>> sweep.lrs, bool((sweep.final_acc() > 0.5).all())
        ([0.5, 1.0, 2.0], True)
    """
    device = torch.device(device)
    data = data.to(device)
    seeds = list(seeds)
    n = len(seeds)
    lrs = [OPTIMIZERS[optimizer].lr] * n if lrs is None else [float(lr) for lr in lrs]
    if len(lrs) != n:
        raise ValueError(f"got {len(lrs)} learning rates for {n} members")
    net = make_model(model, data.classes).to(device)
    opt = make_optimizer(optimizer)
    grad_fn = value_and_grad(net, lambda out, y: F.cross_entropy(out, y, reduction="none"))

    params = _stack_params(model, data.classes, seeds, device)
    state = opt.init(params[0])
    state = torch.stack([state] * n)
    lr_t = torch.tensor(lrs, dtype=state.hyper.lr.dtype, device=device)
    state = state.replace(hyper=state.hyper.replace(lr=lr_t))

    def member_step(p, s, x, y):
        grads, losses = grad_fn(p, x, y)
        p, s = opt.step(p, grads, losses, s)
        return p, s, losses.mean()

    def member_acc(p, x, y):
        out = torch.func.functional_call(net, p.flatten_keys(".").to_dict(), (x,))
        return (out.argmax(-1) == y).float().mean()

    step = torch.vmap(member_step)
    if compile:
        step = torch.compile(step)
    acc_fn = torch.vmap(member_acc, in_dims=(0, None, None))

    n_train = len(data.y_train)
    n_batches = n_train // batch_size
    gens = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    train_loss = torch.zeros(n, epochs)
    test_acc = torch.zeros(n, epochs)
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n_train, generator=g) for g in gens]).to(device)
        total = torch.zeros(n, device=device)
        for b in range(n_batches):
            idx = order[:, b * batch_size : (b + 1) * batch_size]
            params, state, loss = step(params, state, data.x_train[idx], data.y_train[idx])
            total = total + loss
        with torch.no_grad():
            train_loss[:, epoch] = (total / n_batches).cpu()
            test_acc[:, epoch] = acc_fn(params, data.x_test, data.y_test).cpu()
        if progress is not None:
            progress(
                epoch + 1,
                epochs,
                float(train_loss[:, epoch].nanmean()),
                float(test_acc[:, epoch].mean()),
            )
    return RunResult(optimizer, seeds, lrs, train_loss, test_acc, time.perf_counter() - start)


class _Progress:
    """A one-line progress bar on stderr (a line per optimizer when stderr is not a TTY)."""

    def __init__(self, label: str, stream=None, width: int = 24):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()
        self.tty = self.stream.isatty()

    def __call__(self, epoch: int, epochs: int, loss: float, acc: float) -> None:
        if not self.tty and epoch < epochs:
            return
        filled = round(self.width * epoch / epochs)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (
            f"{self.label:<14} [{bar}] {epoch}/{epochs} epochs  loss {loss:.4f}  "
            f"test acc {100 * acc:5.1f}%  {time.perf_counter() - self.start:5.1f}s"
        )
        end = "\n" if epoch == epochs else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _mean_std(x: torch.Tensor, scale: float = 1.0, digits: int = 2) -> str:
    x = x.double() * scale
    std = x.std().item() if len(x) > 1 else 0.0
    return f"{x.mean().item():.{digits}f} ± {std:.{digits}f}"


def results_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: test accuracy (mean ± std over seeds), final training loss, time."""
    lines = [
        "| optimizer | lr | test accuracy (%) | final train loss | time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {OPTIMIZERS[r.optimizer].label} | {r.lrs[0]:g} | {_mean_std(r.final_acc(), 100)} "
            f"| {_mean_std(r.final_loss(), digits=4)} | {r.time:.1f} |"
        )
    return "\n".join(lines)


def plot_curves(results: Sequence[RunResult], path: Path, title: str = "") -> Path | None:
    """Mean ± std bands of the training loss and test accuracy per epoch; ``None`` without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = torch.arange(1, r.train_loss.shape[1] + 1)
        for ax, curve, scale in ((ax_loss, r.train_loss, 1.0), (ax_acc, r.test_acc, 100.0)):
            mean = curve.nanmean(0) * scale
            std = curve.std(0).nan_to_num() * scale if len(curve) > 1 else torch.zeros_like(mean)
            line = ax.plot(epochs, mean, label=OPTIMIZERS[r.optimizer].label)[0]
            ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax_loss.set(xlabel="epoch", ylabel="train loss (mean over epoch)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    ax_acc.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- argument parsing


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _optimizer_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)} "
            f"(choose from {', '.join(OPTIMIZERS)})"
        )
    return names


def _device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"argument --device: invalid device {text!r}")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, False)
    if device.type == "cuda" and available and device.index is not None:
        available = device.index < torch.cuda.device_count()
    if not available:
        parser.error(f"argument --device: device {text!r} is not available on this machine")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koala-func",
        description="KOALA++ as a pure, vmappable function: train and benchmark from the shell.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train a small model with several optimizers, many seeds in one vmapped call",
        description="Train every optimizer on the same task; for each optimizer all seeds run "
        "in one torch.vmap-ed functional step. Prints a results table and writes curves.png, "
        "results.md and metrics.json into --out.",
    )
    train.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    train.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    train.add_argument("--epochs", type=_positive_int, default=20)
    train.add_argument("--seeds", type=_positive_int, default=8, help="members per optimizer")
    train.add_argument("--batch-size", type=_positive_int, default=64)
    train.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(DEFAULT_OPTIMIZERS),
        help=f"comma-separated, from: {', '.join(OPTIMIZERS)} "
        f"(default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    train.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the vmapped step (pays off for long runs; tiny default runs are "
        "faster eager)",
    )
    train.add_argument("--device", default="cpu")
    train.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch intra-op threads (default 1: the default models are tiny, and more threads "
        "only add overhead, badly so on a busy machine)",
    )
    train.add_argument("--out", type=Path, default=Path("koala-func-out"))

    bench = sub.add_parser(
        "bench",
        help="a quick run of the benchmark suite: step times and their ratios (from a "
        "checkout: packed compiled step, eager fallback, authors-style loop, Adam)",
    )
    bench.add_argument("--repeats", type=_positive_int, default=20)
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the compiled packed step (a cold compile takes seconds per set)",
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    data = load_data(args.dataset)
    seeds = list(range(args.seeds))
    print(
        f"{args.dataset} ({len(data.y_train)} train / {len(data.y_test)} test), {args.model}, "
        f"{args.seeds} seeds per optimizer in one vmapped call, {args.epochs} epochs, "
        f"batch {args.batch_size}, device {args.device}, compile {args.compile}",
        file=sys.stderr,
    )
    results = []
    for name in args.optimizers:
        results.append(
            train_members(
                data=data,
                model=args.model,
                optimizer=name,
                seeds=seeds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                compile=args.compile,
                device=args.device,
                progress=_Progress(name),
            )
        )
    table = results_table(results)
    print(table)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    metrics = {
        "config": {
            k: (str(v) if isinstance(v, Path | torch.device) else v) for k, v in vars(args).items()
        },
        "results": {
            r.optimizer: {
                "lr": r.lrs[0],
                "test_acc": r.test_acc.tolist(),
                "train_loss": [
                    [None if math.isnan(x) else x for x in row] for row in r.train_loss.tolist()
                ],
                "time": r.time,
            }
            for r in results
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    png = plot_curves(results, out / "curves.png", f"{args.dataset}, {args.model}")
    print(f"wrote {out / 'results.md'}, {out / 'metrics.json'}" + (f", {png}" if png else ""))
    if png is None:
        print("(no plot: matplotlib is not installed)", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:  # the benchmark suite, when run from a checkout
        from benchmarks.report import quick_table  # type: ignore[import-not-found]
    except ImportError:
        quick_table = None
    if quick_table is not None:
        print(quick_table(repeats=args.repeats, compile=args.compile))
        return 0
    from koala_func._bench import micro_benchmark

    print(micro_benchmark(repeats=args.repeats, compile=args.compile))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``koala-func`` and ``python -m koala_func``; returns the exit code.

    Bad options are argparse errors (exit code 2 with a message on stderr).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:  # doctest: +ELLIPSIS
        ...     main(["train", "--dataset", "synthetic", "--epochs", "1", "--seeds", "2",
        ...           "--optimizers", "koala++,adam", "--out", out])
        | optimizer | lr | test accuracy (%) | final train loss | time (s) |
        ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None:
        args.device = _device(parser, args.device)
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return _train(args) if args.command == "train" else _bench(args)
    finally:  # main() may run inside a larger process (tests, notebooks)
        torch.set_num_threads(threads)
