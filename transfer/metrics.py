"""MMDetection's VOCMetric and MMSegmentation's IoUMetric, also returning the per-class numbers they only log."""

from __future__ import annotations

import numpy as np

from mmstack import compat

compat.apply()  # mmcv's ops (mmcv-lite) before MMDetection imports them
from mmdet.evaluation.functional import eval_map  # noqa: E402
from mmdet.evaluation.metrics import VOCMetric  # noqa: E402
from mmengine.registry import METRICS  # noqa: E402
from mmseg.evaluation.metrics import IoUMetric  # noqa: E402


@METRICS.register_module()
class VOCMetricPerClass(VOCMetric):
    """VOCMetric plus ``AP50_<class>`` (percent) for every class, from the same ``eval_map`` call it makes."""

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        gts, preds = zip(*results)
        _, per_class = eval_map(preds, gts, scale_ranges=self.scale_ranges, iou_thr=0.5,
                                dataset=self.dataset_meta["classes"], logger="silent", eval_mode=self.eval_mode,
                                use_legacy_coordinate=True)
        for name, result in zip(self.dataset_meta["classes"], per_class):
            metrics[f"AP50_{name}"] = float(np.asarray(result["ap"]).item()) * 100
        return metrics


@METRICS.register_module()
class IoUMetricPerClass(IoUMetric):
    """IoUMetric plus ``IoU_<class>`` (percent; NaN for classes absent from both prediction and labels)."""

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        intersect, union = (sum(r[i] for r in results) for i in (0, 1))
        iou = (intersect / union).numpy() * 100
        for name, value in zip(self.dataset_meta["classes"], iou):
            metrics[f"IoU_{name}"] = float(value)
        return metrics
