"""The README stays true: its code runs, and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


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
    # the packed loop trained the model whose tensors are views of the packed buffer
    assert int(namespace["pstate"].step) == 5
    assert namespace["popt"].unpack(namespace["flat"])["0"]["weight"].data_ptr() == (
        dict(namespace["model"].named_parameters())["0.weight"].data_ptr()
    )
