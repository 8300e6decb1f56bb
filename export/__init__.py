"""Export: a ResNet-50 classifier (a run of this toolkit's trainer, or published weights) as an MMDetection /
MMSegmentation backbone, checked key by key, tensor by tensor and output by output.

    layout.py     the timm <-> mm key mapping and the variant's reference shapes (torch + timm only)
    files.py      the export dir: write_export, load_export, meta.json
    trained.py    a run dir or checkpoint of the trainer -> an export
    published.py  timm:NAME, torchvision:WEIGHTS, a weights file -> an export (fetched with the libraries' caches)
    source.py     any source, identified once: its kind, its file, its sha256 (hashed once), the options that apply
    resolve.py    the one ``resolve``: the export dir a stage reads, exported first where needed
                  (``python -m export.resolve``, what tools/transfer_stage.sh calls)
    refresh.py    keep an export dir current: redo it only when its source changed, never leave it invalid
    mm_check.py   the mm side: build the target backbone with mmdet / mmseg and prove it holds the export

Nothing here trains; transfer/ imports mm_check, tools/export_backbone.py and resolve.py drive refresh.
"""
