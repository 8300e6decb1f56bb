"""Detection (Faster R-CNN, VOC) and segmentation (FCN, ADE20K) stages on the tiny generated trees, on CPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from classification.artifacts import read_summary

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


def run_stage(stage, export, data_root, work_dir, *extra):
    s = STAGES[stage]
    cmd = [sys.executable, "-m", f"{stage}.train", "--export", str(export), "--config", str(REPO / s["config"]),
           "--data-root", str(data_root), "--work-dir", str(work_dir), "--arm", "test", "--cfg-options", *s["short"],
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_tests_and_writes_summary_and_its_config_runs_under_mm_tools(stage, tiny_data, tiny_export,
                                                                                 tmp_path):
    out = run_stage(stage, tiny_export, tiny_data / STAGES[stage]["data"], tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "VerifyBackboneHook: every backbone tensor equals the export" in out.stdout + out.stderr
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
    assert summary["config"]["effective_batch"] == summary["config"]["recipe_batch"]
    json.dumps(summary, allow_nan=False)  # strict JSON: no NaN

    # Rerunning the same command finds the run complete.
    again = run_stage(stage, tiny_export, tiny_data / STAGES[stage]["data"], tmp_path / "run")
    assert again.returncode == 0 and "complete" in again.stdout

    # The generated config is the record of the run: the library's own entry point trains it too.
    own = subprocess.run([sys.executable, str(STAGES[stage]["tool"]), str(tmp_path / "run" / "config.py"),
                          "--work-dir", str(tmp_path / "own")], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert own.returncode == 0, own.stderr[-3000:]
    assert "VerifyBackboneHook: every backbone tensor equals the export" in own.stdout + own.stderr


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


def test_random_init_arm_runs(tiny_data, tmp_path):
    out = run_stage("segmentation", "none", tiny_data / "ADEChallengeData2016", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(tmp_path / "run" / "summary.json")
    assert summary["backbone"] is None and "init_cfg=None" in (tmp_path / "run" / "config.py").read_text()


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


def test_transfer_scripts_resolve_their_source(tiny_export, tmp_path):
    from classification.export import ExportError
    from transfer.source import resolve

    assert resolve("none") == "none"
    assert resolve(str(tiny_export)) == str(tiny_export)
    run = tmp_path / "run"
    shutil.copytree(tiny_export.parent, run, ignore=shutil.ignore_patterns("export"))
    assert resolve(str(run)) == str(run / "export") and (run / "export" / "meta.json").is_file()  # exported once
    with pytest.raises(ExportError, match="no such export or run dir"):
        resolve(str(tmp_path / "missing"))
    usage = subprocess.run(["bash", str(REPO / "tools/transfer_det.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "SRC" in usage.stdout


def test_c4_detector_holds_the_export_in_backbone_and_shared_head(tiny_data, tiny_export, tmp_path):
    """configs/detection/faster-rcnn_r50_c4_voc0712.py (no FPN, the paper's protocol): stem + stages 1-3 in the
    backbone, stage 4 in roi_head.shared_head (with ResNet-D's avg-pool shortcut), both verified; a step trains."""
    import argparse

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from classification.export import ExportError, load_export
    from detection.train import STAGE
    from transfer import compat
    from transfer.backbone_check import verify_model_loaded
    from transfer.runner import configure, walk
    from transfer.shared_head import shared_head_keys

    assert shared_head_keys({"variant": "A"}, "x.pth") == dict(
        type="ResLayer", style="caffe", init_cfg=dict(type="Pretrained", checkpoint="x.pth"))
    compat.apply()
    cfg = Config.fromfile(REPO / "configs/detection/faster-rcnn_r50_c4_voc0712.py")
    args = argparse.Namespace(config="c4", data_root=tiny_data / "VOCdevkit", work_dir=tmp_path, launcher="none",
                              seed=0)
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
