"""The mmcv ops the pipeline runs, from torchvision and torch, so that mmcv-lite (mmcv without compiled ops) is
enough.

mmcv's Python ops (``mmcv.ops.nms``, ``batched_nms``, ``RoIAlign``, ...) call functions of one compiled extension,
``mmcv._ext``, which mmcv-lite does not ship, so ``import mmcv.ops`` (and with it MMDetection's models) fails there.
:func:`install` puts a module of that name in ``sys.modules`` that provides what the shipped configs call, from
torchvision's kernels (CPU and CUDA), and raises :class:`MissingMmcvOp` (one line: the op, and how to get the compiled
build) for any other op when it is called. Verified by running every shipped config with a recording module
(``tests/test_mmcv_ops.py``): Faster R-CNN, FPN and C4, calls ``nms`` and ``roi_align_forward`` /
``roi_align_backward`` (average mode); FCN calls none. Beyond the shipped configs, the sigmoid focal loss (what
MMDetection's and MMSegmentation's ``FocalLoss`` call on CUDA tensors: RetinaNet, FCOS, ATSS heads) is provided from
torch's elementwise ops, so such a config trains on a GPU with mmcv-lite too.

Same algorithms, not approximations:
- ``nms``: greedy NMS in score order, a box suppressed when its IoU with a kept box is above the threshold; equal
  scores in mmcv's order (see ``nms``); mmcv's ``offset=1`` (legacy widths ``x2 - x1 + 1``) is torchvision's NMS on
  boxes whose x2, y2 are shifted by 1.
- ``roi_align_forward`` / ``roi_align_backward`` with ``pool_mode`` average: both libraries implement Detectron's
  RoIAlign (bilinear samples, adaptive ``ceil(roi / bin)`` grid when ``sampling_ratio`` is 0, samples beyond one
  pixel outside the map contribute zero, ``aligned`` shifts by half a pixel). Max pooling is not provided.
- ``sigmoid_focal_loss_forward`` / ``_backward``: mmcv's CUDA kernel's formulas, term for term (its CPU build has
  none): ``p = 1 / (1 + exp(-x))``, logs of ``p`` and ``1 - p`` clamped at float32's smallest normal (so a confident
  wrong logit's loss stops at ``-log(FLT_MIN)`` = 87.3 times its alpha, where the textbook loss grows on), the
  analytic gradient, the optional per-class weight.
Half and bfloat16 inputs are computed in float32 and written back in the input's type (torchvision's CPU kernels
have no bfloat16 and its CPU NMS no half; float32 is also what torchvision's own autocast runs RoIAlign in; mmcv's
focal loss kernel computes half in half, and has no bfloat16).
``tests/test_mmcv_ops.py`` compares NMS's and RoIAlign's outputs and gradients with the compiled mmcv's CPU ops,
stored as fixtures; the focal loss (no CPU kernel in mmcv to compare with) with MMDetection's own PyTorch focal loss,
its autograd gradient, and the kernel's clamped values.

Two ways in, so that every entry point has it before MMDetection / MMSegmentation import ``mmcv.ops``:
- ``tools/setup_env.sh`` (mmcv-lite) writes ``mmcv/_ext.py`` into the installed mmcv (:func:`write_shim`), which
  becomes :class:`TorchvisionExt` when imported. Needed for the libraries' own tools: MMDetection's
  ``tools/test.py`` imports ``mmcv.ops`` (through ``mmdet.structures``) before it reads any config.
- ``mmstack.compat.apply()`` calls :func:`install`, which registers the module itself where no shim was written
  (mmcv-lite installed by other means).
With the compiled mmcv installed (``MMCV=full tools/setup_env.sh``) both leave its extension alone.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torchvision  # noqa: F401 - loads torchvision's kernels into torch.ops.torchvision

from lifecycle.errors import UserError

EXT = "mmcv._ext"
PROVIDED = ("nms", "roi_align_forward", "roi_align_backward", "sigmoid_focal_loss_forward",
            "sigmoid_focal_loss_backward")
COMPILED, TORCHVISION, ABSENT = "compiled", "torchvision", "absent"
FULL_BUILD_FIX = "install mmcv with its compiled ops: MMCV=full tools/setup_env.sh"
_REDUCED = (torch.float16, torch.bfloat16)
_FLT_MIN = torch.finfo(torch.float32).tiny  # the clamp in mmcv's focal loss kernel (FLT_MIN)


class MissingMmcvOp(UserError):
    """An mmcv op that only the compiled mmcv provides was called."""


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """mmcv's ``ext_module.nms``: the kept indices into ``boxes`` (N x 4, x1 y1 x2 y2), highest score first."""
    if boxes.numel() == 0:
        return boxes.new_zeros(0, dtype=torch.long)
    boxes, scores = boxes.float(), scores.float()  # no-ops for float32
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + offset], dim=1)
    # mmcv visits the boxes in the order of scores.sort(0, descending=True), torch's default (not stable) sort, on
    # CPU and CUDA; torchvision sorts its own way. It gets the boxes in mmcv's order with distinct decreasing
    # stand-in scores (exact in float32 up to 2**24 boxes), so equal scores break as in mmcv: the same boxes kept.
    order = scores.sort(0, descending=True)[1]
    rank = torch.arange(len(order), 0, -1, dtype=boxes.dtype, device=boxes.device)
    return order[torch.ops.torchvision.nms(boxes[order], rank, float(iou_threshold))]


def _roi_align_args(pool_mode: int, aligned_height: int, aligned_width: int, spatial_scale: float,
                    sampling_ratio: int, aligned: bool) -> tuple:
    if pool_mode != 1:  # mmcv's RoIAlignFunction: 0 = max, 1 = avg
        raise MissingMmcvOp(f"mmcv op RoIAlign with pool_mode='max' needs mmcv's compiled ops (only 'avg' is "
                            f"provided without them, from torchvision); {FULL_BUILD_FIX}, or use pool_mode='avg'")
    return float(spatial_scale), int(aligned_height), int(aligned_width), int(sampling_ratio), bool(aligned)


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                      sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's ``ext_module.roi_align_forward``: fills ``output`` (K x C x h x w) for ``rois`` (K x 5: batch index,
    x1 y1 x2 y2). ``argmax_*`` are max mode's (not provided)."""
    scale, h, w, ratio, aligned = _roi_align_args(pool_mode, aligned_height, aligned_width, spatial_scale,
                                                  sampling_ratio, aligned)
    if rois.shape[0] == 0:
        return
    x = input.float() if input.dtype in _REDUCED else input
    output.copy_(torch.ops.torchvision.roi_align(x, rois.to(x.dtype), scale, h, w, ratio, aligned))


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor, argmax_x: torch.Tensor,
                       grad_input: torch.Tensor, aligned_height: int, aligned_width: int, spatial_scale: float,
                       sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's ``ext_module.roi_align_backward``: adds the gradient for the input feature map into ``grad_input``."""
    scale, h, w, ratio, aligned = _roi_align_args(pool_mode, aligned_height, aligned_width, spatial_scale,
                                                  sampling_ratio, aligned)
    if rois.shape[0] == 0:
        return
    g = grad_output.float() if grad_output.dtype in _REDUCED else grad_output
    n, c, height, width = grad_input.shape
    grad_input.add_(torch.ops.torchvision._roi_align_backward(g, rois.to(g.dtype), scale, h, w, n, c, height, width,
                                                              ratio, aligned))


def _focal_terms(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, gamma: float, alpha: float,
                 gradient: bool) -> torch.Tensor:
    """Per element (N x C logits, N labels in 0..C, C meaning background), the loss or its gradient (half and
    bfloat16 computed in float32)."""
    x = input.float() if input.dtype in _REDUCED else input
    if weight.numel() and bool((target == x.shape[1]).any()):  # mmcv's kernel would read past the weights' end
        raise ValueError("sigmoid focal loss: a per-class weight needs every label below the number of classes "
                         "(background labels have no weight)")
    p = 1.0 / (1.0 + torch.exp(-x))
    log_p, log_q = p.clamp(min=_FLT_MIN).log(), (1.0 - p).clamp(min=_FLT_MIN).log()
    if gradient:
        pos = -alpha * (1.0 - p).pow(gamma) * (1.0 - p - gamma * p * log_p)
        neg = -(1.0 - alpha) * p.pow(gamma) * (gamma * (1.0 - p) * log_q - p)
    else:
        pos = -alpha * (1.0 - p).pow(gamma) * log_p
        neg = -(1.0 - alpha) * p.pow(gamma) * log_q
    out = torch.where(target[:, None] == torch.arange(x.shape[1], device=x.device), pos, neg)
    return out * weight.to(x.dtype)[target, None] if weight.numel() else out


def sigmoid_focal_loss_forward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                               output: torch.Tensor, gamma: float, alpha: float) -> None:
    """mmcv's ``ext_module.sigmoid_focal_loss_forward``: fills ``output`` (N x C) with each element's loss;
    ``weight`` is empty (mmcv's convention for none) or one weight per class."""
    output.copy_(_focal_terms(input, target, weight, gamma, alpha, gradient=False))


def sigmoid_focal_loss_backward(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                                grad_input: torch.Tensor, gamma: float, alpha: float) -> None:
    """mmcv's ``ext_module.sigmoid_focal_loss_backward``: fills ``grad_input`` with d(loss)/d(input), element by
    element (mmcv's Python layer scales it by the incoming gradient and the reduction)."""
    grad_input.copy_(_focal_terms(input, target, weight, gamma, alpha, gradient=True))


def _missing(name: str):
    def op(*args, **kwargs):
        raise MissingMmcvOp(f"mmcv op '{name}' needs mmcv's compiled ops, which are not installed (mmcv-lite, with "
                            f"{', '.join(PROVIDED)} from torchvision and torch); {FULL_BUILD_FIX}")

    op.__name__ = name
    return op


class TorchvisionExt(types.ModuleType):
    """What ``mmcv._ext`` is without the compiled build: the provided ops, and for any other name a function that
    raises :class:`MissingMmcvOp` (mmcv's ``load_ext`` only checks at import that each name exists)."""

    def __init__(self) -> None:
        super().__init__(EXT, __doc__)
        self.__spec__ = importlib.machinery.ModuleSpec(EXT, None)
        for name in PROVIDED:
            setattr(self, name, globals()[name])

    def __getattr__(self, name: str):
        if name.startswith("__"):  # introspection (pickle, inspect, copy) must see a plain module
            raise AttributeError(name)
        return _missing(name)


SHIM = '''"""mmcv's compiled extension, provided from torchvision for mmcv-lite: written by tools/setup_env.sh
(mmstack/mmcv_ops.py of the bag-of-tricks transfer toolkit); not part of mmcv. Removed by the set-up when it
installs the compiled mmcv (whose _ext extension module would be imported first anyway)."""
import sys

from mmstack.mmcv_ops import TorchvisionExt

sys.modules[__name__] = TorchvisionExt()
'''


def _mmcv_dirs() -> list[Path]:
    spec = importlib.util.find_spec("mmcv")  # a top-level package: found, not imported
    return [Path(d) for d in (spec.submodule_search_locations or [])] if spec else []


def mmcv_build() -> str:
    """Which mmcv is installed: ``compiled`` (its ``_ext`` extension module is there), ``torchvision`` (mmcv-lite: the
    ops come from here) or ``absent``. Looks at files only; imports nothing."""
    dirs = _mmcv_dirs()
    if not dirs:
        return ABSENT
    compiled = any((d / f"_ext{suffix}").exists() for d in dirs for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return COMPILED if compiled else TORCHVISION


def install() -> str:
    """Make ``mmcv.ops`` importable with mmcv-lite (register :class:`TorchvisionExt` as ``mmcv._ext``); leave a
    compiled mmcv alone. Returns :func:`mmcv_build`'s answer. Idempotent; must run before ``mmcv.ops`` is imported."""
    if isinstance(sys.modules.get(EXT), TorchvisionExt):
        return TORCHVISION
    build = mmcv_build()
    if build == TORCHVISION:
        sys.modules[EXT] = TorchvisionExt()
    return build


def write_shim() -> Path:
    """Write ``mmcv/_ext.py`` (:data:`SHIM`) into the installed mmcv-lite (tools/setup_env.sh)."""
    if mmcv_build() != TORCHVISION:
        raise SystemExit("mmcv_ops: no mmcv-lite installed (the compiled mmcv, or none): no shim to write")
    path = _mmcv_dirs()[0] / "_ext.py"
    path.write_text(SHIM)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["write-shim"]:
        raise SystemExit("usage: python -m mmstack.mmcv_ops write-shim")
    print(f"wrote {write_shim()}: mmcv's {', '.join(PROVIDED)} from torchvision and torch")
