"""ResNet-50 A/B/C/D (He et al. 2019, §4) built on timm's ResNet, with the paper's initialisations."""

from __future__ import annotations

import timm
import torch
from torch import nn

from .variants import get_variant

# Downsampling blocks: the first block of layer2..4 (layer1 keeps the resolution after the stem's max-pool).
DOWNSAMPLING_STAGES = ("layer2", "layer3", "layer4")


def _move_stride_to_1x1(model: nn.Module) -> None:
    """ResNet-50-A (the original ResNet): stride 2 in the first 1x1 conv of a downsampling block.

    timm's ``resnet50`` is ResNet-B (stride in the 3x3 conv2). The weights' shapes are identical, only where
    the stride is applied differs, which is exactly mmdet's ResNet(style='caffe') vs style='pytorch'.
    """
    for stage in DOWNSAMPLING_STAGES:
        block = getattr(model, stage)[0]
        block.conv1.stride = (2, 2)
        block.conv2.stride = (1, 1)


def xavier_init_(model: nn.Module) -> None:
    """§2 baseline: Xavier-uniform conv and FC weights, biases 0 (BN keeps timm's gamma 1 / beta 0 or the
    zero-gamma initialisation, which this function does not touch)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_model(
    variant: str,
    num_classes: int,
    *,
    zero_gamma: bool,
    init: str,
    mean: list[float],
    std: list[float],
) -> nn.Module:
    """A freshly initialised ResNet-50 of the paper's ``variant``; ``mean``/``std`` are RGB on 0-255."""
    v = get_variant(variant)
    # zero_init_last is passed explicitly: timm's default (True) is the zero-gamma trick.
    model = timm.create_model(v.timm_name, pretrained=False, num_classes=num_classes, zero_init_last=zero_gamma)
    if v.name == "A":
        _move_stride_to_1x1(model)
    if init == "xavier":
        xavier_init_(model)
    elif init != "timm":
        raise ValueError(f"unknown init {init!r}; expected 'xavier' or 'timm'")
    # Record our normalisation where timm's distillation wrapper and the export look for it (0-1 scale).
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(m / 255 for m in mean),
                            "std": tuple(s / 255 for s in std)}
    return model


def zero_gamma_bns(model: nn.Module) -> list[torch.Tensor]:
    """The BN weights that zero-gamma initialises to 0: the last BN of every residual branch."""
    return [block.bn3.weight for stage in ("layer1", "layer2", "layer3", "layer4") for block in getattr(model, stage)]
