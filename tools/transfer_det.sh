#!/usr/bin/env bash
# Faster R-CNN on Pascal VOC (Table 8) with one of our backbones:
#   tools/transfer_det.sh SRC [--config CFG] [--data-root ROOT] [--work-dir DIR] [-- key=value ...]
# SRC: an export dir, a classification run dir (exported beside it first), or 'none' (random-init control arm).
# Options after '--' go to the mmengine config (--cfg-options). GPUS=N runs N processes under torchrun.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$repo/.venv/bin/python}
[[ $# -ge 1 ]] || { sed -n '2,5p' "$0"; exit 2; }
src=$1; shift
config=$repo/configs/detection/faster-rcnn_r50_fpn_voc0712.py
data_root=data/VOCdevkit
work_dir=work_dirs/det/$(basename "$src")
while [[ $# -gt 0 ]]; do
    case $1 in
        --config) config=$2; shift 2 ;;
        --data-root) data_root=$2; shift 2 ;;
        --work-dir) work_dir=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "error: unknown option $1 (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
done
export_dir=$("$PY" -m transfer.source "$src")
args=(--export "$export_dir" --config "$config" --data-root "$data_root" --work-dir "$work_dir")
[[ $# -gt 0 ]] && args+=(--cfg-options "$@")
if [[ ${GPUS:-1} -gt 1 ]]; then
    exec "$PY" -m torch.distributed.run --nproc_per_node="$GPUS" -m detection.train "${args[@]}" --launcher pytorch
fi
exec "$PY" -m detection.train "${args[@]}"
