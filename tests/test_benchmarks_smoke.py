"""The benchmark machinery runs end to end on a tiny set (timings are not checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import report


def test_report_machinery_runs(tmp_path, monkeypatch):
    from benchmarks import harness

    tiny = lambda: harness.SETS["tiny500"](12)  # noqa: E731
    monkeypatch.setitem(harness.SETS, "tiny12", tiny)
    n = torch.get_num_threads()
    try:
        res = report.main(
            [
                "--reps", "2", "--sets", "tiny12", "--compile-tensors", "3",
                "--threads", "1",
                "--out", str(tmp_path / "b.md"), "--img", str(tmp_path / "b.png"),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(n)
    text = (tmp_path / "b.md").read_text()
    for method in harness.METHODS:
        assert method in text
    assert (tmp_path / "b.png").stat().st_size > 1000
    rows = res["steps"]
    # two weight decays, the copy row each; the adopted-grads step only at weight_decay=0
    assert len(rows) == 2 * (len(harness.METHODS) + 1) - 1
    assert {r["weight_decay"] for r in rows if r["method"] == harness.ADOPT} == {0.0}
    assert all(r["median_s"] > 0 for r in rows)
    assert res["state"]["tiny12"]["Adam"] > 0 and res["compile"][3] > 0
