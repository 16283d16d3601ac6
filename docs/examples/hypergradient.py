"""The hypergradient d(validation loss)/d(lr) through a KOALA++ training run, checked by finite
differences, for a whole sweep of learning rates in one call.

A small MLP is trained for a few steps on a synthetic regression problem with
``koala_pp(differentiable=True)``; the learning rate lives in ``state.hyper.lr`` as a tensor
that requires grad, so autograd differentiates the validation loss after training with respect
to it (through every step: parameters, Kalman state v, h_prev, s and the online R). With
``E`` learning rates as an ensemble, one backward gives all ``E`` hypergradients. Each is
compared with the central difference ``(f(lr + h) - f(lr - h)) / 2h`` in float64.
Writes ``hypergradient.json``.

    python docs/examples/hypergradient.py
    python docs/examples/hypergradient.py --steps 5 --members 3 --out /tmp/hyper   # quick run
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from koala_func import koala_pp, params_of, per_sample_loss, value_and_grad
from koala_func.ensemble import ensemble_init, ensemble_step

DT = torch.float64


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(-1) - y).square()


def make_problem(n: int = 256, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, generator=g, dtype=DT)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, generator=g, dtype=DT)
    return (x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--members", type=int, default=8, help="learning rates, one call")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rel-h", type=float, default=1e-6, help="finite-difference step / lr")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "koala_examples")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    (x_tr, y_tr), (x_va, y_va) = make_problem()
    module = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).to(DT)
    init = params_of(module)
    batches = torch.randint(
        len(y_tr), (args.steps, args.batch), generator=torch.Generator().manual_seed(1)
    )

    opt = koala_pp(sigma=0.1, q=0.1, differentiable=True)
    step = ensemble_step(opt, compile=False)
    grad_fn = torch.vmap(value_and_grad(module, mse), in_dims=(0, None, None))
    val_fn = torch.vmap(per_sample_loss(module, mse), in_dims=(0, None, None))

    def val_loss_after_training(lrs: torch.Tensor) -> torch.Tensor:
        """``[E]`` validation losses after training with the ``E`` learning rates ``lrs``."""
        params = init.expand(len(lrs)).clone()
        state = ensemble_init(opt, params, lr=lrs)
        for idx in batches:  # the same minibatches for every member and every evaluation
            grads, losses = grad_fn(params, x_tr[idx], y_tr[idx])
            params, state = step(params, grads, losses, state)
        return val_fn(params, x_va, y_va).mean(-1)

    lrs = torch.logspace(-2, 0.5, args.members, dtype=DT).requires_grad_()
    val = val_loss_after_training(lrs)
    # members are independent, so the gradient of the sum is every member's hypergradient
    (hypergrad,) = torch.autograd.grad(val.sum(), lrs)

    with torch.no_grad():
        h = args.rel_h * lrs
        fd = (val_loss_after_training(lrs + h) - val_loss_after_training(lrs - h)) / (2 * h)
    rel_err = (hypergrad - fd).abs() / fd.abs().clamp_min(1e-12)

    result = {
        "lr": lrs.tolist(),
        "val_loss": val.tolist(),
        "hypergradient": hypergrad.tolist(),
        "finite_difference": fd.tolist(),
        "max_rel_error": rel_err.max().item(),
        "steps": args.steps,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hypergradient.json").write_text(json.dumps(result, indent=2))
    print(f"{'lr':>8} {'val loss':>10} {'autograd':>14} {'finite diff':>14} {'rel err':>9}")
    for row in zip(
        lrs.tolist(), val.tolist(), hypergrad.tolist(), fd.tolist(), rel_err.tolist(), strict=True
    ):
        print("{:8.4f} {:10.5f} {:14.6e} {:14.6e} {:9.2e}".format(*row))
    return result


if __name__ == "__main__":
    main()
