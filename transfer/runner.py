"""What the detection and segmentation stages share: turn an export into an mmengine config, run it, summarise.

    python -m detection.train    --export EXPORT_DIR|none --config CFG --data-root ROOT --work-dir DIR [...]
    python -m segmentation.train --export EXPORT_DIR|none --config CFG --data-root ROOT --work-dir DIR [...]

The generated ``DIR/config.py`` is the record of the run and also runs under MMDetection's / MMSegmentation's
own ``tools/train.py``. Rerunning the same command resumes (mmengine ``resume=True`` finds the last checkpoint), or
does nothing when the run is complete; a rerun with another effective config or another export (its tensors' hash)
is refused in one line naming the keys (``refuse_changed_inputs``). SIGTERM, SIGUSR1 and SIGINT save the current
iteration and exit 75 (transfer/preemption_hook.py).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datakit.synthetic import synthetic_problem
from lifecycle.artifacts import atomic_write_bytes, write_summary
from lifecycle.distributed import BatchPlan, process_counts
from lifecycle.errors import UserError, quiet_exit_of_loader_workers
from lifecycle.preemption import EXIT_INTERRUPTED
from lifecycle.stages import STAGES
from lifecycle.stop_flag import Preempted


@dataclass(frozen=True)
class DownstreamTask:
    """What a downstream stage does differently from the others; the rest is its row in lifecycle/stages.py."""
    name: str  # its row in lifecycle/stages.py: "detection" | "segmentation"
    library: str  # "mmdet" | "mmseg"
    metric_types: dict[str, str]  # the installed metric -> ours, which also returns per-class numbers
    summarize: Callable[[dict[str, float], Any], tuple[dict, dict]]  # (mm metrics, cfg) -> (metrics, protocol)

    data = property(lambda self: STAGES[self.name].data)  # its dataset kind (tools/check_data.py)


class StageError(UserError, RuntimeError):
    pass


# mmengine's CheckpointHook keeps every interval checkpoint by default: 10 x 397 MB for the 80k-iteration ADE20K
# recipe, 4 x 331 MB for VOC, per arm and seed, none of them read again but the last. It deletes the oldest before
# writing the next, so keeping one would leave none while that write runs (a kill there: nothing to resume); two
# always leave a complete one.
KEEP_CHECKPOINTS = 2


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


def refuse_a_launch_without_its_group(launcher: str) -> None:
    """Under torchrun (WORLD_SIZE > 1) with --launcher none, mmengine starts no process group: each process would
    train alone on its share of the batch while the batch plan and the summary count all of them."""
    if world_size() > 1 and launcher == "none":
        raise StageError(f"WORLD_SIZE={world_size()} (torchrun) but --launcher none: each process would train alone "
                         f"on 1/{world_size()} of the batch; add --launcher pytorch (tools/transfer_det.sh and "
                         f"tools/transfer_seg.sh with GPUS=N do)")


# The config key stating how many training images fit on one GPU (the recipe's own default, measured with
# tools/bench_transfer.py --images-per-gpu; lower it for smaller GPUs). Only above it does the batch plan accumulate
# gradients.
MEMORY_LIMIT_KEY = "max_images_per_gpu"


def plan_batch(recipe_batch: int, processes: int, trains_bn: bool, limit: int | None, source: str) -> BatchPlan:
    """The recipe's batch in one pass over ``processes`` (each takes ``recipe_batch / processes`` images, SyncBN over
    all of them), so that BatchNorm sees the recipe's batch too. Only where that is more than ``limit`` images per
    GPU does a process take fewer (the largest divisor within it) and accumulate gradients for the rest; its BN
    batch is then smaller, and the plan says so. The lr and schedule stay the recipe's, in optimizer updates."""
    if recipe_batch % processes:
        raise StageError(f"{source}: the recipe's batch of {recipe_batch} images cannot be split over {processes} "
                         f"processes; run on {', '.join(map(str, process_counts(recipe_batch)))} GPUs")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise StageError(f"{source}: {MEMORY_LIMIT_KEY}={limit!r}: expected a positive number of images (or None: "
                         f"no limit)")
    share = recipe_batch // processes
    per_device = share if limit is None or share <= limit else max(p for p in range(1, limit + 1) if share % p == 0)
    bn = "frozen" if not trains_bn else "SyncBN" if processes > 1 else "BN"
    return BatchPlan(recipe_batch, processes, per_device, share // per_device, bn)


_TRAINS_BN: dict[str, tuple] = {}  # model config -> (trains BN, the config as built)


def trains_batchnorm(cfg) -> bool:
    """Whether some BatchNorm of the model normalises over its training batch (not frozen by ``norm_eval``): then
    the batch it sees is part of the protocol. The model's own ``train()`` decides (class defaults differ:
    mmdet's ResNet freezes BN unless told, mmseg's does not), so the model is built, on the meta device (no memory,
    no weights: 2-4 s for these recipes), once per model config."""
    key = f"{cfg.get('default_scope')}:{cfg.model!r}"
    if key not in _TRAINS_BN:
        import warnings

        import torch
        from mmengine.registry import MODELS, init_default_scope

        from mmstack import compat

        compat.apply()
        init_default_scope(cfg.get("default_scope"))
        with warnings.catch_warnings():  # the libraries' deprecation notes while importing and building: not ours
            warnings.simplefilter("ignore")
            built = copy.deepcopy(cfg.model)
            try:
                with torch.device("meta"):
                    model = MODELS.build(built)
            except (NotImplementedError, RuntimeError):  # a constructor computing on its tensors: build it for real
                built = copy.deepcopy(cfg.model)
                model = MODELS.build(built)
        model.train()
        _TRAINS_BN[key] = (any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                               for m in model.modules()), built)
    trains, built = _TRAINS_BN[key]
    # mmdet's detectors write their train and test settings into the model config they are built from
    # (roi_head.test_cfg, ...); config.py has always recorded the config so completed, and a rerun compares it. The
    # same whether this process built the model or found it above (a second run in one process, as in the tests).
    cfg.model = copy.deepcopy(built)
    return trains


def train_loop_kind(cfg, source: str) -> str:
    """'iterations' or 'epochs': the loop mmengine's Runner.build_train_loop makes of ``train_cfg`` (``by_epoch``
    without a type; else the class its type names, scoped or not, as registered). The plan puts the loop's length in
    updates, so a loop of neither kind is refused."""
    from mmengine.registry import LOOPS, init_default_scope
    from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

    loop = cfg.train_cfg
    if "type" not in loop:
        if "by_epoch" not in loop:
            raise StageError(f"{source}: train_cfg has neither type nor by_epoch; add by_epoch=True or False")
        return "epochs" if loop.by_epoch else "iterations"
    kind = loop.type
    if isinstance(kind, str):
        init_default_scope(cfg.get("default_scope"))
        kind = LOOPS.get(kind)
    for base, name in ((IterBasedTrainLoop, "iterations"), (EpochBasedTrainLoop, "epochs")):
        if isinstance(kind, type) and issubclass(kind, base):
            return name
    raise StageError(f"{source}: train_cfg.type={loop.type!r} is neither an iteration- nor an epoch-based training "
                     f"loop (mmengine's IterBasedTrainLoop / EpochBasedTrainLoop or a subclass); use one of them")


def recipe_schedule(cfg) -> tuple[int, str]:
    """The schedule's length as the recipe states it: (max_epochs, 'epochs'), or (max_iters, 'iterations') in the
    recipe's iterations, which are optimizer updates (under accumulation mmengine's max_iters counts passes)."""
    if train_loop_kind(cfg, "train_cfg") == "epochs":
        return cfg.train_cfg.max_epochs, "epochs"
    return cfg.train_cfg.max_iters // cfg.optim_wrapper.get("accumulative_counts", 1), "iterations"


def _scale_iterations(cfg, factor: int, loop_kind: str) -> dict[str, Any]:
    """With accumulation, mmengine counts passes, not updates: multiply every iteration count of the recipe (loop
    length, validation/checkpoint intervals, iteration-based lr schedules) so that it holds in updates."""
    changed = {}

    def scale(node: dict, key: str, where: str) -> None:
        if isinstance(node.get(key), int) and node[key] < 2**31:  # not mmengine's "until the end" sentinel
            changed[where] = [node[key], node[key] * factor]
            node[key] *= factor
        elif isinstance(node.get(key), (list, tuple)):
            changed[where] = [list(node[key]), [v * factor for v in node[key]]]
            node[key] = [v * factor for v in node[key]]

    if loop_kind == "iterations":
        for key in ("max_iters", "val_interval"):
            scale(cfg.train_cfg, key, f"train_cfg.{key}")
    ckpt = cfg.get("default_hooks", {}).get("checkpoint")
    if ckpt is not None and not ckpt.get("by_epoch", True):  # counted in passes in an epoch-based loop too
        scale(ckpt, "interval", "default_hooks.checkpoint.interval")
    schedulers = cfg.get("param_scheduler") or []
    for i, sched in enumerate([schedulers] if isinstance(schedulers, dict) else schedulers):
        if not sched.get("by_epoch", True):
            for key in ("begin", "end", "milestones", "T_max"):
                scale(sched, key, f"param_scheduler[{i}].{key}")
    return changed


def _train_from_scratch(cfg) -> dict[str, list]:
    """The random-init control arm trains every layer and its BatchNorm statistics (no frozen stages, BN in train
    mode with trainable affine; SyncBN under DDP, as every arm that trains BN: ``keep_recipe_batch``), the standard
    for detectors without pretraining (He, Girshick, Dollar, "Rethinking ImageNet Pre-training", 2019). The stock
    recipes freeze the stem and stage 1 and keep BN statistics fixed, which is right for pretrained weights and a
    handicap for random ones. Returns what changed."""
    changed = {}

    def put(node: dict, key: str, value: Any, where: str) -> None:
        if node.get(key) != value:
            changed[f"{where}.{key}"] = [node.get(key), value]
            node[key] = value

    parts = [(cfg.model.backbone, "model.backbone")]
    shared_head = cfg.model.get("roi_head", {}).get("shared_head")
    if shared_head is not None:  # a C4 detector: stage 4 runs in the RoI head
        parts.append((shared_head, "model.roi_head.shared_head"))
    for node, where in parts:
        if "frozen_stages" in node:  # absent: the class default, -1 (nothing frozen)
            put(node, "frozen_stages", -1, where)
        put(node, "norm_eval", False, where)
        put(node, "norm_cfg", dict(node.get("norm_cfg") or dict(type="BN"), requires_grad=True), where)
    return changed


def _freeze_backbone(cfg) -> dict[str, list]:
    """Fixed-feature transfer: every backbone stage and its BatchNorm frozen (no gradient, statistics fixed: the
    libraries' own ``frozen_stages`` over all stages and ``norm_eval``), the rest of the recipe unchanged. A C4
    detector's stage 4 runs in the RoI head (``shared_head``): it keeps its weights through an lr and weight decay
    multiplier of 0 (mmdet's ResLayer has no frozen_stages) and its BN in eval mode (``norm_eval``, its default).
    Returns what changed, as the control arm's changes are recorded."""
    changed = {}

    def put(node: dict, key: str, value: Any, where: str) -> None:
        if node.get(key) != value:
            changed[f"{where}.{key}"] = [node.get(key), value]
            node[key] = value

    backbone = cfg.model.backbone
    put(backbone, "frozen_stages", backbone.get("num_stages", 4), "model.backbone")
    put(backbone, "norm_eval", True, "model.backbone")
    put(backbone, "norm_cfg", dict(backbone.get("norm_cfg") or dict(type="BN"), requires_grad=False), "model.backbone")
    if (shared_head := cfg.model.get("roi_head", {}).get("shared_head")) is not None:
        put(shared_head, "norm_eval", True, "model.roi_head.shared_head")
        if "paramwise_cfg" not in cfg.optim_wrapper:
            cfg.optim_wrapper.paramwise_cfg = {}
        paramwise = cfg.optim_wrapper.paramwise_cfg  # (ConfigDict.setdefault returns a copy)
        keys = dict(paramwise.get("custom_keys") or {}, **{"roi_head.shared_head": dict(lr_mult=0.0, decay_mult=0.0)})
        put(paramwise, "custom_keys", keys, "optim_wrapper.paramwise_cfg")
    return changed


def configure(cfg, stage: DownstreamTask, args: argparse.Namespace, meta: dict | None,
              export_ckpt: Path | None, processes: int | None = None) -> dict:
    """Edit the loaded mmengine config in place for our backbone and data, planned for ``processes`` (default: this
    launch's WORLD_SIZE); return what was decided."""
    backbone = cfg.model.backbone
    control_changes = {}
    if meta is not None:
        from export.mm_check import data_preprocessor_kwargs, mm_backbone_cfg

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
        backbone.init_cfg = None  # the random-initialisation control arm (frozen: the random-features baseline)
        control_changes = {} if args.frozen_backbone else _train_from_scratch(cfg)
    frozen_changes = _freeze_backbone(cfg) if args.frozen_backbone else {}
    # Save and exit 75 on SIGTERM / SIGUSR1 / SIGINT (lifecycle/preemption.py), in every arm and under the
    # libraries' own tools/train.py too.
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="PreemptionHook")]
    imports = ["transfer.hooks", "transfer.metrics", "transfer.preemption_hook"]
    shared_head = cfg.model.get("roi_head", {}).get("shared_head")
    if shared_head is not None:  # a C4 detector: the export's layer4 is the RoI head's shared head
        from transfer.shared_head import shared_head_keys

        shared_head.update(shared_head_keys(meta, export_ckpt and str(export_ckpt)))
        imports.append("transfer.shared_head")  # registers AvgDownResLayer (ResNet-D's layer4)
    if "pretrained" in cfg.model:
        cfg.model.pretrained = None  # the stock configs point it at a URL (no network; and it would win)

    data_root = str(Path(args.data_root).resolve())
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        walk(cfg.get(loader), lambda d: d.__setitem__("data_root", data_root) if "data_root" in d else None)
    for evaluator in ("val_evaluator", "test_evaluator"):
        walk(cfg.get(evaluator), lambda d: d.__setitem__("type", stage.metric_types.get(d.get("type"), d.get("type"))))
        # The ranks' results gathered over the process group (mmengine calls it 'gpu'; gloo too), not through files
        # in the launch directory, which its 'cpu' default needs shared by every node (else it fails at the first
        # evaluation of a multi-node run, hours in).
        walk(cfg.get(evaluator), lambda d: d.__setitem__("collect_device", "gpu") if "type" in d else None)

    ckpt = cfg.get("default_hooks", {}).get("checkpoint")
    if ckpt is not None and ckpt.get("max_keep_ckpts", -1) <= 0:  # unless the config keeps its own number
        ckpt["max_keep_ckpts"] = KEEP_CHECKPOINTS
    decided = keep_recipe_batch(cfg, processes or world_size(), str(args.config))
    cfg.custom_imports = _with_imports(cfg.get("custom_imports"), imports)
    cfg.work_dir = str(Path(args.work_dir).resolve())
    cfg.resume = True  # continue from the last checkpoint in work_dir, if any
    cfg.load_from = None
    cfg.launcher = args.launcher
    # The seed is --seed (the summary records it); the rest of mmengine's randomness (deterministic, diff_rank_seed)
    # is the config's or --cfg-options', not overwritten.
    randomness = dict(cfg.get("randomness") or {})
    if randomness.get("seed") not in (None, args.seed):
        raise StageError(f"{args.config}: randomness.seed={randomness['seed']} (config or --cfg-options) contradicts "
                         f"--seed {args.seed}; give the seed as --seed {randomness['seed']}, which the summary records")
    cfg.randomness = {"deterministic": False, **randomness, "seed": args.seed}
    # The export's identity is its tensors, not its folder: recorded so that a rerun can tell another export.
    cfg.export_state_sha256 = meta["state_sha256"] if meta is not None else None
    return dict(decided, control_changes=control_changes, frozen_changes=frozen_changes,
                backbone_mode="frozen" if args.frozen_backbone else "fine-tuned")


def _with_imports(recipe: dict | None, ours: list[str]) -> dict[str, Any]:
    """The recipe's custom_imports (a module name or a list, as mmengine takes them) and ours after them, once each;
    its allow_failed_imports kept. Replaced, the dumped config would miss the recipe's modules under the library's
    own tools/train.py."""
    recipe = dict(recipe or {})
    theirs = recipe.get("imports") or []
    theirs = [theirs] if isinstance(theirs, str) else list(theirs)
    return dict(imports=list(dict.fromkeys([*theirs, *ours])),
                allow_failed_imports=recipe.get("allow_failed_imports", False))


def keep_recipe_batch(cfg, processes: int, source: str) -> dict[str, Any]:
    """The published recipe's batch, BN batch, lr and schedule on ``processes`` (see ``plan_batch``); edits ``cfg``
    and returns the record for the summary."""
    scale = cfg.get("auto_scale_lr")
    if not scale or "base_batch_size" not in scale:
        raise StageError(f"{source}: no auto_scale_lr.base_batch_size; add the batch the lr was tuned for")
    if processes == 1:  # SyncBN needs a process group; one process computes the same statistics with BN
        for key in cfg.keys():  # the model's norm layers and the configs' top-level norm_cfg variables
            walk(cfg[key], lambda d: d.__setitem__("type", "BN") if d.get("type") == "SyncBN" else None)
    plan = plan_batch(scale["base_batch_size"], processes, trains_batchnorm(cfg), cfg.get(MEMORY_LIMIT_KEY), source)
    if plan.bn == "SyncBN":  # every BatchNorm that uses batch statistics sees the whole pass (mmengine converts them)
        cfg.sync_bn = "torch"
    recipe_per_device = cfg.train_dataloader.batch_size
    cfg.train_dataloader.batch_size = plan.per_device
    cfg.optim_wrapper.accumulative_counts = plan.accumulation
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=plan.recipe_batch)  # never rescale: the batch is kept
    loop_kind = train_loop_kind(cfg, source)  # refused here, also without accumulation: the protocol line reads it
    schedule = _scale_iterations(cfg, plan.accumulation, loop_kind) if plan.accumulation > 1 else {}
    lr = cfg.optim_wrapper.optimizer.lr
    return dict(recipe_batch=plan.recipe_batch, batch=plan.per_device * processes * plan.accumulation,
                bn_batch=plan.bn_batch, processes=processes, recipe_per_device=recipe_per_device,
                per_device=plan.per_device, accumulation=plan.accumulation,
                max_images_per_gpu=cfg.get(MEMORY_LIMIT_KEY), lr=lr, batch_line=plan.line(lr),
                policy="the recipe's batch, lr and schedule kept, and BatchNorm's batch unless more images than "
                       f"{MEMORY_LIMIT_KEY} (gradient accumulation; iteration counts in updates)",
                schedule_changes=schedule)


def refuse_another_split(previous: Path, cfg) -> None:
    """mmengine's iteration counter counts passes: a run resumed with another images-per-process or accumulation
    would continue at the wrong point of its schedule. Refuse it, naming the GPU count it was started with."""
    if not previous.is_file():
        return
    from mmengine.config import Config

    old = Config.fromfile(str(previous), import_custom_modules=False)
    before = (old.train_dataloader.batch_size, old.optim_wrapper.get("accumulative_counts", 1))
    now = (cfg.train_dataloader.batch_size, cfg.optim_wrapper.accumulative_counts)
    if before != now:
        raise StageError(f"{previous}: this run was started with {before[0]} images per process and accumulation "
                         f"{before[1]} (now {now[0]} and {now[1]}); resume it on the GPU count it was started "
                         f"with, or use another --work-dir")


# mmengine config keys a rerun may change (the trainer's own are classification/run_dir.py's RUNTIME_KEYS): where
# things are (data, work dir, the export's folder: its tensors are compared by export_state_sha256) and how the run
# is launched, loaded and logged. Any other key is the experiment.
MM_RUNTIME_KEYS = {"work_dir", "launcher", "resume", "load_from", "data_root", "num_workers", "persistent_workers",
                   "pin_memory", "checkpoint", "export", "logger", "log_processor", "visualizer", "env_cfg",
                   "collect_device", MEMORY_LIMIT_KEY}


def _experiment(node: Any, prefix: str = "") -> dict[str, Any]:
    """The config as dotted key -> value, without MM_RUNTIME_KEYS; tuples and lists alike (a dumped config.py reads
    back lists)."""
    if isinstance(node, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items() if k not in MM_RUNTIME_KEYS)
    elif isinstance(node, (list, tuple)):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_experiment(value, key))
    return out


def refuse_changed_inputs(previous: Path, cfg) -> None:
    """A rerun into a work dir resumes it, or finds it complete; with another effective config or another export
    it would mix two experiments in one run dir, so it is refused, naming the keys that differ."""
    if not previous.is_file():
        return
    refuse_another_split(previous, cfg)
    from mmengine.config import Config

    old = _experiment(Config.fromfile(str(previous), import_custom_modules=False).to_dict())
    new = _experiment(Config.fromstring(cfg.pretty_text, ".py").to_dict())  # as it would read back once dumped
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StageError(f"{previous.parent}: inputs changed: {shown}; use another --work-dir (or restore the "
                         f"original settings)")


def load_mm_config(path: str | Path):
    """mmengine's Config.fromfile; a syntax error in the file is one line naming it (mmengine parses the source
    itself, so Python's SyntaxError names '<unknown>' instead of the file)."""
    from mmengine.config import Config

    try:
        return Config.fromfile(str(path))
    except SyntaxError as e:
        raise StageError(f"{path}:{e.lineno}: Python syntax error in the config ({e.msg}); fix the file") from e


_ABSENT = object()


def _at(cfg, key: str) -> Any:
    """The config's value at a dotted --cfg-options key ('a.b', 'a.0.b' for list items), or _ABSENT."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif hasattr(node, "keys") and part in node.keys():  # a dict, ConfigDict or the Config itself
            node = node[part]
        else:
            return _ABSENT
    return node


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    for kind in (int, str, dict):
        if isinstance(old, kind):
            return isinstance(new, kind)
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    return True


def merge_cfg_options(cfg, options: dict[str, Any]) -> None:
    """mmengine's DictAction reads each --cfg-options value as a Python literal, or else as a string; a value of
    another type than the recipe's (``train_cfg.max_iters=1O0``) would fail deep inside the Runner with a
    traceback. Refuse it here, naming the key; new keys and None on either side pass as mmengine allows."""
    for key, new in options.items():
        old = _at(cfg, key)
        if old is _ABSENT or old is None or new is None or _same_kind(old, new):
            continue
        raise StageError(f"--cfg-options {key}={new!r}: the config holds {old!r} ({type(old).__name__}) there, not "
                         f"a {type(new).__name__}; give a value of type {type(old).__name__}")
    cfg.merge_from_dict(options)


def describe_recipe(config: str | Path, cfg_options: dict | None, processes: int, pretrained: bool = True,
                    frozen: bool = False) -> str:
    """The batch line and schedule a stage would run with on ``processes``, for a pretrained arm or the
    random-init control (which trains BatchNorm unless frozen), fine-tuned or frozen; the study's dry run prints
    it."""
    cfg = load_mm_config(config)
    merge_cfg_options(cfg, cfg_options or {})
    if not pretrained:
        cfg.model.backbone.init_cfg = None
        if not frozen:
            _train_from_scratch(cfg)
    if frozen:
        _freeze_backbone(cfg)
    decided = keep_recipe_batch(cfg, processes, str(config))
    return protocol_line(cfg, dict(decided, backbone_mode="frozen" if frozen else "fine-tuned"))


def protocol_line(cfg, decided: dict[str, Any]) -> str:
    """The batch line, the schedule's length in optimizer updates and its lr schedulers: what a stage logs first."""
    count, unit = recipe_schedule(cfg)
    length = f"{count} {'updates' if unit == 'iterations' else unit}"
    scheds = cfg.get("param_scheduler") or []
    names = "+".join(s["type"] for s in ([scheds] if isinstance(scheds, dict) else scheds))
    mode = ", backbone frozen" if decided.get("backbone_mode") == "frozen" else ""
    return f"{decided['batch_line']}, {length}, {names or 'constant lr'}{mode}"


def parse_args(stage: DownstreamTask, argv: list[str] | None) -> argparse.Namespace:
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
    p.add_argument("--frozen-backbone", action="store_true",
                   help="fixed-feature transfer: every backbone stage and its BatchNorm frozen, the rest of the recipe "
                        "as it is")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="accept data generated by tools/make_data.py (the demo configs allow it themselves)")
    # Not mmengine's 'slurm' or 'mpi': they set the process count only after the batch plan is made (from
    # WORLD_SIZE), which would plan for one process. Under Slurm: torchrun in the job (tools/study.py does).
    p.add_argument("--launcher", choices=["none", "pytorch"], default="none",
                   help="'pytorch' under torchrun (GPUS=N tools/transfer_*.sh)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, help="override config keys")
    return p.parse_args(argv)


def run(stage: DownstreamTask, args: argparse.Namespace) -> int:
    from mmstack import compat
    from transfer.data_gate import check_data_once

    compat.apply()
    import torch
    from mmengine.runner import Runner

    from lifecycle.distributed import check_gpus_usable

    check_gpus_usable()
    refuse_a_launch_without_its_group(args.launcher)

    import transfer.metrics  # noqa: F401 - registers the per-class metrics
    import transfer.preemption_hook  # noqa: F401 - registers PreemptionHook
    from export.files import load_export

    # transfer.hooks also registers VerifyBackboneHook (the dumped config imports it too)
    from transfer.hooks import LabelRangeHook, ProgressHook

    work_dir = Path(args.work_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0

    meta, export_ckpt = None, None
    if args.export != "none":
        _, meta = load_export(args.export)  # refuses a damaged or inconsistent export, naming the keys
        export_ckpt = (Path(args.export) / "backbone.pth").resolve()
    if (work_dir / "summary.json").exists():
        return report_complete(stage, args, meta, export_ckpt)
    cfg = load_mm_config(args.config)
    merge_cfg_options(cfg, args.cfg_options)
    decided = configure(cfg, stage, args, meta, export_ckpt)
    if cfg.get("sync_bn") and not torch.cuda.is_available():  # torch's SyncBatchNorm runs on GPUs only
        raise StageError(f"{args.config}: BatchNorm synchronised over {world_size()} processes (SyncBN) needs GPUs; "
                         f"on a CPU, run this stage on one process (GPUS=1)")
    if main_process:
        print(f"{stage.name}: {protocol_line(cfg, decided)}", flush=True)
    # An attempt that stopped before its first checkpoint (out of GPU memory at its first step, say) left nothing to
    # mix with: it starts again as configured.
    if any(work_dir.glob("*.pth")):
        refuse_changed_inputs(work_dir / "config.py", cfg)
    problem = synthetic_problem(args.data_root, args.allow_synthetic or cfg.get("allow_synthetic", False))
    if problem:
        raise StageError(problem)
    # A rank per node checks structure and headers, skipped for a tree unchanged since it passed; the other ranks
    # wait for the answers, so all stop here with the same lines (transfer/data_gate.py: why, and how they wait).
    problems = check_data_once(stage.data, args.data_root, launcher=args.launcher,
                               dist_cfg=cfg.get("env_cfg", {}).get("dist_cfg", {}))
    if problems:
        if main_process:
            print("\n".join(problems), file=sys.stderr)
        raise StageError(f"{args.data_root}: {len(problems)} problem{'s' * (len(problems) != 1)} in the "
                         f"{stage.data} data (above); "
                         f"fix them (tools/check_data.py {stage.data} {args.data_root} --full)")
    work_dir.mkdir(parents=True, exist_ok=True)
    if main_process:  # whole or not at all: a resume compares its inputs with this file (refuse_changed_inputs)
        atomic_write_bytes(work_dir / "config.py", cfg.dump().encode())

    t0 = time.perf_counter()
    runner = Runner.from_cfg(cfg)
    runner.register_hook(ProgressHook(interval=cfg.get("default_hooks", {}).get("logger", {}).get("interval", 50)))
    if head := cfg.model.get("decode_head"):  # segmentation: a bad mask is named, not an IndexError
        runner.register_hook(LabelRangeHook(head.num_classes, head.get("ignore_index", 255)))
    try:
        runner.train()
        mm_metrics = runner.test()
    except Preempted as e:
        print(f"{stage.name}: {e.message}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except torch.OutOfMemoryError as e:
        saved = " in a new --work-dir (this run's checkpoints resume only as they were split)" if any(
            work_dir.glob("*.pth")) else ""
        raise StageError(f"{args.config}: out of GPU memory with {decided['per_device']} images per GPU; set "
                         f"{MEMORY_LIMIT_KEY} lower{saved} (--cfg-options {MEMORY_LIMIT_KEY}=N or the study's "
                         f"cfg_options; tools/bench_transfer.py --images-per-gpu measures what fits)") from e
    finally:  # mmengine never shuts down persistent loader workers: at exit they would be reported killed
        quiet_exit_of_loader_workers()
    if main_process:
        metrics, protocol = stage.summarize(mm_metrics, cfg)
        # The batch is part of what makes arms comparable; how it is laid out on processes is not (config below).
        protocol.update(batch=decided["batch"], bn_batch=decided["bn_batch"] or "frozen", lr=decided["lr"],
                        backbone=decided["backbone_mode"])
        arm = args.arm or ((meta.get("arm") or meta.get("name")) if meta else "random_init")
        write_summary(work_dir / "summary.json", stage=stage.name, arm=arm, seed=args.seed, metrics=metrics,
                      protocol=protocol, config=dict(config_file=str(args.config), **decided,
                                                     cfg_options=dict(args.cfg_options)),
                      backbone=meta and {k: v for k, v in meta.items() if k != "config"},
                      layout={k: decided[k] for k in ("processes", "per_device", "accumulation")}
                      | dict(line=decided["batch_line"]),
                      wall_time_s=time.perf_counter() - t0)
        print(f"{stage.name}: {work_dir / 'summary.json'}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    return 0


def _recorded_layout(previous: Path, cfg) -> int | None:
    """The process count the run recorded in ``previous`` (its config.py) was planned for: its recipe batch over
    images per process and accumulation. Its memory limit is set in ``cfg`` too, so that a plan from ``cfg`` splits
    as it did. None without a record."""
    if not previous.is_file():
        return None
    from mmengine.config import Config

    old = Config.fromfile(str(previous), import_custom_modules=False)
    cfg[MEMORY_LIMIT_KEY] = old.get(MEMORY_LIMIT_KEY)
    per_process = old.train_dataloader.batch_size * old.optim_wrapper.get("accumulative_counts", 1)
    return old.auto_scale_lr.base_batch_size // per_process


def report_complete(stage: DownstreamTask, args: argparse.Namespace, meta: dict | None,
                    export_ckpt: Path | None) -> int:
    """A finished run (its summary.json written) is complete on any GPU count, as its protocol is: its inputs are
    compared as planned for the layout it ran with, so that only another experiment (recipe, export) is refused,
    and nothing of this launch's GPUs (their count, SyncBN's need of them) is checked."""
    work_dir = Path(args.work_dir)
    cfg = load_mm_config(args.config)
    merge_cfg_options(cfg, args.cfg_options)
    configure(cfg, stage, args, meta, export_ckpt, processes=_recorded_layout(work_dir / "config.py", cfg))
    refuse_changed_inputs(work_dir / "config.py", cfg)
    print(f"{work_dir / 'summary.json'} exists: this run is complete (delete it to evaluate again)")
    return 0


def main(stage: DownstreamTask, argv: list[str] | None = None) -> int:
    """The stage's command; detection/train.py and segmentation/train.py wrap it in lifecycle.errors.cli."""
    return run(stage, parse_args(stage, argv))
