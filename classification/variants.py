"""The paper's ResNet-50 variants (He et al. 2019, §4, Figure 2), mapped to library names once.

- A: the original ResNet: stride 2 in the first 1x1 conv of a downsampling block. timm has no A; we build it
  from timm's ``resnet50`` by moving the stride (classification/models.py). MMDetection: ResNet style='caffe'.
- B: stride 2 moved to the 3x3 conv (torchvision / timm ``resnet50``). MM: ResNet style='pytorch'.
- C: B with the 7x7 stem replaced by three 3x3 convs (32, 32, 64). timm ``resnet50c``; MM ``ResNetV1c``.
- D: C with a 2x2 stride-2 average pool before the 1x1 shortcut conv. timm ``resnet50d``; MM ``ResNetV1d``.

Nothing else in the toolkit spells these names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str  # the paper's letter
    timm_name: str  # the timm model this variant is built from
    mm_type: str  # MMDetection / MMSegmentation backbone type
    mm_style: str  # mm ResNet 'style': where the stride-2 conv sits ('caffe': 1x1, 'pytorch': 3x3)
    deep_stem: bool
    avg_down: bool


VARIANTS: dict[str, Variant] = {
    "A": Variant("A", "resnet50", "ResNet", "caffe", deep_stem=False, avg_down=False),
    "B": Variant("B", "resnet50", "ResNet", "pytorch", deep_stem=False, avg_down=False),
    "C": Variant("C", "resnet50c", "ResNetV1c", "pytorch", deep_stem=True, avg_down=False),
    "D": Variant("D", "resnet50d", "ResNetV1d", "pytorch", deep_stem=True, avg_down=True),
}


def get_variant(name: str) -> Variant:
    key = name.upper()
    if key not in VARIANTS:
        raise ValueError(f"unknown ResNet-50 variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[key]
