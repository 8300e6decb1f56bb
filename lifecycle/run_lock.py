"""One writer per run dir: an exclusive advisory lock on ``RUN_DIR/.lock``, held by the writing process.

A rerun while an earlier process still trains in the same dir (an orphaned worker, a job requeued before the old
one died, the same command started twice) would interleave two writers of last.pth. The lock makes the second one
stop at once with one line. flock locks belong to the open file: the kernel releases them when the holder exits,
also on SIGKILL, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from lifecycle.errors import UserError

LOCK_NAME = ".lock"
UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}  # flock on file systems without locks
log = logging.getLogger("lifecycle")


class RunDirBusy(UserError, RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise RunDirBusy(f"{run_dir}: another process (pid {holder}) is training in this run dir; stop it or "
                             f"wait for it, then rerun (one writer per run dir)") from None
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            # Lustre mounted without flock, NFS without lockd: the lock is a guard, not a condition to run.
            log.warning("%s: this file system does not support locks (%s); one writer per run dir is not enforced "
                        "here: do not start the same command twice", self.path, errno.errorcode[e.errno])
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


_unlocked_warned: set[Path] = set()


@contextlib.contextmanager
def waiting_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """An exclusive lock on the file ``path`` for the block, waiting for an earlier holder (``waiting``, if given, is
    logged when there is one): for work that two processes may start at once and the second should find done (two
    studies' jobs, or a detection and a segmentation stage, exporting the same run), or a shared file's
    read-modify-write. On a file system without locks: as RunLock, a warning (once per file) and no lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                log.warning(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)  # a signal handler that raises ends the wait
        except OSError as e:
            if e.errno not in UNSUPPORTED:
                raise
            if path not in _unlocked_warned:
                _unlocked_warned.add(path)
                log.warning("%s: this file system does not support locks (%s); two processes writing here at once "
                            "are not kept apart", path, errno.errorcode[e.errno])
        yield
    finally:
        os.close(fd)  # releases the lock
