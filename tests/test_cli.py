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


# --------------------------------------------------------------------------- koala-func sweep


def _strict_json(path):
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def test_sweep_runs_one_ensemble_and_reports_the_best_point(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "synthetic", "--lr", "0.1,0.5,2", "--q", "0.05,0.3"]
    code = main([*argv, "--seeds", "2", "--epochs", "1", "--out", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "3 grid points x 2 seeds" not in captured.err  # q is an axis too: 6 points
    assert "6 grid points x 2 seeds = 12 members in one vmapped call" in captured.err
    assert "1/1 epochs" in captured.err  # the progress bar
    report = _strict_json(out / "sweep.json")
    rows = report["rows"]
    assert [(r["lr"], r["q"]) for r in rows] == [
        (lr, q) for lr in (0.1, 0.5, 2.0) for q in (0.05, 0.3)
    ]
    assert all(r["seeds"] == [0, 1] and len(r["val_acc_per_seed"]) == 2 for r in rows)
    # every grid point trained with its own (lr, q): no two share a validation loss
    losses = [r["val_loss_mean"] for r in rows]
    assert None not in losses and len(set(losses)) == len(losses)
    # exactly one best point, the highest mean accuracy (ties: the lower loss) ...
    best = [r for r in rows if r["best"]]
    assert len(best) == 1
    top = max(rows, key=lambda r: (r["val_acc_mean"], -r["val_loss_mean"]))
    assert best[0] is not None and (best[0]["lr"], best[0]["q"]) == (top["lr"], top["q"])
    # ... which the JSON's summary, the printed table and the last line all name
    assert (report["best"]["lr"], report["best"]["q"]) == (top["lr"], top["q"])
    assert report["best"]["sigma"] == 0.1  # not swept: the released value
    marked = [line for line in captured.out.splitlines() if "<- best" in line]
    assert len(marked) == 1 and marked[0].startswith(f"| {top['lr']:g} | {top['q']:g} |")
    assert f"best: lr {top['lr']:g}, q {top['q']:g}, sigma 0.1" in captured.out
    png = (out / "sweep.png").read_bytes() if (out / "sweep.png").exists() else None
    pytest.importorskip("matplotlib")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_member_equals_the_same_member_trained_alone():
    # per-member hyperparameters really reach each member's filter (ensemble_init)
    from koala_func import koala_pp
    from koala_func.cli.data import split_validation
    from koala_func.cli.grid import Member, train_grid

    data = split_validation(load_data("synthetic"))
    kw = dict(data=data, model="mlp", optimizer=koala_pp(), epochs=1, batch_size=100)
    pair = train_grid(members=[Member(0, 0.5, q=0.05, sigma=0.2), Member(1, 2.0, q=0.3)], **kw)
    alone = train_grid(members=[Member(1, 2.0, q=0.3)], **kw)
    torch.testing.assert_close(pair.val_loss[1], alone.val_loss[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair.train_loss[1], alone.train_loss[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(pair.val_loss[0], pair.val_loss[1])


def test_schedules_scale_each_members_lr_per_epoch():
    from koala_func.baselines import sgd
    from koala_func.cli.grid import Member, lr_factor, train_grid

    assert [lr_factor("step", e, 10) for e in (0, 2, 3, 6, 9)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.01, 0.001]
    )
    assert lr_factor("cosine", 0, 4) == 1.0 and lr_factor("cosine", 2, 4) == pytest.approx(0.5)
    data = load_data("synthetic")
    kw = dict(data=data, model="mlp", optimizer=sgd(lr=0.1), members=[Member(0, 0.3)], epochs=3)
    const = train_grid(schedule="constant", **kw)
    step = train_grid(schedule="step", **kw)
    # epoch 1 (lr x1) is shared; then the step schedule cuts the lr and the runs part
    torch.testing.assert_close(const.train_loss[:, 0], step.train_loss[:, 0])
    assert not torch.allclose(const.train_loss[:, 2], step.train_loss[:, 2])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], "lr must be > 0, got -1.0"),
        (["--lr", "0.1,abc"], "lr value 'abc' is not a number"),
        (["--lr", ""], "the lr grid is empty"),
        (["--lr", "0.1,,1"], "empty entry in the lr grid"),
        (["--lr", "inf"], "lr value 'inf' is not a finite number"),
        (["--lr", "1,1.0"], "lr value 1 appears twice"),
        (["--sigma", "0"], "sigma must be > 0, got 0.0"),
        (["--sigma", "-0.1"], "sigma must be > 0"),
        (["--q", "-1"], "q must be >= 0, got -1.0"),
        (["--q", "nan"], "q value 'nan' is not a finite number"),
        (["--seeds", "0"], "expected a positive integer, got 0"),
        (["--optimizer", "adam", "--q", "0.1"], "--q and --sigma apply to koala++"),
        (["--lr", ",".join(str(0.01 * (i + 1)) for i in range(600))], "more than 1024"),
    ],
)
def test_sweep_rejects_bad_grids_with_one_line_and_exit_code_2(argv, message, capsys):
    try:
        code = main(["sweep", "--dataset", "synthetic", "--epochs", "1", *argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("koala-func sweep: error:")


def test_sweep_bad_grid_from_the_shell_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "koala_func", "sweep", "--lr", "0.1,-2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "koala-func sweep: error: argument --lr: lr must be > 0, got -2.0"
    )


# --------------------------------------------------------------------------- the reproduction


def test_reproduction_verdicts_follow_the_paired_differences():
    from koala_func.cli.reproduce import compare

    better = torch.tensor([0.95, 0.96, 0.97])
    worse = torch.tensor([0.90, 0.90, 0.92])
    assert compare("t", "K", better, "A", worse, higher_is_better=True).verdict == "holds"
    assert compare("t", "K", worse, "A", better, higher_is_better=True).verdict == ("does not hold")
    noisy = compare(
        "t",
        "K",
        torch.tensor([0.9, 0.7, 0.8]),
        "A",
        torch.tensor([0.8, 0.8, 0.8]),
        higher_is_better=True,
    )
    assert noisy.verdict == "not resolved" and noisy.diff == pytest.approx(0.0, abs=1e-6)
    # losses: lower is better, and the sign of the difference follows
    lm = compare(
        "lm", "K", torch.tensor([2.0, 2.1]), "A", torch.tensor([2.5, 2.7]), higher_is_better=False
    )
    assert lm.verdict == "holds" and lm.diff == pytest.approx(0.55, rel=1e-5)
    assert lm.diff_se == pytest.approx(0.05, rel=1e-5)  # paired: std of (0.5, 0.6) / sqrt(2)


def test_tuning_chooses_on_validation_and_reports_test_at_that_lr():
    from koala_func.baselines import sgd
    from koala_func.cli.data import split_validation
    from koala_func.cli.reproduce import tune

    full = load_data("synthetic")
    t = tune(
        key="sgd",
        label="SGD",
        data=split_validation(full),
        test=(full.x_test, full.y_test),
        model="mlp",
        optimizer=sgd(lr=0.1),
        grid=(0.0, 0.1),
        seeds=2,
        epochs=1,
        schedule="constant",
        higher_is_better=True,
    )
    assert t.best_lr == 0.1  # lr 0 never learns
    assert t.run.test_acc is not None
    torch.testing.assert_close(t.test, t.run.test_acc[[1, 3]])  # seed-major, lr-minor


def test_training_step_times_cover_both_doors():
    from koala_func.cli.bench import micro_benchmark, train_step_times

    times = train_step_times(
        lambda: torch.nn.Linear(4, 3),
        (torch.randn(8, 4), torch.randint(3, (8,))),
        koala_kwargs={"lr": 0.1},
        adamw_kwargs={"lr": 1e-3},
        members=2,
        repeats=2,
        compile=False,
    )
    assert set(times) == {
        "single: KoalaPP",
        "single: torch.optim.AdamW(fused=True)",
        "ensemble: KOALA++",
        "ensemble: functional AdamW",
    }
    assert all(t > 0 for t in times.values())
    table = micro_benchmark(repeats=2, compile=False)
    assert "| KoalaPP.step (torch.optim door) |" in table and "ratio to" in table
