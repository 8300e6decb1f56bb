"""The export dir: every source (a trained run, timm, torchvision, a weights file) ends in ``write_export``, so
every export has the same files and checks; ``load_export`` reads one back, checked against its meta.json.

An export dir holds::

    backbone.pth          {'state_dict': mm-named backbone tensors, 'meta': meta}  (mmengine init_cfg Pretrained;
                          torch.load(weights_only=True): tensors and plain types only)
    backbone.safetensors  the same tensors
    head.safetensors      the classifier's fc weight and bias (timm names), so that export_to_timm() rebuilds the
                          whole classifier and reproduces its logits exactly
    meta.json             written last: its presence marks a complete export

meta.json, besides the variant's names (variant, timm_name, mm_type, mm_style, deep_stem, avg_down) and the tensors'
count and hashes (num_keys, state_sha256, head_sha256): where the weights come from (source_kind "trained" | "timm"
| "torchvision" | "file", library, source, source_name, source_file, sha256 of that file; for a trained run also
source_checkpoint, checkpoint "last.pth" | "best.pth", weights "raw" | "ema", source_epoch and its config), the
ImageNet top-1 of exactly these weights (source_top1, and top1_from: which history row, or which library
statement) and the normalisation they expect (mean, std: RGB on 0-255, mean_std_from, color_order).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from classification.variants import get_variant
from lifecycle.artifacts import atomic_torch_save, atomic_write_bytes, atomic_write_json, stack_versions

from .layout import ExportError, check_shapes, mm_to_timm_key, reference_mm_shapes, reference_timm_shapes, state_sha256

EXPORT_FORMAT_VERSION = 1
META, BACKBONE_PTH, BACKBONE_ST, HEAD_ST = "meta.json", "backbone.pth", "backbone.safetensors", "head.safetensors"
EXPORT_FILES = (BACKBONE_PTH, BACKBONE_ST, HEAD_ST, META)
PUBLISHED_KINDS = ("timm", "torchvision", "file")  # meta source_kind of weights this toolkit did not train


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_bytes(state: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(state, metadata=meta)


def write_export(out_dir: str | Path, backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor],
                 variant: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """Write an export (mm backbone + timm head, both checked by ``timm_to_mm``) with meta.json last.

    ``provenance`` holds what differs between sources (a trained run, timm, torchvision, a weights file): at least
    mean / std (RGB, 0-255), source_top1 and where it came from, the weights file and its sha256. The keys that
    describe the variant, the tensors and the stack are added here, the same for every source.
    """
    v = get_variant(variant)
    meta = {
        "export_format_version": EXPORT_FORMAT_VERSION,
        "variant": v.name,
        "timm_name": v.timm_name,
        "mm_type": v.mm_type,
        "mm_style": v.mm_style,
        "deep_stem": v.deep_stem,
        "avg_down": v.avg_down,
        # mm loads images as BGR: its data_preprocessor needs bgr_to_rgb=True for these weights.
        "color_order": "RGB",
        **provenance,
        "num_keys": len(backbone),
        "state_sha256": state_sha256(backbone),
        "head_sha256": state_sha256(head),
        "versions": stack_versions(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st_meta = {"export_format_version": str(EXPORT_FORMAT_VERSION), "variant": v.name, "layout": "mm"}
    atomic_write_bytes(out / BACKBONE_ST, _safetensors_bytes(backbone, st_meta))
    atomic_write_bytes(out / HEAD_ST, _safetensors_bytes(head, dict(st_meta, layout="timm")))
    atomic_torch_save({"state_dict": backbone, "meta": meta}, out / BACKBONE_PTH)
    atomic_write_json(out / META, meta)  # last: a complete export
    return meta


def _export_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def read_meta(export_dir: str | Path) -> dict[str, Any]:
    """meta.json of an export, checked for version and for agreement with the variant table and its config."""
    d = _export_dir(export_dir)
    if not d.is_dir():
        raise ExportError(f"{d}: no such export dir; create it with tools/export_backbone.py RUN_DIR --out {d}")
    path = d / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ExportError(f"{path}: missing; {d} is not a complete export, rerun tools/export_backbone.py") from e
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read ({e}); rerun tools/export_backbone.py") from e
    if not isinstance(meta, dict) or meta.get("export_format_version") != EXPORT_FORMAT_VERSION:
        version = meta.get("export_format_version") if isinstance(meta, dict) else None
        raise ExportError(f"{path}: export_format_version {version!r} is not supported (this toolkit reads "
                          f"{EXPORT_FORMAT_VERSION}); re-export with this toolkit")
    try:
        v = get_variant(str(meta.get("variant")))
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from e
    if meta.get("source_kind") in PUBLISHED_KINDS:  # published weights: no training config to agree with
        pass
    elif (cfg_variant := (meta.get("config") or {}).get("variant")) != v.name:
        raise ExportError(f"{path}: meta variant {v.name!r} does not match its config's variant {cfg_variant!r}; "
                          f"the export was edited or mixed up, re-export it")
    table = {"mm_type": v.mm_type, "mm_style": v.mm_style}
    wrong = {k: meta.get(k) for k, want in table.items() if meta.get(k) != want}
    if wrong:
        raise ExportError(f"{path}: {wrong} disagrees with variant {v.name} ({table}); re-export it")
    return meta


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing; {path.parent} is not a complete export, rerun tools/export_backbone.py")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: cannot read ({e}); rerun tools/export_backbone.py") from e


def check_state(state: dict[str, torch.Tensor], meta: dict[str, Any], what: str) -> None:
    """An export's mm state dict against its meta: key set and shapes of the variant, count, tensor hash."""
    check_shapes(state, reference_mm_shapes(meta["variant"]), f"{what} (ResNet-50-{meta['variant']}, "
                 f"{meta['mm_type']})")
    if len(state) != meta.get("num_keys"):
        raise ExportError(f"{what}: {len(state)} tensors, meta.json says {meta.get('num_keys')}; re-export it")
    if state_sha256(state) != meta.get("state_sha256"):
        raise ExportError(f"{what}: tensor values do not match meta.json's state_sha256 (the file was changed after "
                          f"export); re-export it")


def load_export(export_dir: str | Path, source: str = "safetensors") -> tuple[dict[str, torch.Tensor], dict]:
    """(mm backbone state dict, meta) of an export, checked against meta.json; ``source``: "safetensors" or "pth"."""
    d = _export_dir(export_dir)
    meta = read_meta(d)
    if source == "safetensors":
        state = _load_safetensors(d / BACKBONE_ST)
        what = str(d / BACKBONE_ST)
    elif source == "pth":
        path = d / BACKBONE_PTH
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise ExportError(f"{path}: missing; rerun tools/export_backbone.py") from e
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
            raise ExportError(f"{path}: cannot load ({type(e).__name__}); rerun tools/export_backbone.py") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
            raise ExportError(f"{path}: no 'state_dict'; not an export of this toolkit, rerun tools/export_backbone.py")
        state, what = obj["state_dict"], str(path)
    else:
        raise ValueError(f"source must be 'safetensors' or 'pth', got {source!r}")
    check_state(state, meta, what)
    return state, meta


def verify_export(export_dir: str | Path) -> None:
    """Every tensor file of an export against its meta.json: meta.json alone says what was exported, not that its
    files survived (a partial copy, a full disk), and a stage reading a damaged file fails."""
    load_export(export_dir, "pth")
    export_to_timm(export_dir)  # backbone.safetensors and head.safetensors


def export_to_timm(export_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole timm classifier state dict (backbone from the export, fc from head.safetensors).

    It loads strictly into ``classification.models.build_model(meta['variant'], meta['num_classes'], ...)`` (for
    B/C/D that is ``timm.create_model(meta['timm_name'], num_classes=...)``) and reproduces the exported
    classifier's logits exactly.
    """
    d = _export_dir(export_dir)
    state, meta = load_export(d)
    head = _load_safetensors(d / HEAD_ST)
    if state_sha256(head) != meta.get("head_sha256"):
        raise ExportError(f"{d / HEAD_ST}: does not match meta.json's head_sha256; re-export it")
    full = {mm_to_timm_key(k, meta["variant"]): v for k, v in state.items()}
    full.update(head)
    check_shapes(full, reference_timm_shapes(meta["variant"], meta["num_classes"]), f"{d}: timm state")
    return full

