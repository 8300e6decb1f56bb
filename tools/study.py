#!/usr/bin/env python3
"""Run a whole transfer study in one command (see study/runner.py)::

    python tools/study.py configs/studies/demo.yaml --work-dir work_dirs/demo [--dry-run] [--only cls|export|det|seg]
        [--arms a,b] [--no-report]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from study.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
