#!/usr/bin/env bash
# Shared body of tools/transfer_det.sh and tools/transfer_seg.sh:
#   tools/transfer_stage.sh detection|segmentation SRC [--config CFG] [--data-root ROOT] [--work-dir DIR]
#                           [--variant V] [--allow-synthetic] [--frozen-backbone] [--debug] [-- k=v ...]
# SRC: an export dir, a classification run dir (exported beside it first), published weights (timm:NAME, e.g.
# timm:resnet50d.gluon_in1k, or torchvision:WEIGHTS), a timm/torchvision weights file (--variant A|B|C|D where its
# keys fit several variants), or 'none' (random-init control arm). Published weights and files are exported once
# into work_dirs/exports/.
# Options after '--' go to the mmengine config (--cfg-options). GPUS=N runs N processes under torchrun.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
[[ $# -ge 2 ]] || { sed -n '2,9p' "$0"; exit 2; }
stage=$1 src=$2; shift 2
# The stage's default recipe and data root: its row in lifecycle/stages.py (a usage line for an unknown stage).
defaults=$(cd "$repo" && "$PY" -m lifecycle.stages defaults "$stage") || exit 2
read -r config data_root <<< "$defaults"
config=$repo/$config
name=$(basename "$src")
work_dir=  # default: work_dirs/$stage/<source>, with _frozen for a frozen backbone (below)
frozen=
variant=()
extra=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --config) config=$2; shift 2 ;;
        --data-root) data_root=$2; shift 2 ;;
        --work-dir) work_dir=$2; shift 2 ;;
        --variant) variant=(--variant "$2"); shift 2 ;;
        --allow-synthetic) extra+=(--allow-synthetic); shift ;;
        --frozen-backbone) extra+=(--frozen-backbone); frozen=_frozen; shift ;;  # fixed-feature transfer
        --debug) export BOT_DEBUG=1; shift ;;  # tracebacks instead of one-line errors (lifecycle/errors.py)
        --) shift; break ;;
        *) echo "error: unknown option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
done
work_dir=${work_dir:-work_dirs/$stage/${name//:/_}$frozen}  # timm:resnet50d.gluon_in1k -> timm_resnet50d.gluon_in1k
# ${a[@]+"${a[@]}"}: an empty array is "unbound" under set -u before bash 4.4 (macOS's bash 3.2).
export_dir=$("$PY" -m export.resolve "$src" ${variant[@]+"${variant[@]}"})
args=(--export "$export_dir" --config "$config" --data-root "$data_root" --work-dir "$work_dir")
args+=(${extra[@]+"${extra[@]}"})
[[ $# -gt 0 ]] && args+=(--cfg-options "$@")
if [[ ${GPUS:-1} -gt 1 ]]; then
    # torchrun through lifecycle/torchrun.py: it sets TORCHELASTIC_SIGNALS_TO_HANDLE so that SIGUSR1 (Slurm's
    # preemption warning) reaches every worker too, and exits 75 when they saved (lifecycle/preemption.py).
    exec "$PY" -m lifecycle.torchrun --nproc_per_node="$GPUS" -m "$stage.train" "${args[@]}" --launcher pytorch
fi
exec "$PY" -m "$stage.train" "${args[@]}"
