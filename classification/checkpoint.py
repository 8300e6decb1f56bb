"""Training checkpoints: atomic, complete (model, EMA, optimizer, scaler, schedule, RNG), weights-only loadable."""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lifecycle.artifacts import atomic_torch_save
from lifecycle.errors import UserError

from .config import Config, config_from_dict
from .models import build_model

LAST, BEST = "last.pth", "best.pth"


class CheckpointError(UserError, RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    """RNG states of every library the run draws from, as tensors and plain types (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float or None): plain types
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's GPU only: a resume may see fewer GPUs (another node, a requeue)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") if torch.cuda.is_available() else None
    if isinstance(cuda, list):  # an older checkpoint: every visible GPU's, this process's at its index
        here = torch.cuda.current_device()
        cuda = cuda[here] if here < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP's ``module`` and torch.compile's ``_orig_mod`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: Path, **state: Any) -> None:
    """``state`` holds everything to resume, including ``rng``: a list of every rank's ``rng_state()``."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one of our checkpoints (weights_only=True: tensors and plain containers only)."""
    path = Path(path)
    with _loading(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_hashed(path: str | Path) -> tuple[dict[str, Any], str]:
    """``load_checkpoint`` and the sha256 of the very file it loaded: hashed and loaded through one open file, since
    a run still training replaces its file (a rename) at any moment, and two opens could see two files."""
    path = Path(path)
    with _loading(path), open(path, "rb") as f:
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True), h.hexdigest()


@contextmanager
def _loading(path: Path):
    """A missing or damaged checkpoint as one line naming it."""
    try:
        yield
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such checkpoint; give a run dir holding {LAST} or a .pth file") from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              f"it is damaged or not one of ours: retrain or pick another file") from e


def run_progress(ckpt: dict[str, Any], epochs: int) -> tuple[str, bool]:
    """("epoch 37 of 120, unfinished", False) for a checkpoint of a run planned for ``epochs`` epochs: a run stopped
    early (preempted, or still training) or mid-epoch (step > 0) is unfinished (the export's words too)."""
    epoch, step = ckpt.get("epoch"), ckpt.get("step", 0)
    finished = epoch == epochs and not step
    return f"epoch {epoch} of {epochs}" + ("" if finished else f"{', mid-epoch' if step else ''}, unfinished"), finished


# Which checkpoint of a run dir: the final epoch (the default everywhere, what the paper reports) or the epoch with
# the best validation top-1 (an opt-in: ImageNet's validation set is also its test set).
CHECKPOINTS = {"last": LAST, "best": BEST}


def resolve_checkpoint(src: str | Path, which: str | None = None) -> Path:
    """A checkpoint file as given, or a run dir's ``last.pth`` unless ``which="best"``."""
    src = Path(src)
    if which is not None and which not in CHECKPOINTS:
        raise CheckpointError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
    if not src.is_dir():
        if which is not None:
            raise CheckpointError(f"{src}: --checkpoint {which} picks a file of a run dir; give the run dir, or "
                                  f"drop --checkpoint to use this file")
        return src
    path = src / CHECKPOINTS[which or "last"]
    if not path.is_file():
        fix = ("train it first (tools/train_cls.sh)" if path.name == LAST else
               f"the run never saved one; use {LAST} (the default)")
        raise CheckpointError(f"{path}: no such checkpoint in this run dir; {fix}")
    return path


def load_classifier(src: str | Path, *, ema: bool = False) -> tuple[nn.Module, Config, dict[str, Any]]:
    """Rebuild a trained classifier from a run dir or checkpoint: (model in eval mode, its config, checkpoint)."""
    path = resolve_checkpoint(src)
    ckpt = load_checkpoint(path)
    return (*classifier_from(ckpt, path, ema=ema), ckpt)


def classifier_from(ckpt: dict[str, Any], path: Path, *, ema: bool = False) -> tuple[nn.Module, Config]:
    """The classifier a loaded checkpoint holds (model in eval mode, its config); ``path`` names it in errors."""
    if "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a classification checkpoint of this toolkit (no config/model)")
    cfg = config_from_dict(ckpt["config"], str(path))
    weights = ckpt["model"]
    if ema:
        if ckpt.get("ema") is None:
            raise CheckpointError(f"{path}: this run kept no EMA weights (ema_decay was 0); use raw weights")
        weights = ckpt["ema"]
    model = build_model(cfg.variant, ckpt["num_classes"], zero_gamma=cfg.zero_gamma, init="timm", mean=cfg.mean,
                        std=cfg.std)
    model.load_state_dict(weights, strict=True)
    return model.eval(), cfg
