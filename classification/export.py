"""Export a classifier as an MMDetection / MMSegmentation backbone, and read such an export back.

The classifier is a run of this toolkit's trainer (``export_backbone``: by default the final epoch's raw weights,
``last.pth``'s model, which is what the paper reports; ``checkpoint="best"`` and ``weights="ema"`` opt in to the
others) or published weights (classification/published.py: timm, torchvision, a weights file); both end in
``write_export``, so every export has the same files and checks.

MMDetection and MMSegmentation load pretrained backbones with ``strict=False`` and only log the keys they
skipped: a wrong key mapping silently trains from random weights. So the export checks every key and shape
against the variant's reference layout when it is written and again when it is read, and records a hash of
its tensors in ``meta.json``. The mm side of the check (building the target backbone from the installed
packages and comparing) lives in ``transfer/backbone_check.py``; this module is torch + timm only.

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

Key mapping timm -> mm (confirmed against the pinned mmdet / mmseg modules by tests/test_export.py):
- every variant: ``layerN.*`` keeps its name (the 1x1 shortcut is ``downsample.0/.1``, with the D average pool
  in front ``downsample.1/.2``: both libraries number the pool, which holds no tensors);
- A, B (7x7 stem): ``conv1`` and ``bn1`` keep their names (mm ResNet's stem norm is also called ``bn1``);
- C, D (deep stem): timm's ``conv1`` is Sequential(conv, bn, act, conv, bn, act, conv) and its last BN is ``bn1``;
  mm's ``stem`` is Sequential(conv, bn, relu) x 3, so ``conv1.{0,1,3,4,6}`` -> ``stem.{0,1,3,4,6}``, ``bn1`` ->
  ``stem.7``;
- ``fc`` (the classifier head) is not part of the backbone: it goes to head.safetensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lifecycle.artifacts import atomic_torch_save, atomic_write_bytes, atomic_write_json, stack_versions
from lifecycle.errors import UserError

from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import ConfigError, config_from_dict
from .models import build_model
from .variants import get_variant

EXPORT_FORMAT_VERSION = 1
META, BACKBONE_PTH, BACKBONE_ST, HEAD_ST = "meta.json", "backbone.pth", "backbone.safetensors", "head.safetensors"
HEAD_PREFIX = "fc."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
# mm's deep stem is Sequential(conv, bn, relu) x 3: timm's conv1.{0,1,3,4,6} keep their indices, the last BN
# (timm's separate bn1) is the 8th entry.
_MM_STEM, _MM_STEM_LAST_BN = "stem.", "stem.7."
PUBLISHED_KINDS = ("timm", "torchvision", "file")  # meta source_kind of weights this toolkit did not train


class ExportError(UserError, ValueError):
    """A bad export or a backbone that does not hold it; the message is one line naming the keys and the fix."""


def format_keys(keys: list[str] | set[str], limit: int = 8) -> str:
    """One line of keys: a set sorted, a list in its own (module) order, at most ``limit`` of them."""
    keys = sorted(keys) if isinstance(keys, set) else list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ---------------------------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------------------------


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes (in any nesting)."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def timm_to_mm_key(key: str, variant: str) -> str | None:
    """The mm backbone name of a timm ResNet key; None for the classifier head."""
    if key.startswith(HEAD_PREFIX):
        return None
    if get_variant(variant).deep_stem:
        if key.startswith("conv1."):
            return _MM_STEM + key[len("conv1."):]
        if key.startswith("bn1."):
            return _MM_STEM_LAST_BN + key[len("bn1."):]
    return key


def mm_to_timm_key(key: str, variant: str) -> str:
    """Inverse of timm_to_mm_key for backbone keys."""
    if get_variant(variant).deep_stem:
        if key.startswith(_MM_STEM_LAST_BN):
            return "bn1." + key[len(_MM_STEM_LAST_BN):]
        if key.startswith(_MM_STEM):
            return "conv1." + key[len(_MM_STEM):]
    return key


def reference_timm_shapes(variant: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the variant's timm classifier, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(variant, num_classes, zero_gamma=False, init="timm", mean=[0.0] * 3, std=[1.0] * 3)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def reference_mm_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the variant's mm backbone as this module maps it (tests compare it with mmdet/mmseg)."""
    return {timm_to_mm_key(k, variant): s for k, s in reference_timm_shapes(variant, 1).items()
            if timm_to_mm_key(k, variant) is not None}


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Raise ExportError listing every missing, unexpected and mis-shaped key of ``state`` against ``expected``."""
    missing = set(expected) - set(state)
    extra = set(state) - set(expected)
    shapes = {k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k])}
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {format_keys(missing)}")
    if extra:
        problems.append(f"unexpected {len(extra)} key(s): {format_keys(extra)}")
    if shapes:
        problems.append("wrong shape: " + format_keys(
            [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in sorted(shapes)], limit=4))
    if problems:
        raise ExportError(f"{what}: {'; '.join(problems)}")


def timm_to_mm(state: dict[str, torch.Tensor], variant: str, num_classes: int
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A timm classifier state dict -> (mm backbone state dict, timm head state dict), checked key by key."""
    state = strip_wrapper_prefixes(state)
    check_shapes(state, reference_timm_shapes(variant, num_classes), f"ResNet-50-{variant} classifier weights")
    backbone, head = {}, {}
    for key, value in state.items():
        mm_key = timm_to_mm_key(key, variant)
        (head if mm_key is None else backbone)[mm_key or key] = value.detach().to("cpu").contiguous()
    return backbone, head


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes: equal for the same tensors whatever file format holds them."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def _source_top1(ckpt: dict[str, Any], path: Path, weights: str) -> float | None:
    """Top-1 of exactly these weights: the checkpoint's history row for its epoch, else the run's summary.json.

    A mid-epoch checkpoint (step > 0) holds weights that were never evaluated: None.
    """
    metric = "ema_top1" if weights == "ema" else "top1"
    epoch, step = ckpt.get("epoch"), ckpt.get("step", 0)
    if step:
        return None
    for row in reversed(ckpt.get("history") or []):
        if row.get("epoch") == epoch and row.get(metric) is not None:
            return float(row[metric])
    summary = path.parent / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            rows = s.get("history") or []
            if rows and rows[-1].get("epoch") == epoch and s.get("metrics", {}).get(metric) is not None:
                return float(s["metrics"][metric])
        except (OSError, ValueError, AttributeError):
            return None
    return None


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


def run_checkpoint(src: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file an export of ``src`` reads (``checkpoint.resolve_checkpoint``: last.pth by default)."""
    try:
        return resolve_checkpoint(src, checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e


def export_backbone(src: str | Path, out_dir: str | Path, weights: str | None = None,
                    checkpoint: str | None = None) -> dict[str, Any]:
    """Write ``src``'s (a run dir or checkpoint) backbone to ``out_dir`` in the mm layout; returns the meta.

    Defaults are what the paper reports: the final epoch (``last.pth``) and the raw weights. ``checkpoint="best"``
    and ``weights="ema"`` are explicit opt-ins; meta.json records the choice, the epoch and the top-1 of exactly
    the exported weights.
    """
    weights = weights or "raw"
    if weights not in ("ema", "raw"):
        raise ExportError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = run_checkpoint(src, checkpoint)
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint or run dir; give a classification run dir or its .pth file")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    if not is_run_checkpoint(ckpt):
        raise ExportError(f"{path}: not a classification checkpoint of this toolkit (no config/model/num_classes)")
    try:
        cfg = config_from_dict(ckpt["config"], str(path))
    except ConfigError as e:
        raise ExportError(str(e)) from e
    if weights == "ema" and ckpt.get("ema") is None:
        raise ExportError(f"{path}: this run kept no EMA weights (ema_decay was {cfg.ema_decay}); export without "
                          f"--weights ema (raw weights are the default)")
    v = get_variant(cfg.variant)
    backbone, head = timm_to_mm(ckpt["ema" if weights == "ema" else "model"], v.name, ckpt["num_classes"])
    metric = "ema_top1" if weights == "ema" else "top1"
    top1 = _source_top1(ckpt, path, weights)
    return write_export(out_dir, backbone, head, v.name, {
        "source_kind": "trained",
        "library": "bot-toolkit",
        "source": str(path.resolve()),
        "source_name": cfg.name,
        "source_file": str(path.resolve()),
        "source_checkpoint": str(path.resolve()),
        "checkpoint": path.name,
        "weights": weights,
        "sha256": file_sha256(path),
        "source_epoch": ckpt.get("epoch"),
        "source_top1": top1,
        "top1_from": None if top1 is None else f"{path.name} history, epoch {ckpt.get('epoch')}, {metric}",
        "mean": [float(m) for m in cfg.mean],  # RGB, 0-255
        "std": [float(s) for s in cfg.std],
        "mean_std_from": "the classification config",
        "arm": cfg.name,
        "name": cfg.name,
        "num_classes": int(ckpt["num_classes"]),
        "classes": [str(c) for c in ckpt.get("classes") or []],
        "config": cfg.to_dict(),
    })


def is_run_checkpoint(obj: Any) -> bool:
    """A checkpoint written by this toolkit's trainer (as opposed to a plain state dict of timm / torchvision)."""
    return isinstance(obj, dict) and all(k in obj for k in ("config", "model", "num_classes"))


# ---------------------------------------------------------------------------------------------------------------
# Reading an export
# ---------------------------------------------------------------------------------------------------------------


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

