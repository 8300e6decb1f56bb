"""Detection (Faster R-CNN, VOC) and segmentation (FCN, ADE20K) stages on the tiny generated trees, on CPU."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lifecycle.artifacts import read_summary

REPO = Path(__file__).resolve().parents[1]
SITE = Path(torch.__file__).parents[1]

STAGES = {
    "detection": dict(config="configs/detection/demo/faster-rcnn_r50_fpn_voc0712_demo.py", data="VOCdevkit",
                      short=["train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"],
                      tool=SITE / "mmdet/.mim/tools/train.py"),
    "segmentation": dict(config="configs/segmentation/demo/fcn_r50-d8_ade20k_demo.py", data="ADEChallengeData2016",
                         short=["train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"],
                         tool=SITE / "mmseg/.mim/tools/train.py"),
}


def run_stage_cmd(stage, export, data_root, work_dir, *extra):
    s = STAGES[stage]
    return [sys.executable, "-m", f"{stage}.train", "--export", str(export), "--config", str(REPO / s["config"]),
            "--data-root", str(data_root), "--work-dir", str(work_dir), "--arm", "test", "--cfg-options", *s["short"],
            *extra]


def run_stage(stage, export, data_root, work_dir, *extra):
    return subprocess.run(run_stage_cmd(stage, export, data_root, work_dir, *extra), capture_output=True, text=True,
                          cwd=REPO, timeout=900)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_tests_and_writes_summary_and_its_config_runs_under_mm_tools(stage, tiny_data, tiny_export,
                                                                                 tmp_path):
    out = run_stage(stage, tiny_export, tiny_data / STAGES[stage]["data"], tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "VerifyBackboneHook: every backbone tensor equals the export" in out.stdout + out.stderr
    assert re.search(r"^progress: iter 2/2, [\d.]+ img/s, eta 0:00:00$", out.stdout, re.M)  # lifecycle/progress.py
    assert re.search(r"^progress: test (\d+)/\1, [\d.]+ img/s, eta 0:00:00$", out.stdout, re.M)
    summary = read_summary(tmp_path / "run" / "summary.json")
    assert summary["stage"] == stage and summary["arm"] == "test"
    assert summary["backbone"]["variant"] == "D"
    if stage == "detection":
        assert 0 <= summary["metrics"]["mAP"] <= 100 and len(summary["metrics"]["per_class_AP"]) == 20
        assert summary["protocol"]["eval_mode"] == "11points"
    else:
        assert {"mIoU", "aAcc", "mAcc"} <= summary["metrics"].keys()
        assert len(summary["metrics"]["per_class_IoU"]) == 150
        assert summary["protocol"]["reduce_zero_label"] is True and summary["protocol"]["crop_size"] == [128, 128]
    cfg = (tmp_path / "run" / "config.py").read_text()
    assert str(tiny_export.resolve() / "backbone.pth") in cfg and "SyncBN" not in cfg
    assert summary["config"]["batch"] == summary["config"]["recipe_batch"] and summary["config"]["accumulation"] == 1
    # The batch BatchNorm sees is part of the protocol (the detector's BN is frozen: norm_eval), the layout is not.
    bn = "frozen" if stage == "detection" else 4
    assert (summary["protocol"]["batch"], summary["protocol"]["bn_batch"]) == (summary["config"]["batch"], bn)
    assert summary["layout"] == dict(processes=1, per_device=summary["config"]["batch"], accumulation=1,
                                     line=summary["config"]["batch_line"])
    assert f"{stage}: {summary['config']['batch_line']}, 2 " in out.stdout  # the protocol line, logged first
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN

    # Rerunning the same command finds the run complete.
    again = run_stage(stage, tiny_export, tiny_data / STAGES[stage]["data"], tmp_path / "run")
    assert again.returncode == 0 and "complete" in again.stdout

    # The generated config is the record of the run: the library's own entry point trains it too.
    own = subprocess.run([sys.executable, str(STAGES[stage]["tool"]), str(tmp_path / "run" / "config.py"),
                          "--work-dir", str(tmp_path / "own")], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert own.returncode == 0, own.stderr[-3000:]
    assert "VerifyBackboneHook: every backbone tensor equals the export" in own.stdout + own.stderr
    # And its own tools/test.py evaluates that run's checkpoint (with mmcv-lite: torchvision's NMS and RoIAlign).
    tested = subprocess.run([sys.executable, str(STAGES[stage]["tool"].with_name("test.py")),
                             str(tmp_path / "run" / "config.py"), str(tmp_path / "own" / "iter_2.pth"),
                             "--work-dir", str(tmp_path / "own_test")], capture_output=True, text=True, cwd=REPO,
                            timeout=900)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert ("pascal_voc/mAP" if stage == "detection" else "mIoU") in tested.stdout + tested.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_backbone_that_did_not_load_stops_the_run(stage, tiny_data, tiny_export, tmp_path):
    # The classic silent failure: checkpoint keys under a prefix load nothing, mmengine only warns.
    bad = tmp_path / "export"
    shutil.copytree(tiny_export, bad)
    ckpt = torch.load(bad / "backbone.pth", weights_only=True)
    ckpt["state_dict"] = {f"backbone.{k}": v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, bad / "backbone.pth")
    out = run_stage(stage, bad, tiny_data / STAGES[stage]["data"], tmp_path / "run")
    assert out.returncode != 0
    assert "tensors differ (" in out.stderr and "conv1" not in out.stderr.split("tensors differ")[0]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_corrupt_export_is_refused_before_training(tiny_data, tiny_export, tmp_path):
    bad = tmp_path / "export"
    shutil.copytree(tiny_export, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["variant"] = "B"  # the weights are a D
    (bad / "meta.json").write_text(json.dumps(meta))
    out = run_stage("detection", bad, tiny_data / "VOCdevkit", tmp_path / "run")
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "meta.json" in out.stderr


def test_random_init_arm_runs_and_its_rerun_is_complete_on_any_gpu_layout(tiny_data, tmp_path):
    """A random-init run with accumulation (2 images per GPU of the demo's 4) ends without the loader workers'
    "killed by signal" traceback and records its schedule in updates; rerun on another layout (another memory
    limit, two processes whose BatchNorm would need SyncBN, so GPUs) it is complete; a changed recipe is refused."""
    data, work = tiny_data / "ADEChallengeData2016", tmp_path / "run"
    out = run_stage("segmentation", "none", data, work, "max_images_per_gpu=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "killed by signal" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-3000:]
    summary = read_summary(work / "summary.json")
    assert summary["backbone"] is None and "init_cfg=None" in (work / "config.py").read_text()
    assert summary["layout"]["accumulation"] == 2 and summary["protocol"]["schedule"] == "2 iterations"
    two = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    for extra, env in ((["max_images_per_gpu=4"], None), (["--launcher", "pytorch"], two)):
        again = subprocess.run(run_stage_cmd("segmentation", "none", data, work, *extra), capture_output=True,
                               text=True, cwd=REPO, env=env, timeout=300)
        assert again.returncode == 0 and "complete" in again.stdout, again.stderr[-3000:]
    changed = subprocess.run(run_stage_cmd("segmentation", "none", data, work, "optim_wrapper.optimizer.lr=0.5",
                                           "--launcher", "pytorch"), capture_output=True, text=True, cwd=REPO,
                             env=two, timeout=300)
    assert changed.returncode == 1 and "inputs changed: optim_wrapper.optimizer.lr;" in changed.stderr, \
        changed.stderr[-3000:]


def test_broken_voc_tree_gives_the_checkers_lines(tiny_data, tmp_path):
    voc = tmp_path / "VOCdevkit"
    shutil.copytree(tiny_data / "VOCdevkit", voc)
    first = (voc / "VOC2007/ImageSets/Main/test.txt").read_text().split()[0]
    xml = voc / "VOC2007/Annotations" / f"{first}.xml"
    xml.write_text("<annotation><object>")
    out = run_stage("detection", "none", voc, tmp_path / "run")
    assert out.returncode == 1 and str(xml) in out.stderr and "check_data.py voc" in out.stderr


def test_rgb_mask_gives_the_checkers_lines(tiny_data, tmp_path):
    # The stage's start checks headers (mode, size); mask values need tools/check_data.py --full.
    from PIL import Image

    ade = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tiny_data / "ADEChallengeData2016", ade)
    mask = sorted((ade / "annotations/training").glob("*.png"))[0]
    Image.open(mask).convert("RGB").save(mask)
    out = run_stage("segmentation", "none", ade, tmp_path / "run")
    assert out.returncode == 1 and str(mask) in out.stderr and "mode 'RGB'" in out.stderr


def test_a_mask_value_outside_the_label_space_is_named_not_an_index_error(tiny_data, tmp_path):
    """A class id above ADE20K's 150 in every training mask (the start's header check cannot see values): the stage
    stops at its first batch with one line naming a mask and the full check, not "IndexError: Target ... out of
    bounds" from the loss."""
    import numpy as np
    from PIL import Image

    ade = tmp_path / "ADEChallengeData2016"
    shutil.copytree(tiny_data / "ADEChallengeData2016", ade)
    masks = sorted((ade / "annotations/training").glob("*.png"))
    for mask in masks:
        values = np.array(Image.open(mask))
        values[:2, :2] = 200
        Image.fromarray(values).save(mask)
    out = run_stage("segmentation", "none", ade, tmp_path / "run")
    assert out.returncode == 1 and "IndexError" not in out.stderr, out.stderr[-3000:]
    line = out.stderr.strip().splitlines()[-1]
    assert any(str(m) in line for m in masks) and "class ids 199" in line and "--full" in line, line


def test_transfer_scripts_resolve_their_source(tiny_export, tmp_path):
    from export.layout import ExportError
    from export.resolve import resolve

    assert resolve("none") == "none"
    assert resolve(str(tiny_export)) == str(tiny_export)
    run = tmp_path / "run"
    shutil.copytree(tiny_export.parent, run, ignore=shutil.ignore_patterns("export"))
    assert resolve(str(run)) == str(run / "export") and (run / "export" / "meta.json").is_file()  # exported once
    with pytest.raises(ExportError, match="no such export, run dir or weights file"):
        resolve(str(tmp_path / "missing"))
    usage = subprocess.run(["bash", str(REPO / "tools/transfer_det.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "SRC" in usage.stdout


def test_a_frozen_backbone_run_trains_its_heads_and_leaves_every_backbone_tensor_as_exported(tiny_data, tiny_export,
                                                                                              tmp_path):
    """tools/transfer_det.sh --frozen-backbone: after training, every backbone tensor in the checkpoint (weights and
    BatchNorm statistics) is the export's, the heads moved, and the summary's protocol says frozen."""
    env = {**os.environ, "PYTHON": sys.executable}
    s = STAGES["detection"]
    out = subprocess.run(["bash", str(REPO / "tools/transfer_det.sh"), str(tiny_export), "--frozen-backbone",
                          "--config", str(REPO / s["config"]), "--data-root", str(tiny_data / s["data"]),
                          "--work-dir", str(tmp_path / "run"), "--", *s["short"],
                          "default_hooks.checkpoint.interval=1"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backbone frozen" in out.stdout
    summary = read_summary(tmp_path / "run" / "summary.json")
    assert summary["protocol"]["backbone"] == "frozen" and summary["config"]["frozen_changes"]
    exported = torch.load(tiny_export / "backbone.pth", map_location="cpu", weights_only=True)
    exported = exported.get("state_dict", exported)
    state = torch.load(tmp_path / "run" / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, exported[k]) for k, v in backbone.items() if k in exported)
    assert sum(k in exported for k in backbone) > 300  # weights, biases and BN statistics alike
    first = torch.load(tmp_path / "run" / "iter_1.pth", map_location="cpu", weights_only=False)["state_dict"]
    heads = [k for k in state if k.startswith(("rpn_head.", "roi_head.bbox_head.")) and state[k].is_floating_point()]
    assert heads and any(not torch.equal(first[k], state[k]) for k in heads)  # the heads trained between iterations


def test_c4_detector_holds_the_export_in_backbone_and_shared_head(tiny_data, tiny_export, tmp_path):
    """configs/detection/faster-rcnn_r50_c4_voc0712.py (no FPN, the paper's protocol): stem + stages 1-3 in the
    backbone, stage 4 in roi_head.shared_head (with ResNet-D's avg-pool shortcut), both verified; a step trains."""
    import argparse

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from detection.train import STAGE
    from export.files import load_export
    from export.layout import ExportError
    from export.mm_check import verify_model_loaded
    from mmstack import compat
    from transfer.runner import configure, walk
    from transfer.shared_head import shared_head_keys

    assert shared_head_keys({"variant": "A"}, "x.pth") == dict(
        type="ResLayer", style="caffe", init_cfg=dict(type="Pretrained", checkpoint="x.pth"))
    compat.apply()
    cfg = Config.fromfile(REPO / "configs/detection/faster-rcnn_r50_c4_voc0712.py")
    args = argparse.Namespace(config="c4", data_root=tiny_data / "VOCdevkit", work_dir=tmp_path, launcher="none",
                              frozen_backbone=False, seed=0, allow_synthetic=True)
    state, meta = load_export(tiny_export)
    configure(cfg, STAGE, args, meta, (tiny_export / "backbone.pth").resolve())
    assert "transfer.shared_head" in cfg.custom_imports["imports"]  # registers AvgDownResLayer in a run
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    assert type(model.roi_head.shared_head).__name__ == "AvgDownResLayer"
    with pytest.raises(ExportError, match="shared_head"):
        verify_model_loaded(model, tiny_export)  # not initialised yet: random weights
    model.init_weights()
    record = verify_model_loaded(model, tiny_export)
    assert record["tensors_checked"] == len(state) and 0 < record["shared_head_tensors"] < len(state)

    # One training step on the generated VOC at the stock 1000x600 scale (boxes under 32 px kept, as elsewhere).
    walk(cfg.train_dataloader, lambda d: d.__setitem__("bbox_min_size", 4) if "bbox_min_size" in d else None)
    cfg.train_dataloader.update(num_workers=0, persistent_workers=False, batch_size=1)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    losses = model.train_step(next(iter(loader)), build_optim_wrapper(model, cfg.optim_wrapper))
    assert torch.isfinite(sum(v for k, v in losses.items() if "loss" in k))


def configured(config: str, meta=None, export=None, world: int = 1, monkeypatch=None, frozen=False, **options):
    """An installed-config-based recipe after our stage's configure(), as a run on ``world`` processes would see it."""
    import argparse

    from mmengine.config import Config

    from detection.train import STAGE as DET
    from segmentation.train import STAGE as SEG
    from transfer.runner import configure

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = Config.fromfile(REPO / config)
    cfg.merge_from_dict(options)
    args = argparse.Namespace(config=config, data_root="data", work_dir="w", launcher="none", frozen_backbone=frozen,
                              seed=0)
    decided = configure(cfg, DET if "detection" in config else SEG, args, meta, export)
    return cfg, decided


@pytest.mark.parametrize("config", ["configs/detection/faster-rcnn_r50_fpn_voc0712.py",
                                    "configs/detection/faster-rcnn_r50_c4_voc0712.py",
                                    "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"])
def test_random_init_control_trains_every_layer_and_its_bn_statistics(config, tiny_export, monkeypatch):
    """The control arm is not handicapped: built and put in train mode, every backbone (and C4 shared-head)
    parameter is trainable and every BatchNorm updates its statistics; a pretrained arm keeps the recipe's freezing."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS as SEG_MODELS

    from export.files import load_export
    from mmstack import compat

    compat.apply()
    det = "detection" in config
    init_default_scope("mmdet" if det else "mmseg")
    models = DET_MODELS if det else SEG_MODELS

    def parts(model):
        out = [model.backbone]
        if det and model.roi_head.with_shared_head:
            out.append(model.roi_head.shared_head)
        return out

    cfg, decided = configured(config, monkeypatch=monkeypatch)
    control = models.build(cfg.model)
    control.train()
    for part in parts(control):
        assert all(p.requires_grad for p in part.parameters())
        bns = [m for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.training for m in bns)
    if det:  # the stock detection recipes freeze; the summary says what the control changed
        assert decided["control_changes"]["model.backbone.frozen_stages"] == [1, -1]
        assert decided["control_changes"]["model.backbone.norm_eval"] == [True, False]
    else:  # mmseg's FCN recipe already trains everything: nothing to change
        assert decided["control_changes"] == {}

    state, meta = load_export(tiny_export)
    cfg, decided = configured(config, meta, (tiny_export / "backbone.pth").resolve(), monkeypatch=monkeypatch)
    pretrained = models.build(cfg.model)
    pretrained.train()
    frozen = [p for part in parts(pretrained) for p in part.parameters() if not p.requires_grad]
    assert decided["control_changes"] == {} and (bool(frozen) == det)


@pytest.mark.parametrize("config", ["configs/detection/faster-rcnn_r50_fpn_voc0712.py",
                                    "configs/detection/faster-rcnn_r50_c4_voc0712.py",
                                    "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"])
def test_frozen_backbone_mode_freezes_every_backbone_stage_and_its_bn_and_trains_the_head(config, tiny_export,
                                                                                          monkeypatch):
    """Fixed-feature transfer (--frozen-backbone): built and put in train mode, no backbone parameter takes a gradient
    and every backbone BatchNorm keeps its statistics; a C4 detector's stage 4 (the RoI head's shared head) gets an
    lr and weight decay of 0 and BN in eval mode; the heads train as in the recipe. The protocol line says so."""
    from mmdet.registry import MODELS as DET_MODELS
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS as SEG_MODELS

    from export.files import load_export
    from mmstack import compat
    from transfer.runner import protocol_line

    compat.apply()
    det = "detection" in config
    init_default_scope("mmdet" if det else "mmseg")
    _, meta = load_export(tiny_export)
    cfg, decided = configured(config, meta, (tiny_export / "backbone.pth").resolve(), monkeypatch=monkeypatch,
                              frozen=True)
    model = (DET_MODELS if det else SEG_MODELS).build(cfg.model)
    model.train()
    bn = torch.nn.modules.batchnorm._BatchNorm
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, bn))
    head = model.roi_head.bbox_head if det else model.decode_head
    assert all(p.requires_grad for p in head.parameters()) and any(True for _ in head.parameters())
    if det:
        assert all(p.requires_grad for p in model.rpn_head.parameters())
    else:  # FCN's head trains its BN: the BN batch still matters
        assert any(m.training for m in model.decode_head.modules() if isinstance(m, bn)) and decided["bn_batch"] == 16
    if "c4" in config:
        shared = {id(p) for p in model.roi_head.shared_head.parameters()}
        groups = build_optim_wrapper(model, cfg.optim_wrapper).optimizer.param_groups
        frozen = [g for g in groups if any(id(p) in shared for p in g["params"])]
        assert frozen and all(g["lr"] == 0 and g["weight_decay"] == 0 for g in frozen)
        assert all(not m.training for m in model.roi_head.shared_head.modules() if isinstance(m, bn))
        assert any(g["lr"] > 0 for g in groups)
    stages = cfg.model.backbone.get("num_stages", 4)  # 3 for C4: its stage 4 is the shared head
    assert decided["backbone_mode"] == "frozen" and decided["frozen_changes"]["model.backbone.frozen_stages"][1] == \
        stages == (3 if "c4" in config else 4)
    assert protocol_line(cfg, decided).endswith(", backbone frozen")


DOWNSTREAM = {"fpn": "configs/detection/faster-rcnn_r50_fpn_voc0712.py",
              "c4": "configs/detection/faster-rcnn_r50_c4_voc0712.py",
              "fcn": "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"}


@pytest.mark.parametrize("recipe", DOWNSTREAM)
def test_downstream_recipes_keep_their_batch_bn_batch_lr_and_schedule_on_any_gpu_count(recipe, tiny_export,
                                                                                        monkeypatch):
    """Each recipe's 16 images in one pass on 1, 2, 4 and 8 GPUs: the total batch, the batch BatchNorm normalises
    over (16 under SyncBN wherever BN trains: FCN and the random-init control; frozen in the pretrained detectors),
    lr and schedule are the same, and so are iteration counts (no accumulation)."""
    from export.files import load_export

    config = DOWNSTREAM[recipe]
    _, meta = load_export(tiny_export)
    for arm, bn in (("pretrained", "frozen" if recipe != "fcn" else 16), ("control", 16)):
        plans = {}
        for world in (1, 2, 4, 8):
            cfg, decided = configured(config, *((meta, (tiny_export / "backbone.pth").resolve()) if arm ==
                                                "pretrained" else ()), world=world, monkeypatch=monkeypatch)
            plans[world] = (decided["per_device"], decided["accumulation"])
            assert (decided["batch"], decided["bn_batch"] or "frozen", decided["lr"]) == (16, bn, 0.01), (arm, world)
            assert cfg.optim_wrapper.accumulative_counts == 1 and cfg.train_dataloader.batch_size == 16 // world
            assert cfg.get("sync_bn") == ("torch" if world > 1 and bn != "frozen" else None), (arm, world)
            loop = cfg.train_cfg
            assert loop.get("max_iters", loop.get("max_epochs")) == (80000 if recipe == "fcn" else 4)
        assert plans == {1: (16, 1), 2: (8, 1), 4: (4, 1), 8: (2, 1)}, arm
        line = decided["batch_line"]
        assert line == f"batch 16 = 8 x 2 x 1 accumulation steps, BN {'frozen' if bn == 'frozen' else 'batch 16'}, " \
                       "lr 0.01"


def test_a_stated_memory_limit_accumulates_and_records_the_smaller_bn_batch(monkeypatch):
    """Above max_images_per_gpu a process takes fewer images and accumulates; iteration counts hold in updates and
    the BN batch it gives is recorded; 3 GPUs cannot share 16 images; a bad limit is named."""
    from mmengine.optim import build_optim_wrapper

    from transfer.runner import StageError

    seg = DOWNSTREAM["fcn"]
    cfg, decided = configured(seg, world=1, monkeypatch=monkeypatch, max_images_per_gpu=4)
    assert (decided["per_device"], decided["accumulation"], decided["bn_batch"], decided["batch"]) == (4, 4, 4, 16)
    assert cfg.train_cfg.max_iters == cfg.param_scheduler[0]["end"] == 4 * 80000
    assert build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper)._accumulative_counts == 4
    assert decided["batch_line"] == "batch 16 = 1 x 4 x 4 accumulation steps, BN batch 4, lr 0.01"
    _, decided = configured(seg, world=2, monkeypatch=monkeypatch, max_images_per_gpu=6)  # 8 each: 4 x 2
    assert (decided["per_device"], decided["accumulation"], decided["bn_batch"]) == (4, 2, 8)
    with pytest.raises(StageError, match=r"run on 1, 2, 4, 8, 16 GPUs"):
        configured(seg, world=3, monkeypatch=monkeypatch)
    with pytest.raises(StageError, match=r"max_images_per_gpu=0: expected a positive number of images"):
        configured(seg, world=1, monkeypatch=monkeypatch, max_images_per_gpu=0)


def test_under_two_processes_every_batchnorm_that_trains_is_synchronised(tmp_path):
    """The FCN recipe and the random-init Faster R-CNN built by mmengine's Runner under torchrun (2 processes,
    gloo): every BatchNorm that uses batch statistics is a SyncBatchNorm of the whole group; the pretrained
    detector's frozen BN is left as it is; the evaluator scores every rank's images. On a CPU such a run is refused
    in one line before it starts."""
    script = tmp_path / "built.py"
    script.write_text(f"""
import argparse, json, os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from mmengine.runner import Runner
from mmstack import compat
from transfer.runner import configure
import transfer.hooks, transfer.metrics, transfer.preemption_hook  # registers our hooks and metrics, as run() does
from detection.train import STAGE as DET
from segmentation.train import STAGE as SEG
compat.apply()
torch.distributed.init_process_group("gloo")  # as transfer/data_gate.py does on a CPU (mmengine's would pick CUDA)
from mmengine.registry import MODEL_WRAPPERS

@MODEL_WRAPPERS.register_module()
class Holder(torch.nn.Module):  # torch's DDP refuses SyncBatchNorm on CPU modules; the conversion comes before it
    def __init__(self, module):
        super().__init__()
        self.module = module

out = {{}}
for name, config, stage in (("fcn", {DOWNSTREAM['fcn']!r}, SEG), ("fpn", {DOWNSTREAM['fpn']!r}, DET)):
    from mmengine.config import Config
    cfg = Config.fromfile(os.path.join({str(REPO)!r}, config))
    args = argparse.Namespace(config=config, data_root="data", work_dir={str(tmp_path)!r} + "/" + name,
                              launcher="pytorch", seed=0, frozen_backbone=False)
    decided = configure(cfg, stage, args, None, None)
    cfg.model_wrapper_cfg = dict(type="Holder")
    runner = Runner.from_cfg(cfg)
    model = runner.model.module
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train()
    out[name] = dict(bn_batch=decided["bn_batch"], trains=sum(m.training for m in bns),
                     synced=sum(isinstance(m, torch.nn.SyncBatchNorm) for m in bns if m.training),
                     world=torch.distributed.get_world_size())
    if name == "fcn":  # the evaluator as configured: each rank scores its own image, the ranks' results gathered
        evaluator = runner.build_evaluator(cfg.val_evaluator)
        evaluator.dataset_meta = dict(classes=[str(c) for c in range(150)])
        rank = torch.distributed.get_rank()
        gt, pred = torch.ones(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 1 + rank)  # rank 1 all wrong
        evaluator.process([dict(pred_sem_seg=dict(data=pred), gt_sem_seg=dict(data=gt))])
        out[name]["mIoU"] = float(evaluator.evaluate(2)["mIoU"])
if os.environ["RANK"] == "0":
    print("RESULT " + json.dumps(out))
""")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ")[1].splitlines()[0])
    assert result["fcn"]["trains"] > 50 and result["fcn"]["synced"] == result["fcn"]["trains"]
    assert result["fcn"]["bn_batch"] == 16 and result["fcn"]["world"] == 2
    # Both ranks' images scored (class 1: IoU 16/32; class 2: 0/16; rank 0 alone would give 100), gathered over the
    # process group: nothing written to the launch directory, which another node may not share.
    assert result["fcn"]["mIoU"] == 25.0 and not (tmp_path / ".dist_test").exists()
    assert result["fpn"]["trains"] == result["fpn"]["synced"] > 50 and result["fpn"]["bn_batch"] == 16  # control

    if not torch.cuda.is_available():  # the stage itself: SyncBN cannot run on CPU tensors, so it says so first
        refused = subprocess.run([sys.executable, "-m", "segmentation.train", "--export", "none", "--config",
                                  str(REPO / DOWNSTREAM["fcn"]), "--data-root", str(tmp_path / "absent"),
                                  "--work-dir", str(tmp_path / "run"), "--launcher", "pytorch"],
                                 env={**os.environ, "WORLD_SIZE": "2"},
                                 capture_output=True, text=True, cwd=REPO, timeout=300)
        last = refused.stderr.splitlines()[-1]  # after the libraries' import warnings
        assert refused.returncode == 1 and last.startswith("error: "), refused.stderr[-2000:]
        assert last.endswith("SyncBN) needs GPUs; on a CPU, run this stage on one process (GPUS=1)")
        assert not (tmp_path / "run").exists()


def test_downstream_runs_keep_two_interval_checkpoints_unless_their_config_says(monkeypatch):
    """The stock recipes keep every checkpoint (ADE20K's 80k iterations: 10 x 397 MB per run); ours keep two, and a
    config that sets its own number keeps it."""
    from mmengine.config import Config

    seg = "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"
    for config in (seg, "configs/detection/faster-rcnn_r50_fpn_voc0712.py",
                   "configs/detection/faster-rcnn_r50_c4_voc0712.py"):
        assert Config.fromfile(REPO / config).default_hooks.checkpoint.get("max_keep_ckpts", -1) == -1, config
        cfg, _ = configured(config, monkeypatch=monkeypatch)
        assert cfg.default_hooks.checkpoint.max_keep_ckpts == 2, config
    cfg, _ = configured(seg, monkeypatch=monkeypatch, **{"default_hooks.checkpoint.max_keep_ckpts": 5})
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == 5


def test_cfg_options_randomness_is_kept_and_the_seed_is_seed_s(monkeypatch):
    """--cfg-options randomness.deterministic=True was overwritten with False, silently; a seed given there, unlike
    --seed's, would not be the summary's."""
    from transfer.runner import StageError

    det = "configs/detection/faster-rcnn_r50_fpn_voc0712.py"
    cfg, _ = configured(det, monkeypatch=monkeypatch)
    assert cfg.randomness == dict(deterministic=False, seed=0)
    cfg, _ = configured(det, monkeypatch=monkeypatch, **{"randomness.deterministic": True,
                                                        "randomness.diff_rank_seed": True})
    assert cfg.randomness == dict(deterministic=True, diff_rank_seed=True, seed=0)
    with pytest.raises(StageError, match=r"randomness.seed=3 .* contradicts --seed 0; give the seed as --seed 3"):
        configured(det, monkeypatch=monkeypatch, **{"randomness.seed": 3})


def test_paper_recipes_refuse_generated_data_unless_allowed(tiny_data, tmp_path, capsys):
    """A tree written by tools/make_data.py carries a marker: the paper's recipes stop before training, naming the
    marker and the flag; --allow-synthetic lets it through."""
    from classification import train

    rc = train.main([str(REPO / "configs/classification/r50b_standard.yaml"), "--data-root",
                     str(tiny_data / "imagenet"), "--work-dir", str(tmp_path / "cls")])
    err = capsys.readouterr().err
    assert rc == 1 and "SYNTHETIC.json" in err and "--allow-synthetic" in err and err.count("\n") == 1
    assert not (tmp_path / "cls" / "last.pth").exists()
    stock = subprocess.run([sys.executable, "-m", "detection.train", "--export", "none", "--config",
                            str(REPO / "configs/detection/faster-rcnn_r50_fpn_voc0712.py"), "--data-root",
                            str(tiny_data / "VOCdevkit"), "--work-dir", str(tmp_path / "det2")],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert stock.returncode == 1 and "SYNTHETIC.json" in stock.stderr and "--allow-synthetic" in stock.stderr


def test_out_of_gpu_memory_names_the_limit_and_a_lower_one_starts_again(tiny_data, tiny_export, tmp_path,
                                                                         monkeypatch, capsys):
    """A run that runs out of GPU memory at its first step stops in one line naming max_images_per_gpu; rerun with
    a lower limit (another split), it starts again, as it left no checkpoint to mix with."""
    from mmengine.runner import Runner

    from detection.train import main as det_main

    s = STAGES["detection"]
    argv = ["--export", str(tiny_export), "--config", str(REPO / s["config"]), "--data-root",
            str(tiny_data / s["data"]), "--work-dir", str(tmp_path / "run"), "--cfg-options", *s["short"]]

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(Runner, "train", out_of_memory)
        # Hours in, with checkpoints saved: another split would be refused on resume, so it says where to go.
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "iter_8.pth").touch()
        assert det_main(argv) == 1
        assert "set max_images_per_gpu lower in a new --work-dir (" in capsys.readouterr().err
        (tmp_path / "run" / "iter_8.pth").unlink()
        assert det_main(argv) == 1  # at its first step
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "out of GPU memory with 2 images per GPU; set max_images_per_gpu lower (" in err
        assert (tmp_path / "run" / "config.py").exists() and not list((tmp_path / "run").glob("*.pth"))
    assert det_main([*argv, "max_images_per_gpu=1"]) == 0
    summary = read_summary(tmp_path / "run" / "summary.json")
    assert summary["layout"]["accumulation"] == 2 and summary["protocol"]["schedule"] == "2 iterations"  # updates
    capsys.readouterr()
    # Finished: its rerun without the limit (another split: no accumulation) finds it complete.
    assert det_main(argv) == 0 and "this run is complete" in capsys.readouterr().out


def test_a_downstream_run_resumes_only_on_its_own_split(tmp_path, monkeypatch):
    """mmengine counts passes: a run started on 1 GPU with accumulation 4 (4 images per GPU at most) cannot
    continue on 4 GPUs."""
    from transfer.runner import StageError, refuse_another_split

    seg = "configs/segmentation/fcn_r50-d8_ade20k-512x512.py"
    one, _ = configured(seg, world=1, monkeypatch=monkeypatch, max_images_per_gpu=4)
    one.dump(str(tmp_path / "config.py"))
    refuse_another_split(tmp_path / "config.py", configured(seg, world=1, monkeypatch=monkeypatch,
                                                            max_images_per_gpu=4)[0])
    with pytest.raises(StageError, match="accumulation 4 .now 4 and 1.; resume it on the GPU count"):
        refuse_another_split(tmp_path / "config.py", configured(seg, world=4, monkeypatch=monkeypatch)[0])


def test_a_downstream_rerun_with_other_inputs_is_refused_naming_the_keys(tiny_export, tmp_path, monkeypatch):
    """The dumped config.py is the record: a rerun with the same experiment (runtime keys may differ) goes on; another
    recipe key or another export (its tensors' hash) is refused in one line naming the keys."""
    from export.files import load_export
    from transfer.runner import StageError, refuse_changed_inputs

    det = "configs/detection/faster-rcnn_r50_fpn_voc0712.py"
    _, meta = load_export(tiny_export)
    ckpt = tiny_export.resolve() / "backbone.pth"
    first, _ = configured(det, world=1, monkeypatch=monkeypatch, meta=meta, export=ckpt)
    first.dump(str(tmp_path / "config.py"))
    runtime = {"train_dataloader.num_workers": 0, "default_hooks.logger.interval": 1, "work_dir": "elsewhere"}
    refuse_changed_inputs(tmp_path / "config.py", configured(det, world=1, monkeypatch=monkeypatch, meta=meta,
                                                              export=ckpt, **runtime)[0])
    lr = configured(det, world=1, monkeypatch=monkeypatch, meta=meta, export=ckpt,
                    **{"optim_wrapper.optimizer.lr": 0.5})[0]
    with pytest.raises(StageError, match=r"inputs changed: optim_wrapper\.optimizer\.lr; use another --work-dir"):
        refuse_changed_inputs(tmp_path / "config.py", lr)
    other = configured(det, world=1, monkeypatch=monkeypatch, meta=dict(meta, state_sha256="0" * 64), export=ckpt)[0]
    with pytest.raises(StageError, match="inputs changed: export_state_sha256;"):
        refuse_changed_inputs(tmp_path / "config.py", other)


def test_a_launcher_that_sets_the_process_count_after_the_batch_plan_is_refused(capsys):
    """mmengine's 'slurm' and 'mpi' launchers set WORLD_SIZE only when they start the process group, after the batch
    plan is made: the plan would be for one process (its batch, BN batch and lr wrong on every rank). Refused."""
    from detection.train import STAGE
    from transfer.runner import parse_args

    required = ["--export", "none", "--config", "c.py", "--data-root", "d", "--work-dir", "w"]
    assert parse_args(STAGE, [*required, "--launcher", "pytorch"]).launcher == "pytorch"
    for launcher in ("slurm", "mpi"):
        with pytest.raises(SystemExit) as e:
            parse_args(STAGE, [*required, "--launcher", launcher])
        assert e.value.code == 2 and f"invalid choice: '{launcher}'" in capsys.readouterr().err


def test_a_torchrun_process_without_launcher_pytorch_is_refused(tmp_path, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE=2) with the default --launcher none each process would train alone on its share of
    the batch while the summary records all of it: refused in one line naming the fix, before anything loads."""
    from detection.train import main as det_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert det_main(["--export", "none", "--config", "c.py", "--data-root", "d", "--work-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--launcher pytorch" in err and "GPUS=N" in err, err


def test_a_loop_given_by_by_epoch_or_a_scoped_type_is_planned_as_mmengine_builds_it(monkeypatch):
    """mmengine builds an iteration-based loop from ``by_epoch=False`` or a scoped type too: under accumulation its
    length is multiplied as the lr schedule's is, and the protocol line gives it in updates; a loop of neither kind
    is refused in one line."""
    from transfer.runner import StageError, protocol_line

    seg = DOWNSTREAM["fcn"]
    for loop in (dict(by_epoch=False, max_iters=80000, val_interval=8000),
                 dict(type="mmengine.IterBasedTrainLoop", max_iters=80000, val_interval=8000)):
        cfg, decided = configured(seg, monkeypatch=monkeypatch, max_images_per_gpu=4, train_cfg=dict(_delete_=True,
                                                                                                   **loop))
        assert (cfg.train_cfg.max_iters, cfg.train_cfg.val_interval) == (4 * 80000, 4 * 8000), loop
        assert cfg.param_scheduler[0]["end"] == 4 * 80000 and ", 80000 updates, PolyLR" in protocol_line(cfg, decided)
    # An epoch-based loop keeps its epochs; a checkpoint every N iterations (by_epoch=False) counts passes there
    # too, so it holds in updates only multiplied.
    cfg, decided = configured(seg, monkeypatch=monkeypatch, max_images_per_gpu=4,
                              train_cfg=dict(_delete_=True, by_epoch=True, max_epochs=3),
                              default_hooks=dict(checkpoint=dict(by_epoch=False, interval=500)))
    assert cfg.train_cfg.max_epochs == 3 and ", 3 epochs, PolyLR" in protocol_line(cfg, decided)
    assert cfg.default_hooks.checkpoint.interval == 4 * 500
    with pytest.raises(StageError, match=r"train_cfg.type='ValLoop' is neither an iteration- nor an epoch-based"):
        configured(seg, monkeypatch=monkeypatch, train_cfg=dict(_delete_=True, type="ValLoop"))


def test_the_generated_config_keeps_the_recipes_custom_imports(monkeypatch):
    """Our modules are added to the recipe's custom_imports, not put in their place (the dumped config would fail
    under the library's own tools/train.py without them); allow_failed_imports stays the recipe's."""
    ours = ["transfer.hooks", "transfer.metrics", "transfer.preemption_hook"]
    fpn = DOWNSTREAM["fpn"]
    cfg, _ = configured(fpn, monkeypatch=monkeypatch,
                        custom_imports=dict(imports=["mmdet.engine"], allow_failed_imports=True))
    assert cfg.custom_imports == dict(imports=["mmdet.engine", *ours], allow_failed_imports=True)
    cfg, _ = configured(fpn, monkeypatch=monkeypatch, custom_imports=dict(imports="transfer.hooks"))  # mmengine's str
    assert cfg.custom_imports == dict(imports=ours, allow_failed_imports=False)


def accumulating_toy_runner(work: Path, stop_in_validation: bool = False):
    """mmengine's Runner on a linear model, SGD with momentum, accumulation 2 and PreemptionHook: 2 epochs of 5
    batches, validated after each; SIGTERM to itself in the first validation if asked."""
    import signal

    from mmengine.dataset import DefaultSampler
    from mmengine.evaluator import BaseMetric, Evaluator
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader

    import transfer.preemption_hook  # noqa: F401 - registers PreemptionHook

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 1)

        def forward(self, inputs, targets, mode="loss"):
            return dict(loss=((self.fc(inputs) - targets) ** 2).mean()) if mode == "loss" else list(self.fc(inputs))

    class Count(BaseMetric):
        def process(self, data_batch, data_samples):
            self.results.extend(data_samples)

        def compute_metrics(self, results):
            return dict(n=len(results))

    class StopInValidation(Hook):
        priority = "HIGHEST"

        def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if stop_in_validation and runner.epoch == 1 and batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    g = torch.Generator().manual_seed(0)
    data = [dict(inputs=torch.randn(3, generator=g), targets=torch.randn(1, generator=g)) for _ in range(10)]
    torch.manual_seed(0)
    return Runner(model=Toy(), work_dir=str(work),
                  train_dataloader=DataLoader(data, batch_size=2, sampler=DefaultSampler(data, shuffle=True, seed=0)),
                  val_dataloader=DataLoader(data[:4], batch_size=2), val_evaluator=Evaluator(Count()), val_cfg=dict(),
                  optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9), accumulative_counts=2),
                  train_cfg=dict(by_epoch=True, max_epochs=2, val_interval=1),
                  default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=100)),
                  custom_hooks=[dict(type="PreemptionHook"), StopInValidation()], resume=True, randomness=dict(seed=0),
                  experiment_name=f"acc_toy_{work.parent.name}_{work.name}_{stop_in_validation}")


def test_a_stop_during_validation_inside_an_update_is_saved_at_the_update_boundary(tmp_path, restore_handlers):
    """Accumulation 2 over epochs of 5 batches: the validation after epoch 1 falls inside the third update (mmengine
    counts passes across epochs). Saved there, the partial gradient would be lost on resume; the stop waits for the
    update's end instead (iteration 6), and the resumed run ends at the uninterrupted run's weights."""
    from lifecycle.stop_flag import Preempted

    straight = accumulating_toy_runner(tmp_path / "straight")
    straight.train()
    work = tmp_path / "stopped"
    with pytest.raises(Preempted):
        accumulating_toy_runner(work, stop_in_validation=True).train()
    assert Path((work / "last_checkpoint").read_text().strip()).name == "iter_6.pth"
    resumed = accumulating_toy_runner(work)
    resumed.train()
    assert resumed.iter == straight.iter == 10
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_the_transfer_script_guards_its_possibly_empty_arrays():
    """bash before 4.4 takes "${arr[@]}" of an empty array for an unbound variable under set -u (macOS's bash 3.2):
    each array the script may leave empty is expanded as ${arr[@]+"${arr[@]}"}."""
    text = (REPO / "tools/transfer_stage.sh").read_text()
    empty = re.findall(r"^(\w+)=\(\)$", text, re.M)
    assert {"variant", "extra"} <= set(empty)
    for name in empty:
        bare = text.replace(f'${{{name}[@]+"${{{name}[@]}}"}}', "")
        assert f'"${{{name}[@]}}"' not in bare, name
