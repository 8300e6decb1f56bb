"""Running planned steps in order, each its stage's command in a subprocess (the local executor, and each Slurm job
on its allocation), and WORK_DIR/study_status.json: each stage's last answer, ``running`` (host, pid, Slurm job)
before it starts, then ``done``, ``stopped by max_steps`` (where told, without a summary), ``interrupted`` (exit 75,
after saving a resumable checkpoint), ``failed`` (its error line) or ``blocked`` (an upstream stage is not done; the
other arms go on). A ``running`` entry whose process is gone (SIGKILL) reads back as ``not finished``. SIGTERM and
SIGUSR1 are passed on to the running stage (Ctrl-C reaches it from the terminal); the study then stops with 75.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from classification.artifacts import atomic_write_json
from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS
from study.plan import REPO, Step, command
from study.spec import STAGES

_ERROR_LINE = re.compile(r"^(error:|\w+(\.\w+)*(Error|Exception)\b)")
STATUS_FILE = "study_status.json"
DONE, RUNNING, NOT_FINISHED = "done", "running", "not finished"
MAX_STEPS, INTERRUPTED, FAILED, BLOCKED = "stopped by max_steps", "interrupted", "failed", "blocked"


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return [e for e in json.loads(path.read_text()) if isinstance(e, dict)]
    except (OSError, ValueError, TypeError):  # absent, not JSON, not a list
        return []


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


def read_status(work_dir: Path) -> list[dict[str, Any]]:
    """The entries by arm, seed and stage; ``running`` with its process gone from this host reads ``not finished``
    (on another host it shows its host and job: this process cannot see it)."""
    entries = _load(work_dir / STATUS_FILE)
    for e in entries:
        if e.get("status") == RUNNING and e.get("host") == socket.gethostname() and not Path(
                f"/proc/{e.get('pid')}").exists():  # Linux: the process is gone
            e.update(status=NOT_FINISHED, error=f"its study process (pid {e.get('pid')}) is gone; rerun to resume")
    return sorted(entries, key=lambda e: (str(e.get("arm")), str(e.get("seed")), STAGES.index(e.get("stage"))))


def status_table(entries: list[dict[str, Any]]) -> str:
    rows = [("arm", "seed", "stage", "status", "time", "where", "error")] + [(
        str(e.get("arm")), str(e.get("seed")), str(e.get("stage")), str(e.get("status")),
        "" if e.get("seconds") is None else f"{e['seconds']:.0f}s",
        (f"{e.get('host')} pid {e.get('pid')}" if e.get("status") in (RUNNING, NOT_FINISHED) else "")
        + (f" Slurm job {e['job']}" if e.get("job") else ""), (e.get("error") or "").split("\n")[0][:100])
        for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[6]).rstrip() for r in rows)


class _Running:  # the stage running now, for the signal handlers (ours, or submitit's checkpoint in a Slurm job)
    proc = step = work_dir = signum = None  # its Popen, Step and work dir; the signal that stops the study


def echo(text: str) -> None:
    print(f"[study] {text}", flush=True)


def _pass_on(signum, frame) -> None:
    _Running.signum = signum
    if _Running.proc is not None and _Running.proc.poll() is None and signum != signal.SIGINT:
        _Running.proc.send_signal(signum)  # Ctrl-C: the terminal sent SIGINT to the stage's process group already


@contextmanager
def passing_signals_on():
    old = {sig: signal.signal(sig, _pass_on) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _Running.signum = None


def stop_running_stage(signum: int, wait_s: float) -> None:
    """Ask the running stage to save (the stop contract), wait for it, and record the answer."""
    if (proc := _Running.proc) is not None and (step := _Running.step) is not None:
        _pass_on(signum, None)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        state, error = outcome(step, rc, f"preempted; no checkpoint (exit {rc})")
        record(_Running.work_dir, step.key, state, error=error)


def run_stage(step: Step, argv: list[str], work_dir: Path) -> tuple[int, str]:
    """Run one stage; its stdout passes through, its stderr too, the last error line kept."""
    paths = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": paths}  # torchrun's signals: lifecycle.torchrun
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env)
    _Running.proc, _Running.step, _Running.work_dir = proc, step, work_dir
    decoder, tail = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        while chunk := os.read(proc.stderr.fileno(), 65536):
            sys.stderr.write(text := decoder.decode(chunk))
            sys.stderr.flush()
            tail = (tail + text)[-8192:]
        lines = [ln.strip()[:300] for ln in re.sub(r"\x1b\[[0-9;]*m", "", tail).replace("\r", "\n").splitlines()]
        errors = [ln for ln in lines if _ERROR_LINE.match(ln)] or [ln for ln in lines if ln] or [""]
        return proc.wait(), errors[-1]
    finally:
        _Running.proc = _Running.step = None
        proc.stderr.close()


def outcome(step: Step, rc: int | None, error: str) -> tuple[str, str | None]:
    if rc == 0 and step.output.exists():
        return DONE, None
    if rc == 0 and step.stage == "classification":  # the trainer stops at max_steps as asked, without a summary
        return MAX_STEPS, "no summary.json: rerun without max_steps to finish the run"
    if rc == EXIT_INTERRUPTED:
        return INTERRUPTED, "saved a resumable checkpoint (exit 75); rerun to continue"
    return FAILED, f"exited 0 but wrote no {step.output}" if rc == 0 else error or f"exit code {rc}"


def run_steps(steps: list[Step], work_dir: Path, gpus: int, nodes: int = 1, rank: int = 0,
              master: str = "localhost", job_id: str = "0") -> int:
    """Run ``steps`` in order: 0 when all are done (or stopped at max_steps), EXIT_INTERRUPTED on a signal, else 1.
    On several nodes each runs the training stages in one torchrun rendezvous; the first runs the rest and records."""
    not_done: dict[tuple, str] = {}
    note = record if rank == 0 else lambda *args, **kwargs: None
    for step in steps:
        if _Running.signum is not None:
            return EXIT_INTERRUPTED
        missing = [p for p in step.inputs if not p.exists()] if rank == 0 else []
        why = next((f"{d[2]} of {d[0]} seed{d[1]}: {not_done[d]}" for d in step.needs if d in not_done), None) or (
            f"needs {missing[0]}; run the stage that writes it first" if missing else None)
        if why is not None or (rank > 0 and not step.distributed):
            if why is not None:
                not_done[step.key] = BLOCKED
                note(work_dir, step.key, BLOCKED, error=why)
                echo(f"{step.label}: blocked: {why}")
            continue
        argv = command(step, gpus, nodes, master, job_id)
        note(work_dir, step.key, RUNNING, command=shlex.join(argv))
        echo(f"{step.label}: {shlex.join(argv)}")
        t0 = time.perf_counter()
        state, error = outcome(step, *run_stage(step, argv, work_dir))
        seconds = round(time.perf_counter() - t0, 1)
        note(work_dir, step.key, state, seconds=seconds, error=error)
        echo(f"{step.label}: {state} in {seconds:.1f}s" + (f": {error}" if error else ""))
        if state != DONE:
            not_done[step.key] = state
        if state == INTERRUPTED or _Running.signum is not None:
            return EXIT_INTERRUPTED
    return 1 if set(not_done.values()) - {MAX_STEPS} else 0  # a stop at max_steps is as asked
