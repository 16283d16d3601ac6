"""One ensemble over a grid of hyperparameters x seeds, trained in ONE vmapped call.

The engine of ``koala-func sweep`` and of the reproduction: every member (a grid point and a
seed) is an independent model with its own optimizer state and hyperparameters; KOALA++
members get theirs through :func:`koala_func.ensemble_init` (per-member ``lr``, ``q``,
``sigma``), the baselines through their state's ``hyper``. One
:func:`koala_func.ensemble_train_step` call trains all members on their own minibatches, and a
learning-rate schedule edits the state's ``lr`` once per epoch (no recompile).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDictBase

from koala_func import KoalaPPTransform, ensemble_init, ensemble_train_step, params_of
from koala_func.cli.data import Data, make_model

__all__ = ["SCHEDULES", "GridRun", "Member", "lr_factor", "train_grid"]

#: Learning-rate schedule shapes: ``constant``; ``cosine`` (annealed to 0 over the run, as
#: ``CosineAnnealingLR(T_max=epochs)``); ``step`` (x0.1 at 30%, 60% and 90% of the epochs, the
#: shape of the released vision script's ``MultiStepLR(milestones=[30, 60, 90])`` over 100).
SCHEDULES = ("constant", "cosine", "step")


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The multiplier of the base lr during ``epoch`` (0-based) of ``epochs``.

    Examples:
        >>> [round(lr_factor("step", e, 10), 4) for e in range(10)]
        [1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001]
        >>> lr_factor("cosine", 0, 10), round(lr_factor("cosine", 5, 10), 3)
        (1.0, 0.5)
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        milestones = [round(f * epochs) for f in (0.3, 0.6, 0.9)]
        return 0.1 ** sum(epoch >= m for m in milestones if m > 0)
    raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {', '.join(SCHEDULES)})")


@dataclass(frozen=True)
class Member:
    """One member of a grid: its initialisation/data-order seed and its hyperparameters
    (``q`` and ``sigma`` only for KOALA++; ``None`` keeps the optimizer's value).

    Examples:
        >>> Member(seed=1, lr=0.5).q is None
        True
    """

    seed: int
    lr: float
    q: float | None = None
    sigma: float | None = None


@dataclass
class GridRun:
    """The curves of every member: ``train_loss``, ``val_acc`` and ``val_loss`` are
    ``[members, epochs]`` (validation on ``data.x_test``); ``test_acc``/``test_loss`` are
    ``[members]`` on the extra test split when one was given; ``time`` is the wall-clock
    seconds of the training loop and ``step_time`` the median seconds of one ensemble step.

    Examples:
        >>> from koala_func import koala_pp
        >>> from koala_func.cli.data import load_data
        >>> run = train_grid(data=load_data("synthetic"), model="mlp",
        ...                  optimizer=koala_pp(sigma=0.1, q=0.1),
        ...                  members=[Member(0, 0.5), Member(0, 1.0)], epochs=1)
        >>> tuple(run.val_acc.shape), run.test_acc is None
        ((2, 1), True)
    """

    members: list[Member]
    train_loss: torch.Tensor
    val_acc: torch.Tensor
    val_loss: torch.Tensor
    test_acc: torch.Tensor | None
    test_loss: torch.Tensor | None
    time: float
    step_time: float


def _set_lr(state, lr: torch.Tensor):
    if hasattr(state, "with_hyperparams"):
        return state.with_hyperparams(lr=lr)
    return state.replace(hyper=state.hyper.replace(lr=lr))


def _init_state(opt, params: TensorDictBase, members: Sequence[Member]):
    lr = torch.tensor([m.lr for m in members], dtype=torch.float64)
    if isinstance(opt, KoalaPPTransform):
        kw = {"lr": lr}
        for name in ("q", "sigma"):
            values = [getattr(m, name) for m in members]
            if any(v is not None for v in values):
                default = float(getattr(opt, name))
                kw[name] = torch.tensor([default if v is None else v for v in values])
        return ensemble_init(opt, params, **kw)
    if any(m.q is not None or m.sigma is not None for m in members):
        raise ValueError("per-member q and sigma are KOALA++ hyperparameters")
    state = torch.vmap(opt.init)(params)
    return _set_lr(state, lr.to(state.hyper.lr.dtype))


def train_grid(
    *,
    data: Data,
    model: str | Callable[[], torch.nn.Module],
    optimizer,
    members: Sequence[Member],
    epochs: int,
    batch_size: int = 64,
    schedule: str = "constant",
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    scalar_loss: bool = False,
    compile: bool = False,
    progress: Callable[[int, int, float, float], None] | None = None,
) -> GridRun:
    """Train every member of ``members`` in one vmapped call per minibatch.

    Args:
        data: ``x_train``/``y_train`` to fit, ``x_test``/``y_test`` to validate on (e.g. a
            :func:`~koala_func.cli.data.split_validation` split).
        model: ``"mlp"`` or ``"cnn"`` (:func:`~koala_func.cli.data.make_model`), or a
            function that builds a module (called under ``torch.manual_seed(seed)`` for each
            seed, e.g. a language model whose inputs are token ids).
        optimizer: a functional optimizer (``koala_pp(...)``, ``koala_v(...)`` or a baseline
            from :mod:`koala_func.baselines`); its lr is replaced by each member's.
        members: the grid points x seeds. Members with the same seed start from the same
            weights and see the same minibatches (paired comparisons).
        epochs: passes over ``x_train``; ``schedule`` scales each member's lr per epoch.
        test: an extra ``(x, y)`` evaluated once at the end (reported, never used to choose).
        scalar_loss: give the step the minibatch mean loss instead of the per-sample losses,
            as the released vision scripts do (their online R then sees ``L**2``).
        compile: ``torch.compile`` the vmapped step (pays off for long runs).
        progress: ``progress(epoch, epochs, mean_train_loss, mean_val_acc)`` after each epoch.

    Examples:
        >>> from koala_func.baselines import sgd
        >>> from koala_func.cli.data import load_data
        >>> run = train_grid(data=load_data("synthetic"), model="mlp", optimizer=sgd(lr=0.1),
        ...                  members=[Member(0, 0.0), Member(0, 0.1)], epochs=1)
        >>> bool(run.val_acc[1, 0] > run.val_acc[0, 0])  # lr 0 never learns
        True
    """
    members = list(members)
    if not members:
        raise ValueError("the grid has no members")
    if schedule not in SCHEDULES:
        raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {', '.join(SCHEDULES)})")
    n = len(members)

    def build() -> torch.nn.Module:
        return make_model(model, data.classes) if isinstance(model, str) else model()

    net = build()
    inits = {}
    for seed in sorted({m.seed for m in members}):
        torch.manual_seed(seed)
        inits[seed] = params_of(build())
    params = torch.stack([inits[m.seed] for m in members]).contiguous()
    state = _init_state(optimizer, params, members)
    base_lr = state.hyper.lr.clone()

    def ce(out, y):
        return F.cross_entropy(out, y, reduction="none")

    # the optimizer itself where possible: ensemble_train_step then picks its own (engine) path
    step_fn = optimizer if isinstance(optimizer, KoalaPPTransform) else optimizer.step
    if scalar_loss:

        def step_fn(p, g, losses, s, _step=optimizer.step):
            return _step(p, g, losses.mean(), s)

    train = ensemble_train_step(step_fn, net, ce, shared_inputs=False, compile=compile)

    def member_eval(p, x, y):
        out = torch.func.functional_call(net, p.flatten_keys(".").to_dict(), (x,))
        return (out.argmax(-1) == y).float().mean(), ce(out, y).mean()

    evaluate = torch.vmap(member_eval, in_dims=(0, None, None))
    n_train = len(data.y_train)
    n_batches = n_train // batch_size
    if n_batches == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training samples")
    seeds = sorted(inits)
    gens = {s: torch.Generator().manual_seed(1000 + s) for s in seeds}
    train_loss = torch.zeros(n, epochs)
    val_acc, val_loss = torch.zeros(n, epochs), torch.zeros(n, epochs)
    step_times: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        state = _set_lr(state, base_lr * lr_factor(schedule, epoch, epochs))
        orders = {s: torch.randperm(n_train, generator=gens[s]) for s in seeds}
        order = torch.stack([orders[m.seed] for m in members])
        total = torch.zeros(n)
        for b in range(n_batches):
            idx = order[:, b * batch_size : (b + 1) * batch_size]
            t0 = time.perf_counter()
            params, state, losses = train(params, state, data.x_train[idx], data.y_train[idx])
            step_times.append(time.perf_counter() - t0)
            total = total + losses.detach().mean(-1)
        with torch.no_grad():
            train_loss[:, epoch] = total / n_batches
            val_acc[:, epoch], val_loss[:, epoch] = evaluate(params, data.x_test, data.y_test)
        if progress is not None:
            progress(
                epoch + 1,
                epochs,
                float(train_loss[:, epoch].nanmean()),
                float(val_acc[:, epoch].mean()),
            )
    elapsed = time.perf_counter() - start
    test_acc = test_loss = None
    if test is not None:
        with torch.no_grad():
            test_acc, test_loss = evaluate(params, *test)
    steady = sorted(step_times[len(step_times) // 10 :] or step_times)  # past compile/warm-up
    return GridRun(
        members,
        train_loss,
        val_acc,
        val_loss,
        test_acc,
        test_loss,
        elapsed,
        steady[len(steady) // 2],
    )
