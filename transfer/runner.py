"""What the detection and segmentation stages share: turn an export into an mmengine config, run it, summarise.

    python -m detection.train    --export EXPORT_DIR|none --config CFG --data-root ROOT --work-dir DIR [...]
    python -m segmentation.train --export EXPORT_DIR|none --config CFG --data-root ROOT --work-dir DIR [...]

The generated ``DIR/config.py`` is the record of the run and also runs under MMDetection's / MMSegmentation's
own ``tools/train.py``. Rerunning the same command resumes (mmengine ``resume=True`` finds the last checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from classification.artifacts import write_summary


@dataclass(frozen=True)
class Stage:
    name: str  # "detection" | "segmentation"
    library: str  # "mmdet" | "mmseg"
    check_data: str  # dataset kind for datakit.check ("voc" | "ade20k")
    metric_types: dict[str, str]  # the installed metric -> ours, which also returns per-class numbers
    summarize: Callable[[dict[str, float], Any], tuple[dict, dict]]  # (mm metrics, cfg) -> (metrics, protocol)


class StageError(RuntimeError):
    pass


def walk(node: Any, fn: Callable[[dict], None]) -> None:
    """Call ``fn`` on every dict nested anywhere in a config (datasets are nested in Repeat/Concat wrappers)."""
    if isinstance(node, dict):
        fn(node)
        for value in node.values():
            walk(value, fn)
    elif isinstance(node, (list, tuple)):
        for value in node:
            walk(value, fn)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def configure(cfg, stage: Stage, args: argparse.Namespace, meta: dict | None, export_ckpt: Path | None) -> dict:
    """Edit the loaded mmengine config in place for our backbone and data; return what was decided."""
    backbone = cfg.model.backbone
    if meta is not None:
        from transfer.backbone_check import data_preprocessor_kwargs, mm_backbone_cfg

        # Only the variant's keys (type, style: A = 'caffe'; deep stem / avg-pool shortcut where the library has no
        # ResNetV1c); the config keeps its own layout (dilations, strides, frozen stages, norm_eval).
        variant_keys = mm_backbone_cfg(meta, stage.library, checkpoint=export_ckpt)
        for key in ("type", "depth", "style", "deep_stem", "avg_down", "init_cfg"):
            if key in variant_keys:
                backbone[key] = variant_keys[key]
        # Our classifier's input normalisation, so the backbone sees what it was trained on.
        cfg.model.data_preprocessor.update(data_preprocessor_kwargs(meta))
        cfg.custom_hooks = [*cfg.get("custom_hooks", []),
                            dict(type="VerifyBackboneHook", export=str(export_ckpt.parent))]
    else:
        backbone.init_cfg = None  # the random-initialisation control arm
    imports = ["transfer.hooks", "transfer.metrics"]
    shared_head = cfg.model.get("roi_head", {}).get("shared_head")
    if shared_head is not None:  # a C4 detector: the export's layer4 is the RoI head's shared head
        from transfer.shared_head import shared_head_keys

        shared_head.update(shared_head_keys(meta, export_ckpt and str(export_ckpt)))
        imports.append("transfer.shared_head")  # registers AvgDownResLayer (ResNet-D's layer4)
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None  # the stock configs point it at a URL (no network; and it would win)

    if world_size() == 1:  # SyncBN needs a process group; one process computes the same statistics with BN
        for key in cfg.keys():  # the model's norm layers and the configs' top-level norm_cfg variables
            walk(cfg[key], lambda d: d.__setitem__("type", "BN") if d.get("type") == "SyncBN" else None)
    data_root = str(Path(args.data_root).resolve())
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        walk(cfg.get(loader), lambda d: d.__setitem__("data_root", data_root) if "data_root" in d else None)
    for evaluator in ("val_evaluator", "test_evaluator"):
        walk(cfg.get(evaluator), lambda d: d.__setitem__("type", stage.metric_types.get(d.get("type"), d.get("type"))))

    # Linear scaling of the recipe's lr to the batch actually used (recorded in the summary).
    scale = cfg.get("auto_scale_lr")
    if not scale or "base_batch_size" not in scale:
        raise StageError(f"{args.config}: no auto_scale_lr.base_batch_size; add the batch the lr was tuned for")
    effective_batch = cfg.train_dataloader.batch_size * world_size()
    recipe_lr = cfg.optim_wrapper.optimizer.lr
    lr = recipe_lr * effective_batch / scale["base_batch_size"]
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=scale["base_batch_size"])  # done here, once

    cfg.custom_imports = dict(imports=imports, allow_failed_imports=False)
    cfg.work_dir = str(Path(args.work_dir).resolve())
    cfg.resume = True  # continue from the last checkpoint in work_dir, if any
    cfg.load_from = None
    cfg.launcher = args.launcher
    cfg.randomness = dict(seed=args.seed, deterministic=False)
    return dict(effective_batch=effective_batch, recipe_lr=recipe_lr, lr=lr,
                recipe_batch=scale["base_batch_size"], world_size=world_size())


def parse_args(stage: Stage, argv: list[str] | None) -> argparse.Namespace:
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(prog=f"python -m {stage.name}.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="export dir (tools/export_backbone.py) or 'none' (random init)")
    p.add_argument("--config", required=True, help=f"mmengine config (configs/{stage.name}/...)")
    p.add_argument("--data-root", required=True, help="dataset root (VOCdevkit / ADEChallengeData2016)")
    p.add_argument("--work-dir", required=True, help="run dir; rerun the same command to resume")
    p.add_argument("--arm", default=None,
                   help="study arm name for the summary (default: the export's, or 'random_init')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                   help="'pytorch' under torchrun")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, help="override config keys")
    return p.parse_args(argv)


def run(stage: Stage, args: argparse.Namespace) -> int:
    from transfer import compat
    from transfer.data_gate import check_data_once

    compat.apply()
    from mmengine.config import Config
    from mmengine.runner import Runner

    import transfer.hooks  # noqa: F401 - registers VerifyBackboneHook (the dumped config imports it itself)
    import transfer.metrics  # noqa: F401 - registers the per-class metrics
    from classification.export import load_export

    work_dir = Path(args.work_dir)
    if (work_dir / "summary.json").exists():
        print(f"{work_dir / 'summary.json'} exists: this run is complete (delete it to evaluate again)")
        return 0
    main_process = int(os.environ.get("RANK", "0")) == 0

    meta, export_ckpt = None, None
    if args.export != "none":
        _, meta = load_export(args.export)  # refuses a damaged or inconsistent export, naming the keys
        export_ckpt = (Path(args.export) / "backbone.pth").resolve()
    cfg = Config.fromfile(args.config)
    cfg.merge_from_dict(args.cfg_options)
    # Rank 0 checks structure and headers, skipped for a tree unchanged since it passed; the other ranks wait for
    # its answer, so all stop here with the same one line (transfer/data_gate.py: why, and how they wait).
    problems = check_data_once(stage.check_data, args.data_root, launcher=args.launcher,
                               dist_cfg=cfg.get("env_cfg", {}).get("dist_cfg", {}))
    if problems:
        if main_process:
            print("\n".join(problems), file=sys.stderr)
        raise StageError(f"{args.data_root}: {len(problems)} problems in the {stage.check_data} data (above); "
                         f"fix them (tools/check_data.py {stage.check_data} {args.data_root} --full)")
    decided = configure(cfg, stage, args, meta, export_ckpt)
    work_dir.mkdir(parents=True, exist_ok=True)
    compat.trust_checkpoints_in(work_dir)  # resume reads the Runner's own checkpoints written here
    cfg.dump(str(work_dir / "config.py"))

    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.train()
    mm_metrics = runner.test()
    if main_process:
        metrics, protocol = stage.summarize(mm_metrics, cfg)
        arm = args.arm or ((meta.get("arm") or meta.get("name")) if meta else "random_init")
        write_summary(work_dir / "summary.json", stage=stage.name, arm=arm, seed=args.seed, metrics=metrics,
                      protocol=protocol, config=dict(config_file=str(args.config), **decided,
                                                     cfg_options=dict(args.cfg_options)),
                      backbone=meta and {k: v for k, v in meta.items() if k != "config"},
                      wall_time_s=time.perf_counter() - t0)
        print(f"{stage.name}: {work_dir / 'summary.json'}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    return 0


def main(stage: Stage, argv: list[str] | None = None) -> int:
    from classification.export import ExportError

    args = parse_args(stage, argv)
    try:
        return run(stage, args)
    except (StageError, ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
