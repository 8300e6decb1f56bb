#!/usr/bin/env python3
"""Report a transfer study: ``python tools/report.py STUDY_DIR --out REPORT_DIR`` (see study/report.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from study.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
