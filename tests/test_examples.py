"""Run every example in docs/examples on a small budget (eager, tiny sizes, outputs to tmp)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module", autouse=True)
def examples_on_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def load(name: str):
    return importlib.import_module(name)


def test_ensemble_digits(tmp_path):
    res = load("ensemble_digits").main(
        ["--members", "4", "--steps", "30", "--batch", "32", "--eager", "--out", str(tmp_path)]
    )
    assert json.loads((tmp_path / "ensemble_digits.json").read_text()) == res
    assert len(res["member_accuracy"]) == 4
    assert len(set(res["member_accuracy"])) > 1 or res["member_weight_spread"] > 0
    assert res["member_weight_spread"] > 1e-3  # random init really differs per member
    assert min(res["member_accuracy"]) > 0.3  # chance is 0.1
    assert res["ensemble_accuracy"] > 0.3
    assert res["skipped"] == 0


def test_sweep_lr_q(tmp_path):
    res = load("sweep_lr_q").main(
        ["--n-lr", "3", "--n-q", "2", "--steps", "15", "--eager", "--out", str(tmp_path)]
    )
    png = (tmp_path / "sweep_lr_q.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["final_loss"]) == 3 and len(res["final_loss"][0]) == 2
    flat = [v for row in res["final_loss"] for v in row]
    assert all(math.isfinite(v) for v in flat)
    assert len(set(flat)) == len(flat)  # each grid point trained with its own (lr, q)
    assert res["best"]["loss"] < math.log(10)  # below the loss of a uniform guess


def test_maml_sine(tmp_path):
    small = "--meta-steps 8 --meta-batch 4 --inner-steps 2 --eval-tasks 16 --meta-lr 3e-3"
    res = load("maml_sine").main([*small.split(), "--out", str(tmp_path)])
    assert (tmp_path / "maml_sine.json").exists()
    # the meta-gradient reached the inner learning rate through the inner KOALA++ steps
    assert res["inner_lr_learned"] != pytest.approx(0.5, abs=1e-6)
    for key in ("eval_query_mse_meta_init", "eval_query_mse_random_init", "last_meta_losses"):
        assert math.isfinite(res[key]), key


def test_hypergradient(tmp_path):
    res = load("hypergradient").main(["--steps", "6", "--members", "3", "--out", str(tmp_path)])
    assert (tmp_path / "hypergradient.json").exists()
    assert len(res["hypergradient"]) == 3
    assert res["max_rel_error"] < 1e-6
    assert all(g != 0 for g in res["hypergradient"])
