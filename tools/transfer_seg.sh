#!/usr/bin/env bash
# FCN on ADE20K (Table 9) with any ResNet-50 backbone:
#   tools/transfer_seg.sh SRC [--config CFG] [--data-root ROOT] [--work-dir DIR] [--variant V] [--frozen-backbone]
#   [-- key=value ...]
# SRC: an export dir, a classification run dir (exported beside it first), published weights (timm:NAME, e.g.
# timm:resnet50d.gluon_in1k, or torchvision:WEIGHTS), a timm/torchvision weights file (--variant A|B|C|D where its
# keys fit several variants), or 'none' (random-init control arm). Published weights and files are exported once
# into work_dirs/exports/.
# Options after '--' go to the mmengine config (--cfg-options). GPUS=N runs N processes under torchrun.
[[ $# -ge 1 ]] || { sed -n '2,9p' "$0"; exit 2; }
exec "$(dirname "$0")/transfer_stage.sh" segmentation "$@"
