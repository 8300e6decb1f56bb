"""Export: a ResNet-50 classifier (a run of this toolkit's trainer, or published weights) as an MMDetection /
MMSegmentation backbone, checked key by key, tensor by tensor and output by output.

    layout.py     the timm <-> mm key mapping and the variant's reference shapes (torch + timm only)
    files.py      the export dir: write_export, load_export, meta.json
    trained.py    a run dir or checkpoint of the trainer -> an export
    published.py  timm:NAME, torchvision:WEIGHTS, a weights file -> an export (fetched with the libraries' caches)
    source.py     any source, identified once (kind, file, sha256); ``resolve``: the export dir a stage reads
                  (``python -m export.source``, what tools/transfer_stage.sh calls)
    refresh.py    keep an export dir current: redo it only when its source changed, never leave it invalid
    mm_check.py   the mm side: build the target backbone with mmdet / mmseg and prove it holds the export

Nothing here trains; the detection and segmentation stages import mm_check, tools/export_backbone.py drives
refresh.
"""
