"""The command line: a tiny real run, the ensemble semantics, and clear errors for bad options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from koala_func.cli import load_data, main, train_members


def test_train_tiny_run_writes_table_metrics_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "--optimizers",
            "koala++,koala-v,adam",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert "| KOALA++ (symmetric) |" in captured.out
    assert "| KOALA-V |" in captured.out and "| Adam |" in captured.out
    assert "1/1 epochs" in captured.err  # the progress line
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"koala++", "koala-v", "adam"}
    for result in metrics["results"].values():
        acc = torch.tensor(result["test_acc"])
        assert acc.shape == (2, 1)
        assert bool((acc > 0.3).all())  # 10 classes: chance is 0.1, one epoch learns a lot
    assert (out / "results.md").read_text().startswith("| optimizer |")
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").stat().st_size > 1000


def test_members_of_one_vmapped_call_equal_separate_runs():
    data = load_data("synthetic")
    kwargs = dict(data=data, model="mlp", optimizer="koala++", epochs=1, batch_size=100)
    pair = train_members(seeds=[0, 1], **kwargs)
    alone = train_members(seeds=[1], **kwargs)
    torch.testing.assert_close(pair.train_loss[1], alone.train_loss[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair.test_acc[1], alone.test_acc[0])
    assert not torch.equal(pair.train_loss[0], pair.train_loss[1])  # seeds differ


def test_lr_sweep_in_one_call_uses_each_members_lr():
    data = load_data("synthetic")
    sweep = train_members(
        data=data, model="cnn", optimizer="sgd", seeds=[0, 0], lrs=[0.0, 0.05], epochs=1
    )
    # lr 0 never moves: its loss is the initial loss of seed 0; lr 0.05 learns
    assert sweep.train_loss[1, 0] < sweep.train_loss[0, 0]
    assert sweep.test_acc[0, 0] < 0.5 < sweep.test_acc[1, 0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "0"], "expected a positive integer, got 0"),
        (["train", "--seeds", "-3"], "expected a positive integer, got -3"),
        (["train", "--optimizers", "koala++,lion"], "unknown optimizer 'lion'"),
        (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["train", "--device", "not-a-device"], "invalid device 'not-a-device'"),
        ([], "required"),
    ],
)
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_an_error_from_the_shell():
    # the real entry point, as a user types it (python -m koala_func)
    proc = subprocess.run(
        [sys.executable, "-m", "koala_func", "train", "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "device 'cuda' is not available" in proc.stderr


def test_bench_prints_a_ratio_table(capsys):
    assert main(["bench", "--repeats", "2", "--no-compile"]) == 0
    out = capsys.readouterr().out
    # the in-package fallback or benchmarks.report.quick_table: both print ratios to Adam
    assert "ratio" in out.lower() and "adam" in out.lower()
