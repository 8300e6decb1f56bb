#!/usr/bin/env python
"""Generate the embedded datasets: python tools/make_data.py --out DIR [--seed 0] [--scale tiny|small|medium]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from datakit.make import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
