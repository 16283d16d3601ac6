"""``python -m koala_func`` and the ``koala-func`` console script (see :mod:`koala_func.cli`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse exits with 2 on bad options).

    Examples:
        >>> from koala_func.__main__ import main
        >>> main(["train", "--help"])  # doctest: +SKIP
    """
    from koala_func.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
