"""The README stays true: its code runs, CI runs its test command, and every benchmark figure it
quotes is the generated report's (docs/benchmarks.json, written by ``python -m benchmarks.report``).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REPORT = ROOT / "docs" / "benchmarks.json"
BEGIN = "<!-- benchmark figures: written by python -m benchmarks.report -->"
END = "<!-- end of benchmark figures -->"
# a ratio (1.85x), a time (14 s, 7.4 ms) or the report's duration (10 minutes)
FIGURE = re.compile(r"(?<![\w.=])\d+(?:\.\d+)?(?:x|\s(?:s|ms|minutes))(?!\w)")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _figures_paragraph() -> tuple[str, str]:
    """(the generated paragraph, the README without it)."""
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), README, flags=re.S)
    assert m, f"README.md must hold its benchmark figures between {BEGIN!r} and {END!r}"
    return m.group(1), README[: m.start()] + README[m.end() :]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = [b.strip() for b in _blocks("bash")]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "python -m koala_func train" in main_job
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be a line of .ci/run"


def test_readme_python_runs():
    namespace: dict = {}  # blocks run in order, like the docs pages
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_figures_are_the_generated_reports():
    paragraph, rest = _figures_paragraph()
    report = json.loads(REPORT.read_text())
    quoted = [" ".join(f.split()) for f in FIGURE.findall(paragraph)]  # a figure may wrap
    assert quoted, "the figures paragraph quotes no figure"
    # every figure quoted is one of the report's, and each of the report's is quoted once
    assert Counter(quoted) == Counter(report["readme_figures"].values()), (
        quoted,
        report["readme_figures"],
    )
    # ... in its place: the paragraph is the report's template filled with the JSON's figures
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed
    from benchmarks.report import readme_paragraph

    assert paragraph == readme_paragraph(report), "regenerate with python -m benchmarks.report"
    # and the README quotes no benchmark figure anywhere else
    assert FIGURE.findall(rest) == [], "benchmark figures belong in the generated paragraph"
