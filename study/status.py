"""WORK_DIR/study_status.json: each stage's last answer, one entry per (arm, seed, stage): ``running`` (with host,
pid and Slurm job) before it starts, then ``done``, ``stopped by max_steps`` (the trainer stopped where it was told,
without a summary), ``interrupted`` (exit 75: it saved a resumable checkpoint), ``failed`` (with its error line) or
``blocked`` (an upstream stage is not done). Jobs on several nodes update it under a lock. A ``running`` entry
whose process is gone (a study killed by SIGKILL) reads back as ``not finished``.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from classification.artifacts import atomic_write_json
from study.spec import STAGES

STATUS_FILE = "study_status.json"
DONE, RUNNING, NOT_FINISHED = "done", "running", "not finished"
MAX_STEPS, INTERRUPTED, FAILED, BLOCKED = "stopped by max_steps", "interrupted", "failed", "blocked"


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def record(work_dir: Path, key: tuple[str, int, str], status: str, **fields: Any) -> None:
    """Update the entry of ``key`` = (arm, seed, stage); ``running`` also names this process and the time."""
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if status == RUNNING:
        fields.update(host=socket.gethostname(), pid=os.getpid(), job=os.environ.get("SLURM_JOB_ID"), started=now,
                      finished=None, seconds=None, error=None)
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / f".{STATUS_FILE}.lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # POSIX locks, which NFS honours across nodes
        entries = _load(work_dir / STATUS_FILE)
        old = next((e for e in entries if (e.get("arm"), e.get("seed"), e.get("stage")) == key), {})
        new = {**old, "arm": key[0], "seed": key[1], "stage": key[2], "status": status,
               **({} if status == RUNNING else {"finished": now}), **fields}
        atomic_write_json(work_dir / STATUS_FILE, [e for e in entries if e is not old] + [new])


def _gone(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError):
        pass
    return False


def read(work_dir: Path) -> list[dict[str, Any]]:
    """The entries by arm, seed and stage; ``running`` with its process gone from this host reads ``not finished``
    (on another host it shows its host and job: this process cannot see it)."""
    entries = _load(work_dir / STATUS_FILE)
    for e in entries:
        if e.get("status") == RUNNING and e.get("host") == socket.gethostname() and _gone(e.get("pid")):
            e.update(status=NOT_FINISHED, error=f"its study process (pid {e.get('pid')}) is gone; rerun to resume")
    return sorted(entries, key=lambda e: (str(e.get("arm")), str(e.get("seed")), STAGES.index(e.get("stage"))))


def table(entries: list[dict[str, Any]]) -> str:
    rows = [("arm", "seed", "stage", "status", "time", "where", "error")] + [(
        str(e.get("arm")), str(e.get("seed")), str(e.get("stage")), str(e.get("status")),
        "" if e.get("seconds") is None else f"{e['seconds']:.0f}s",
        (f"{e.get('host')} pid {e.get('pid')}" if e.get("status") in (RUNNING, NOT_FINISHED) else "")
        + (f" Slurm job {e['job']}" if e.get("job") else ""), (e.get("error") or "").split("\n")[0][:100])
        for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[6]).rstrip() for r in rows)
