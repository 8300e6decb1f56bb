"""Segmentation transfer (paper Table 9): MMSegmentation FCN on ADE20K with one of our backbones.

    python -m segmentation.train --export EXPORT_DIR|none --config CFG --data-root ADEChallengeData2016 --work-dir DIR
"""

from __future__ import annotations

import math
import sys

from lifecycle.errors import cli
from transfer.runner import DownstreamTask, recipe_schedule, walk
from transfer.runner import main as run_stage


def summarize(mm: dict[str, float], cfg) -> tuple[dict, dict]:
    """mmseg already reports percentages."""
    # NaN (a class in neither prediction nor labels) becomes null: JSON has no NaN.
    per_class = {k[4:]: (None if math.isnan(v) else v) for k, v in mm.items() if k.startswith("IoU_")}
    reduce_zero = []
    walk(cfg.train_dataloader, lambda d: reduce_zero.append(d["reduce_zero_label"])
         if d.get("type") == "LoadAnnotations" else None)
    crop = cfg.model.data_preprocessor.get("size")
    length, unit = recipe_schedule(cfg)  # in updates: the same on any GPU count
    protocol = dict(dataset="ADE20K train -> val", crop_size=list(crop) if crop else None,
                    reduce_zero_label=reduce_zero[0] if reduce_zero else None,
                    test="multi-scale" if cfg.get("tta_model") and "TestTimeAug" in str(cfg.test_dataloader)
                    else "single-scale",
                    schedule=f"{length} {unit}", model=cfg.model.decode_head.type)
    metrics = dict(mIoU=float(mm["mIoU"]), aAcc=float(mm["aAcc"]), mAcc=float(mm["mAcc"]), per_class_IoU=per_class)
    return metrics, protocol


STAGE = DownstreamTask(name="segmentation", library="mmseg", metric_types={"IoUMetric": "IoUMetricPerClass"},
                       summarize=summarize)


@cli  # one line per failure (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
