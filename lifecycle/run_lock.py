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
import socket
from collections.abc import Callable, Iterator
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
        self._fd = hold(self.path, lambda holder: RunDirBusy(
            f"{run_dir}: another process ({holder}) is training in this run dir; stop it or wait for it, then rerun "
            f"(one writer per run dir)"), unlocked="one writer per run dir is not enforced here: do not start the "
                                                   "same command twice")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def hold(path: Path, busy: Callable[[str], Exception], unlocked: str) -> int:
    """Open ``path`` and lock it without waiting; the descriptor returned holds the lock until it is closed, and the
    file names this process (host and pid) for the next one. Held by another process: raises ``busy(holder)``, with
    what the holder wrote. On a file system without locks (Lustre mounted without flock, NFS without lockd) the lock
    is a guard, not a condition to run: a warning ending in ``unlocked``, and the descriptor, unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "its host and pid not yet written"
        os.close(fd)
        raise busy(holder) from None
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            os.close(fd)
            raise
        log.warning("%s: this file system does not support locks (%s); %s", path, errno.errorcode[e.errno], unlocked)
        return fd
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
    return fd


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
