"""The preemption contract shared by the four stages and the study.

SIGTERM, SIGUSR1 (Slurm's warning before preemption) and SIGINT (Ctrl-C) make a stage save a resumable checkpoint
within one step and exit with EXIT_INTERRUPTED; rerunning the same command continues from that checkpoint.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# sysexits' EX_TEMPFAIL ("try again later"): a resumable checkpoint was saved, rerun the same command. Distinct from
# 0 (done, or stopped at max_steps as asked), 1 (an error a rerun will not fix) and 128+N (killed by signal N).
EXIT_INTERRUPTED = 75

# The time a stage has from a stop signal to its exit: finish the step (or the evaluation batch) in progress, save
# (a ResNet-50 checkpoint is 200-300 MB, fsynced, on shared storage), exit. torchrun waits this long for its workers
# before it kills them (lifecycle/torchrun.py; its own default is 30 s), and a study on Slurm is warned this long
# before its time limit (--signal=USR1@STOP_GRACE_S, study/slurm.py).
# BOT_STOP_GRACE_S overrides it (a cluster whose saves take longer, a test).
STOP_GRACE_S = int(os.environ.get("BOT_STOP_GRACE_S", "120"))

# torchrun forwards only the signals named here to its workers (default SIGTERM,SIGINT,SIGHUP,SIGQUIT); without
# SIGUSR1 a Slurm warning kills the launcher and orphans the workers. torch 2.14 takes the list from its own option
# (PET_SIGNALS_TO_HANDLE) and overwrites this variable: launch through lifecycle.torchrun, which sets both.
TORCHRUN_SIGNALS_ENV = "TORCHELASTIC_SIGNALS_TO_HANDLE"
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
