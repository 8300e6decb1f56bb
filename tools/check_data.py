#!/usr/bin/env python
"""Validate a dataset tree: python tools/check_data.py {imagenet,voc,ade20k} ROOT [--full] [--jobs N]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from datakit.check_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
