"""``koala-func train``: every optimizer on the same task, all seeds of one optimizer in ONE
``torch.vmap``-ed call of the functional step; a results table, curves and metrics.
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

from koala_func import params_of, value_and_grad
from koala_func.cli.data import Data, load_data, make_model
from koala_func.cli.optimizers import OPTIMIZERS, make_optimizer

__all__ = ["Progress", "RunResult", "plot_curves", "results_table", "run", "train_members"]


@dataclass
class RunResult:
    """Curves of an ensemble run, one row per member: ``train_loss`` and ``test_acc`` are
    ``[members, epochs]``; ``time`` is the wall-clock seconds of the whole run.

    Examples:
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
        """The test accuracy of each member after the last epoch, ``[members]``.

        Examples:
            >>> RunResult("sgd", [0], [0.1], torch.zeros(1, 2), torch.ones(1, 2), 0.0).final_acc()
            tensor([1.])
        """
        return self.test_acc[:, -1]

    def final_loss(self) -> torch.Tensor:
        """The mean training loss of each member over the last epoch, ``[members]``.

        Examples:
            >>> RunResult("sgd", [0], [0.1], torch.ones(1, 2), torch.ones(1, 2), 0.0).final_loss()
            tensor([1.])
        """
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

    Examples:
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


class Progress:
    """A one-line progress bar on ``stream`` (stderr by default), redrawn in place on a
    terminal; elsewhere (logs, pipes) only the finished line is written.

    Examples:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = Progress("adam", stream=out, width=4)
        >>> bar(1, 2, 0.5, 0.9); bar(2, 2, 0.25, 0.95)
        >>> out.getvalue().split("  loss")[0]  # not a terminal: only the finished line
        'adam           [####] 2/2 epochs'
    """

    def __init__(self, label: str, stream=None, width: int = 24, metric: str = "test acc"):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.metric = metric
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, epoch: int, epochs: int, loss: float, acc: float) -> None:
        if not self.tty and epoch < epochs:
            return
        filled = round(self.width * epoch / epochs)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (
            f"{self.label:<14} [{bar}] {epoch}/{epochs} epochs  loss {loss:.4f}  "
            f"{self.metric} {100 * acc:5.1f}%  {time.perf_counter() - self.start:5.1f}s"
        )
        end = "\n" if epoch == epochs else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _mean_std(x: torch.Tensor, scale: float = 1.0, digits: int = 2) -> str:
    x = x.double() * scale
    std = x.std().item() if len(x) > 1 else 0.0
    return f"{x.mean().item():.{digits}f} ± {std:.{digits}f}"


def results_table(results: Sequence[RunResult]) -> str:
    """A Markdown table: test accuracy (mean ± std over seeds), final training loss, time.

    Examples:
        >>> r = RunResult("adam", [0, 1], [0.01] * 2, torch.ones(2, 1), torch.ones(2, 1), 1.0)
        >>> print(results_table([r]).splitlines()[-1])
        | Adam | 0.01 | 100.00 ± 0.00 | 1.0000 ± 0.0000 | 1.0 |
    """
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
    """Mean ± std bands of the training loss and test accuracy per epoch, written to ``path``
    (PNG); ``None`` without matplotlib.

    Examples:
        >>> import tempfile
        >>> r = RunResult("adam", [0, 1], [0.01] * 2, torch.ones(2, 3), torch.ones(2, 3), 1.0)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = plot_curves([r], Path(d) / "c.png")
        ...     path is None or path.read_bytes()[:4] == b"\\x89PNG"
        True
    """
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


def run(args: argparse.Namespace) -> int:
    """The ``train`` subcommand on parsed arguments (see :func:`koala_func.cli.main`).

    Examples:
        >>> from koala_func.cli import build_parser
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as out:  # doctest: +ELLIPSIS
        ...     args = build_parser().parse_args(["train", "--dataset", "synthetic",
        ...         "--epochs", "1", "--seeds", "2", "--optimizers", "sgd", "--out", out])
        ...     run(args)
        | optimizer | lr | test accuracy (%) | final train loss | time (s) |
        ...
        0
    """
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
                progress=Progress(name),
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
