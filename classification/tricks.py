"""The paper's training tricks, each a small function of the config, built from timm's pieces.

Every timm call passes its trick-related arguments explicitly: timm switches several tricks on by default
(zero_init_last, no weight decay on 1-d params, label smoothing 0.1 in Mixup, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.data import ImageNetInfo, Mixup, infer_imagenet_subset
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.task import ClassificationTask, LogitDistillationTask
from timm.task.distillation import DistillationTeacher
from torch import nn

from lifecycle.distributed import rank0_first

from .checkpoint import BEST, LAST, classifier_from, load_checkpoint_hashed, resolve_checkpoint, run_progress
from .config import Config, ConfigError


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """§3.1 no bias decay: weight decay only on conv and FC weights; biases and BN gamma/beta get none.

    Off: one group, weight decay on everything (the §2 baseline).
    """
    if not cfg.no_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    # timm excludes every parameter with ndim <= 1 (BN gamma/beta, all biases) and anything named *.bias.
    return param_groups_weight_decay(
        model, weight_decay=cfg.weight_decay, weight_decay_exclude_1d=True, no_weight_decay_list=()
    )


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """§2: Nesterov SGD, momentum 0.9; the learning rate is set per update by the scheduler.

    torch's fused SGD where it has a kernel (CPU, CUDA): one pass over each parameter instead of torch's default
    per-tensor loop of five ops and two temporaries: 11.0 ms against 38.6 ms a ResNet-50-D update on a CPU
    (docs/performance.md), the same arithmetic up to float rounding (tests/test_speed.py: within 1e-6)."""
    groups = param_groups(model, cfg)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for g in groups for p in g["params"])
    return torch.optim.SGD(
        groups, lr=cfg.peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, iters_per_epoch: int):
    """Per-update schedule (``iters_per_epoch`` counts updates of ``global_batch`` images). Call
    ``step_update(i + 1)`` before the i-th update (0-based), so that warmup
    gives lr = (i + 1) / W x peak for the first W updates, as in §3.1 ("at batch i, 1 <= i <= m, i eta / m").

    - step (§2): peak x gamma^k after each of ``step_epochs`` (counted from the start of training);
    - cosine (§5.1): 0.5 (1 + cos(pi t / T)) peak, t counted from the end of warmup, T = the rest of training.
    """
    total = cfg.epochs * iters_per_epoch
    warmup = warmup_updates(cfg, iters_per_epoch)
    if cfg.schedule == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=total - warmup, lr_min=0.0, cycle_mul=1.0, cycle_decay=1.0, cycle_limit=1,
            warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False, noise_range_t=None,
            k_decay=1.0,
        )
    # timm counts milestone m as reached at t = m - 1 and we step with t = i + 1, so m = first update + 2.
    return MultiStepLRScheduler(
        optimizer, decay_t=[e * iters_per_epoch + 2 for e in cfg.step_epochs], decay_rate=cfg.step_gamma,
        warmup_t=warmup, warmup_lr_init=0.0, warmup_prefix=False, t_in_epochs=False, noise_range_t=None,
    )


def warmup_updates(cfg: Config, iters_per_epoch: int) -> int:
    """warmup_epochs in updates, rounded. The config allows any warmup_epochs < epochs, but the updates per epoch
    come from the data: rounding can make the warmup the whole run (epochs=2, warmup_epochs=1.9, 1 update per
    epoch), which leaves no update at the peak and no cosine to follow it (timm asserts t_initial > 0)."""
    total = cfg.epochs * iters_per_epoch
    warmup = round(cfg.warmup_epochs * iters_per_epoch)
    if warmup >= total:
        raise ConfigError(f"config: warmup_epochs {cfg.warmup_epochs:g} is {warmup} of the run's {total} updates "
                          f"({iters_per_epoch} per epoch with this data and global_batch {cfg.global_batch}): the "
                          f"warmup must leave at least one update after it; lower warmup_epochs or raise epochs")
    return warmup


def lr_at(cfg: Config, iters_per_epoch: int, i: int) -> float:
    """Closed form of the schedule for the i-th update (0-based); used for plots and the summary."""
    peak = cfg.peak_lr
    total = cfg.epochs * iters_per_epoch
    warmup = warmup_updates(cfg, iters_per_epoch)
    t = i + 1
    if t < warmup:
        return peak * t / warmup
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t - warmup, total - warmup) / (total - warmup))) * peak
    return peak * cfg.step_gamma ** sum(i >= e * iters_per_epoch for e in cfg.step_epochs)


def autocast_kwargs(cfg: Config, device: torch.device) -> dict:
    """§3.2 mixed precision: ``torch.autocast(**autocast_kwargs(cfg, device))`` for training and evaluation."""
    return dict(device_type=device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
                enabled=cfg.amp != "none")


def build_scaler(cfg: Config, device: torch.device) -> torch.amp.GradScaler:
    """§3.2 loss scaling, for fp16 only. fp32 and bf16 need no scaling; a scaler kept on there with scale 1 cost a
    full pass over every gradient per update (its inf check, 7 % of a CPU step here) to guard against non-finite
    gradients, which ``optimizer_step`` now does from the loss alone."""
    return torch.amp.GradScaler(device.type, init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
                                growth_interval=2000, enabled=cfg.amp == "fp16")


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   loss: torch.Tensor) -> torch.Tensor:
    """One update, skipped when it would not be finite; returns 1.0 (skipped) or 0.0 as a tensor, no host sync
    where the optimizer is fused.

    fp16: the scaler unscales, skips an update with inf/NaN gradients and adapts the scale. fp32/bf16: the update is
    skipped when the loss is not finite (a finite loss with non-finite gradients, rare without fp16, leaves
    non-finite weights, so the following losses are non-finite and the trainer's streak check stops the run).
    """
    fused = all(g.get("fused") for g in optimizer.param_groups)  # per group: a resumed state dict sets it
    # A fused SGD's first step allocates its momenta uninitialised and copies the gradient into them; when the
    # kernel skips that step (non-finite), they stay garbage for the whole run. So the first fused update is
    # decided on the host (one sync, once): skipped without calling the kernel.
    first_fused = fused and not optimizer.state
    if scaler.is_enabled():
        if first_fused:  # fp16's first steps often overflow (scale 2^16)
            scaler.unscale_(optimizer)
            found_inf = sum(scaler._found_inf_per_device(optimizer).values())
            if found_inf.item():
                scaler.update()
                return found_inf
        scaler.step(optimizer)
        # Private but long-stable GradScaler API (torch 2.14 pinned): per-device inf flags, no host sync.
        found = scaler._found_inf_per_device(optimizer)
        found_inf = sum(found.values()) if found else torch.zeros((), device=loss.device)
        scaler.update()
        return found_inf
    found_inf = (~torch.isfinite(loss)).float()
    if fused and not first_fused:
        # The fused kernels skip the whole update (weights and momenta) when found_inf is set: GradScaler's own
        # mechanism for fused optimizers (torch.optim.SGD.step reads these two attributes), with scale 1.
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()
    return found_inf


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    """§5.4 mixup with soft targets; label smoothing (§5.2) is applied to the one-hot targets before mixing."""
    if cfg.mixup_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup_alpha, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.0,
        mode="batch", correct_lam=True, label_smoothing=cfg.label_smoothing, num_classes=num_classes,
    )


def mix_pass(mixup: Mixup, x: torch.Tensor, y: torch.Tensor, seed: int, update: int, slot: int):
    """§5.4 on one forward pass: mixup pairs samples, so an odd one left by skipped images is dropped; lambda is
    drawn from (seed, update, the pass's place in the global batch), not from the process: the same on any GPU
    count."""
    x, y = x[: len(x) // 2 * 2], y[: len(y) // 2 * 2]
    np.random.seed([seed, update, slot])
    return mixup(x, y)


def build_criterion(cfg: Config) -> nn.Module:
    """Cross-entropy on the training targets: soft (mixed, smoothed) targets with mixup, else class indices with
    torch's label smoothing, which is exactly CE against (1 - eps) onehot + eps / K. The paper's Eq. (4) writes 1 - eps
    for the true class and eps / (K - 1) for the others; torch, timm and the authors' GluonCV scripts give every class
    eps / K, which we follow: at K = 1000 the two differ by about 1e-4 per entry (more on the demo's 10 classes)."""
    if cfg.mixup_alpha > 0:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_task(model: nn.Module, cfg: Config, teacher: nn.Module | None, device: torch.device) -> nn.Module:
    """The timm training task: ``task(x, y)['loss']``.

    §5.3 distillation: loss = task_weight x CE(p, y) + distill_weight x T^2 KL(softmax(r/T) || softmax(z/T)).
    KL differs from the paper's cross-entropy to the teacher by the teacher's entropy, a constant for the student,
    so the gradients are the paper's. The teacher sees the same (mixed) input as the student.
    """
    criterion = build_criterion(cfg)
    if teacher is None:
        return ClassificationTask(model, criterion=criterion, device=device, verbose=False)
    return LogitDistillationTask(
        student_model=model, teacher_model=DistillationTeacher(teacher, device=device), criterion=criterion,
        loss_type="kl", distill_loss_weight=cfg.distill_weight, task_loss_weight=cfg.task_weight,
        temperature=cfg.distill_temperature, device=device, verbose=False,
    )


def load_teacher(cfg: Config, classes: list[str],
                 device: torch.device) -> tuple[torch.nn.Module | None, dict[str, Any] | None]:
    """§5.3 teacher: one of our run dirs / checkpoints, or a timm model name with its pretrained weights; and its
    identity, which the student's checkpoints pin (run_dir.check_same_teacher): None without distillation. Its outputs
    must be the data's classes in the data's order (its logit k the data's label k): checked by name where the
    teacher names its classes (our checkpoints; timm's ImageNet label sets), by count otherwise."""
    if not cfg.distill_teacher:
        return None, None
    what = f"distill_teacher {cfg.distill_teacher}"
    if Path(cfg.distill_teacher).exists():
        teacher, identity, count, theirs = _run_teacher(cfg.distill_teacher, what)
        other_count = other_order = "train the teacher on the same data"
    else:
        teacher, count, theirs = _hub_teacher(cfg.distill_teacher, what)
        identity = {"timm": cfg.distill_teacher}
        other_count = "use a teacher trained on this label space"
        other_order = "name the class folders by WordNet id, as ImageNet's own layout does"
    if count != len(classes):
        raise ConfigError(f"{what}: predicts {count} classes, the data has {len(classes)}; {other_count}")
    if theirs is not None and list(theirs) != list(classes):
        k = next(i for i, (a, b) in enumerate(zip(theirs, classes)) if a != b)
        raise ConfigError(f"{what}: its class {k} is {theirs[k]!r}, the data's class {k} is {classes[k]!r} (the "
                          f"teacher's logit k must be the data's label k); {other_order}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval(), identity


def _run_teacher(src: str, what: str) -> tuple[nn.Module, dict[str, Any], int, list[str] | None]:
    """A teacher the toolkit trained: (model, identity, class count, class names). A run dir means its last.pth,
    which must be the finished run's, as an export requires: an unfinished one (preempted, still training) would
    teach with half-trained weights, and differently at each start of the student. Identity: the sha256 of the
    file (0.4 s for the 300 MB of a ResNet-50 run's last.pth on one CPU core, once per start), with its epoch and
    step for the messages."""
    path = resolve_checkpoint(src)
    ckpt, sha256 = load_checkpoint_hashed(path)
    teacher, teacher_cfg = classifier_from(ckpt, path)
    said, finished = run_progress(ckpt, teacher_cfg.epochs)
    if path.name == LAST and not finished:  # another file (best.pth, a copy) is picked on purpose
        raise ConfigError(f"{what}: {path} is {said}; finish the teacher run first (rerun its training command, "
                          f"which resumes it), or pick one of its checkpoints on purpose "
                          f"(distill_teacher={path.parent / BEST})")
    identity = {"sha256": sha256, "epoch": ckpt.get("epoch"), "step": ckpt.get("step", 0)}
    return teacher, identity, ckpt["num_classes"], ckpt.get("classes")


def _hub_teacher(name: str, what: str) -> tuple[nn.Module, int, list[str] | None]:
    """A timm model name with its pretrained weights: (model, class count, class names where timm knows them)."""
    try:  # downloaded from the Hugging Face hub into its cache once (rank 0), read from the cache after
        teacher = rank0_first(lambda: timm.create_model(name, pretrained=True))
    except (RuntimeError, OSError, ValueError) as e:
        raise ConfigError(
            f"{what}: cannot load its pretrained weights ({str(e).splitlines()[0][:200]}); "
            f"fill the hub cache on a machine with network (python -c \"import timm; timm.create_model('{name}', "
            f"pretrained=True)\", cache in $HF_HOME, default ~/.cache/huggingface, copied to the same place "
            f"here), or distil from a teacher trained by the toolkit (distill_teacher=<its run dir>)") from e
    # timm's ImageNet models predict their label set's classes in its order: for ImageNet-1k the sorted WordNet
    # ids, which are the folder names of ImageNet's own layout (and so of the data's classes, sorted)
    subset = infer_imagenet_subset(teacher)
    return teacher, teacher.num_classes, ImageNetInfo(subset).label_names() if subset else None
