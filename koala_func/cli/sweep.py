"""``koala-func sweep``: how sensitive is KOALA++ to its learning rate (and Q, sigma) here?

Every grid point x seed is a member of ONE ensemble trained in one vmapped call
(:func:`koala_func.ensemble_init` with per-member ``lr``, ``q``, ``sigma``). Members train on
80% of the training split and are scored on the other 20% (validation; the test set is never
used); the command prints a table of validation accuracy and loss per grid point (mean ±
standard error over seeds) with the best point marked, and writes ``sweep.json`` and
``sweep.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from koala_func.cli.data import load_data, split_validation
from koala_func.cli.grid import GridRun, Member, train_grid
from koala_func.cli.optimizers import LR_GRIDS, OPTIMIZERS, make_optimizer
from koala_func.cli.train import Progress

__all__ = [
    "KOALA_FAMILY",
    "MAX_MEMBERS",
    "add_arguments",
    "grid_values",
    "plot_sweep",
    "run",
    "summarize",
    "sweep_table",
]

#: Optimizers whose ``q`` and ``sigma`` the sweep can vary (the others take an lr grid only).
KOALA_FAMILY = ("koala++", "koala++-asym")
#: The largest ensemble a sweep builds (grid points x seeds).
MAX_MEMBERS = 1024


def grid_values(name: str, text: str) -> tuple[float, ...]:
    """Parse a comma-separated grid such as ``"0.1,0.3,1"`` for hyperparameter ``name``.

    Raises ``ValueError`` with a one-line message for an empty grid, a value that is not a
    finite number, a duplicate, or a value out of range (``lr`` and ``sigma`` must be > 0,
    ``q`` >= 0).

    Examples:
        >>> grid_values("lr", "0.1, 1e-2,3")
        (0.1, 0.01, 3.0)
        >>> grid_values("sigma", "0.1,0")
        Traceback (most recent call last):
        ...
        ValueError: sigma must be > 0, got 0.0
    """
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise ValueError(f"the {name} grid is empty (give comma-separated numbers, e.g. 0.1,1)")
    values = []
    for item in items:
        if not item:
            raise ValueError(f"empty entry in the {name} grid {text!r}")
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{name} value {item!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} value {item!r} is not a finite number")
        if name == "q" and value < 0:
            raise ValueError(f"q must be >= 0, got {value}")
        if name != "q" and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
        if value in values:
            raise ValueError(f"{name} value {value:g} appears twice in the grid")
        values.append(value)
    return tuple(values)


def _grid_type(name: str):
    def parse(text: str) -> tuple[float, ...]:
        try:
            return grid_values(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = f"{name} grid"
    return parse


def add_arguments(parser: argparse.ArgumentParser, positive_int) -> None:
    """The options of ``koala-func sweep`` (see :func:`koala_func.cli.build_parser`).

    Examples:
        >>> p = argparse.ArgumentParser()
        >>> add_arguments(p, int)
        >>> p.parse_args(["--lr", "0.5,1"]).lr
        (0.5, 1.0)
    """
    parser.add_argument(
        "--optimizer",
        choices=tuple(OPTIMIZERS),
        default="koala++",
        help="what to sweep (default koala++; q and sigma grids only for koala++/koala++-asym)",
    )
    parser.add_argument(
        "--lr",
        type=_grid_type("lr"),
        default=None,
        help="comma-separated learning rates (default: the optimizer's 5-point grid; "
        f"koala++: {','.join(f'{x:g}' for x in LR_GRIDS['koala++'])})",
    )
    parser.add_argument(
        "--q", type=_grid_type("q"), default=None, help="comma-separated Q values (default 0.1)"
    )
    parser.add_argument(
        "--sigma",
        type=_grid_type("sigma"),
        default=None,
        help="comma-separated sigma values (default 0.1)",
    )
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds per grid point")
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument(
        "--schedule",
        choices=("constant", "cosine", "step"),
        default="constant",
        help="lr schedule shape over the run (step: x0.1 at 30/60/90%% of the epochs)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile the ensemble step (pays off for long runs)",
    )
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("koala-func-sweep"))


def summarize(run: GridRun, axes: Sequence[str]) -> list[dict]:
    """One row per grid point (members grouped over seeds): the final validation accuracy
    and loss, mean and standard error over seeds (``None`` for a non-finite value), and
    whether it is the best point (highest mean accuracy, ties to the lower loss).

    Examples:
        >>> import torch
        >>> run = GridRun([Member(0, 0.1), Member(0, 1.0)], torch.zeros(2, 1),
        ...               torch.tensor([[0.5], [0.9]]), torch.tensor([[1.0], [0.3]]),
        ...               None, None, 1.0, 0.01)
        >>> [(r["lr"], r["best"]) for r in summarize(run, ["lr"])]
        [(0.1, False), (1.0, True)]
    """
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(run.members):
        groups.setdefault(tuple(getattr(m, a) for a in axes), []).append(i)
    rows = []
    for key, idx in groups.items():
        acc = run.val_acc[idx, -1].double()
        loss = run.val_loss[idx, -1].double()
        row = dict(zip(axes, key, strict=True))
        row["seeds"] = [run.members[i].seed for i in idx]
        for name, x in (("val_acc", acc), ("val_loss", loss)):
            mean = float(x.mean())
            se = float(x.std() / math.sqrt(len(x))) if len(x) > 1 else 0.0
            row[f"{name}_mean"] = mean if math.isfinite(mean) else None
            row[f"{name}_se"] = se if math.isfinite(se) else None
            row[f"{name}_per_seed"] = [v if math.isfinite(v) else None for v in x.tolist()]
        rows.append(row)

    def rank(r):
        acc = r["val_acc_mean"] if r["val_acc_mean"] is not None else -1.0
        loss = r["val_loss_mean"] if r["val_loss_mean"] is not None else math.inf
        return (-acc, loss)

    best = min(range(len(rows)), key=lambda i: rank(rows[i]))
    for i, row in enumerate(rows):
        row["best"] = i == best
    return rows


def sweep_table(rows: Sequence[dict], axes: Sequence[str]) -> str:
    """The rows of :func:`summarize` as a Markdown table, the best point marked.

    Examples:
        >>> rows = [dict(lr=0.1, val_acc_mean=0.5, val_acc_se=0.01, val_loss_mean=1.0,
        ...              val_loss_se=0.1, best=False),
        ...         dict(lr=1.0, val_acc_mean=0.9, val_acc_se=0.02, val_loss_mean=0.3,
        ...              val_loss_se=0.1, best=True)]
        >>> print(sweep_table(rows, ["lr"]).splitlines()[-1])
        | 1 | 90.00 ± 2.00 | 0.3000 ± 0.1000 | <- best |
    """

    def cell(mean, se, scale, digits):
        if mean is None:
            return "diverged"
        return f"{mean * scale:.{digits}f} ± {(se or 0.0) * scale:.{digits}f}"

    head = "| " + " | ".join(axes) + " | val accuracy (%) | val loss | best |"
    lines = [head, "|" + "---|" * (len(axes) + 3)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[a]:g}" for a in axes)
            + f" | {cell(r['val_acc_mean'], r['val_acc_se'], 100, 2)}"
            + f" | {cell(r['val_loss_mean'], r['val_loss_se'], 1, 4)}"
            + f" | {'<- best' if r['best'] else ''} |"
        )
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], axes: Sequence[str], path: Path, title: str) -> Path | None:
    """Validation accuracy and loss against lr (log scale), one curve per (q, sigma), error
    bars of one standard error, the best point circled; ``None`` without matplotlib.

    Examples:
        >>> import tempfile
        >>> rows = [dict(lr=lr, val_acc_mean=a, val_acc_se=0.0, val_loss_mean=1 - a,
        ...              val_loss_se=0.0, best=a == 0.9) for lr, a in ((0.1, 0.5), (1, 0.9))]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = plot_sweep(rows, ["lr"], Path(d) / "s.png", "t")
        ...     p is None or p.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    others = [a for a in axes if a != "lr"]
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        curves.setdefault(tuple(r[a] for a in others), []).append(r)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, points in curves.items():
        points = sorted(points, key=lambda r: r["lr"])
        label = ", ".join(f"{a} {v:g}" for a, v in zip(others, key, strict=True)) or None
        for ax, name, scale in ((ax_acc, "val_acc", 100.0), (ax_loss, "val_loss", 1.0)):
            xs = [r["lr"] for r in points]
            ys = [
                math.nan if r[f"{name}_mean"] is None else r[f"{name}_mean"] * scale for r in points
            ]
            es = [(r[f"{name}_se"] or 0.0) * scale for r in points]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
            for r, y in zip(points, ys, strict=True):
                if r["best"]:
                    ax.plot([r["lr"]], [y], "o", ms=14, mfc="none", mec="black")
    lrs = sorted({r["lr"] for r in rows})
    for ax in (ax_acc, ax_loss):
        ax.set_xscale("log")
        ax.set_xticks(lrs, labels=[f"{x:g}" for x in lrs])  # the grid, not decades
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("learning rate")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_loss.set(yscale="log", ylabel="validation loss")
    if len(curves) > 1:
        ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    """The ``sweep`` subcommand on parsed arguments (see :func:`koala_func.cli.main`).

    Examples:
        >>> import tempfile
        >>> from koala_func.cli import build_parser
        >>> with tempfile.TemporaryDirectory() as out:  # doctest: +ELLIPSIS
        ...     args = build_parser().parse_args(["sweep", "--dataset", "synthetic",
        ...         "--lr", "0.5,2", "--seeds", "2", "--epochs", "1", "--out", out])
        ...     run(args)
        | lr | val accuracy (%) | val loss | best |
        ...
        0
    """
    koala = args.optimizer in KOALA_FAMILY
    if not koala and (args.q is not None or args.sigma is not None):
        print(
            f"koala-func sweep: error: --q and --sigma apply to {' and '.join(KOALA_FAMILY)} "
            f"only, not {args.optimizer}",
            file=sys.stderr,
        )
        return 2
    lrs = args.lr if args.lr is not None else LR_GRIDS[args.optimizer]
    grid = {"lr": lrs}
    if koala:
        grid["q"] = args.q if args.q is not None else (0.1,)
        grid["sigma"] = args.sigma if args.sigma is not None else (0.1,)
    # only the axes the user varies become table columns (q, sigma at their value otherwise)
    axes = ["lr"] + [a for a in ("q", "sigma") if a in grid and len(grid[a]) > 1]
    points = list(itertools.product(*grid.values()))
    n = len(points) * args.seeds
    if n > MAX_MEMBERS:
        print(
            f"koala-func sweep: error: the grid has {len(points)} points x {args.seeds} seeds = "
            f"{n} members, more than {MAX_MEMBERS}",
            file=sys.stderr,
        )
        return 2
    members = [
        Member(seed, **dict(zip(grid, point, strict=True)))
        for seed in range(args.seeds)
        for point in points
    ]
    data = split_validation(load_data(args.dataset))
    opt = make_optimizer(args.optimizer)
    fixed = ", ".join(f"{a} {grid[a][0]:g}" for a in ("q", "sigma") if a in grid and a not in axes)
    print(
        f"{args.optimizer} sweep on {args.dataset} ({len(data.y_train)} train / "
        f"{len(data.y_test)} validation), {args.model}: {len(points)} grid points x "
        f"{args.seeds} seeds = {n} members in one vmapped call, {args.epochs} epochs, "
        f"{args.schedule} lr" + (f", {fixed}" if fixed else ""),
        file=sys.stderr,
    )
    result = train_grid(
        data=data,
        model=args.model,
        optimizer=opt,
        members=members,
        epochs=args.epochs,
        batch_size=args.batch_size,
        schedule=args.schedule,
        compile=args.compile,
        progress=Progress(f"{args.optimizer} x{n}", metric="val acc"),
    )
    rows = summarize(result, axes)
    table = sweep_table(rows, axes)
    print(table)
    best = next(r for r in rows if r["best"])
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": {
            "optimizer": args.optimizer,
            "dataset": args.dataset,
            "model": args.model,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "batch_size": args.batch_size,
            "schedule": args.schedule,
            "grid": {k: list(v) for k, v in grid.items()},
            "members": n,
            "validation": "last 20% of the training split",
        },
        "rows": rows,
        "best": {k: best[k] for k in (*grid, "val_acc_mean", "val_loss_mean") if k in best}
        | {a: grid[a][0] for a in grid if a not in best},
        "time_s": result.time,
    }
    (out / "sweep.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    epochs = f"{args.epochs} epoch" + ("s" if args.epochs != 1 else "")
    title = f"{args.optimizer} on {args.dataset} {args.model}, {epochs}, " + (
        f"{args.seeds} seeds" + (f", {fixed}" if fixed else "")
    )
    png = plot_sweep(rows, axes, out / "sweep.png", title)
    point = ", ".join(f"{a} {report['best'][a]:g}" for a in grid)
    acc = best["val_acc_mean"]
    print(f"best: {point} (validation accuracy " + (f"{100 * acc:.2f}%)" if acc else "n/a)"))
    if len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs)):
        print(
            f"note: the best lr ({best['lr']:g}) is at the edge of the grid; extend the grid "
            "past it to see the optimum",
            file=sys.stderr,
        )
    print(f"wrote {out / 'sweep.json'}" + (f", {png}" if png else ""))
    if png is None:
        print("(no plot: matplotlib is not installed)", file=sys.stderr)
    return 0
