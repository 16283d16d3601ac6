"""The ``koala-func`` command line: ``train`` (KOALA++ against known optimizers), ``sweep``
(lr, Q and sigma sensitivity in one vmapped ensemble) and ``bench`` (step timings).

``koala-func train`` trains a small model on scikit-learn's bundled digits (no download) with
several optimizers; for each optimizer all seeds train in ONE ``torch.vmap``-ed call of the
functional step (an ensemble), and the command prints a table of test accuracy (mean and std
over seeds), final training loss and time, and writes the curves to a PNG.

The experiments live in this package (the core never imports it): :mod:`.data` (data sets and
models), :mod:`.optimizers`, :mod:`.train`, :mod:`.grid` (one ensemble over a hyperparameter
grid), :mod:`.sweep`, :mod:`.bench` and :mod:`.reproduce` (``scripts/reproduce.py``). The
building blocks below are re-exported so that scripts and users reuse them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from koala_func.cli.data import Data, load_data, make_model
from koala_func.cli.optimizers import (
    DEFAULT_OPTIMIZERS,
    LR_GRIDS,
    OPTIMIZERS,
    OptimizerSpec,
    make_optimizer,
)
from koala_func.cli.train import RunResult, plot_curves, results_table, train_members

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "LR_GRIDS",
    "OPTIMIZERS",
    "Data",
    "OptimizerSpec",
    "RunResult",
    "build_parser",
    "load_data",
    "main",
    "make_model",
    "make_optimizer",
    "plot_curves",
    "results_table",
    "train_members",
]


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
    """The argument parser of ``koala-func`` (subcommands ``train``, ``sweep``, ``bench``).

    Examples:
        >>> args = build_parser().parse_args(["sweep", "--lr", "0.3,1,3", "--seeds", "2"])
        >>> args.command, args.lr, args.seeds
        ('sweep', (0.3, 1.0, 3.0), 2)
    """
    from koala_func.cli import sweep

    parser = argparse.ArgumentParser(
        prog="koala-func",
        description="KOALA++ as a pure, vmappable function: train, sweep and benchmark from "
        "the shell.",
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

    sweep.add_arguments(
        sub.add_parser(
            "sweep",
            help="lr (and q, sigma) x seeds in ONE vmapped ensemble: validation accuracy per "
            "grid point, the best marked; writes sweep.json and sweep.png",
            description="Train one ensemble over a grid of learning rates (optionally Q and "
            "sigma) x seeds in one vmapped call, on 80%% of the digits training split; score "
            "each member on the other 20%% (validation). Prints a table with the best point "
            "marked and writes sweep.json and sweep.png into --out.",
        ),
        _positive_int,
    )

    bench = sub.add_parser(
        "bench",
        help="a quick run of the benchmark suite: step times and their ratios (from a "
        "checkout: the benchmark suite; otherwise KoalaPP, the functional step and Adam)",
    )
    bench.add_argument("--repeats", type=_positive_int, default=20)
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include the compiled steps (a cold compile takes seconds per set)",
    )
    return parser


def _bench(args: argparse.Namespace) -> int:
    try:  # the benchmark suite, when run from a checkout
        from benchmarks.report import quick_table  # type: ignore[import-not-found]
    except ImportError:
        quick_table = None
    if quick_table is not None:
        print(quick_table(repeats=args.repeats, compile=args.compile))
        return 0
    from koala_func.cli.bench import micro_benchmark

    print(micro_benchmark(repeats=args.repeats, compile=args.compile))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``koala-func`` and ``python -m koala_func``; returns the exit code.

    Bad options are argparse errors (exit code 2 with a one-line message on stderr).

    Examples:
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
        if args.command == "train":
            from koala_func.cli import train

            return train.run(args)
        if args.command == "sweep":
            from koala_func.cli import sweep

            return sweep.run(args)
        return _bench(args)
    finally:  # main() may run inside a larger process (tests, notebooks)
        torch.set_num_threads(threads)
