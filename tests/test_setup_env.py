"""tools/setup_env.sh's stamp: when a second set-up may return at once, and when it must install again.

The script runs for real in a copy of its inputs, with stand-ins for what it would install with: a `uv` that records
its commands, a venv python that answers `mmstack/compat.py mmcv-ops` with a chosen target (what torch would say
on a node with or without a GPU), and a wheel cache holding an (empty) compiled mmcv per target, so nothing is
downloaded or built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INPUTS = ["tools/setup_env.sh", "requirements/constraints.txt", "setup.py", "mmstack/compat.py",
          "mmstack/mmcv_ops.py"]


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


# Ops targets as mmstack/compat.py mmcv-ops names them: a login node, an H100 node, an A100 node.
CPU, H100, A100 = "cpu-cp312", "cu13.0-sm90-cp312", "cu13.0-sm80-cp312"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "repo"
    for name in INPUTS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    uv_home = tmp_path / "uv"
    (uv_home / "bin").mkdir(parents=True)
    (uv_home / "bin" / "python").symlink_to(sys.executable)  # runs `pip config list` for the package sources
    # The venv's python: the ops target from FAKE_OPS, its version from FAKE_VENV_PYTHON (else this Python's),
    # everything else a success. `uv venv DIR` makes one.
    venv_python = tmp_path / "venv_python"
    _executable(venv_python, '#!/bin/sh\nif [ "$1 $2" = "mmstack/compat.py mmcv-ops" ]; then echo "$FAKE_OPS"; fi\n'
                'if [ "$1" = -c ]; then\n'
                f'    [ -n "$FAKE_VENV_PYTHON" ] && echo "$FAKE_VENV_PYTHON" || exec {sys.executable} "$@"\nfi\n')
    _executable(uv_home / "bin" / "uv", f'#!/bin/sh\necho "$*" >> {tmp_path}/uv.log\n'
                'if [ "$1" = venv ]; then\n    eval last=\\${$#}; mkdir -p "$last/bin"\n'
                f'    cp {venv_python} "$last/bin/python"\nfi\n')
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(venv_python, root / ".venv" / "bin" / "python")
    pins = dict(line.split("==") for line in (REPO / INPUTS[1]).read_text().splitlines() if "==" in line)
    for ops in (CPU, H100, A100):
        wheels = tmp_path / "wheels" / f"torch-{pins['torch']}-{ops}"
        wheels.mkdir(parents=True)
        (wheels / f"mmcv-{pins['mmcv']}-cp312-cp312-linux_x86_64.whl").touch()
    env = {**{k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "MMCV")},
           "UV_HOME": str(uv_home), "WHEEL_CACHE": str(tmp_path / "wheels"), "SETUP_LOG": str(tmp_path / "setup.log"),
           "PYTHON": sys.executable}

    def setup(expect: int = 0, **extra) -> list[str] | subprocess.CompletedProcess:
        """Runs the set-up; returns the uv commands it ran (or, expecting a failure, the finished process)."""
        log = tmp_path / "uv.log"
        log.unlink(missing_ok=True)
        run = subprocess.run(["bash", str(root / "tools/setup_env.sh")], capture_output=True, text=True,
                             env={**env, **extra}, timeout=120)
        assert run.returncode == expect, run.stdout[-2000:] + run.stderr[-2000:]
        if expect:
            return run
        return log.read_text().splitlines() if log.exists() else []

    return setup


def test_an_unchanged_set_up_returns_at_once_and_a_changed_one_installs_again(tree):
    assert any(" install " in c for c in tree())
    assert tree() == []
    assert any("mmcv==" in c for c in tree(MMCV="full", FAKE_OPS=CPU))  # another mmcv build: installed


def test_a_compiled_mmcv_set_up_on_a_node_without_a_gpu_is_redone_on_a_gpu_node(tree):
    """MMCV=full in a venv that a login node (no GPU: CPU-only ops) and the GPU nodes share: the GPU node's set-up
    installs the wheel with CUDA ops, and the login node's puts its own back; each returns at once on a second run."""
    login = tree(MMCV="full", FAKE_OPS=CPU)
    assert any(f"-{CPU}" in c and "mmcv==" in c for c in login), login
    assert tree(MMCV="full", FAKE_OPS=CPU) == []
    gpu = tree(MMCV="full", FAKE_OPS=H100)
    assert any(f"-{H100}" in c and "mmcv==" in c for c in gpu), gpu
    assert tree(MMCV="full", FAKE_OPS=H100) == []
    assert any(f"-{CPU}" in c and "mmcv==" in c for c in tree(MMCV="full", FAKE_OPS=CPU))
    # An A100 partition sharing the home folder: its own wheel (sm_80 kernels), not the H100 node's (sm_90 only).
    assert any(f"-{A100}" in c and "mmcv==" in c for c in tree(MMCV="full", FAKE_OPS=A100))


def test_a_python_older_than_the_pins_need_is_refused_and_a_venv_of_another_python_is_made_again(tree, tmp_path):
    """The pins (numpy 2.4, scipy 1.17) need Python 3.11: an older PYTHON is refused in one line before anything is
    made; a .venv left by a set-up with another Python (a failed first try) is made again, not installed into."""
    old = tmp_path / "python3.10"
    _executable(old, "#!/bin/sh\necho 3.10\n")
    run = tree(expect=2, PYTHON=str(old))
    assert run.stderr.strip().splitlines() == [
        f"error: PYTHON={old} is Python 3.10; the pinned stack needs 3.11 or later: set PYTHON=python3.11 (or newer) "
        "and rerun"]
    made = tree(FAKE_VENV_PYTHON="3.10")  # the venv answers 3.10, this PYTHON is this Python (3.11 or later)
    assert any(c.startswith("venv ") for c in made), made
    again = tree(MMCV="full", FAKE_OPS=CPU)  # another set-up, the venv of this Python's version: kept
    assert any(" install " in c for c in again) and not any(c.startswith("venv ") for c in again), again
