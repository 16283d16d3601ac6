"""An lr x q sweep of KOALA++ in one call per step, with a heat map of the final loss.

Every grid point is an ensemble member: the same initial MLP, the same minibatches, its own
(lr, q) in ``state.hyper`` (shape ``[E]``) and its own Kalman state. One compiled call steps all
of them. Writes ``sweep_lr_q.png`` (final training loss over the grid) and ``sweep_lr_q.json``.

    python docs/examples/sweep_lr_q.py                       # 8 x 6 grid, 200 steps
    python docs/examples/sweep_lr_q.py --n-lr 3 --n-q 2 --steps 10 --eager --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from ensemble_digits import ce, digits, mlp

from koala_func import koala_pp, params_of
from koala_func.ensemble import ensemble_init, ensemble_train_step


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-lr", type=int, default=8)
    ap.add_argument("--n-q", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eager", action="store_true", help="skip torch.compile (quick runs)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "koala_examples")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    (x_tr, y_tr), _ = digits()

    lrs = torch.logspace(-2, 1, args.n_lr)  # 0.01 .. 10
    qs = torch.logspace(-3, 1, args.n_q)  # 0.001 .. 10
    grid_lr, grid_q = torch.meshgrid(lrs, qs, indexing="ij")
    n = grid_lr.numel()

    module = mlp()
    params = params_of(module).expand(n).clone()  # one initial model, n copies
    opt = koala_pp()
    state = ensemble_init(opt, params, lr=grid_lr.flatten(), q=grid_q.flatten())
    train = ensemble_train_step(opt, module, ce, compile=not args.eager)

    for _ in range(args.steps):
        idx = torch.randint(len(y_tr), (args.batch,))  # the same minibatch for every member
        params, state, _ = train(params, state, x_tr[idx], y_tr[idx])

    def full_loss(p):
        out = torch.func.functional_call(module, p.flatten_keys(".").to_dict(), (x_tr,))
        return ce(out, y_tr).mean()

    final = torch.vmap(full_loss)(params).reshape(args.n_lr, args.n_q)
    final = torch.nan_to_num(final, nan=float("inf"))
    best = divmod(int(final.argmin()), args.n_q)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(
        final.log10().clamp(max=1).numpy(), origin="lower", aspect="auto", cmap="viridis"
    )
    ax.set_xticks(range(args.n_q), [f"{q:.3g}" for q in qs.tolist()], rotation=45)
    ax.set_yticks(range(args.n_lr), [f"{lr:.3g}" for lr in lrs.tolist()])
    ax.set_xlabel("q (process noise)")
    ax.set_ylabel("lr")
    ax.set_title(f"KOALA++ on digits: log10 final train loss ({args.steps} steps, 1 call/step)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "sweep_lr_q.png", dpi=100)
    plt.close(fig)

    result = {
        "lr": lrs.tolist(),
        "q": qs.tolist(),
        "final_loss": final.tolist(),
        "best": {"lr": lrs[best[0]].item(), "q": qs[best[1]].item(), "loss": final.min().item()},
        "steps": args.steps,
    }
    (args.out / "sweep_lr_q.json").write_text(json.dumps(result, indent=2))
    print(
        f"{n} runs in one call per step; best lr={result['best']['lr']:.3g} "
        f"q={result['best']['q']:.3g} final loss {result['best']['loss']:.4f}"
    )
    return result


if __name__ == "__main__":
    main()
