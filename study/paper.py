"""The paper's numbers as data, keyed by our study arm names: He, Zhang, Zhang, Zhang, Xie, Li, "Bag of Tricks
for Image Classification with Convolutional Neural Networks", CVPR 2019 (arXiv 1812.01187), Tables 4, 5, 6, 8, 9.

Every report puts these beside ours. Arm keys are canonical: ``b_standard`` .. ``d_distill_mixup`` map to the
rows of Tables 6, 8 and 9; ``random_init`` is our own control (no paper row); any other arm name is allowed and
shown with empty paper cells. The paper's tables are cumulative: each refinement is added to the row named in
``BUILDS_ON``, which is what its finding ("label smoothing and mixup hurt segmentation", §6) is measured against.
"""

from __future__ import annotations

from typing import NamedTuple

B_STANDARD = "b_standard"
RANDOM_INIT = "random_init"

# The paper's row order (Table 6 order, B-standard first; Tables 8/9 are a subsequence of it).
ARM_ORDER: tuple[str, ...] = (
    "b_standard",
    "d_efficient",
    "d_cosine",
    "d_label_smoothing",
    "d_distill",
    "d_mixup",
    "d_distill_mixup",
)

DISPLAY: dict[str, str] = {
    "b_standard": "B-standard",
    "d_efficient": "D-efficient",
    "d_cosine": "+ cosine",
    "d_label_smoothing": "+ label smoothing",
    "d_distill": "+ distillation, no mixup",
    "d_mixup": "+ mixup",
    "d_distill_mixup": "+ distillation with mixup",
    "random_init": "random init",
}

# Table 6 is cumulative, but distillation and mixup branch off label smoothing (§5.4: "+ mixup, no distillation"),
# and Tables 8/9 go B-standard -> D-efficient -> cosine -> label smoothing -> mixup.
BUILDS_ON: dict[str, str] = {
    "d_efficient": "b_standard",  # model tweak B -> D plus the efficient-training recipe (§3, §4)
    "d_cosine": "d_efficient",
    "d_label_smoothing": "d_cosine",
    "d_distill": "d_label_smoothing",
    "d_mixup": "d_label_smoothing",
    "d_distill_mixup": "d_mixup",
}


class Cls(NamedTuple):  # Table 6: ImageNet top-1 / top-5
    top1: float
    top5: float | None


class Det(NamedTuple):  # Table 8: Faster R-CNN, VOC 07+12 -> VOC 07 test
    top1: float
    mAP: float


class Seg(NamedTuple):  # Table 9: FCN, ADE20K
    top1: float
    aAcc: float
    mIoU: float


TABLE6: dict[str, Cls] = {
    # Table 6 has no B-standard row; Table 8 gives its ImageNet top-1 (no top-5), used for Table 6 gains.
    "b_standard": Cls(76.14, None),
    "d_efficient": Cls(77.16, 93.52),
    "d_cosine": Cls(77.91, 93.81),
    "d_label_smoothing": Cls(78.31, 94.09),
    "d_distill": Cls(78.67, 94.36),
    "d_mixup": Cls(79.15, 94.58),
    "d_distill_mixup": Cls(79.29, 94.63),
}
TABLE6_NOTE = "B-standard's paper top-1 is Table 8's (Table 6 has no B-standard row, and no top-5 for it)."

TABLE8: dict[str, Det] = {
    "b_standard": Det(76.14, 77.54),
    "d_efficient": Det(77.16, 78.30),
    "d_cosine": Det(77.91, 79.23),
    "d_label_smoothing": Det(78.31, 80.71),
    "d_mixup": Det(79.15, 81.33),
}

TABLE9: dict[str, Seg] = {
    "b_standard": Seg(76.14, 78.08, 37.05),
    "d_efficient": Seg(77.16, 78.88, 38.88),
    "d_cosine": Seg(77.91, 79.25, 39.33),
    "d_label_smoothing": Seg(78.31, 78.64, 38.75),
    "d_mixup": Seg(79.15, 77.08, 37.99),
}

TABLES: dict[str, dict[str, NamedTuple]] = {"table6": TABLE6, "table8": TABLE8, "table9": TABLE9}

# The classification rows behind configs/classification/*.yaml (each recipe's comment names its row), ImageNet top-1.
# Table 4: efficient training of ResNet-50 (A), cumulative heuristics, at batch 256 and 1024 (linear-scaled lr).
TABLE4: dict[str, tuple[float, float]] = {  # recipe suffix -> (BS 256, BS 1024)
    "linear_scaling": (75.87, 75.17),
    "warmup": (76.03, 75.93),  # 5 epochs from 0
    "zero_gamma": (76.19, 76.37),
    "no_bias_decay": (76.16, 76.03),
    "fp16": (76.15, 76.21),
}
# Table 5: model tweaks in the efficient setting (BS 1024, FP16): top-1, top-5.
TABLE5: dict[str, Cls] = {
    "r50a_efficient": Cls(76.21, 92.97),
    "r50b_efficient": Cls(76.66, 93.28),
    "r50c_efficient": Cls(76.87, 93.48),
    "r50d_efficient": Cls(77.16, 93.52),
}
# Table 3: minutes per epoch on 8 V100s, baseline (BS 256, FP32) and efficient (BS 1024, FP16).
TABLE3_MINUTES_PER_EPOCH = {"baseline": 13.3, "efficient": 4.4}

# Cells whose value is not certain: (table, arm, field) -> why. The report marks them and repeats the note.
UNVERIFIED: dict[tuple[str, str, str], str] = {
    ("table9", "d_mixup", "aAcc"): "not verified against the PDF",
}


def display_name(arm: str) -> str:
    return DISPLAY.get(arm, arm)


def value(table: str, arm: str, field: str) -> float | None:
    """The paper's cell, or None where the paper has no such row or column."""
    row = TABLES[table].get(arm)
    return None if row is None else getattr(row, field)


def gain(table: str, arm: str, field: str, against: str = B_STANDARD) -> float | None:
    """The paper's own gain: its row for ``arm`` minus its row for ``against`` (None if either is missing)."""
    a, b = value(table, arm, field), value(table, against, field)
    return None if a is None or b is None else a - b


def unverified(table: str, arm: str, field: str) -> str | None:
    return UNVERIFIED.get((table, arm, field))


def arm_sort_key(arm: str) -> tuple[int, int, str]:
    """The paper's order, then unknown arms alphabetically, then the random-init control."""
    if arm == RANDOM_INIT:
        return (2, 0, arm)
    if arm in ARM_ORDER:
        return (0, ARM_ORDER.index(arm), arm)
    return (1, 0, arm)


def ancestors(arm: str) -> list[str]:
    """The rows ``arm`` builds on, nearest first (e.g. d_mixup -> d_label_smoothing, d_cosine, ..., b_standard)."""
    out = []
    while arm in BUILDS_ON:
        arm = BUILDS_ON[arm]
        out.append(arm)
    return out
