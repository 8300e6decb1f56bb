"""Running planned steps in order, each its stage's command in a subprocess (the local executor, and each Slurm job
on its allocation), and WORK_DIR/study_status.json: each stage's last answer, ``running`` (host, pid, Slurm job)
before it starts, then ``done``, ``stopped by max_steps`` (where told, without a summary), ``interrupted`` (exit 75,
after saving a resumable checkpoint), ``failed`` (its error line) or ``blocked`` (an upstream stage is not done; the
other arms go on). A ``running`` entry whose process is gone (SIGKILL) reads back as ``not finished``. SIGTERM and
SIGUSR1 are passed on to the running stage (Ctrl-C reaches it from the terminal); the study then stops with 75. A
stop that comes while a stage is being recorded does not let it start; one that comes as it starts reaches it.

The console gets one line when a stage starts and one when it ends (its time and headline metric), and while it runs
its newest progress line (lifecycle/progress.py: rewritten in place on a terminal, else every PROGRESS_EVERY_S); the
stage's whole output goes to ``stage.log`` in its run dir, and a failing stage's last lines are shown.
"""

from __future__ import annotations

import codecs
import collections
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lifecycle import progress
from lifecycle.artifacts import atomic_write_json
from lifecycle.errors import UserError
from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS
from lifecycle.run_lock import hold, waiting_lock
from lifecycle.stages import NAMES
from study.plan import FROZEN, REPO, Step, command
from study.spec import STATUS_FILE

_ERROR_LINE = re.compile(r"^(error:|\w+(\.\w+)*(Error|Exception)\b)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_NAME = "stage.log"  # a stage's whole console output, appended per run, in its run dir (an export's swap keeps it)
# ... as the first node of a multi-node job sees it; node N's own: stage.nodeN.log (appends from several hosts to one
# file on a shared file system may overwrite each other)
PROGRESS_EVERY_S = 30.0  # without a terminal, a running stage's progress line at most this often
TAIL_LINES = 15  # of a failing stage's output, shown on the console
# The one number a stage's end line shows: (file, key in it), the first found.
HEADLINES = (("summary.json", "top1", "top-1"), ("summary.json", "mAP", "mAP"), ("summary.json", "mIoU", "mIoU"),
             ("meta.json", "source_top1", "top-1 of the exported weights"))
STUDY_LOCK = ".study.lock"  # in the work dir: held by the local study running there, naming its host and pid
DONE, RUNNING, NOT_FINISHED = "done", "running", "not finished"
MAX_STEPS, INTERRUPTED, FAILED, BLOCKED = "stopped by max_steps", "interrupted", "failed", "blocked"


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        return [e for e in json.loads(path.read_text()) if isinstance(e, dict)]
    except (OSError, ValueError, TypeError):  # absent, not JSON, not a list
        return []


def entry_of(entries: list[dict[str, Any]], key: tuple[str, int, str]) -> dict[str, Any]:
    """The entry of ``key`` = (arm, seed, stage) among study_status.json's, or {}."""
    return next((e for e in entries if (e.get("arm"), e.get("seed"), e.get("stage")) == key), {})


def record(work_dir: Path, key: tuple[str, int, str], status: str, **fields: Any) -> None:
    """Update the entry of ``key`` = (arm, seed, stage); ``running`` also names this process and the time."""
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    if status == RUNNING:
        fields.update(host=socket.gethostname(), pid=os.getpid(), job=os.environ.get("SLURM_JOB_ID"), started=now,
                      finished=None, seconds=None, error=None)
    work_dir.mkdir(parents=True, exist_ok=True)
    # flock, which NFS (as POSIX locks) and Lustre mounted with flock honour across nodes; without locks, a warning
    with waiting_lock(work_dir / f".{STATUS_FILE}.lock"):
        entries = _load(work_dir / STATUS_FILE)
        old = entry_of(entries, key)
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
    return sorted(entries, key=lambda e: (str(e.get("arm")), str(e.get("seed")),
                                          NAMES.index(str(e.get("stage")).removesuffix(FROZEN))))


def status_table(entries: list[dict[str, Any]]) -> str:
    rows = [("arm", "seed", "stage", "status", "time", "where", "error")] + [(
        str(e.get("arm")), str(e.get("seed")), str(e.get("stage")), str(e.get("status")),
        "" if e.get("seconds") is None else f"{e['seconds']:.0f}s",
        (f"{e.get('host')} pid {e.get('pid')}" if e.get("status") in (RUNNING, NOT_FINISHED) else "")
        + (f" Slurm job {e['job']}" if e.get("job") else ""), (e.get("error") or "").split("\n")[0][:100])
        for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[6]).rstrip() for r in rows)


class StudyBusy(UserError, RuntimeError):
    """Another study runs in this work dir."""


@contextmanager
def study_lock(work_dir: Path) -> Iterator[None]:
    """One local study per work dir: a second one stops at once with one line, before it records anything. Without
    it, its stages hit the run dirs' locks and were recorded ``failed`` over the first study's ``running`` entries,
    blocking their students. An flock, which the kernel releases when its holder dies, SIGKILL included."""
    fd = hold(work_dir / STUDY_LOCK, lambda holder: StudyBusy(
        f"{work_dir}: another study is running in this work dir ({holder}); wait for it or stop it, then rerun "
        f"(--status shows its stages)"), unlocked="two studies in this work dir are not kept apart: do not start it "
                                                  "twice")
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


class _Running:  # the stage running now, for the signal handlers (ours, or submitit's checkpoint in a Slurm job)
    proc = step = work_dir = signum = None  # its Popen, Step and work dir; the signal that stops the study
    output = None  # the _Output thread copying its output to stage.log


def echo(text: str) -> None:
    print(f"[study] {text}", flush=True)


def _pass_on(signum, frame) -> None:
    _Running.signum = signum
    if _Running.proc is not None and _Running.proc.poll() is None and signum != signal.SIGINT:
        _Running.proc.send_signal(signum)  # Ctrl-C: the terminal sent SIGINT to the stage's process group already


def _pass_on_late(proc: subprocess.Popen) -> None:
    """A stop that came after run_steps' last look and before ``_Running.proc`` was set found no stage to pass it on
    to: passed on now, or the stage ran to its end. SIGINT too: the terminal's may have come before the stage
    existed, and a stage takes the same signal twice within a moment as one stop (lifecycle/stop_flag.py)."""
    if (signum := _Running.signum) is not None and proc.poll() is None:
        proc.send_signal(signum)


@contextmanager
def passing_signals_on():
    old = {sig: signal.signal(sig, _pass_on) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        _Running.signum = None


def no_stage_after(signum: int | None) -> None:
    """After a stop signal that the running stage got itself (from Slurm): run_steps starts no further stage, and
    returns EXIT_INTERRUPTED. None: clears it."""
    _Running.signum = signum


def stop_running_stage(signum: int, wait_s: float) -> None:
    """Ask the running stage to save (the stop contract), wait for it, and record the answer. Called in a signal
    handler (submitit's, in a Slurm job): the stage's output goes on being read meanwhile, by its _Output thread,
    so the stage never blocks on a full pipe and its last lines (what it saved) reach stage.log."""
    if (proc := _Running.proc) is not None and (step := _Running.step) is not None:
        _pass_on(signum, None)
        try:
            rc = proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            rc = None
        if (output := _Running.output) is not None:
            output.join(timeout=5)  # its last lines (a loader worker still holding the pipe: not waited for)
        state, error = outcome(step, rc, f"preempted; no checkpoint (exit {rc})")
        record(_Running.work_dir, step.key, state, error=error)


class _Progress:
    """The running stage's newest progress line on the console."""

    def __init__(self, label: str):
        self.label, self.tty, self.last, self.shown = label, sys.stdout.isatty(), -PROGRESS_EVERY_S, False

    def update(self, text: str) -> None:
        if self.tty:
            sys.stdout.write(f"\r\x1b[K[study]   {self.label}: {text}")
            sys.stdout.flush()
            self.shown = True
        elif time.monotonic() - self.last >= PROGRESS_EVERY_S:
            echo(f"  {self.label}: {text}")
            self.last = time.monotonic()

    def clear(self) -> None:
        if self.shown:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


class _Output(threading.Thread):
    """Copies a stage's output to its log as it comes, keeping its last lines and showing its progress; in a thread,
    so that the pipe is read while the main thread waits for the stage, or for its stop in a signal handler."""

    def __init__(self, pipe, log, shown: _Progress):
        super().__init__(daemon=True, name="stage-output")
        self.pipe, self.log, self.shown = pipe, log, shown
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.pending = ""
        self.log_error: OSError | None = None  # the log could not be written (a full disk): the pipe is still read

    def write(self, text: str) -> None:
        if self.log_error is None:
            try:
                self.log.write(text)
                self.log.flush()
            except OSError as e:
                self.log_error = e

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := os.read(self.pipe.fileno(), 65536):
                text = decoder.decode(chunk)
                self.write(text)
                *lines, self.pending = re.split(r"\r\n|\r|\n", self.pending + text)  # \r: progress bars redraw
                for line in lines:
                    line = _ANSI.sub("", line).strip()
                    if line:
                        self.tail.append(line[:300])
                        if match := progress.PATTERN.search(line):
                            self.shown.update(match[1])
        except (OSError, ValueError):  # the pipe or the log closed under it: the study is exiting
            pass

    def lines(self) -> list[str]:
        return [*self.tail, *filter(None, [_ANSI.sub("", self.pending).strip()[:300]])]


def log_name(rank: int) -> str:
    return LOG_NAME if rank == 0 else f"stage.node{rank}.log"


def run_stage(step: Step, argv: list[str], work_dir: Path, rank: int = 0) -> tuple[int, str, list[str]]:
    """Run one stage, its output (stdout and stderr) appended to its run dir's log (``log_name``); returns its exit
    status, its last error line and its last TAIL_LINES lines."""
    paths = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": paths}  # torchrun's signals: lifecycle.torchrun
    step.dir.mkdir(parents=True, exist_ok=True)
    log = open(step.dir / log_name(rank), "a", encoding="utf-8")  # closed below, where a full disk may refuse
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = _Output(proc.stdout, log, _Progress(step.label))
    output.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()}: {shlex.join(argv)}\n")
    output.start()
    _Running.proc, _Running.step, _Running.work_dir, _Running.output = proc, step, work_dir, output
    _pass_on_late(proc)
    try:
        # To the end of its output, then its exit. Not proc.wait() first: it holds Popen's wait lock while it
        # blocks, and the stop in a signal handler (stop_running_stage) could then never see the exit.
        output.join()
        rc = proc.wait()
    finally:
        output.shown.clear()
        _Running.proc = _Running.step = _Running.output = None
        proc.stdout.close()
        with suppress(OSError):  # what a full disk did not take (said below)
            log.close()
    if output.log_error is not None:
        echo(f"{step.label}: could not write {step.dir / log_name(rank)} ({output.log_error.strerror}); the rest of "
             f"its output was read but not kept")
    lines = output.lines()
    errors = [line for line in lines if _ERROR_LINE.match(line)] or lines or [""]
    return rc, errors[-1], lines[-TAIL_LINES:]


def headline(step: Step) -> str:
    """The stage's headline metric from the file that marks it done, e.g. ``top-1 54.00``; "" when there is none."""
    for name, key, label in HEADLINES:
        try:
            data = json.loads((step.dir / name).read_text())
        except (OSError, ValueError):
            continue
        value = (data.get("metrics") or {}).get(key) if name == "summary.json" else data.get(key)
        if isinstance(value, (int, float)):
            return f"{label} {value:.2f}"
    return ""


def _stamp(path: Path) -> int | None:
    """The file's modification time (ns), None when it does not exist."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def outcome(step: Step, rc: int | None, error: str) -> tuple[str, str | None]:
    if rc == 0 and step.output.exists():
        return DONE, None
    if rc == 0 and step.stage == "classification":  # the trainer stops at max_steps as asked, without a summary
        return MAX_STEPS, "no summary.json: rerun without max_steps to finish the run"
    if rc == EXIT_INTERRUPTED:
        return INTERRUPTED, "saved a resumable checkpoint (exit 75); rerun to continue"
    if rc is not None and -rc in SIGNALS:  # the stop came while it started, before its handlers: it had written
        # nothing yet, or only whole files (every write is atomic), so the rerun resumes from its last checkpoint
        return INTERRUPTED, f"stopped by {signal.Signals(-rc).name} while starting; rerun to continue"
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
        # Every node decides alike (the inputs come from other jobs, on the shared work dir): a node starting a step
        # the first node skipped would wait out the rendezvous for it.
        missing = [p for p in step.inputs if not p.exists()]
        why = next((f"{d[2]} of {d[0]} seed{d[1]}: {not_done[d]}" for d in step.needs if d in not_done), None) or (
            f"needs {missing[0]}; run the stage that writes it first" if missing else None)
        if why is not None or (rank > 0 and not step.distributed):
            if why is not None:
                not_done[step.key] = BLOCKED
                note(work_dir, step.key, BLOCKED, error=why)
                echo(f"{step.label}: blocked: {why}")
            continue
        argv = command(step, gpus, nodes, master, job_id, rank)
        found = _stamp(step.output)  # complete already? Then the rerun below only checks it: see after it
        earlier = entry_of(_load(work_dir / STATUS_FILE), step.key).get("seconds") if found else None
        note(work_dir, step.key, RUNNING, command=shlex.join(argv))  # the command: in study_status.json and the log
        if _Running.signum is not None:  # the stop came while it was being recorded: it does not start
            note(work_dir, step.key, INTERRUPTED, error=f"stopped by {signal.Signals(_Running.signum).name} before it "
                                                        f"started; rerun to continue")
            return EXIT_INTERRUPTED
        echo(f"{step.label}: started; its output: {step.dir / log_name(rank)}")
        t0 = time.perf_counter()
        rc, error, last_lines = run_stage(step, argv, work_dir, rank)
        state, error = outcome(step, rc, error)
        seconds = round(time.perf_counter() - t0, 1)
        checked = state == DONE and found is not None and _stamp(step.output) == found
        # A stage found complete trained nothing: its entry keeps the time of the run that made its output, not the
        # seconds its check took (the table's time column is the stage's, as summary.json's is); where no entry
        # has that time (a lost status file, a study killed before it recorded the end), the check's.
        note(work_dir, step.key, state, seconds=earlier if checked and earlier is not None else seconds, error=error)
        metric = headline(step) if state == DONE else ""
        echo(f"{step.label}: {'already done, checked' if checked else state} in {seconds:.1f}s"
             + (f": {metric}" if metric else "") + (f": {error}" if error else ""))
        if state == FAILED:
            print("\n".join(f"    {line}" for line in last_lines), flush=True)
        if state != DONE:
            not_done[step.key] = state
        if state == INTERRUPTED or _Running.signum is not None:
            return EXIT_INTERRUPTED
    return 1 if set(not_done.values()) - {MAX_STEPS} else 0  # a stop at max_steps is as asked
