"""The stop flag every training loop polls (classification's train step, the mmengine hook of detection and
segmentation): set by the signals of the preemption contract, agreed on by all ranks before anyone stops.

A signal handler may run between any two bytecodes, so it only sets a flag; the loop reads it at a step boundary,
where a checkpoint is consistent. Under DDP the ranks must stop at the same step (a rank that stops alone hangs the
others in their next collective): ``agreed()`` all-reduces the flags. It does so asynchronously over a CPU (gloo)
group, started at one step and read at the next, so it costs no GPU synchronisation and no wait: a signal stops
every rank at most one step after the step it arrived in.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS

log = logging.getLogger("lifecycle")


class Preempted(SystemExit):
    """Raised (after a resumable checkpoint was saved) to leave a loop we do not own, e.g. mmengine's Runner; a
    SystemExit, so that a library's own entry point (tools/train.py) also exits with EXIT_INTERRUPTED."""

    def __init__(self, message: str):
        super().__init__(EXIT_INTERRUPTED)
        self.message = message


_active = 0  # StopFlags installed in this process
_shielded_pid = 0  # the process shield_child() last ran in
SECOND_SIGINT_S = 2.0  # a SIGINT this long after the first one is a second Ctrl-C (sooner: the same stop, delivered
# twice, e.g. by the scheduler to every process and again by torchrun forwarding it)


def shield_child(owner: int | None = None) -> None:
    """Make this child process (a DataLoader worker, a pool worker) outlive the stop signals its parent handles.

    A scheduler signals every process of the job (Slurm: the whole step's cgroup) and Ctrl-C the terminal's whole
    process group, so the children receive the stop signal too. They must keep serving until the parent has saved,
    and the parent stops them itself: SIGUSR1 and SIGINT are ignored. SIGTERM is also how an owner ends its
    children (``Pool.terminate()``, ``DataLoader`` at shutdown). In a child forked with one thread (the fork hook
    below) it is blocked and taken by a thread that reads the sender (``sigwaitinfo``): only a SIGTERM from the
    parent or from ``owner`` ends the process, as SIGTERM's default action does. A child started by spawn or a
    fork server already runs other threads when its init function is called (torch's), and a signal blocked in one
    thread reaches another: there SIGTERM is ignored, and the owner ends the worker through DataLoader's own
    shutdown (a sentinel on its queue; the worker also exits when its parent is gone). Idempotent per process."""
    global _shielded_pid
    if _shielded_pid == os.getpid():
        return
    _shielded_pid = os.getpid()
    try:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread (a fork from a thread): the handlers cannot change here; SIGTERM is
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # not left blocked from the fork (_before_fork)
        return
    tasks = "/proc/self/task"  # Linux; elsewhere SIGTERM stays ignored
    if os.path.isdir(tasks) and len(os.listdir(tasks)) == 1:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from here on inherit it
        senders = {os.getppid(), owner or os.getppid()}
        threading.Thread(target=_sigterm_from, args=(senders,), name="stop-shield", daemon=True).start()


def _sigterm_from(senders: set[int]) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid in senders:  # the owner stops its child: die of SIGTERM, as without the shield
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # this thread only; SIG_DFL kills all
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _before_fork() -> None:
    # Block SIGTERM across the fork, so that a child is never killed between the fork and its shield (a stop
    # signal to the whole group in that window): it stays pending in the parent and is delivered after.
    if _active:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _after_fork_in_parent() -> None:
    if _active:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _after_fork_in_child() -> None:
    """Children forked while a StopFlag is installed (DataLoader workers, multiprocessing pools) are shielded; the
    flag itself is not theirs (nobody reads a child's flag)."""
    global _active
    if _active:
        _active = 0
        shield_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def _start_helpers_shielded() -> None:
    """multiprocessing starts helper processes on first use: the resource tracker (spawn, fork server) and the fork
    server (Python 3.14's default start method), which forks the loader workers. A stop signal to the whole group
    kills them, and the loader then fails to fetch its batches. Started here with the stop signals ignored (an
    ignored signal stays ignored across exec), they outlive it; both exit when this process does."""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopFlag:
    """Install the handlers for SIGNALS (``close()`` puts the previous ones back); poll ``agreed()`` each step."""

    def __init__(self):
        global _active
        if not _active:
            _start_helpers_shielded()
        self.signum: int | None = None
        self._announced = False  # the signal logged (by a poll: never from the handler)
        self._at = 0.0  # when the first signal came (time.monotonic)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        _active += 1
        self._group = None
        self._pending = None  # (work, tensor) of the all-reduce started at the previous step

    @property
    def set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # the same stop again (every process got it, and a launcher forwarded it)
            if signum == self.signum == signal.SIGINT and time.monotonic() - self._at > SECOND_SIGINT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
            return
        # Not logged here: a handler runs between any two bytecodes, also inside the logging handler's write to the
        # same file, which then fails ("reentrant call inside BufferedWriter") and prints a traceback. Said by the
        # next poll, at the step boundary.
        self.signum, self._at = signum, time.monotonic()

    def _distributed(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        if self._group is None:  # a collective: the first call happens at the same step on every rank
            self._group = dist.new_group(backend="gloo")
        return True

    def _announce(self) -> None:
        if self.set and not self._announced:
            self._announced = True
            log.warning("received %s: saving a checkpoint at the next step boundary, then exiting with %d",
                        signal.Signals(self.signum).name, EXIT_INTERRUPTED)

    def agreed(self) -> bool:
        """True on every rank at the same step once any rank received a signal (call it on all ranks, once per
        step). Alone: the flag itself."""
        self._announce()
        if not self._distributed():
            return self.set
        import torch
        import torch.distributed as dist

        stop = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            stop = flags.item() > 0
        flags = torch.tensor([float(self.set)])
        self._pending = (dist.all_reduce(flags, group=self._group, async_op=True), flags)
        return stop

    def close(self) -> None:
        """Finish the outstanding all-reduce (every rank started one) and restore the previous handlers."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        global _active
        if self._previous:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
            _active -= 1
