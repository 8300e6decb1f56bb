#!/usr/bin/env python3
"""Report a transfer study: ``python tools/report.py STUDY_DIR --out REPORT_DIR`` (see study/report.py)."""

import sys
from pathlib import Path

# The checkout instead of tools/ (run from a checkout without installing): this file is named like a module of the
# study package, and tools/ on the path would let it shadow that module.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from lifecycle.errors import cli  # noqa: E402
from study.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main)())  # one line per failure; --debug or BOT_DEBUG=1 shows the traceback
