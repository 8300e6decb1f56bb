#!/usr/bin/env bash
# Train a classifier: tools/train_cls.sh CONFIG [--data-root DIR] [--work-dir DIR] [--set key=value ...]
# GPUS=N runs N processes under torchrun (DDP) on this machine; rerunning the same command resumes.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
if [[ ${GPUS:-1} -gt 1 ]]; then
    # torchrun forwards only these signals to its workers (its default lacks SIGUSR1, Slurm's preemption warning):
    # every worker then saves and exits 75 (lifecycle/preemption.py).
    TORCHELASTIC_SIGNALS_TO_HANDLE=$(cd "$repo" && "$PY" -c "from lifecycle.preemption import TORCHRUN_SIGNALS; print(TORCHRUN_SIGNALS)")
    export TORCHELASTIC_SIGNALS_TO_HANDLE
    exec "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" -m classification.train "$@"
fi
exec "$PY" -m classification.train "$@"
