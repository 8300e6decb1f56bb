"""The stages of a study, in the order they run: the one table that the study (its file, plan, Slurm jobs), the
report, the summaries, the shell wrappers and the checks read. A downstream task is a row here, plus its package
(``<task>/train.py``: the library it runs and how its metrics become the summary's).

    python -m lifecycle.stages defaults detection   # the shell wrappers' default recipe and data root
"""

from __future__ import annotations

import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperTable:
    """The paper's table a stage's summaries fill, and its columns: (summary metric, label)."""
    key: str  # study/paper.py's name for its numbers
    title: str
    columns: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StageRow:
    name: str
    dir: str  # its run dir: WORK_DIR/<arm>/seed<S>/<dir>
    output: str  # the file whose presence marks it done
    part: str  # the Slurm job of an arm and seed that runs it: "imagenet" or "transfer" (study/slurm.py)
    module: str | None = None  # ``python -m MODULE`` trains it; None: the export (tools/export_backbone.py)
    data: str | None = None  # the study's data key, also the dataset kind of tools/check_data.py
    data_dir: str | None = None  # that dataset's folder under --data-root (and under data/ for the shell wrappers)
    config: str | None = None  # the shell wrapper's default recipe
    metrics: tuple[str, ...] = ()  # the summary metrics results.csv lists
    table: PaperTable | None = None
    transfer: tuple[tuple[str, str], ...] = ()  # downstream: (metric, label) whose transfer the report measures
    plotted: str = ""  # downstream: the metric of the report's gain plot


STAGES: dict[str, StageRow] = {s.name: s for s in (
    StageRow("classification", "cls", "summary.json", "imagenet", module="classification.train", data="imagenet",
          data_dir="imagenet", metrics=("top1", "top5", "ema_top1", "ema_top5"),
          table=PaperTable("table6", "Table 6 — classification (ResNet-50-D training refinements)",
                           (("top1", "top-1"), ("top5", "top-5")))),
    StageRow("export", "export", "meta.json", "imagenet"),
    StageRow("detection", "det", "summary.json", "transfer", module="detection.train", data="voc", data_dir="VOCdevkit",
          config="configs/detection/faster-rcnn_r50_fpn_voc0712.py", metrics=("mAP",),
          table=PaperTable("table8", "Table 8 — Faster R-CNN on Pascal VOC (VOC07 test mAP@0.5)",
                           (("mAP", "VOC mAP"),)),
          transfer=(("mAP", "VOC mAP"),), plotted="mAP"),
    StageRow("segmentation", "seg", "summary.json", "transfer", module="segmentation.train", data="ade20k",
          data_dir="ADEChallengeData2016", config="configs/segmentation/fcn_r50-d8_ade20k-512x512.py",
          metrics=("mIoU", "aAcc", "mAcc"),
          table=PaperTable("table9", "Table 9 — FCN on ADE20K (pixel accuracy = aAcc, mIoU)",
                           (("aAcc", "ADE pixel acc"), ("mIoU", "ADE mIoU"))),
          transfer=(("aAcc", "ADE pixel acc"), ("mIoU", "ADE mIoU")), plotted="mIoU"),
)}
NAMES = tuple(STAGES)
SUMMARY_STAGES = tuple(n for n, s in STAGES.items() if s.output == "summary.json")  # what summary.json's stage says
DOWNSTREAM = tuple(n for n, s in STAGES.items() if s.part == "transfer")  # trained on an export (or from scratch)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "defaults":
        print(f"usage: python -m lifecycle.stages defaults {{{'|'.join(DOWNSTREAM)}}}", file=sys.stderr)
        return 2
    if argv[1] not in DOWNSTREAM:
        print(f"error: unknown stage {argv[1]} ({' or '.join(DOWNSTREAM)})", file=sys.stderr)
        return 2
    stage = STAGES[argv[1]]
    print(stage.config, f"data/{stage.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
