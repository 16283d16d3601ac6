"""The benchmark machinery runs end to end on tiny sets (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed
from benchmarks import cold_compile, harness, report, sharded  # noqa: E402


def test_report_runs_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setitem(harness.SETS, "tiny12", lambda: harness.SETS["tiny500"](12))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.README_BEGIN}\nold figures\n{report.README_END}\n")
    n = torch.get_num_threads()
    try:
        res = report.main(
            [
                "--reps", "2", "--sets", "tiny12", "ensemble", "--members", "3", "--full-plan",
                "--ensemble-reps", "2",
                "--compile-tensors", "3", "--compile-doors", "functional", "--no-passes",
                "--compile-samples", "2",
                "--fresh-pages-sets", "mlp", "--fresh-pages-methods", harness.ADAM,
                harness.KOALA_EAGER, "--sharded-reps", "0",
                "--threads", "1", "--out", str(tmp_path / "b.md"),
                "--json", str(tmp_path / "b.json"), "--img", str(tmp_path / "b.png"),
                "--readme", str(readme),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(n)

    rows = res["steps"]
    plan = report.FULL_PLAN + report.WD0_PLAN + report.ENSEMBLE_PLAN
    assert [(r["method"], r["mode"]) for r in rows] == plan
    # every public door is built and timed (a door that fails is reported with its error)
    for door in (harness.ADAM, harness.KOALA, harness.FUNC, harness.AUTHORS, harness.ENS):
        row = next(r for r in rows if r["method"] == door)
        assert row["error"] is None, row
        assert row["median_s"] > 0 and row["state_bytes"] > 0
    assert all(r["median_s"] > 0 for r in rows if r["error"] is None)

    text = (tmp_path / "b.md").read_text()
    for heading in ("## Targets (issue 10)", "## Step time", "## Cold compile", "## Method"):
        assert heading in text
    # the doors under each allocator setting, each in a fresh process
    configs = [(r["set"], r["config"]) for r in res["fresh_pages"]]
    assert configs == [("mlp", c) for c in ("default", "thp", "glibc")]
    for run in res["fresh_pages"]:
        assert "error" not in run, run
        assert [r["method"] for r in run["rows"]] == [harness.ADAM, harness.KOALA_EAGER]
        assert all(r["median_s"] > 0 for r in run["rows"])
    assert f"| mlp | {harness.KOALA_EAGER} | " in text
    for method, mode in plan:
        assert f"| {method} | {mode} |" in text
    assert "| target | measured | target | met | note |" in text
    assert (tmp_path / "b.png").stat().st_size > 1000

    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["targets"] == json.loads(json.dumps(res["targets"]))
    (comp,) = saved["compile"]
    assert comp["door"] == "functional" and comp["compile_s"] > 0
    # cold, over 20 steps: one graph, no recompile; the compiled frame writes its update into
    # its own input buffers, so the update op's kernel (a step inlined in a user's graph
    # compiles it) is not compiled at all
    assert comp["graphs"] == 1 and comp["op_graphs"] == 0, comp
    assert comp["recompile_reasons"] == [], comp["recompile_reasons"]
    # two rounds, each a fresh process; the row is their median and lists both
    assert comp["samples"] == 2 and len(comp["compile_s_samples"]) == 2
    assert min(comp["compile_s_samples"]) <= comp["compile_s"] <= max(comp["compile_s_samples"])
    each = ", ".join(f"{x:.1f}" for x in comp["compile_s_samples"])
    assert f"| {comp['compile_s']:.1f} | {each} | " in text
    # every target of the issue is listed; those this run measured say whether they are met
    assert len(saved["targets"]) == 8
    for t in saved["targets"]:
        assert (t["met"] is None) == (t["measured"] is None)
    # the figures the README quotes are the ones this run measured, when it measured them all
    para = report.readme_paragraph(res)
    if para is not None:
        assert para in readme.read_text()
        for figure in saved["readme_figures"].values():
            assert figure in para


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_sharded_benchmark_runs_on_two_ranks_and_agrees():
    """The sharded doors' benchmark (eager doors only: no compile in CI) on 2 gloo ranks, and
    its report section: collectives, times, and the parameters against the reference's."""
    run = sharded.measure(reps=2, compiled=False, timeout=300)
    assert "error" not in run, run
    rows = {r["door"]: r for r in run["rows"]}
    assert list(rows) == [d for d in sharded.DOORS if d not in sharded.COMPILED]
    assert rows[sharded.ADAM]["collectives"]["total"] == 0
    assert rows[sharded.REFERENCE]["collectives"]["total"] > 1  # DTensor, op by op
    for door in (sharded.KOALA_EAGER, sharded.SHARDED):
        assert rows[door]["collectives"] == {"total": 1, "ops": {"all_reduce": 1}}, door
        assert 0 <= rows[door]["max_diff"] < 1e-4, door  # float32, a few steps
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 2 for r in rows.values())
    text = "\n".join(report.sharded_section({"sharded": run}))
    assert "## Sharded parameters (FSDP2), 2 ranks" in text
    assert f"| {sharded.KOALA_EAGER} | 1 (1 all_reduce) | " in text
    assert f"| {sharded.ADAM} | 0 | " in text and "| 1.00 |" in text


def test_gpu_check_without_cuda_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


def test_gpu_check_dry_run_on_cpu_passes_every_check():
    """The GPU script, run on the CPU (``--device cpu --quick``): every parity check passes
    (not vacuously: bfloat16 is within its own reference's error of float64) and every door
    is timed, so a session that is lent a GPU gets a working script."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| parity:")]
    assert len(rows) == 12, proc.stdout  # 6 doors, float32 and bfloat16
    assert all("| pass (limit" in r for r in rows), rows
    times = [line for line in proc.stdout.splitlines() if line.startswith("| time:")]
    assert len(times) == 4 and all(r.rstrip(" |").endswith("x") for r in times), times


def test_cold_compile_rows_are_medians_and_their_ratio_is_taken_round_by_round():
    def sample(cold, graphs=1, reasons=()):
        times = dict.fromkeys(cold_compile.TIMES, cold)
        counts = {"graphs": graphs, "graphs_first_call": 1, "op_graphs": 1}
        return {"door": "functional", "tensors": 10, **times, **counts,
                "recompile_reasons": list(reasons)}  # fmt: skip

    lo = cold_compile.combine([sample(10.0), sample(20.0), sample(12.0)])
    assert lo["compile_s"] == 12.0 and lo["first_s"] == 12.0 and lo["samples"] == 3
    assert lo["compile_s_samples"] == [10.0, 20.0, 12.0]
    failed = {"door": "functional", "tensors": 160, "error": "exit 1: boom"}
    hi = cold_compile.combine([sample(13.0, 2, ["why"]), failed, sample(30.0)])
    assert hi["compile_s"] == 21.5 and hi["graphs"] == 2 and hi["recompile_reasons"] == ["why"]
    assert hi["compile_s_samples"] == [13.0, None, 30.0]
    assert hi["failed_samples"] == ["exit 1: boom"]
    # rounds 1 and 3 have both sizes: ratios 1.3 and 2.5; the ratio of the medians would be 1.79
    assert cold_compile.round_ratio(hi, lo) == pytest.approx(1.9)
    assert cold_compile.combine([failed]) == failed
    assert cold_compile.round_ratio(cold_compile.combine([failed]), lo) is None


def test_cold_compile_reports_a_failure_instead_of_raising():
    res = cold_compile.measure("functional", 3, timeout=0.01)
    assert res["door"] == "functional" and "error" in res


def test_pass_breakdown_times_the_engines_passes():
    """bench_passes times the engine's own passes beside the door and Adam, and the report
    renders every row with its ratio (timings are not checked)."""
    from benchmarks import bench_passes

    res = bench_passes.run(reps=2, shapes=[(8, 4), (4,)])
    assert list(res["ms"]) == list(bench_passes.TRAFFIC)
    assert all(ms > 0 for ms in res["ms"].values())
    assert res["x_adam"][bench_passes.ADAM] == 1.0
    lines = report.passes_section({"passes": res})
    for name in bench_passes.TRAFFIC:
        row = next(line for line in lines if line.startswith(f"| {name} |"))
        assert f"{res['x_adam'][name]:.2f} |" in row
    prose = lines[-2]  # the paragraph quotes the measured read-only floor and pass 2 sans h
    for name in (bench_passes.READS, bench_passes.PASS2_NO_H, bench_passes.STEP):
        assert f"{res['x_adam'][name]:.2f}x" in prose
    # the read-only sum is called the floor only when it is below the step
    for reads, floor in ((1.3, True), (2.3, False)):
        x = {**res["x_adam"], bench_passes.STEP: 1.6, bench_passes.READS: reads}
        prose = report.passes_section({"passes": {**res, "x_adam": x}})[-2]
        assert ("is the floor of the step" in prose) is floor, prose
        assert ("bounds nothing here" in prose) is not floor, prose
    assert report.passes_section({}) == []


def test_pass_reuse_times_pass_2_in_three_cache_states():
    """bench_passes.reuse times pass 2 after a flush, after pass 1 and warm, per buffer size,
    with ratios to the flushed time, and the report renders every cell of it."""
    from benchmarks import bench_passes

    rows = bench_passes.reuse(rows_list=(2, 4), reps=2, chunk=16)
    assert [r["floats"] for r in rows] == [32, 64]
    cases = (bench_passes.FLUSHED, bench_passes.AFTER_PASS1, bench_passes.WARM)
    for r in rows:
        assert all(r[k] > 0 for k in cases)
        assert r[f"x {bench_passes.FLUSHED}"] == 1.0
        assert abs(r[f"x {bench_passes.WARM}"] - r[bench_passes.WARM] / r[cases[0]]) < 1e-12
    lines = report.reuse_section(rows)
    table = [line for line in lines if line.startswith("| 0.00M |")]
    assert len(table) == len(rows)
    for r, row in zip(rows, table, strict=True):
        for k in cases:
            assert f"{r[k]:.3f} ({r['x ' + k]:.2f})" in row
    assert report.reuse_section(None) == []
    sp = bench_passes.split(rows=4, parts=(1, 2), reps=2, chunk=16)
    assert sp["floats"] == 64 and sp["x_one"][1] == 1.0 and all(v > 0 for v in sp["ms"].values())
    prose = " ".join(report.reuse_section(rows, sp))
    assert f"2 calls {sp['x_one'][2]:.2f}" in prose and f"({sp['ms'][1]:.2f} ms)" in prose


def test_ensemble_profile_splits_a_call_into_kernel_guards_and_the_rest():
    """profile_ensemble finds the compiled kernel and the guard check in the profile (a
    renamed profiler event would leave them at 0) and its parts add up to the wall time."""
    from benchmarks import profile_ensemble

    for guarded in (True, False):
        r = profile_ensemble.run(members=3, calls=3, guarded=guarded)
        assert r["call"] > 0
        assert 0 < r["kernel"] <= r["region"] < r["wall"]
        # by default the graph is called without Dynamo's guard check
        assert (r["guards"] > 0) is guarded
        assert abs(r["region"] + r["guards"] + r["outside"] - r["wall"]) < 1e-9


def test_ensemble_rotation_takes_the_in_place_call_apart():
    """profile_ensemble --rotation times the door's own compiled call next to the report's
    cases (the report's MLP member has 6 tensors, whose gradients the step reads where they
    are: no refill to time), and its ratios are per-round ratios to stacked Adam."""
    from benchmarks import harness, profile_ensemble

    r = profile_ensemble.rotation(members=3, rounds=2, turns=1)
    names = (harness.ENS, harness.ENS_INPLACE, harness.ENS_ADAM, harness.ENS_LOOP)
    for name in (*names, profile_ensemble.CALL):
        assert r[name] > 0 and r[f"x {name}"] > 0
    assert r[f"x {harness.ENS_ADAM}"] == 1.0


def test_ensemble_guards_times_every_door_against_adam():
    """ensemble_guards times each ensemble door with and without Dynamo's guard check next to
    Adam, and its ratios are its times over Adam's."""
    from benchmarks import ensemble_guards

    (r,) = ensemble_guards.run(members=3, rounds=1, calls=3)
    for name in ensemble_guards.CASES:
        assert r[name] > 0 and r[f"x {name}"] > 0
    assert r["x Adam"] == 1.0  # of the last rotation, whose Adam time is kept
    assert abs(r["x functional"] - r["functional"] / r["Adam"]) < 1e-12
