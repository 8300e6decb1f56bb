"""The paper's training tricks, each a small function of the config, built from timm's pieces.

Every timm call passes its trick-related arguments explicitly: timm switches several tricks on by default
(zero_init_last, no weight decay on 1-d params, label smoothing 0.1 in Mixup, ...).
"""

from __future__ import annotations

import math

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from timm.task import ClassificationTask, LogitDistillationTask
from timm.task.distillation import DistillationTeacher
from torch import nn

from .config import Config


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
    """§2: Nesterov SGD, momentum 0.9; the learning rate is set per update by the scheduler."""
    return torch.optim.SGD(
        param_groups(model, cfg), lr=cfg.peak_lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, iters_per_epoch: int):
    """Per-update schedule (``iters_per_epoch`` counts updates of ``global_batch`` images). Call
    ``step_update(i + 1)`` before the i-th update (0-based), so that warmup
    gives lr = (i + 1) / W x peak for the first W updates, as in §3.1 ("at batch i, 1 <= i <= m, i eta / m").

    - step (§2): peak x gamma^k after each of ``step_epochs`` (counted from the start of training);
    - cosine (§5.1): 0.5 (1 + cos(pi t / T)) peak, t counted from the end of warmup, T = the rest of training.
    """
    total = cfg.epochs * iters_per_epoch
    warmup = round(cfg.warmup_epochs * iters_per_epoch)
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


def lr_at(cfg: Config, iters_per_epoch: int, i: int) -> float:
    """Closed form of the schedule for the i-th update (0-based); used for plots and the summary."""
    peak = cfg.peak_lr
    total = cfg.epochs * iters_per_epoch
    warmup = round(cfg.warmup_epochs * iters_per_epoch)
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
    """§3.2 loss scaling for fp16. The scaler also guards fp32/bf16: with scale 1 that never grows it only skips
    updates whose gradients are not finite (the non-finite counter in the trainer reads its flags)."""
    fp16 = cfg.amp == "fp16"
    return torch.amp.GradScaler(device.type, init_scale=2.0**16 if fp16 else 1.0, growth_factor=2.0,
                                backoff_factor=0.5, growth_interval=2000 if fp16 else 2**30, enabled=True)


def build_mixup(cfg: Config, num_classes: int) -> Mixup | None:
    """§5.4 mixup with soft targets; label smoothing (§5.2) is applied to the one-hot targets before mixing."""
    if cfg.mixup_alpha <= 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup_alpha, cutmix_alpha=0.0, cutmix_minmax=None, prob=1.0, switch_prob=0.0,
        mode="batch", correct_lam=True, label_smoothing=cfg.label_smoothing, num_classes=num_classes,
    )


def build_criterion(cfg: Config) -> nn.Module:
    """Cross-entropy on the training targets: soft (mixed, smoothed) targets with mixup, else class indices with
    torch's label smoothing, which is exactly CE against (1 - eps) onehot + eps / K."""
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
