"""Running planned steps in order, each its stage's command in a subprocess, each answer recorded in
study_status.json: the local executor, and each Slurm job on its allocation (study/slurm.py). A step whose upstream
is not done is ``blocked``; the other arms go on. SIGTERM and SIGUSR1 are passed on to the running stage (Ctrl-C
reaches it from the terminal), which saves and exits 75; the study then stops with 75, and rerunning resumes it.
"""

from __future__ import annotations

import codecs
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS, TORCHRUN_SIGNALS, TORCHRUN_SIGNALS_ENV
from study import status
from study.plan import REPO, Step, command

_ERROR_LINE = re.compile(r"^(error:|\w+(\.\w+)*(Error|Exception)\b)")


class _Running:  # the stage running now, for the signal handlers (ours, or submitit's checkpoint in a Slurm job)
    proc: subprocess.Popen | None = None
    step: Step | None = None
    work_dir: Path | None = None
    signum: int | None = None


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
    proc, step = _Running.proc, _Running.step
    if proc is not None and step is not None:
        if proc.poll() is None:
            proc.send_signal(signum)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        status.record(_Running.work_dir, step.key, *outcome(step, rc, f"preempted; no checkpoint (exit {rc})"))


def run_stage(step: Step, argv: list[str], work_dir: Path) -> tuple[int, str]:
    """Run one stage; its stdout passes through, its stderr too, the last error line kept."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), TORCHRUN_SIGNALS_ENV: TORCHRUN_SIGNALS}
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
        return status.DONE, None
    if rc == 0 and step.stage == "classification":  # the trainer stops at max_steps as asked, without a summary
        return status.MAX_STEPS, "no summary.json: rerun without max_steps to finish the run"
    if rc == EXIT_INTERRUPTED:
        return status.INTERRUPTED, "saved a resumable checkpoint (exit 75); rerun to continue"
    return status.FAILED, f"exited 0 but wrote no {step.output}" if rc == 0 else error or f"exit code {rc}"


def run_steps(steps: list[Step], work_dir: Path, gpus: int, nodes: int = 1, rank: int = 0,
              master: str = "localhost", job_id: str = "0") -> int:
    """Run ``steps`` in order: 0 when none failed, EXIT_INTERRUPTED when stopped by a signal, else 1. On several
    nodes every node runs the training stages in one torchrun rendezvous; the first runs the rest and records."""
    not_done: dict[tuple, str] = {}
    note = status.record if rank == 0 else lambda *args, **kwargs: None
    for step in steps:
        if _Running.signum is not None:
            return EXIT_INTERRUPTED
        missing = [p for p in step.inputs if not p.exists()] if rank == 0 else []
        why = next((f"{d[2]} of {d[0]} seed{d[1]}: {not_done[d]}" for d in step.needs if d in not_done), None) or (
            f"needs {missing[0]}; run the stage that writes it first" if missing else None)
        if why is not None or (rank > 0 and not step.distributed):
            if why is not None:
                not_done[step.key] = status.BLOCKED
                note(work_dir, step.key, status.BLOCKED, error=why)
                echo(f"{step.label}: blocked: {why}")
            continue
        argv = command(step, gpus, nodes, master, job_id)
        note(work_dir, step.key, status.RUNNING, command=shlex.join(argv))
        echo(f"{step.label}: {shlex.join(argv)}")
        t0 = time.perf_counter()
        state, error = outcome(step, *run_stage(step, argv, work_dir))
        seconds = round(time.perf_counter() - t0, 1)
        note(work_dir, step.key, state, seconds=seconds, error=error)
        echo(f"{step.label}: {state} in {seconds:.1f}s" + (f": {error}" if error else ""))
        if state != status.DONE:
            not_done[step.key] = state
        if state == status.INTERRUPTED or _Running.signum is not None:
            return EXIT_INTERRUPTED
    return 1 if status.FAILED in not_done.values() else 0
