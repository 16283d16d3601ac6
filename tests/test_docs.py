"""The docs are part of the product: every public name is documented with an example, the
examples and the Python blocks of ``docs/*.md`` run, and the site builds in strict mode.

Conventions for ``docs/**/*.md``: every ```` ```python ```` block runs, page by page in one
namespace (like a notebook), in a fresh interpreter whose working directory is a temporary
folder. A block that cannot run here (it needs ``torchrun`` or CUDA) is preceded by the line
``<!-- no-run -->``. Other fences (``bash``, ``text``, untagged) are not run.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import koala_func

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_TIMEOUT = 600  # seconds for all blocks of one page; pages are small by design

PUBLIC_MODULES = sorted(
    [
        *(
            f"koala_func.{m.name}"
            for m in pkgutil.iter_modules(koala_func.__path__)
            if not m.name.startswith("_")
        ),
        # the engine's own modules: their examples are not found through the package
        "koala_func.engine.layout",
        "koala_func.engine.math",
        "koala_func.engine.passes",
    ]
)


def _public_names() -> list[tuple[str, str]]:
    """(module, name) for koala_func.__all__ and every public submodule's __all__."""
    names = [("koala_func", n) for n in koala_func.__all__]
    for mod_name in PUBLIC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # an optional dependency is missing: nothing public to check
            continue
        names += [(mod_name, n) for n in getattr(mod, "__all__", [])]
    return names


def _has_example(doc: str) -> bool:
    return ">>>" in doc  # a doctest, which test_module_docstring_and_doctests_run executes


def _public_methods(obj) -> list:
    own = vars(obj) if inspect.isclass(obj) else {}
    return [
        v
        for k, v in own.items()
        if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property))
    ]


@pytest.mark.parametrize(("module", "name"), _public_names(), ids=lambda x: str(x))
def test_public_name_has_docstring_with_math_or_explanation_and_example(module, name):
    obj = getattr(importlib.import_module(module), name)
    doc = inspect.getdoc(obj) or ""
    if not inspect.isclass(obj) and not callable(obj):  # constants: a module-level comment
        return
    assert len(doc.split()) >= 8, f"{module}.{name} has no real docstring"
    # an example in the docstring, or (for classes) in the docstring of one of its methods,
    # or (for classes built by a documented builder) in that builder's docstring
    docs = [doc] + [inspect.getdoc(m) or "" for m in _public_methods(obj)]
    assert any(_has_example(d) for d in docs), f"{module}.{name}: no example in its docstring"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_module_docstring_and_doctests_run(module):
    mod = importlib.import_module(module)
    assert len((mod.__doc__ or "").split()) >= 8, f"{module} has no module docstring"
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module, globs=vars(mod).copy()):
        if test.lineno is None or test.filename != mod.__file__:
            continue  # re-exported objects are tested in their own module
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {module}"


FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)


def python_blocks(text: str) -> list[str]:
    """The runnable ```python blocks of a page, in order (``<!-- no-run -->`` skips one)."""
    blocks = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        if not info or info[0] not in ("python", "py", "pycon"):
            continue
        before = text[: m.start()].rstrip().splitlines()
        if before and before[-1].strip() == "<!-- no-run -->":
            continue
        if "no-run" in info[1:]:
            continue
        blocks.append(textwrap.dedent(m.group("body")))
    return blocks


PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def test_block_extraction_follows_the_conventions():
    page = "\n".join(
        [
            "```python\nx = 1\n```",
            "<!-- no-run -->",
            "```python\nraise SystemExit(1)\n```",
            "```bash\nexit 1\n```",
            "```\nnot python\n```",
            "- item:\n\n    ```python\n    y = x + 1\n    ```",
        ]
    )
    assert python_blocks(page) == ["x = 1\n", "y = x + 1\n"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks((DOCS / p).read_text())])
def test_docs_page_python_blocks_run(page, tmp_path):
    blocks = python_blocks((DOCS / page).read_text())
    script = "\n\n".join(
        f"# --- block {i + 1} of {page}\n{block}" for i, block in enumerate(blocks)
    )
    path = tmp_path / "page.py"
    path.write_text(script)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT,
    )
    assert proc.returncode == 0, f"docs/{page} failed:\n{proc.stderr[-4000:]}"


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_files(value) if isinstance(value, list) else [value]
    return out


def test_every_nav_entry_exists_and_every_page_is_in_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_files(config["nav"])
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml nav lists missing pages: {missing}"
    assert sorted(nav) == PAGES, f"pages not in nav: {sorted(set(PAGES) - set(nav))}"


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (docs extra)")
def test_site_builds_in_strict_mode(tmp_path):
    proc = subprocess.run(
        ["mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
