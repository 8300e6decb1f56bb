"""The mm side of the export: build the target backbone from the pinned mmdet / mmseg, and prove it holds the export.

mmengine loads ``init_cfg=dict(type='Pretrained', ...)`` with ``strict=False`` and only logs what it skipped, so
the detection and segmentation stages call ``verify_model_loaded`` after the model is initialised (before the
first training step changes the weights): every backbone tensor, parameters and buffers, must equal the export.
tools/export_backbone.py runs ``check_in_both_libraries`` on every new export before it replaces the old one.
Nothing here loads with ``strict=False``; mmdet / mmseg / mmengine are imported only when a function needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from classification.checkpoint import unwrap
from classification.models import build_model
from classification.variants import get_variant

from .files import BACKBONE_PTH, export_to_timm, load_export
from .layout import ExportError, check_shapes, format_keys

LIBRARIES = ("mmdet", "mmseg")
# MMSegmentation's FCN / dilated layout (mmseg::_base_/models/fcn_r50-d8.py): output stride 8, the first block of
# each dilated stage with half the dilation (contract_dilation).
DILATED = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)
# Stage outputs of an mm backbone and the classifier it came from agree to float rounding (0.0 measured on CPU for
# A-D; fp32 reassociation may differ elsewhere): more than this is a layout error, not rounding.
OUTPUT_TOL = 1e-4
# C4 detectors run the last stage as the RoI head's shared head (transfer/shared_head.py): these export keys go there.
SHARED_HEAD_PREFIX = "layer4."


def _registry(library: str):
    from mmstack import compat

    compat.apply()  # mmcv's ops (mmcv-lite) before the models import them
    if library == "mmdet":
        import mmdet.models  # noqa: F401 - registers the backbones
        from mmdet.registry import MODELS
    elif library == "mmseg":
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
    else:
        raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")
    return MODELS


def mm_backbone_cfg(meta: dict[str, Any], library: str = "mmdet", dilated: bool = False,
                    checkpoint: str | Path | None = None) -> dict[str, Any]:
    """The ``backbone`` config dict of the export's variant for ``library`` (what the stages' configs use).

    mmdet 3.3 registers no ``ResNetV1c``: there variant C is ``ResNet`` with ``deep_stem=True`` (the same module
    mmseg's three-line ``ResNetV1c`` subclass builds). ``checkpoint``: add ``init_cfg`` Pretrained from it.
    """
    v = get_variant(meta["variant"])
    registry = _registry(library)
    if registry.get(v.mm_type) is not None:
        cfg: dict[str, Any] = dict(type=v.mm_type, depth=50)
    else:
        cfg = dict(type="ResNet", depth=50, deep_stem=v.deep_stem, avg_down=v.avg_down)
    cfg.update(style=v.mm_style, num_stages=4, out_indices=(0, 1, 2, 3))
    if dilated:
        if library != "mmseg":
            raise ValueError("the dilated (output stride 8) layout is mmseg's FCN backbone; use library='mmseg'")
        cfg.update(DILATED)
    if checkpoint is not None:
        cfg["init_cfg"] = dict(type="Pretrained", checkpoint=str(checkpoint))
    return cfg


def build_mm_backbone(meta: dict[str, Any], library: str = "mmdet", dilated: bool = False,
                      checkpoint: str | Path | None = None) -> nn.Module:
    """The export's target backbone, built by the pinned package's own registry (randomly initialised until
    ``init_weights()``; with ``checkpoint`` that loads it through mmengine's Pretrained init). Built in the library's
    scope: an mmengine Runner created earlier in the process leaves its default scope behind, whose registry would be
    searched instead."""
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope(library):
        return _registry(library).build(mm_backbone_cfg(meta, library, dilated, checkpoint))


def data_preprocessor_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """mean/std/bgr_to_rgb for mm's data_preprocessor: the normalisation the weights were trained with (meta.json:
    the run's config, timm's pretrained_cfg, torchvision's transforms; RGB, 0-255); mm loads BGR images."""
    if meta.get("color_order") != "RGB":
        raise ExportError(f"export meta color_order {meta.get('color_order')!r}: expected 'RGB'; re-export it")
    mean, std = meta.get("mean"), meta.get("std")
    if not all(isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)
               for v in (mean, std)):
        raise ExportError(f"export meta mean {mean!r} / std {std!r}: expected three numbers each (RGB, 0-255); "
                          f"re-export it")
    if max(mean) <= 1.0 and max(std) <= 1.0:  # 0-1 statistics would normalise 0-255 pixels to ~1000
        raise ExportError(f"export meta mean {mean} / std {std} are on the 0-1 scale; mm's data_preprocessor works "
                          f"on 0-255 pixels: re-export it with this toolkit")
    return dict(mean=[float(x) for x in mean], std=[float(x) for x in std], bgr_to_rgb=True)


def classifier_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four stage outputs of a timm or torchvision ResNet (stem, max-pool, layer1..4), the mm backbone's outputs."""
    act = model.act1 if hasattr(model, "act1") else model.relu  # timm names it act1, torchvision relu
    x = model.maxpool(act(model.bn1(model.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        outs.append(x)
    return outs


def check_stage_outputs(export_dir: str | Path, backbone: nn.Module, tol: float = OUTPUT_TOL) -> float:
    """Run the classifier the export describes (its timm model, rebuilt from the export) and the loaded mm
    ``backbone`` on one seeded 64x64 image; their four stage outputs must agree within ``tol``. Returns the max
    abs difference; ExportError naming the stage otherwise. The backbone is left in eval mode."""
    _, meta = load_export(export_dir)
    model = build_model(meta["variant"], meta["num_classes"], zero_gamma=False, init="timm", mean=meta["mean"],
                        std=meta["std"])
    model.load_state_dict(export_to_timm(export_dir), strict=True)
    model.eval()
    backbone = _backbone_of(backbone)
    backbone.eval()  # mm's ResNet.train() returns None: no chaining
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = classifier_stages(model, x), backbone(x)
    diffs = [(a - b).abs().max().item() if a.shape == b.shape else float("inf") for a, b in zip(want, got)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    if len(got) != 4 or diffs[worst] > tol:
        raise ExportError(f"{type(backbone).__name__} loaded with {export_dir}: stage {worst + 1} output differs from "
                          f"the classifier's by {diffs[worst]:.3g} (> {tol}); the variant ({meta['variant']}, style "
                          f"{meta['mm_style']}) does not match the weights: re-export with the right --variant")
    return max(diffs)


def _backbone_of(model: nn.Module) -> nn.Module:
    """A backbone, or the backbone of a (DDP-wrapped) detector / segmentor."""
    model = unwrap(model)
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def check_export_matches(state_dict: dict[str, torch.Tensor], backbone: nn.Module) -> None:
    """The export's key set and every shape equal the target backbone's; else ExportError listing the keys."""
    target = {k: tuple(v.shape) for k, v in _backbone_of(backbone).state_dict().items()}
    check_shapes(state_dict, target, f"export vs {type(_backbone_of(backbone)).__name__}")


def load_into(backbone: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Check, then ``load_state_dict(strict=True)``."""
    backbone = _backbone_of(backbone)
    check_export_matches(state_dict, backbone)
    backbone.load_state_dict(state_dict, strict=True)
    return backbone


def _export_state(export: str | Path | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(export, dict):
        return export, "the export"
    state, _ = load_export(export)
    return state, str(export)


def verify_backbone_loaded(model_backbone: nn.Module, export: str | Path | dict[str, torch.Tensor]
                           ) -> dict[str, Any]:
    """Every tensor (params AND buffers) of an initialised backbone equals the export; else ExportError naming them.

    Call it after mmengine's ``init_weights()`` and before training. ``model_backbone``: the backbone or the whole
    (wrapped) model; ``export``: an export dir or its state dict. Returns a record for summary.json.
    """
    backbone = _backbone_of(model_backbone)
    state, what = _export_state(export)
    check_export_matches(state, backbone)
    own = backbone.state_dict()
    differ = [k for k, t in own.items() if not torch.equal(t.detach().to("cpu", state[k].dtype), state[k])]
    if differ:
        hint = (f"set init_cfg=dict(type='Pretrained', checkpoint='{Path(what) / BACKBONE_PTH}') and check that "
                f"init_weights() ran" if not isinstance(export, dict) else "the pretrained weights did not load")
        raise ExportError(f"{type(backbone).__name__} does not hold {what}: {len(differ)} of {len(state)} tensors "
                          f"differ ({format_keys(differ)}); {hint}")
    return dict(backbone_loaded=True, tensors_checked=len(state), export=what)


def verify_model_loaded(model: nn.Module, export: str | Path | dict[str, torch.Tensor]) -> dict[str, Any]:
    """``verify_backbone_loaded`` for a whole (wrapped) detector or segmentor. A C4 detector holds the export in
    two modules: layer4 in ``roi_head.shared_head``, the rest in the backbone; both are checked, every tensor."""
    model = unwrap(model)
    head = getattr(getattr(model, "roi_head", None), "shared_head", None)
    if head is None:
        return verify_backbone_loaded(model, export)
    state, what = _export_state(export)
    in_head = {k for k in state if k.startswith(SHARED_HEAD_PREFIX)}
    try:
        verify_backbone_loaded(model.backbone, {k: v for k, v in state.items() if k not in in_head})
        verify_backbone_loaded(head, {k: state[k] for k in in_head})
    except ExportError as e:
        raise ExportError(f"{what} (C4: stem + layer1-3 in the backbone, layer4 in roi_head.shared_head): {e}") from e
    return dict(backbone_loaded=True, tensors_checked=len(state), shared_head_tensors=len(in_head), export=what)


def check_in_both_libraries(export_dir: str | Path) -> list[str]:
    """Load ``export_dir``'s backbone.pth the way the stages do (mmengine's Pretrained init), in mmdet and in mmseg;
    compare every tensor, then the four stage outputs with those of the classifier the export describes. One line
    per library; ExportError where either differs."""
    from mmengine.logging import MMLogger

    MMLogger.get_instance("export_backbone", log_level="WARNING")  # mmengine logs every initialised tensor at INFO
    export_dir = Path(export_dir)
    state, meta = load_export(export_dir)
    lines = []
    for library in LIBRARIES:
        backbone = build_mm_backbone(meta, library, checkpoint=export_dir / BACKBONE_PTH)
        check_export_matches(state, backbone)
        backbone.init_weights()
        report = verify_backbone_loaded(backbone, state)
        diff = check_stage_outputs(export_dir, backbone)
        lines.append(f"{library} {type(backbone).__name__}: {report['tensors_checked']} tensors equal, stage outputs "
                     f"within {diff:.1g} of the classifier's")
    return lines
