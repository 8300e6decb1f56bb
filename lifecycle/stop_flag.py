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

from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS

log = logging.getLogger("lifecycle")


class Preempted(SystemExit):
    """Raised (after a resumable checkpoint was saved) to leave a loop we do not own, e.g. mmengine's Runner; a
    SystemExit, so that a library's own entry point (tools/train.py) also exits with EXIT_INTERRUPTED."""

    def __init__(self, message: str):
        super().__init__(EXIT_INTERRUPTED)
        self.message = message


_active = 0  # StopFlags installed in this process


def _in_forked_child() -> None:
    """A process forked while a StopFlag is installed (DataLoader workers, multiprocessing pools) must not inherit its
    handlers: a pool's terminate() stops its workers with SIGTERM, which the flag would swallow (the pool then waits
    forever), and the flag of a child is read by nobody. SIGTERM gets its default action back; SIGUSR1 and SIGINT
    (sent to every process of a Slurm step or of the terminal's process group) are ignored, so that the workers keep
    serving batches until the parent has saved, and the parent stops them itself."""
    global _active
    if _active:
        _active = 0
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for sig in SIGNALS:
            if sig != signal.SIGTERM:
                signal.signal(sig, signal.SIG_IGN)


os.register_at_fork(after_in_child=_in_forked_child)


class StopFlag:
    """Install the handlers for SIGNALS (``close()`` puts the previous ones back); poll ``agreed()`` each step."""

    def __init__(self):
        global _active
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        _active += 1
        self._group = None
        self._pending = None  # (work, tensor) of the all-reduce started at the previous step

    @property
    def set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the next step boundary, then exiting with %d",
                    signal.Signals(signum).name, EXIT_INTERRUPTED)

    def _distributed(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        if self._group is None:  # a collective: the first call happens at the same step on every rank
            self._group = dist.new_group(backend="gloo")
        return True

    def agreed(self) -> bool:
        """True on every rank at the same step once any rank received a signal (call it on all ranks, once per
        step). Alone: the flag itself."""
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
