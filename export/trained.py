"""Export a run of this toolkit's trainer: by default the final epoch's raw weights (``last.pth``'s model, what the
paper reports); ``checkpoint="best"`` and ``weights="ema"`` opt in to the others. meta.json records the choice, the
epoch, the run's config and the top-1 of exactly the exported weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from classification.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, resolve_checkpoint, run_progress
from classification.config import ConfigError, config_from_dict
from classification.variants import get_variant

from .files import file_sha256, write_export
from .layout import ExportError, timm_to_mm

WEIGHTS = ("raw", "ema")  # a run's weights: as trained (the default, what the paper reports) or their EMA


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


def progress_of(meta: dict[str, Any]) -> str:
    """``progress``'s words for an export of a trained run, from its meta.json."""
    epoch = {"epoch": meta.get("source_epoch"), "step": meta.get("source_step", 0)}
    return run_progress(epoch, meta.get("source_epochs"))[0]


def run_checkpoint(src: str | Path, checkpoint: str | None = None) -> Path:
    """The checkpoint file an export of ``src`` reads (``checkpoint.resolve_checkpoint``: last.pth by default)."""
    try:
        return resolve_checkpoint(src, checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e


def export_backbone(src: str | Path, out_dir: str | Path, weights: str | None = None,
                    checkpoint: str | None = None, sha256: str | None = None,
                    allow_unfinished: bool = False) -> dict[str, Any]:
    """Write ``src``'s (a run dir or checkpoint) backbone to ``out_dir`` in the mm layout; returns the meta.

    Defaults are what the paper reports: the final epoch (``last.pth``) and the raw weights. ``checkpoint="best"``
    and ``weights="ema"`` are explicit opt-ins; meta.json records the choice, the epoch and the top-1 of exactly
    the exported weights. ``sha256``: the checkpoint's, where the caller hashed it already (export/source.py).
    An unfinished run's last.pth is refused unless ``allow_unfinished`` (best.pth is an earlier epoch by choice).
    """
    weights = weights or "raw"
    if weights not in WEIGHTS:
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
    said, finished = run_progress(ckpt, cfg.epochs)
    if not finished and path.name != BEST and not allow_unfinished:
        # Exported silently, a preempted or still-training run passed for the final weights the paper reports.
        run = path.parent if path.name == LAST else path
        raise ExportError(f"{path}: {said}: the run was stopped or is still training; finish it (rerun its "
                          f"tools/train_cls.sh command, which resumes it), or export it anyway with "
                          f"tools/export_backbone.py {run} --out DIR --allow-unfinished")
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
        "sha256": sha256 or file_sha256(path),
        "source_epoch": ckpt.get("epoch"),
        "source_epochs": cfg.epochs,  # the run's planned epochs: source_epoch < source_epochs is an unfinished run
        "source_step": ckpt.get("step", 0),  # > 0: saved mid-epoch
        "source_finished": finished,
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


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run dir's summary.json where it says the run trained all its epochs (what decides that a run is complete
    once its checkpoints were removed to save space, classification/run_dir.py), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        finished = summary.get("stage") == "classification" and len(summary["history"]) >= summary["config"]["epochs"]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return summary if finished else None


def _result_config(values: Any) -> dict[str, Any] | None:
    """A saved config as the trainer rebuilds it, less the keys that do not change the result (RUNTIME_KEYS)."""
    from classification.run_dir import RUNTIME_KEYS

    try:
        return {k: v for k, v in config_from_dict(values, "summary.json").to_dict().items() if k not in RUNTIME_KEYS}
    except (ConfigError, TypeError, AttributeError, ValueError):
        return None


def export_matches_summary(meta: dict[str, Any], run_dir: Path, weights: str) -> bool:
    """Whether ``meta`` (an export's meta.json) is of ``run_dir``'s final ``weights`` although its last.pth is gone.
    The checkpoint's sha256 can no longer be checked; what meta.json recorded of it can be, against what the run's
    summary.json says of its end: the checkpoint's path, the final epoch, the config (seed included), and the top-1
    of exactly these weights. A rerun of the run in that dir, or an export of another run, differs in one of them."""
    summary = finished_summary(run_dir)
    if summary is None or meta.get("source_kind") != "trained":
        return False
    top1 = (summary.get("metrics") or {}).get("ema_top1" if weights == "ema" else "top1")
    last_row = summary["history"][-1] if isinstance(summary["history"][-1], dict) else {}
    recorded = (meta.get("source_checkpoint"), meta.get("checkpoint"), meta.get("weights"),
                meta.get("source_finished"), meta.get("source_step"), meta.get("source_epoch"),
                meta.get("source_epochs"), meta.get("source_top1"), meta.get("arm"))
    expected = (str((run_dir / LAST).resolve()), LAST, weights, True, 0, last_row.get("epoch"),
                summary["config"]["epochs"], top1, summary.get("arm"))
    config = _result_config(summary["config"])
    return top1 is not None and recorded == expected and config is not None and config == _result_config(
        meta.get("config"))


def is_run_checkpoint(obj: Any) -> bool:
    """A checkpoint written by this toolkit's trainer (as opposed to a plain state dict of timm / torchvision)."""
    return isinstance(obj, dict) and all(k in obj for k in ("config", "model", "num_classes"))

