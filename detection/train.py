"""Detection transfer (paper Table 8): MMDetection Faster R-CNN on Pascal VOC with one of our backbones.

    python -m detection.train --export EXPORT_DIR|none --config CFG --data-root VOCdevkit --work-dir DIR
"""

from __future__ import annotations

import sys

from lifecycle.errors import cli
from transfer.runner import DownstreamTask, recipe_schedule, walk
from transfer.runner import main as run_stage


def summarize(mm: dict[str, float], cfg) -> tuple[dict, dict]:
    """mmdet reports mAP as a fraction and names keys 'pascal_voc/...'; the summary uses percent, as the paper."""
    prefix = "pascal_voc/"
    per_class = {k[len(prefix) + 5:]: v for k, v in mm.items() if k.startswith(prefix + "AP50_")}
    scales = []
    walk(cfg.test_dataloader, lambda d: scales.append(d["scale"]) if d.get("type") == "Resize" else None)
    modes = []
    walk(cfg.test_evaluator, lambda d: modes.append(d.get("eval_mode", "11points")) if "metric" in d else None)
    length, unit = recipe_schedule(cfg)  # in updates: the same on any GPU count
    protocol = dict(dataset="VOC07+12 trainval -> VOC07 test", test_scale=list(scales[0]) if scales else None,
                    schedule=f"{length} {unit}",
                    eval_mode=modes[0] if modes else None, iou_thr=0.5, model=cfg.model.type,
                    neck=cfg.model.get("neck", {}).get("type"))
    return dict(mAP=mm[prefix + "mAP"] * 100, per_class_AP=per_class), protocol


STAGE = DownstreamTask(name="detection", library="mmdet", metric_types={"VOCMetric": "VOCMetricPerClass"},
                       summarize=summarize)


@cli  # one line per failure (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
