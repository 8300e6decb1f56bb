#!/usr/bin/env python3
"""Run a whole transfer study (see study/cli.py): ``python tools/study.py STUDY.yaml --work-dir DIR [--dry-run]
[--executor local|slurm] [--status]``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from study.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
