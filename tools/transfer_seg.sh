#!/usr/bin/env bash
# FCN on ADE20K (Table 9) with one of our backbones:
#   tools/transfer_seg.sh SRC [--config CFG] [--data-root ROOT] [--work-dir DIR] [-- key=value ...]
# SRC: an export dir, a classification run dir (exported beside it first), or 'none' (random-init control arm).
# Options after '--' go to the mmengine config (--cfg-options). GPUS=N runs N processes under torchrun.
[[ $# -ge 1 ]] || { sed -n '2,5p' "$0"; exit 2; }
exec "$(dirname "$0")/transfer_stage.sh" segmentation "$@"
