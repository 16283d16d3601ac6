"""pytest-benchmark configuration: ``python -m pytest benchmarks/bench_step.py``.

Not part of the test run (``testpaths = ["tests"]``). For the side-by-side report with ratios,
bandwidth, compile time and state size, use ``python -m benchmarks.report`` instead.
"""

collect_ignore = ["bench_ensemble.py", "report.py", "harness.py", "sets.py", "authors_style.py"]


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
