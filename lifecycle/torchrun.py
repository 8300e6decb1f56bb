"""torchrun with the preemption contract: ``python -m lifecycle.torchrun [torchrun options] -m MODULE ...``.

Plain torchrun (torch 2.14) breaks the contract in two ways. It forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT
to its workers (it starts them in their own sessions, so nothing else reaches them): a SIGUSR1 from Slurm killed the
launcher and left the workers training. When it forwards a signal it waits for the workers 30 s (less than a
save can take on shared storage) and then kills them. And it then exits 1 with a traceback, whatever they did, so
a caller cannot tell a saved, resumable stop from a crash. This launcher has torchrun forward the contract's
signals, wait STOP_GRACE_S for the workers, and exits EXIT_INTERRUPTED only when every worker did (each saved what
it had to, rank 0 the checkpoint): a worker killed at the end of the wait, the writer included, makes it a failure.
"""

from __future__ import annotations

import os
import signal
import sys

from lifecycle.preemption import EXIT_INTERRUPTED, SIGNALS, STOP_GRACE_S, TORCHRUN_SIGNALS, TORCHRUN_SIGNALS_ENV

# torch 2.14's torchrun reads the signals to forward from its --signals-to-handle option (default from the env
# variable PET_SIGNALS_TO_HANDLE, like all its options) and then overwrites TORCHELASTIC_SIGNALS_TO_HANDLE with it:
# exporting TORCHRUN_SIGNALS_ENV alone is not enough (measured: SIGUSR1 did not reach the workers). Both are set.
TORCHRUN_OPTION_ENV = "PET_SIGNALS_TO_HANDLE"


def stopped(codes) -> str | None:
    """How the workers' exit codes make a resumable stop, or None if they do not: each saved and exited 75, or died
    of a stop signal while it started, before its handlers existed (it had written nothing then, or only whole
    files: every write is atomic), so the rerun resumes from the last checkpoint. A worker killed (SIGKILL: the end
    of the grace) or failing otherwise is not one."""
    codes = list(codes)
    if codes and all(code == EXIT_INTERRUPTED for code in codes):
        return f"every worker saved and exited {EXIT_INTERRUPTED}"
    if codes and all(code == EXIT_INTERRUPTED or (code is not None and -code in SIGNALS) for code in codes):
        return f"every worker saved and exited {EXIT_INTERRUPTED} or was stopped while starting ({codes})"
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ[TORCHRUN_SIGNALS_ENV] = TORCHRUN_SIGNALS  # read by the process contexts of older torch releases
    os.environ[TORCHRUN_OPTION_ENV] = TORCHRUN_SIGNALS
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.api import PContext
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    exit_codes: dict[int, int | None] = {}
    shutdown = LocalElasticAgent._shutdown

    def recording_shutdown(self, death_sig=signal.SIGTERM, timeout=30):
        """The agent's shutdown (signal the workers, wait STOP_GRACE_S, not torch's 30 s, kill the rest), then note
        how each worker ended; the agent itself drops them. ``subprocess_handlers``: torch's SubprocessContext."""
        context = self._pcontext
        shutdown(self, death_sig, STOP_GRACE_S)
        for rank, handler in (getattr(context, "subprocess_handlers", None) or {}).items():
            if rank not in exit_codes and handler.proc.returncode == -signal.SIGKILL:
                print(f"lifecycle.torchrun: rank {rank} had not exited {STOP_GRACE_S} s after "
                      f"{signal.Signals(death_sig).name}: killed (BOT_STOP_GRACE_S sets the wait)", file=sys.stderr)
            exit_codes[rank] = handler.proc.returncode

    LocalElasticAgent._shutdown = recording_shutdown
    # The process context also stops the other workers itself, with its own 30 s, when one worker ends first (a
    # rank that saved nothing exits 75 while rank 0 still writes the checkpoint): the same grace there.
    close = PContext.close
    PContext.close = lambda self, death_sig=None, timeout=30: close(self, death_sig, STOP_GRACE_S)
    try:
        run(parse_args(argv))
    except SignalException as e:
        if how := stopped(exit_codes.values()):
            print(f"lifecycle.torchrun: {e.sigval.name}: {how}; rerun the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"lifecycle.torchrun: {e.sigval.name}: workers ended with {exit_codes}", file=sys.stderr)
        return 128 + e.sigval
    except ChildFailedError as e:  # the workers stopped first (the signal reached them directly, e.g. from Slurm)
        # Every worker's end, as the shutdown saw it: the failures name only the workers that had ended when the
        # agent noticed the first, and the others (the writer among them, still saving) were stopped after that.
        codes = list(exit_codes.values()) or [failure.exitcode for failure in e.failures.values()]
        if how := stopped(codes):
            print(f"lifecycle.torchrun: {how}; rerun the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"lifecycle.torchrun: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
