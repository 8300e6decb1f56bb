"""Every command in a ```bash block of README.md and docs/*.md runs as written, as far as a CPU without the real data
can show: the study's --dry-run and --status commands are run; for every other command, its script or make target
exists, every option it passes is one the tool accepts (its --help, or the shell wrapper's own option list), and
every config or study file it names exists. The README is a short page: at most 150 lines."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def commands() -> list[tuple[str, str]]:
    """(page, command) for each line of each bash block, continuation lines joined."""
    out = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            out += [(page.name, line.strip()) for line in block.replace("\\\n", " ").splitlines()
                    if shlex.split(line, comments=True)]
    return out


@functools.cache
def help_text(*entry: str) -> str:
    out = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, f"{' '.join(entry)} --help: {out.stderr[-2000:]}"
    return out.stdout


def accepted_options(argv: list[str]) -> tuple[str, set[str]] | None:
    """The entry point a command calls and the options it accepts; None for a make target (checked apart)."""
    if argv[0] == "make":
        return None
    if argv[0] == "python" and argv[1] == "-m":
        return argv[2], set(OPTION.findall(help_text("-m", argv[2])))
    if argv[0] == "python":
        assert (REPO / argv[1]).is_file(), f"{argv[1]}: no such script"
        return argv[1], set(OPTION.findall(help_text(argv[1])))
    script = REPO / argv[0]
    assert script.is_file() and os.access(script, os.X_OK), f"{argv[0]}: no such executable script"
    if argv[0] == "tools/train_cls.sh":  # passes everything to the trainer
        return argv[0], set(OPTION.findall(help_text("-m", "classification.train")))
    if argv[0] in ("tools/transfer_det.sh", "tools/transfer_seg.sh"):  # their options are transfer_stage.sh's case
        return argv[0], set(re.findall(r"^\s+(--[a-z-]+)\)", (REPO / "tools/transfer_stage.sh").read_text(), re.M))
    return argv[0], set()  # a script without options (tools/setup_env.sh)


COMMANDS = commands()


def test_the_readme_is_a_short_page_and_every_page_has_commands_or_a_purpose():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    for page in PAGES[1:]:
        assert re.search(r"^\*For: .+\*$", page.read_text(), re.M), f"{page.name}: no 'For:' line saying its task"
        assert f"docs/{page.name}" in (REPO / "README.md").read_text(), f"{page.name}: not in the README's map"
    assert len(COMMANDS) >= 25 and len(RUNNABLE) >= 4


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_names_real_files_and_options(page, command):
    argv = [t.strip("[]") for t in shlex.split(command, comments=True)]
    while ASSIGNMENT.match(argv[0]):  # GPUS=8, MMCV=full
        argv.pop(0)
    found = accepted_options(argv)
    if found is None:
        targets = re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M)
        assert argv[1] in targets, f"{page}: make {argv[1]}: no such target"
        return
    entry, options = found
    for token in argv[1:]:
        if OPTION.fullmatch(token):
            assert token in options, f"{page}: {entry} has no option {token}"
        if re.match(r"(configs|tools)/", token):
            assert (REPO / token).exists(), f"{page}: {token}: no such file"


RUNNABLE = [(p, c) for p, c in COMMANDS if "tools/study.py" in c and ("--dry-run" in c or "--status" in c)]


@pytest.mark.parametrize("page,command", RUNNABLE, ids=[f"{p}:{c[:60]}" for p, c in RUNNABLE])
def test_the_documented_dry_runs_and_status_commands_run(page, command, tmp_path):
    """Run from the repository root as written (python = this interpreter); they create nothing."""
    argv = shlex.split(command, comments=True)
    env = dict(os.environ)
    while ASSIGNMENT.match(argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    before = sorted(p.name for p in (REPO / "work_dirs").glob("*")) if (REPO / "work_dirs").exists() else []
    out = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert out.returncode == 0, f"{page}: {command}: {out.stderr[-2000:]}"
    assert out.stdout.strip()
    after = sorted(p.name for p in (REPO / "work_dirs").glob("*")) if (REPO / "work_dirs").exists() else []
    assert after == before
