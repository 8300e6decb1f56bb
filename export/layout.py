"""The key mapping between a timm ResNet-50 classifier and an MMDetection / MMSegmentation ResNet backbone.

MMDetection and MMSegmentation load pretrained backbones with ``strict=False`` and only log the keys they
skipped: a wrong key mapping silently trains from random weights. So every export is checked key by key and
shape by shape against the variant's reference layout, when it is written and again when it is read.

Key mapping timm -> mm (confirmed against the pinned mmdet / mmseg modules by tests/test_export.py):
- every variant: ``layerN.*`` keeps its name (the 1x1 shortcut is ``downsample.0/.1``, with the D average pool
  in front ``downsample.1/.2``: both libraries number the pool, which holds no tensors);
- A, B (7x7 stem): ``conv1`` and ``bn1`` keep their names (mm ResNet's stem norm is also called ``bn1``);
- C, D (deep stem): timm's ``conv1`` is Sequential(conv, bn, act, conv, bn, act, conv) and its last BN is ``bn1``;
  mm's ``stem`` is Sequential(conv, bn, relu) x 3, so ``conv1.{0,1,3,4,6}`` -> ``stem.{0,1,3,4,6}``, ``bn1`` ->
  ``stem.7``;
- ``fc`` (the classifier head) is not part of the backbone: it goes to the export's head.safetensors.

torch + timm only: the mm side of the check (building the target backbone from the installed packages) is
export/mm_check.py.
"""

from __future__ import annotations

import hashlib

import torch

from classification.models import build_model
from classification.variants import get_variant
from lifecycle.errors import UserError

HEAD_PREFIX = "fc."
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
# mm's deep stem is Sequential(conv, bn, relu) x 3: timm's conv1.{0,1,3,4,6} keep their indices, the last BN
# (timm's separate bn1) is the 8th entry.
_MM_STEM, _MM_STEM_LAST_BN = "stem.", "stem.7."


class ExportError(UserError, ValueError):
    """A bad export or a backbone that does not hold it; the message is one line naming the keys and the fix."""


def format_keys(keys: list[str] | set[str], limit: int = 8) -> str:
    """One line of keys: a set sorted, a list in its own (module) order, at most ``limit`` of them."""
    keys = sorted(keys) if isinstance(keys, set) else list(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


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

