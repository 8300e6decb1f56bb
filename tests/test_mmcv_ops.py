"""mmstack/mmcv_ops.py: the mmcv ops the pipeline uses, from torchvision and torch, against the compiled mmcv.

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

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmstack import compat, mmcv_ops

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
from mmstack import compat, mmcv_ops
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
from mmcv.ops import sigmoid_focal_loss
logits = torch.zeros(1, 2, requires_grad=True)
loss = sigmoid_focal_loss(logits, torch.tensor([0]), 2.0, 0.25, None, "mean")
loss.backward()
print(f"{loss.item():.4f} {logits.grad[0, 0].item():.4f} {logits.grad[0, 1].item():.4f}")
try:
    deform_conv2d(x, torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 1, 1))
except mmcv_ops.MissingMmcvOp as e:
    print(type(e).__name__, str(e).splitlines()[0][:40])
"""


def test_mmcv_python_ops_run_on_the_torchvision_extension():
    """mmcv's own Python layer (batched_nms, the RoIAlign module and the sigmoid focal loss with autograd) on our
    extension, in a fresh process; any other op imports and raises MissingMmcvOp when called."""
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "[3, 0, 2] [3, 2]"  # class 1's box is kept beside class 0's; one class: the duplicate goes
    assert lines[1] == "10.0 1.0 1.0"  # one sample, at the box centre (2, 2); its gradient goes there alone
    # p = 1/2 for both classes: (1/4)(1/2)^2 ln 2 + (3/4)(1/2)^2 ln 2 = ln(2) / 4, and the analytic gradients
    # -(1/4)(1/2)^2 (1/2 + ln 2) and -(3/4)(1/2)^2 (-ln 2 - 1/2)
    assert lines[2] == "0.1733 -0.0746 0.2237"
    assert lines[3] == "MissingMmcvOp mmcv op 'deform_conv_forward' needs mmcv"


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


def _focal(x, target, weight=None, gamma=2.0, alpha=0.25):
    """Our focal loss ops, per element: (loss, gradient)."""
    weight = x.new_empty(0) if weight is None else weight
    loss, grad = torch.empty_like(x), torch.empty_like(x)
    mmcv_ops.sigmoid_focal_loss_forward(x, target, weight, loss, gamma=gamma, alpha=alpha)
    mmcv_ops.sigmoid_focal_loss_backward(x, target, weight, grad, gamma=gamma, alpha=alpha)
    return loss, grad


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.5, 0.75)])
def test_sigmoid_focal_loss_matches_mmdetections_pytorch_focal_loss_and_its_gradient(gamma, alpha):
    """mmcv has no CPU kernel to compare with; MMDetection's own PyTorch focal loss (from binary cross-entropy with
    logits, another route to the same loss) and autograd's gradient of it are the reference where the kernel's
    clamp does not act. Labels 0..C, C being background (all negative), as the detection heads pass them. In float64
    (which the kernel also takes): in float32 the kernel's ``1 - p`` loses digits that the reference keeps (relative
    1.8e-5 at logits near 8), a difference of rounding, not of formula."""
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    torch.manual_seed(0)
    x = (torch.rand(64, 5, dtype=torch.float64) * 16 - 8).requires_grad_(True)
    target = torch.randint(0, 6, (64,))
    target[:3] = 5  # background rows, certainly
    ref = py_sigmoid_focal_loss(x, torch.nn.functional.one_hot(target, 6)[:, :5].double(), gamma=gamma,
                                alpha=alpha, reduction="none")
    ref_grad, = torch.autograd.grad(ref.sum(), x)
    loss, grad = _focal(x.detach(), target, gamma=gamma, alpha=alpha)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)


def test_sigmoid_focal_loss_keeps_the_kernels_clamp_weights_and_reduced_precision():
    """Confidently wrong logits: the kernel's logs are clamped at FLT_MIN (2**-126), so the loss stops at
    alpha * 126 * ln 2 where the textbook loss (100 * alpha) goes on; the gradient is its finite limit. Per-class
    weights scale each row by its label's weight; a background label with weights is refused (the kernel would read
    past the weights). Half is computed in float32, so within half's rounding of the float32 result on the
    same logits."""
    x = torch.tensor([[-100.0, 100.0], [-100.0, 100.0]])
    target = torch.tensor([0, 1])  # row 0: class 0 wrongly at -100, class 1 wrongly at +100; row 1 both right
    loss, grad = _focal(x, target, gamma=2.0, alpha=0.25)
    clamp = 126 * math.log(2)
    torch.testing.assert_close(loss, torch.tensor([[0.25 * clamp, 0.75 * clamp], [0.0, 0.0]]))
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.75], [0.0, 0.0]]))

    torch.manual_seed(1)
    x, target = torch.randn(8, 3), torch.randint(0, 3, (8,))
    weight = torch.tensor([1.0, 3.0, 0.5])
    plain, plain_grad = _focal(x, target)
    weighted, weighted_grad = _focal(x, target, weight)
    torch.testing.assert_close(weighted, plain * weight[target, None])
    torch.testing.assert_close(weighted_grad, plain_grad * weight[target, None])
    with pytest.raises(ValueError, match="label below the number of classes"):
        _focal(x, torch.full((8,), 3), weight)

    half, half_grad = _focal(x.half(), target)
    single, single_grad = _focal(x.half().float(), target)  # the same (rounded) logits in float32
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), single, rtol=ULP[torch.float16], atol=1e-7)
    torch.testing.assert_close(half_grad.float(), single_grad, rtol=ULP[torch.float16], atol=1e-7)


@pytest.mark.parametrize("force_cuda,arch_list", [(None, None), ("0", None), ("1", None), ("1", "8.0;9.0+PTX")])
def test_the_mmcv_wheel_cache_key_follows_what_mmcvs_build_compiles(force_cuda, arch_list):
    """tools/setup_env.sh keys its cached compiled mmcv by `python mmstack/compat.py mmcv-ops`, run as it runs it:
    CUDA ops (which CUDA, for which GPU architectures) where mmcv's setup.py would compile them (torch sees a GPU,
    or FORCE_CUDA=1), else cpu; FORCE_CUDA=0 is no request for CUDA (mmcv tests for '1'); and the Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")}
    env.update({k: v for k, v in (("FORCE_CUDA", force_cuda), ("TORCH_CUDA_ARCH_LIST", arch_list)) if v is not None})
    run = subprocess.run([sys.executable, "mmstack/compat.py", "mmcv-ops"], capture_output=True, text=True,
                         cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if force_cuda == "1" or torch.cuda.is_available():
        archs = "sm80+90ptx" if arch_list else compat._cuda_archs()
        assert run.stdout.strip() == f"cu{torch.version.cuda}-{archs}-{python}"
    else:
        assert run.stdout.strip() == f"cpu-{python}"


def test_a_wheel_built_for_one_gpu_architecture_is_not_another_ones(monkeypatch):
    """Without TORCH_CUDA_ARCH_LIST torch's extension builder compiles for the visible GPUs only: a wheel built on
    an H100 node (sm_90) has no kernel for an A100 (sm_80), so the two get their own cached wheels."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    targets = {}
    for name, caps in (("A100", [(8, 0)]), ("H100", [(9, 0)]), ("both", [(9, 0), (8, 0), (9, 0)])):
        monkeypatch.setattr(torch.cuda, "device_count", lambda caps=caps: len(caps))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i, caps=caps: caps[i])
        targets[name] = compat.mmcv_ops_target().split("-")[1]
    assert targets == {"A100": "sm80", "H100": "sm90", "both": "sm80+90"}


def test_mmdetections_focal_loss_gives_on_the_gpu_path_what_it_gives_on_the_cpu_path():
    """MMDetection's FocalLoss computes in PyTorch on the CPU and calls mmcv's op on CUDA tensors: its CUDA branch
    (the function it picks there, called here on CPU tensors, so our op) against its CPU branch, as a RetinaNet head
    calls it (labels 0..C with C background, per-anchor weights, avg_factor), loss and gradient, in float32."""
    from mmdet.models.losses.focal_loss import FocalLoss, sigmoid_focal_loss

    torch.manual_seed(2)
    head = FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0)
    logits = (torch.randn(500, 20) * 3).requires_grad_(True)
    labels, weights = torch.randint(0, 21, (500,)), (torch.rand(500) > 0.1).float()
    cpu_branch = head(logits, labels, weights, avg_factor=37.0)
    cpu_grad, = torch.autograd.grad(cpu_branch, logits)
    gpu_branch = head.loss_weight * sigmoid_focal_loss(logits, labels, weights, gamma=2.0, alpha=0.25,
                                                       reduction="mean", avg_factor=37.0)
    gpu_grad, = torch.autograd.grad(gpu_branch, logits)
    torch.testing.assert_close(gpu_branch, cpu_branch, rtol=1e-5, atol=0)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-7)
