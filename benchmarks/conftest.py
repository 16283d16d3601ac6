"""pytest-benchmark configuration: ``python -m pytest benchmarks/bench_step.py``.

Not part of the test run (``testpaths = ["tests"]``). For the side-by-side report with ratios,
memory, cold compile times and the targets, use ``python -m benchmarks.report`` instead.
"""

collect_ignore = [
    "bench_ensemble.py",
    "bench_passes.py",
    "report.py",
    "harness.py",
    "sets.py",
    "authors_style.py",
    "cold_compile.py",
    "gpu_check.py",
]


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
