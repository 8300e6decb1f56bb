"""The files every stage writes and reads: atomic writes and the one versioned ``summary.json`` schema.

summary.json (schema_version 1), shared by the classification, detection and segmentation stages::

    {
      "schema_version": 1,
      "stage": "classification" | "detection" | "segmentation",
      "arm": "d_cosine",            # study arm (defaults to the config / run name)
      "seed": 0,
      "metrics": {...},             # percentages 0-100, as in the paper's tables:
                                    #   classification: top1, top5, ema_top1, ema_top5 (ema_* None without EMA)
                                    #   detection: mAP, per_class_AP {class: AP}
                                    #   segmentation: mIoU, aAcc, mAcc, per_class_IoU {class: IoU}
      "protocol": {...},            # what makes numbers comparable: dataset, image size, schedule, eval mode,
                                    #   total batch and the batch BatchNorm normalises over (bn_batch)
      "layout": {...},              # how this run laid the batch out: processes, per_device, accumulation, line
                                    #   (not compared across arms: the same protocol on any GPU count)
      "config": {...},              # the resolved config of the run
      "backbone": {...} | null,     # detection/segmentation: the export's meta.json (null: random init)
      "history": [...],             # per-epoch rows, e.g. {"epoch", "lr", "train_loss", "top1"}
      "lr_schedule": [[t, lr], ...],  # sampled learning rate against epoch (float), for plots
      "wall_time_s": 12.3,
      "versions": {"torch": ..., "timm": ..., ...},
      "created": "2026-11-27T10:00:00+00:00"
    }

The report reads only these files; ``read_summary`` refuses any other schema version.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lifecycle.errors import UserError
from lifecycle.stages import SUMMARY_STAGES

SCHEMA_VERSION = 1


TMP_SUFFIX = ".tmp"


def _mkstemp_beside(path: Path) -> str:
    """A temporary file next to ``path`` with the permissions a plain open() would give (mkstemp uses 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def _umask() -> int:
    """The process's umask, read without setting it: os.umask(0) and back leaves a moment in which the files other
    threads create (TensorBoard's, the compiler's) are world-writable. Linux's /proc/self/status has it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)  # elsewhere: the only portable way to read it
    os.umask(umask)
    return umask


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of saves that were killed before their rename (SIGKILL, OOM, power loss): they
    are never valid files, and a checkpoint's can be hundreds of MB. Call it when a run starts, from the one process
    that writes into ``directory``. Returns what was removed."""
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable: the new name is in the directory's own blocks only after this."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: str, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync it, rename it over ``path`` and fsync the directory:
    the old file survives a crash, and the new one survives a power loss once this returns."""
    path = Path(path)
    tmp = _mkstemp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        _replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a same-directory temporary file, fsync and a rename (as ``atomic_write_bytes``). It writes
    through a Python file, not a path: torch's own file writer loses the OS's reason (a full disk, a quota) and
    raises only 'unexpected pos'; through a file object the OSError stays in its chain (errors.writing)."""
    import torch

    path = Path(path)
    tmp = _mkstemp_beside(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        _replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_link(src: str | Path, path: str | Path) -> None:
    """Make ``path`` a second name of the finished file ``src`` (a hard link through a temporary name and a rename,
    as timm's train.py keeps its best checkpoint): a checkpoint's bytes are written once, not twice. Every write
    here replaces a file by rename, never in place, so a later save of either name leaves the other untouched.
    Where the file system has no hard links, ``src`` is copied."""
    path = Path(path)
    tmp = _mkstemp_beside(path)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network and FUSE file systems)
            shutil.copyfile(src, tmp)
        _replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stack_versions() -> dict[str, str]:
    """Versions of whatever parts of the stack are importable (mm* only where installed)."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "torchvision", "timm", "numpy", "mmengine", "mmcv", "mmdet", "mmsegmentation"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def write_summary(
    path: str | Path,
    *,
    stage: str,
    arm: str,
    seed: int,
    metrics: dict[str, Any],
    protocol: dict[str, Any],
    config: dict[str, Any],
    wall_time_s: float,
    backbone: dict[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    lr_schedule: list[list[float]] | None = None,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if stage not in SUMMARY_STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {SUMMARY_STAGES}")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "arm": arm,
        "seed": int(seed),
        "metrics": metrics,
        "protocol": protocol,
        "layout": layout,
        "config": config,
        "backbone": backbone,
        "history": history or [],
        "lr_schedule": lr_schedule or [],
        "wall_time_s": round(float(wall_time_s), 2),
        "versions": stack_versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(path, summary)
    return summary


class SummaryError(UserError, ValueError):
    pass


def read_summary(path: str | Path) -> dict[str, Any]:
    """Load a summary.json, refusing unreadable files and unknown schema versions with one clear line."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SummaryError(f"{path}: cannot read summary ({e}); rerun the stage that writes it") from e
    version = summary.get("schema_version") if isinstance(summary, dict) else None
    if version != SCHEMA_VERSION:
        raise SummaryError(
            f"{path}: summary schema_version {version!r} is not supported (this toolkit reads version "
            f"{SCHEMA_VERSION}); rerun the stage with this toolkit version"
        )
    if summary.get("stage") not in SUMMARY_STAGES:
        raise SummaryError(f"{path}: unknown stage {summary.get('stage')!r}; expected one of {SUMMARY_STAGES}")
    return summary
