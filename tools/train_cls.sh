#!/usr/bin/env bash
# Train a classifier: tools/train_cls.sh CONFIG [--data-root DIR] [--work-dir DIR] [--set key=value ...]
# GPUS=N runs N processes under torchrun (DDP) on this machine; rerunning the same command resumes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
if [[ ${GPUS:-1} -gt 1 ]]; then
    # torchrun through lifecycle/torchrun.py: it sets TORCHELASTIC_SIGNALS_TO_HANDLE so that SIGUSR1 (Slurm's
    # preemption warning) reaches every worker too, and exits 75 when they saved (lifecycle/preemption.py).
    exec "$PY" -m lifecycle.torchrun --nproc_per_node="$GPUS" -m classification.train "$@"
fi
exec "$PY" -m classification.train "$@"
