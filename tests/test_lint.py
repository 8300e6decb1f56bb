"""The code passes ruff with the project's settings (pyproject.toml): one style, checked like behaviour."""

import subprocess
import sys
from pathlib import Path


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
