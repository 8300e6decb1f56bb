#!/usr/bin/env python3
"""Run a whole transfer study (see study/cli.py): ``python tools/study.py STUDY.yaml --work-dir DIR [--dry-run]
[--executor local|slurm] [--status]``."""

import sys
from pathlib import Path

# The checkout instead of tools/ (run from a checkout without installing): this file is named like a module of the
# study package, and tools/ on the path would let it shadow that module.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
