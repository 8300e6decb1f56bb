"""C4 detectors (Faster R-CNN without FPN, the paper's Table 8 protocol): ResNet's last stage runs in the RoI head.

MMDetection's C4 recipe (``mmdet::_base_/models/faster-rcnn_r50-caffe-c4.py``) cuts the backbone after stage 3
and rebuilds ``layer4`` as ``roi_head.shared_head`` (``ResLayer``). So our export feeds two modules: the backbone
gets the stem and layer1-3, the shared head gets layer4 (its keys are the export's ``layer4.*`` as they are). mmdet
3.3's ``ResLayer`` cannot build ResNet-D's average-pool shortcut (it does not pass ``avg_down``), so for D the
head is ``AvgDownResLayer`` below: the same module with that one argument.
"""

from __future__ import annotations

from typing import Any

from classification.variants import get_variant
from mmstack import compat

compat.apply()  # mmcv's ops (mmcv-lite) before MMDetection's models import them
from mmdet.models.backbones import ResNet  # noqa: E402
from mmdet.models.layers import ResLayer as _ResLayer  # noqa: E402
from mmdet.models.roi_heads.shared_heads import ResLayer  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402


@MODELS.register_module()
class AvgDownResLayer(ResLayer):
    """mmdet's C4 shared head with ``layer{stage + 1}`` built with ``avg_down=True`` (ResNet-D's shortcut)."""

    def __init__(self, depth: int, stage: int = 3, stride: int = 2, dilation: int = 1, style: str = "pytorch",
                 norm_cfg: dict | None = None, norm_eval: bool = True, with_cp: bool = False, dcn=None,
                 pretrained=None, init_cfg=None):
        norm_cfg = norm_cfg or dict(type="BN", requires_grad=True)  # ResLayer's own default
        super().__init__(depth, stage=stage, stride=stride, dilation=dilation, style=style, norm_cfg=norm_cfg,
                         norm_eval=norm_eval, with_cp=with_cp, dcn=dcn, pretrained=pretrained, init_cfg=init_cfg)
        block, stage_blocks = ResNet.arch_settings[depth]
        planes = 64 * 2**stage
        inplanes = 64 * 2**(stage - 1) * block.expansion
        # Replaces the layer ResLayer built (same arguments as there, plus avg_down); the init_cfg stays.
        self.add_module(f"layer{stage + 1}", _ResLayer(block, inplanes, planes, stage_blocks[stage], stride=stride,
                                                       dilation=dilation, style=style, with_cp=with_cp,
                                                       norm_cfg=norm_cfg, dcn=dcn, avg_down=True))


def shared_head_keys(meta: dict[str, Any] | None, checkpoint: str | None) -> dict[str, Any]:
    """The shared head's config keys for the export's variant (``meta`` None: the random-init arm)."""
    if meta is None:
        return dict(init_cfg=None)  # ResLayer then uses its own Kaiming / constant init
    v = get_variant(meta["variant"])
    return dict(type="AvgDownResLayer" if v.avg_down else "ResLayer", style=v.mm_style,
                init_cfg=dict(type="Pretrained", checkpoint=checkpoint))
