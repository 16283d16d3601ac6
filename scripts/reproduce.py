#!/usr/bin/env python
"""The reproduction of the KOALA++ paper's claims under its protocol, at CPU scale; writes
docs/results.md and docs/img/*.png. The experiment code lives in koala_func/cli/reproduce.py.

    nice -n 19 python scripts/reproduce.py   # about 20 minutes on 2 CPU cores
    python scripts/reproduce.py --quick      # a smoke run into koala-func-reproduce-quick/
"""

from __future__ import annotations

import sys

from koala_func.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
