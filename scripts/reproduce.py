#!/usr/bin/env python
"""A small-scale reproduction of the KOALA++ paper's claims; writes docs/results.md and plots.

    python scripts/reproduce.py            # a few minutes on 2 CPU cores
    python scripts/reproduce.py --quick    # a smoke run (minutes -> seconds), not for the docs

Sections: (1) an lr sweep per optimizer, each in ONE vmapped call, on a validation split of the
digits training set; it chooses the default lr of every optimizer (the same budget for all);
(2) digits with an MLP and (3) with a small CNN, 5 seeds per optimizer; (4) the symmetric vs
asymmetric ablation (paired by seed); (5) a tiny character-level language model on the
public-domain text shipped in koala_func/data, KOALA++ against AdamW.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from importlib.resources import files
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from koala_func.baselines import adamw
from koala_func.cli import (
    DEFAULT_OPTIMIZERS,
    LR_GRIDS,
    OPTIMIZERS,
    Data,
    load_data,
    plot_curves,
    results_table,
    train_members,
)
from koala_func.functional import params_of, value_and_grad
from koala_func.koala_pp import koala_pp

ROOT = Path(__file__).resolve().parents[1]


def mean_std(x: torch.Tensor, scale: float = 1.0, digits: int = 2) -> str:
    x = x.double() * scale
    return f"{x.mean():.{digits}f} ± {x.std():.{digits}f}"


# ----------------------------------------------------------------------------- (1) lr sweep


def lr_sweep(data: Data, epochs: int, seeds: int, img: Path) -> tuple[str, dict[str, float]]:
    n = len(data.y_train) * 4 // 5  # validation split of the training set: no test leakage
    val = Data("digits-val", data.x_train[:n], data.y_train[:n], data.x_train[n:], data.y_train[n:])
    rows, best, curves = [], {}, {}
    for name in [*DEFAULT_OPTIMIZERS, "adamw"]:
        grid = LR_GRIDS[name]
        members = [(s, lr) for s in range(seeds) for lr in grid]
        r = train_members(
            data=val,
            model="mlp",
            optimizer=name,
            seeds=[s for s, _ in members],
            lrs=[lr for _, lr in members],
            epochs=epochs,
        )
        acc = r.final_acc().view(seeds, len(grid)).mean(0) * 100
        best[name] = grid[int(acc.argmax())]
        curves[name] = (grid, acc)
        cells = " | ".join(f"{a:.1f}" for a in acc.tolist())
        rows.append(
            f"| {OPTIMIZERS[name].label} | {cells} | {best[name]:g} | "
            f"{OPTIMIZERS[name].lr:g} | {r.time:.1f} |"
        )
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (grid, acc) in curves.items():
        ax.plot(grid, acc, marker="o", label=OPTIMIZERS[name].label)
    ax.set(
        xscale="log",
        xlabel="learning rate",
        ylabel="validation accuracy (%)",
        title=f"digits MLP, {epochs} epochs, mean of {seeds} seeds",
    )
    ax.set_ylim(bottom=max(0, float(min(a.min() for _, a in curves.values())) - 5))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "lr_sweep.png", dpi=110)
    plt.close(fig)
    header = "| optimizer | " + " | ".join(f"lr #{i + 1}" for i in range(5))
    header += " | best lr | CLI default lr | time of the call (s) |"
    grids = "\n".join(
        f"- {OPTIMIZERS[k].label}: " + ", ".join(f"{x:g}" for x in LR_GRIDS[k]) for k in curves
    )
    text = (
        f"Each row is ONE vmapped call: {seeds} seeds x 5 learning rates = {seeds * 5} members, "
        f"{epochs} epochs, MLP, trained on 80% of the digits training set and scored on the "
        f"other 20% (validation; the test set is not used). Grids:\n\n{grids}\n\n"
        f"{header}\n|{'---|' * 9}\n" + "\n".join(rows) + "\n\n![lr sweep](img/lr_sweep.png)\n"
    )
    return text, best


# ----------------------------------------------------------------------------- (2, 3) digits


def digits_runs(data: Data, model: str, epochs: int, seeds: int, img: Path):
    results = [
        train_members(data=data, model=model, optimizer=name, seeds=range(seeds), epochs=epochs)
        for name in DEFAULT_OPTIMIZERS
    ]
    plot_curves(results, img / f"digits_{model}.png", f"digits, {model}, {seeds} seeds")
    return results


def ablation(runs: dict[str, list]) -> str:
    lines = [
        "| model | symmetric acc (%) | asymmetric acc (%) | paired difference (sym - asym, pp) |",
        "|---|---|---|---|",
    ]
    for model, results in runs.items():
        by = {r.optimizer: r for r in results}
        sym, asym = by["koala++"].final_acc(), by["koala++-asym"].final_acc()
        lines.append(
            f"| {model} | {mean_std(sym, 100)} | {mean_std(asym, 100)} | "
            f"{mean_std(sym - asym, 100)} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- (5) char LM

CONTEXT = 16


class CharMLP(nn.Module):
    """A Bengio-style character model: 16 previous characters -> next character."""

    def __init__(self, vocab: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Embedding(vocab, 16),
            nn.Flatten(),
            nn.Linear(16 * CONTEXT, 256),
            nn.Tanh(),
            nn.Linear(256, vocab),
        )

    def forward(self, x):
        return self.net(x)


def char_lm(steps: int, seeds: int, img: Path) -> str:
    text = files("koala_func").joinpath("data/public_domain.txt").read_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids.unfold(0, CONTEXT + 1, 1)
    n = len(windows)
    # contiguous split: train / validation (choose lr) / test (report)
    a, b = int(0.8 * n), int(0.9 * n)
    split = {"train": windows[:a], "val": windows[a + CONTEXT : b], "test": windows[b + CONTEXT :]}
    net = CharMLP(len(chars))
    loss_fn = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    grad_fn = value_and_grad(net, loss_fn)

    def eval_loss(p, w):
        out = torch.func.functional_call(net, p.flatten_keys(".").to_dict(), (w[:, :-1],))
        return loss_fn(out, w[:, -1]).mean()

    grids = {
        "KOALA++": (
            lambda: koala_pp(lr=1.0, sigma=0.1, q=0.1, weight_decay=1e-4),
            (0.03, 0.1, 0.3, 1.0, 2.0),
        ),
        "AdamW": (lambda: adamw(lr=1e-3, weight_decay=1e-2), (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
    }
    rows, curves, test_loss = [], {}, {}
    for name, (build, grid) in grids.items():
        opt = build()
        members = [(s, lr) for s in range(seeds) for lr in grid]
        params = []
        for s, _ in members:
            torch.manual_seed(s)
            params.append(params_of(CharMLP(len(chars))))
        params = torch.stack(params)
        state = torch.stack([opt.init(params[0])] * len(members))
        lr_t = torch.tensor([lr for _, lr in members], dtype=state.hyper.lr.dtype)
        state = state.replace(hyper=state.hyper.replace(lr=lr_t))

        def member_step(p, st, w, opt=opt):
            grads, losses = grad_fn(p, w[:, :-1], w[:, -1])
            p, st = opt.step(p, grads, losses, st)
            return p, st

        step = torch.vmap(member_step)
        evaluate = torch.vmap(eval_loss, in_dims=(0, None))
        gen = torch.Generator().manual_seed(0)
        history, start = [], time.perf_counter()
        for t in range(steps):
            idx = torch.randint(0, len(split["train"]), (len(members), 64), generator=gen)
            params, state = step(params, state, split["train"][idx])
            if (t + 1) % (steps // 10) == 0:
                with torch.no_grad():
                    history.append(evaluate(params, split["val"]))
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            val = evaluate(params, split["val"]).nan_to_num(nan=float("inf"))
            test = evaluate(params, split["test"]).nan_to_num(nan=float("inf"))
        val_by_lr = val.view(seeds, len(grid)).mean(0)
        k = int(val_by_lr.argmin())
        best = test.view(seeds, len(grid))[:, k]
        test_loss[name] = float(best.mean())
        curves[name] = (torch.stack(history, 1).view(seeds, len(grid), -1)[:, k], grid[k])
        cells = " | ".join(f"{v:.3f}" for v in val_by_lr.tolist())
        rows.append(
            f"| {name} | {cells} | {grid[k]:g} | {mean_std(best, digits=3)} | "
            f"{mean_std(best / math.log(2), digits=3)} | {elapsed:.1f} |"
        )
        rows.append(f"| (lr grid) | {' | '.join(f'{x:g}' for x in grid)} | | | | |")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = torch.arange(1, 11) * (steps // 10)
    for name, (h, lr) in curves.items():
        mean = h.nanmean(0)
        ax.plot(xs, mean, marker="o", label=f"{name} (lr {lr:g})")
    ax.set(xlabel="step", ylabel="validation loss (nats/char)", title="character-level MLP LM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "char_lm.png", dpi=110)
    plt.close(fig)
    return (
        f"Text: `koala_func/data/public_domain.txt` ({len(text)} characters, vocabulary "
        f"{len(chars)}; Shakespeare, Lincoln, the King James Bible, the Declaration of "
        f"Independence). Model: embedding 16, context {CONTEXT}, one tanh layer of 256 "
        f"({sum(p.numel() for p in net.parameters())} parameters). Split 80/10/10 (contiguous). "
        f"Each optimizer: ONE vmapped call of {seeds} seeds x 5 learning rates, {steps} steps "
        f"of batch 64; the lr is chosen on validation, the test loss is reported for it. "
        f"KOALA++ uses the released LM setting otherwise (sigma = q = 0.1, weight decay 1e-4); "
        f"AdamW uses weight decay 1e-2.\n\n"
        "| optimizer | val loss, lr #1 | #2 | #3 | #4 | #5 | best lr | test loss (nats) | "
        "test bits/char | time (s) |\n|"
        + "---|" * 10
        + "\n"
        + "\n".join(rows)
        + "\n\n![char LM](img/char_lm.png)\n"
    ), test_loss


# ----------------------------------------------------------------------------- the page


def verdict(runs: dict[str, list], lm: dict[str, float]) -> tuple[str, bool]:
    out, all_hold = [], True
    for model, results in runs.items():
        by = {r.optimizer: r for r in results}
        k, a = by["koala++"].final_acc() * 100, by["adam"].final_acc() * 100
        diff = k.mean() - a.mean()
        se = math.sqrt(k.var() / len(k) + a.var() / len(a))
        holds = "holds" if diff >= 0 else "does not hold"
        all_hold &= bool(diff >= 0)
        out.append(
            f"- digits {model}: KOALA++ {k.mean():.2f}% vs Adam {a.mean():.2f}% "
            f"(difference {diff:+.2f} pp, standard error {se:.2f} pp): the ordering "
            f"**{holds}**" + (" (within noise)" if abs(diff) < 2 * se else "") + "."
        )
    k, a = lm["KOALA++"], lm["AdamW"]
    lm_holds = k <= a
    all_hold &= lm_holds
    out.append(
        f"- character LM: KOALA++ test loss {k:.3f} vs AdamW {a:.3f} nats/char: the ordering "
        f"**{'holds' if lm_holds else 'does not hold'}**."
    )
    return "\n".join(out), all_hold


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for the docs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see docs/gotchas.md)
    q = args.quick
    sweep_epochs, mlp_epochs, cnn_epochs, seeds = (2, 2, 1, 2) if q else (20, 20, 15, 5)
    lm_steps = 100 if q else 1500
    img = args.out / "img"
    img.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data("digits")

    sweep_text, best = lr_sweep(data, sweep_epochs, 2, img)
    runs = {
        "mlp": digits_runs(data, "mlp", mlp_epochs, seeds, img),
        "cnn": digits_runs(data, "cnn", cnn_epochs, seeds, img),
    }
    lm_text, lm = char_lm(lm_steps, 2, img)
    lines, all_hold = verdict(runs, lm)
    total = time.perf_counter() - start
    defaults_match = all(best[k] == OPTIMIZERS[k].lr for k in best)

    summary = (
        "At this scale the paper's ordering (KOALA++ at or above Adam) "
        + ("**holds** on every task above. " if all_hold else "**does not hold everywhere**. ")
        + "Every optimizer got the same small tuning budget: a 5-point learning-rate grid on "
        "a validation split (section 1 for digits, section 5 for the language model), all "
        "other hyperparameters at their published defaults (KOALA++: sigma = q = 0.1, online "
        "R, weight decay 5e-4, as in the released vision setting). These tasks are tiny and "
        "short (15-20 epochs, no lr decay), so they say little about CIFAR-scale training."
        + (
            ""
            if defaults_match
            else " The best lrs of this run's sweep differ from the CLI "
            "defaults for some optimizers: the defaults come from an earlier run of the same "
            "sweep; section 1 shows how close the grid points are."
        )
    )
    page = f"""# Results: a small-scale reproduction

Generated by `python scripts/reproduce.py` in {total / 60:.1f} minutes on {platform.machine()}
CPU ({torch.get_num_threads()} thread, torch {torch.__version__}); every number below comes from
that run. The paper (Xia, Davtyan, Favaro, NeurIPS 2025, arXiv:2506.04432) reports KOALA++
above Adam and SGD on CIFAR-10 (for example ResNet-50: 96.44% vs Adam 94.45% and SGD 95.71%)
and below AdamW in perplexity on Wikitext-2 (151.75 vs 173.98). This page asks whether that
ordering survives at a scale that runs in minutes on a laptop.

## Verdict

{lines}

{summary}

## 1. Learning-rate sensitivity (one call per optimizer)

{sweep_text}
## 2. Digits, MLP (64-128-10), {seeds} seeds, {mlp_epochs} epochs

All seeds of one optimizer train in one `torch.vmap`-ed step; lrs are the CLI defaults
(tuned in section 1). Weight decay 5e-4 (L2) for every optimizer.

{results_table(runs["mlp"])}

![digits MLP](img/digits_mlp.png)

## 3. Digits, small CNN (3x3 convs, 16 and 32 channels), {seeds} seeds, {cnn_epochs} epochs

Same learning rates as the MLP (no separate tuning for the CNN).

{results_table(runs["cnn"])}

![digits CNN](img/digits_cnn.png)

## 4. Ablation: symmetric vs asymmetric estimate of P

The symmetric least-squares estimate adds the $w_k H_{{k-1}}$ term (see [the math](math.md));
the asymmetric one drops it. Same seeds, so the difference is paired.

{ablation(runs)}

## 5. A tiny character-level language model, KOALA++ vs AdamW

{lm_text}
## Reproduce

```bash
pip install -e ".[examples]"
python scripts/reproduce.py          # rewrites this page and docs/img/*.png
```
"""
    (args.out / "results.md").write_text(page)
    print(f"wrote {args.out / 'results.md'} in {total:.0f} s")


if __name__ == "__main__":
    main()
