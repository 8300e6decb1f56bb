"""mmstack/mmcv_ops.py: the mmcv ops the pipeline uses, from torchvision, against the compiled mmcv.

The reference values (tests/fixtures/mmcv_ops_reference.pt) were computed by mmcv 2.1.0's compiled CPU ops
(tests/fixtures/make_mmcv_ops_reference.py); the tests call our functions directly, so they test the replacement
whichever mmcv is installed. Tolerances:
- NMS: the kept indices, exactly (same greedy algorithm, same comparisons, a float32 IoU either way); ties in the
  scores included: ours visits equal scores in mmcv's order (torch's default, not stable, descending sort).
- RoIAlign forward: 1e-6 absolute on values of order 1 (both sum the same bilinear samples in the same order in
  float32; measured difference 0.0), gradient 1e-5 (the scatter-adds into the input may run in another order;
  measured difference 0.0 on CPU).
- Half and bfloat16 inputs: computed in float32 and rounded once to the input's type, so within one unit in the last
  place of that type of mmcv's float32 result on the same (rounded) values. mmcv's own CPU kernels refuse half and
  bfloat16 for NMS and bfloat16 for RoIAlign (recorded in the fixture).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmstack import mmcv_ops

REPO = Path(__file__).resolve().parent.parent
REFERENCE = torch.load(Path(__file__).parent / "fixtures" / "mmcv_ops_reference.pt", weights_only=True)
NMS = {c["name"]: c for c in REFERENCE["nms"]}
ROI = {c["name"]: c for c in REFERENCE["roi_align"]}
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("name", NMS)
def test_nms_keeps_what_the_compiled_mmcv_keeps(name):
    case = NMS[name]
    keep = mmcv_ops.nms(case["boxes"], case["scores"], case["iou"], case["offset"])
    assert keep.dtype == torch.long and torch.equal(keep, case["keep"]), name


def roi_align(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """What mmcv's RoIAlignFunction does with the extension's two functions: forward, then the backward of
    sum(output * weights) (the fixture's weights)."""
    feats, rois = case["feats"], case["rois"]
    h, w = case["out"]
    args = dict(aligned_height=h, aligned_width=w, spatial_scale=case["scale"], sampling_ratio=case["ratio"],
                pool_mode=1, aligned=case["aligned"])
    out = feats.new_zeros(len(rois), feats.shape[1], h, w)
    mmcv_ops.roi_align_forward(feats, rois, out, feats.new_zeros(0), feats.new_zeros(0), **args)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grad = feats.new_zeros(feats.shape)
    mmcv_ops.roi_align_backward(weights, rois, feats.new_zeros(0), feats.new_zeros(0), grad, **args)
    return out, grad


@pytest.mark.parametrize("name", ROI)
def test_roi_align_matches_the_compiled_mmcv_forward_and_backward(name):
    case = ROI[name]
    out, grad = roi_align(case)
    dtype = case["feats"].dtype
    assert out.dtype == dtype and grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, case["output"], rtol=0, atol=1e-6)
        torch.testing.assert_close(grad, case["grad"], rtol=0, atol=1e-5)
    else:  # one rounding of mmcv's float32 result on the same values, up to one unit in the last place
        for ours, ref in ((out, case["output"]), (grad, case["grad"])):
            assert ((ours.float() - ref).abs() <= ULP[dtype] * ref.abs() + 1e-6).all(), name
    if "out_native" in case:  # mmcv's own half kernel (accumulating in half) is further off than ours
        assert (out.float() - case["output"]).abs().max() <= (case["out_native"].float() - case["output"]).abs(
        ).max() + 1e-6


def test_the_fixture_covers_what_the_issue_asks():
    """Boxes outside the image, degenerate and empty sets, large scales, half and bf16, ties: present, and the ties
    decide something (keeping by another tie order would differ)."""
    names = " ".join(list(NMS) + list(ROI))
    for word in ("ties", "outside", "degenerate", "empty", "large scale", "float16", "bfloat16", "no rois"):
        assert word in names
    case = NMS["ties thr0.3"]  # torchvision's NMS as it is (its own tie order) keeps other boxes than mmcv
    plain = torch.ops.torchvision.nms(case["boxes"], case["scores"], case["iou"])
    assert not torch.equal(plain, case["keep"])
    assert REFERENCE["mmcv"] == "2.1.0"


def test_other_ops_and_max_pooling_raise_one_line_naming_the_op_and_the_fix():
    ext = mmcv_ops.TorchvisionExt()
    assert hasattr(ext, "deform_conv_forward") and not hasattr(ext, "__wrapped__")
    with pytest.raises(mmcv_ops.MissingMmcvOp, match=r"mmcv op 'deform_conv_forward' needs mmcv's compiled ops.*"
                                                     r"MMCV=full tools/setup_env.sh"):
        ext.deform_conv_forward(torch.zeros(1))
    feats = torch.zeros(1, 1, 4, 4)
    with pytest.raises(mmcv_ops.MissingMmcvOp, match="pool_mode='max'.*MMCV=full"):
        mmcv_ops.roi_align_forward(feats, torch.zeros(1, 5), torch.zeros(1, 1, 2, 2), feats, feats, 2, 2, 1.0, 0,
                                   0, True)
    assert "\n" not in str(mmcv_ops.MissingMmcvOp("x"))


SCRIPT = """
import sys, torch
from mmstack import mmcv_ops
sys.modules[mmcv_ops.EXT] = mmcv_ops.TorchvisionExt()  # even where the compiled mmcv is installed
from mmcv.ops import RoIAlign, batched_nms, nms
from mmcv.ops import deform_conv2d  # imports: every op module loads
boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0], [0, 0, 10, 10]])
scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
dets, keep = batched_nms(boxes, scores, torch.tensor([0, 0, 0, 1]), dict(type="nms", iou_threshold=0.5))
print(keep.tolist(), nms(boxes, scores, 0.5)[1].tolist())
x = torch.arange(16.0).view(1, 1, 4, 4).requires_grad_(True)
out = RoIAlign((1, 1), spatial_scale=1.0, sampling_ratio=1, aligned=False)(x, torch.tensor([[0, 0, 0, 4, 4.0]]))
out.sum().backward()
print(out.item(), x.grad[0, 0, 2, 2].item(), x.grad.sum().item())
try:
    deform_conv2d(x, torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 1, 1))
except mmcv_ops.MissingMmcvOp as e:
    print(type(e).__name__, str(e).splitlines()[0][:40])
"""


def test_mmcv_python_ops_run_on_the_torchvision_extension():
    """mmcv's own Python layer (batched_nms, the RoIAlign module with autograd) on our extension, in a fresh
    process; any other op imports and raises MissingMmcvOp when called."""
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "[3, 0, 2] [3, 2]"  # class 1's box is kept beside class 0's; one class: the duplicate goes
    assert lines[1] == "10.0 1.0 1.0"  # one sample, at the box centre (2, 2); its gradient goes there alone
    assert lines[2] == "MissingMmcvOp mmcv op 'deform_conv_forward' needs mmcv"


CONFIGS = ["configs/detection/faster-rcnn_r50_fpn_voc0712.py", "configs/detection/faster-rcnn_r50_c4_voc0712.py",
           "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"]


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_call_only_the_provided_ops(config, tiny_data, monkeypatch):
    """A training step and a test step of each shipped recipe, with every function of mmcv's extension recorded:
    Faster R-CNN (FPN and C4) calls NMS and RoIAlign (average), FCN nothing; nothing else."""
    import argparse

    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner

    from detection.train import STAGE as DET
    from mmstack import compat
    from segmentation.train import STAGE as SEG
    from transfer.runner import configure, walk

    compat.apply()
    import mmcv.ops  # noqa: F401 - loads the extension module (compiled or ours)

    ext = sys.modules[mmcv_ops.EXT]
    called: list[str] = []

    def recorder(name, fn):
        def op(*args, **kwargs):
            called.append(name)
            return fn(*args, **kwargs)
        return op

    for name in set(mmcv_ops.PROVIDED) | {n for n in dir(ext) if not n.startswith("_")}:
        fn = getattr(ext, name)
        if callable(fn):
            monkeypatch.setattr(ext, name, recorder(name, fn), raising=False)

    det = "detection" in config
    cfg = Config.fromfile(REPO / config)
    data_root = tiny_data / ("VOCdevkit" if det else "ADEChallengeData2016")
    args = argparse.Namespace(config=config, data_root=str(data_root), work_dir="w", launcher="none",
                              frozen_backbone=False, seed=0)
    configure(cfg, DET if det else SEG, args, None, None)  # the random-init arm: every layer trains
    walk(cfg.model, lambda d: d.__setitem__("type", "BN") if d.get("type") == "SyncBN" else None)
    walk(cfg.train_dataloader, lambda d: d.__setitem__("bbox_min_size", 4) if "bbox_min_size" in d else None)
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model)
    model.init_weights()
    for part in ("train_dataloader", "test_dataloader"):
        cfg[part].update(num_workers=0, persistent_workers=False, batch_size=1)
    train = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    losses = model.train_step(next(iter(train)), build_optim_wrapper(model, cfg.optim_wrapper))
    assert torch.isfinite(sum(v for k, v in losses.items() if "loss" in k))
    model.eval()
    with torch.no_grad():
        results = model.test_step(next(iter(Runner.build_dataloader(cfg.test_dataloader, seed=0))))
    assert len(results) == 1
    expected = {"nms", "roi_align_forward", "roi_align_backward"} if det else set()
    assert set(called) == expected, sorted(set(called))
