"""Train a ResNet-50 A/B/C/D with any subset of the paper's tricks; rerunning the same command resumes.

The training loop and its command line. The tricks are in tricks.py, the data in data.py (device_data.py for
``decode: gpu``), the run dir's bookkeeping in run_dir.py, processes and the batch plan in lifecycle/distributed.py.

    python -m classification.train CONFIG.yaml [--data-root DIR] [--work-dir DIR] [--set key=value ...]
    python -m lifecycle.torchrun --nproc_per_node=8 -m classification.train CONFIG.yaml ...  # DDP, one per GPU

SIGTERM, SIGUSR1 and SIGINT save last.pth at the current update and exit 75 (lifecycle/preemption.py).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.utils import ModelEmaV3

from lifecycle import progress
from lifecycle.artifacts import atomic_link, atomic_write_bytes, remove_stale_temporaries
from lifecycle.distributed import BatchPlan, Dist, all_reduce, setup_distributed
from lifecycle.errors import UserError, cli, writing
from lifecycle.preemption import EXIT_INTERRUPTED
from lifecycle.run_lock import RunDirBusy, RunLock
from lifecycle.stop_flag import StopFlag

from .checkpoint import BEST, LAST, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, load_config
from .data import DataError, build_loaders, loader_advice, process_cpus
from .models import build_model
from .run_dir import (
    check_resume,
    complete_without_checkpoint,
    setup_logging,
    write_epoch_metrics,
    write_run_summary,
)
from .tricks import (
    autocast_kwargs,
    build_mixup,
    build_optimizer,
    build_scaler,
    build_scheduler,
    build_task,
    load_teacher,
    mix_pass,
    optimizer_step,
)

log = logging.getLogger("classification")

class TrainingError(UserError, RuntimeError):
    pass


NONFINITE_FIX = "lower base_lr, add warmup_epochs or use amp=bf16"


class NonFiniteGuard:
    """Counts consecutive updates skipped for non-finite loss or gradients, on the device (no host sync per step),
    across epochs (an epoch shorter than the limit would otherwise restart the count), and keeps the worst streak,
    read at logging steps: a streak that reaches the limit and ends between two log lines still stops the run."""

    def __init__(self, limit: int, device: torch.device):
        self.limit = limit
        self.streak = torch.zeros((), device=device)
        self.worst = torch.zeros((), device=device)

    def update(self, found_inf: torch.Tensor) -> None:
        self.streak = (self.streak + found_inf) * (found_inf > 0)
        self.worst = torch.maximum(self.worst, self.streak)

    def check(self, epoch: int, step: int) -> None:
        """Call at a logging step (it synchronises with the device)."""
        worst = int(self.worst.item())
        if worst >= self.limit:
            raise TrainingError(f"loss or gradients non-finite for {worst} consecutive steps (by epoch {epoch}, step "
                                f"{step}): {NONFINITE_FIX}, in a new run dir (a run resumes only with its own "
                                f"recipe); {LAST} holds its state from before the streak")

    def in_streak(self) -> bool:
        """Whether the last update was skipped (it synchronises with the device; the same answer on every rank, the
        streak coming from all-reduced values). The state may have diverged: not one to save over a good one."""
        return bool(self.streak.item() > 0)


def grad_sync(task, sync: bool):
    """DDP all-reduces gradients on the last pass of an update only; the passes before accumulate locally."""
    module = task.trainable_module
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


@dataclass
class EpochTally:
    """An epoch's statistics so far, summed over ranks: saved in last.pth when a run stops inside an epoch (or in its
    evaluation), so that the resumed epoch reports the whole epoch (loss over all its updates, images/s over all
    its time), whatever number of processes resumes it."""
    loss_sum: float = 0.0  # the updates' losses, over ranks
    passes: float = 0.0  # rank-updates whose loss counted (not skipped)
    skipped: int = 0  # updates skipped as non-finite (the same on every rank)
    images: int = 0
    bad: int = 0
    data_wait_s: float = 0.0  # rank 0's
    elapsed_s: float = 0.0

    def stats(self) -> dict:
        return dict(train_loss=self.loss_sum / max(self.passes, 1), images_per_s=self.images / max(self.elapsed_s,
                    1e-9), data_wait_share=self.data_wait_s / max(self.elapsed_s, 1e-9), skipped_steps=self.skipped,
                    bad_images=self.bad)


class FirstPassStatistics:
    """BatchNorm running statistics move once per update, on its first device batch. Under DDP the statistics are
    rank 0's (DDP broadcasts them before every forward), which rank 0 updated from its first chunk; with
    accumulation the later passes would update them again. Restoring them after each later pass makes
    them, and so the evaluated top-1, the same on any number of processes. (Restored, not frozen by setting the
    momentum to 0: a changed module attribute makes torch.compile compile the model a second time.)"""

    def __init__(self, model: torch.nn.Module):
        self.buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)  # one kernel launch, not one per buffer

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def close_batches(batches) -> None:
    """End a loader iterator left early: decode=gpu's holds a thread reading the DataLoader (device_data.py)."""
    if hasattr(batches, "close"):
        batches.close()


@dataclass
class TrainState:
    """What every update reads: the model and its training machinery, this process's place, the batch plan."""
    cfg: Config
    task: torch.nn.Module  # timm's training task: task(x, y)["loss"]; its trainable module is compiled / DDP-wrapped
    model: torch.nn.Module  # the model itself (its weights are the checkpoint's)
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm scheduler, stepped per update
    scaler: torch.amp.GradScaler
    mixup: object | None
    ema: ModelEmaV3 | None
    d: Dist
    device: torch.device
    plan: BatchPlan
    iters_per_epoch: int  # updates of global_batch images per epoch
    guard: NonFiniteGuard  # the non-finite streak, carried from epoch to epoch
    save_every: Callable[[int, int, EpochTally], bool] | None = None  # (epoch, updates done, tally), every rank


def train_one_epoch(state: TrainState, loader, epoch: int, first_step: int, stop: StopFlag,
                    carry: EpochTally | None = None) -> dict:
    """One epoch of updates from ``first_step``; returns its EpochTally (``tally``), and ``stopped_at`` (and why) on
    preemption or at ``max_steps``. Each update takes ``accumulation`` passes of ``device_batch`` images per
    process (the global batch); runs stop and resume at update boundaries only.
    ``state.save_every`` is called every ``checkpoint_interval`` updates (on every rank); ``carry`` is the tally of
    the updates before ``first_step`` (from the checkpoint a run resumed from)."""
    st = state  # the names the loop reads most:
    cfg, task, model, d, device, optimizer, scaler = st.cfg, st.task, st.model, st.d, st.device, st.optimizer, st.scaler
    iters_per_epoch, guard = st.iters_per_epoch, st.guard
    task.train()
    autocast = autocast_kwargs(cfg, device)
    accumulation = st.plan.accumulation
    carry = carry or EpochTally()
    mine = carry if d.is_main else EpochTally(skipped=carry.skipped)  # sums over ranks: rank 0 carries them
    loss_sum = torch.tensor(mine.loss_sum, device=device)
    passes = torch.tensor(mine.passes, device=device)
    skipped = torch.tensor(float(mine.skipped), device=device)  # updates skipped (non-finite loss or gradients)
    images, bad, data_wait = mine.images, mine.bad, mine.data_wait_s
    images_now = 0  # this process's, since the start or the resume (the logged rate)

    def tally() -> EpochTally:  # a collective: call on every rank
        loss, counted, n, n_bad = all_reduce(torch.stack([loss_sum, passes, torch.tensor(float(images), device=device),
                                                          torch.tensor(float(bad), device=device)])).tolist()
        return EpochTally(loss, counted, int(skipped.item()), int(n), int(n_bad), data_wait,
                          carry.elapsed_s + time.perf_counter() - t_start)
    batches = iter(loader)
    try:
        statistics = FirstPassStatistics(model) if accumulation > 1 else None
        t_start = time.perf_counter()
        for step in range(first_step, iters_per_epoch):
            global_step = epoch * iters_per_epoch + step
            if cfg.max_steps and global_step >= cfg.max_steps:  # the same step on every rank: no collective needed
                return dict(stopped_at=step, reason=f"max_steps={cfg.max_steps}", tally=tally())
            st.scheduler.step_update(num_updates=global_step + 1)  # lr of update i is schedule(i + 1), see tricks.py
            optimizer.zero_grad(set_to_none=True)
            loss_update = torch.zeros((), device=device)
            for m in range(accumulation):
                t_wait = time.perf_counter()
                x, y, n_bad = next(batches)
                data_wait += time.perf_counter() - t_wait
                bad += n_bad
                if len(x) < 2:  # BatchNorm needs two samples; skipping the batch on one rank would hang DDP
                    raise DataError(f"epoch {epoch} step {step + 1}: {n_bad} unreadable images left {len(x)} in the "
                                    f"batch; run tools/check_data.py imagenet {cfg.data_root}")
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if st.mixup is not None:
                    x, y = mix_pass(st.mixup, x, y, cfg.seed, global_step, slot=m * d.world_size + d.rank)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if statistics and m == 1:
                    statistics.save()  # as the first pass left them
                with grad_sync(task, m == accumulation - 1), torch.autocast(**autocast):
                    loss = task(x, y)["loss"]
                scaler.scale(loss / accumulation).backward()  # the mean over the global batch, as one big pass
                if statistics and m > 0:
                    statistics.restore()  # after the backward, which checks that the forward's inputs are unchanged
                loss_update += loss.detach().float() / accumulation
                images += len(x)
                images_now += len(x)
            # Every rank skips the same updates: the gradients are averaged, so one rank's non-finite loss spoils all
            # (the sum of the ranks' losses is non-finite when any is; one scalar, no host sync).
            any_loss = all_reduce(loss_update.clone()) if dist.is_initialized() else loss_update
            found_inf = optimizer_step(optimizer, scaler, any_loss)  # skips a non-finite update
            if st.ema is not None:
                st.ema.update(model, step=global_step)
            if cfg.compile and step == first_step:  # one host sync per epoch
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                log.info("epoch %d: its first update took %.1f s (after a start: torch.compile's warm-up)", epoch,
                         time.perf_counter() - t_start)

            loss_sum += torch.where(found_inf > 0, 0.0, loss_update)
            passes += 1 - found_inf
            skipped += found_inf
            guard.update(found_inf)
            logging_step = (step + 1) % cfg.log_interval == 0 or step + 1 == iters_per_epoch
            if logging_step:  # the only host synchronisation of the step
                elapsed = time.perf_counter() - t_start
                log.info("epoch %d [%d/%d] loss %.4f lr %.5f | %.1f img/s, data wait %.0f%% | skipped %d, bad "
                         "images %d", epoch, step + 1, iters_per_epoch, loss_sum.item() / max(passes.item(), 1),
                         optimizer.param_groups[0]["lr"], images_now / elapsed,
                         100 * (data_wait - mine.data_wait_s) / elapsed, skipped.item(), bad)
                done, total = global_step + 1, cfg.epochs * iters_per_epoch  # updates; the eta leaves out validation
                log.info(progress.line("update", done, total, images_now * d.world_size / elapsed,
                                       (total - done) * elapsed / (step + 1 - first_step)))
                guard.check(epoch, step + 1)
            if stop.agreed():  # every step: under DDP an asynchronous CPU all-reduce (lifecycle/stop_flag.py)
                return dict(stopped_at=step + 1, reason="signal", tally=tally())
            if st.save_every and cfg.checkpoint_interval and (global_step + 1) % cfg.checkpoint_interval == 0:
                st.save_every(epoch, step + 1, tally())
        return dict(tally=tally())
    finally:  # decode=gpu: its prefetching thread must not outlive the epoch (classification/device_data.py)
        close_batches(batches)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, cfg: Config,
             stop: StopFlag | None = None) -> tuple[float, float, int, int] | None:
    """(top-1 %, top-5 %, images scored, unreadable images skipped) over the whole validation set, reduced over
    ranks; None when ``stop`` was agreed on before the end (a full ImageNet pass takes minutes: a preemption must
    not wait for it). Stops the run when the model's outputs are not finite (diverged weights or BatchNorm
    statistics: the top-1 of such a model means nothing)."""
    model.eval()
    if dist.is_initialized():  # every rank evaluates with rank 0's BatchNorm statistics (the ones saved)
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    counts = torch.zeros(5, device=device)  # correct@1, correct@5, seen, skipped (bad_images=skip), non-finite
    autocast = autocast_kwargs(cfg, device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    # Every rank polls the stop flag (a collective) as often as the rank with the fewest batches has batches.
    polls = math.ceil(len(loader.dataset) // world / loader.batch_size) if stop is not None else 0
    batches = iter(loader)
    try:
        for i, (x, y, n_bad) in enumerate(batches):
            if i < polls and stop.agreed():
                return None
            counts[3] += n_bad
            if not len(x):
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(**autocast):
                logits = model(x)
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            counts[:3] += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(y), device=device)])
            counts[4] += (~logits.isfinite().all(1)).sum()
    finally:
        close_batches(batches)
    c1, c5, n, bad, nonfinite = all_reduce(counts).tolist()
    if nonfinite:
        raise TrainingError(f"model outputs non-finite on {int(nonfinite)} of {int(n)} validation images (the weights "
                            f"or BatchNorm statistics diverged): {NONFINITE_FIX}")
    return 100 * c1 / max(n, 1), 100 * c5 / max(n, 1), int(n), int(bad)


def run(cfg: Config, run_dir: Path, d: Dist) -> int:
    """Train (or resume) the run in ``run_dir``: 0 when complete or stopped at max_steps, EXIT_INTERRUPTED when a
    signal stopped it (a resumable last.pth was saved first)."""
    lock = None
    if d.is_main:  # one writer per run dir: a second command on the same dir stops here
        try:
            lock = RunLock(run_dir)
        except RunDirBusy as e:
            raise CheckpointError(str(e)) from None
    stop = StopFlag()  # from the start: a signal during set-up stops the run after its first step
    try:
        return train_run(cfg, run_dir, d, stop)
    finally:
        stop.close()
        if lock is not None:
            lock.release()


def agreed_checkpoint(last: Path, d: Dist, device: torch.device) -> dict | None:
    """The checkpoint to resume from, or None to start afresh: the same on every rank. Each rank reads its own view
    of ``last``, and one all_gather of (found, epoch, step, wall time) compares them with rank 0's; a rank that sees
    no file, or another one (a node-local work dir), would start afresh while rank 0 resumes and DDP drift with no
    error, so every rank refuses instead."""
    ckpt = load_checkpoint(last) if last.exists() else None
    if not dist.is_initialized():
        return ckpt
    mine = torch.tensor([-1.0, -1.0, -1.0, -1.0] if ckpt is None else
                        [1.0, ckpt["epoch"], ckpt["step"], ckpt.get("wall_time_s", 0.0)],
                        dtype=torch.float64, device=device)  # on the device: NCCL gathers nothing else
    views = [torch.empty_like(mine) for _ in range(d.world_size)]
    dist.all_gather(views, mine)
    views = [v.tolist() for v in views]
    other = next((r for r, v in enumerate(views) if v != views[0]), None)
    if other is not None:
        raise CheckpointError(f"{last}: rank 0 finds {_seen(views[0])}, rank {other} {_seen(views[other])}; every "
                              f"process must read the same run dir: give --work-dir on a file system all nodes share")
    return ckpt


def _seen(view: list[float]) -> str:
    """A rank's view of the checkpoint, for agreed_checkpoint's message."""
    found, epoch, step, wall = view
    return "no checkpoint" if found < 0 else f"one of epoch {int(epoch)} update {int(step)} ({wall:.1f} s trained)"


def train_run(cfg: Config, run_dir: Path, d: Dist, stop: StopFlag) -> int:
    device = torch.device(f"cuda:{d.local_rank}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    np.random.seed(cfg.seed + d.rank)  # timm's Mixup draws lambda from numpy
    random.seed(cfg.seed + d.rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        if cfg.decode == "gpu" and device.type == "cuda":
            # nvjpeg writes each image on its own stream into a tensor torchvision makes on ours, unordered: the fill
            # of new memory this mode adds (255 for uint8) could land after the pixels. Results stay deterministic.
            torch.utils.deterministic.fill_uninitialized_memory = False
    else:
        torch.backends.cudnn.benchmark = True

    plan = cfg.batch_plan(d.world_size)  # refuses a process count that cannot keep the recipe's batch, before any work
    if complete_without_checkpoint(cfg, run_dir):
        return 0
    train_loader, val_loader, sampler, classes = build_loaders(cfg, d.rank, d.world_size,
                                                               cfg.pin_memory and device.type == "cuda", device)
    ipe = sampler.updates  # updates of global_batch images per epoch
    model = build_model(cfg.variant, len(classes), zero_gamma=cfg.zero_gamma, init=cfg.init, mean=cfg.mean,
                        std=cfg.std).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher, teacher_identity = load_teacher(cfg, classes, device)
    task = build_task(model, cfg, teacher, device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, ipe)
    scaler = build_scaler(cfg, device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, min_decay=0.0, update_after_step=0, use_warmup=False,
                     device=None) if cfg.ema_decay > 0 else None
    mixup = build_mixup(cfg, len(classes))

    epoch, first_step, history, best_top1, wall_before, carry, advised = 0, 0, [], -1.0, 0.0, None, False
    last = run_dir / LAST
    if d.is_main:  # what a save killed mid-write (SIGKILL, power loss) left behind: never a valid file
        for tmp in remove_stale_temporaries(run_dir):
            log.info("removed %s, left by an interrupted save", tmp)
    ckpt = agreed_checkpoint(last, d, device)
    if ckpt is not None:
        check_resume(ckpt, cfg, last, classes, sampler.n, len(val_loader.dataset), teacher_identity)
        model.load_state_dict(ckpt["model"], strict=True)
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The data order, augmentation and mixup depend on (seed, epoch, update) only, and updates keep the global
        # batch: a run may resume on another number of processes (e.g. a requeued job on fewer GPUs).
        if ckpt["world_size"] == d.world_size:
            set_rng_state(ckpt["rng"][d.rank])
        epoch, first_step, history, best_top1 = ckpt["epoch"], ckpt["step"], ckpt["history"], ckpt["best_top1"]
        carry = EpochTally(**ckpt["epoch_tally"]) if ckpt.get("epoch_tally") else None
        wall_before = ckpt["wall_time_s"]
        log.info("resumed from %s at epoch %d, update %d (saved by %d processes, now %d)", last, epoch, first_step,
                 ckpt["world_size"], d.world_size)
    if epoch >= cfg.epochs and (run_dir / "summary.json").exists():
        log.info("%s: already complete (%d epochs); nothing to do", run_dir, epoch)
        return 0
    if cfg.compile:  # before DDP wraps it (timm's order); the weights and their names are the model's own
        task.compile(backend=cfg.compile_backend, mode=None)
    if d.world_size > 1:
        task.prepare_distributed(device_ids=[d.local_rank] if device.type == "cuda" else None)

    def save(path: Path, epoch: int, step: int, tally: EpochTally | None = None) -> None:
        """Call on every rank: each rank's RNG state is gathered (mixup draws differ per rank); rank 0 writes, and
        no rank returns before it has written (a rank that exits first has torchrun stop the writer)."""
        rngs = [rng_state()]
        if dist.is_initialized():
            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state())
        if d.is_main:
            with writing(path):  # a full disk names this path (errors.writing)
                save_checkpoint(path, model=model.state_dict(), ema=ema.module.state_dict() if ema else None,
                                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                scheduler=scheduler.state_dict(), epoch=epoch, step=step, history=history,
                                best_top1=best_top1, config=cfg.to_dict(), num_classes=len(classes), classes=classes,
                                train_images=sampler.n, val_images=len(val_loader.dataset), teacher=teacher_identity,
                                world_size=d.world_size, rng=rngs,
                                epoch_tally=vars(tally) if tally else None,
                                wall_time_s=wall_before + time.perf_counter() - t0)
        if dist.is_initialized():
            dist.barrier()

    t0 = time.perf_counter()
    if d.is_main:
        with writing(run_dir / "config.yaml"):
            atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        log.info("%s: %s; ResNet-50-%s, %d classes, %d updates/epoch, device %s, decode %s, %d loader workers%s",
                 cfg.name, cfg.batch_line(d.world_size), cfg.variant, len(classes), ipe, device, cfg.decode,
                 train_loader.num_workers, f" (auto: {process_cpus()} CPUs for this process)"
                 if cfg.workers == "auto" else "")
    tb = None
    if d.is_main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tb"))
    guard = NonFiniteGuard(cfg.max_nonfinite_steps, device)  # one streak for the whole run

    def save_unless_in_streak(epoch: int, step: int, tally: EpochTally) -> bool:
        """A mid-epoch save (periodic, or at a stop) of ``last``, unless updates are being skipped: a diverged state
        (a non-finite update before the streak) must not replace the last good one, which the rerun then resumes."""
        if guard.in_streak():
            log.warning("epoch %d step %d: updates are being skipped (non-finite loss or gradients): %s not saved "
                        "over", epoch, step, last)
            return False
        save(last, epoch, step, tally)
        return True

    state = TrainState(cfg, task, model, optimizer, scheduler, scaler, mixup, ema, d, device, plan, ipe, guard=guard,
                       save_every=save_unless_in_streak)
    while epoch < cfg.epochs:
        sampler.set_epoch(epoch, skip_updates=first_step)
        out = train_one_epoch(state, train_loader, epoch, first_step, stop, carry)
        carry = None
        if "stopped_at" in out:
            if save_unless_in_streak(epoch, out["stopped_at"], out["tally"]):
                log.info("stopped by %s at epoch %d step %d; %s saved, rerun the command to resume",
                         out["reason"], epoch, out["stopped_at"], last)
            return EXIT_INTERRUPTED if out["reason"] == "signal" else 0
        stats = out["tally"].stats()
        if d.is_main and not advised:
            advice = loader_advice(stats["data_wait_share"], cfg, train_loader.num_workers, process_cpus(), device)
            if advice:
                log.warning("epoch %d: %s (said once)", epoch + 1, advice)
                advised = True
        scores = evaluate(model, val_loader, device, cfg, stop)
        ema_scores = evaluate(ema.module, val_loader, device, cfg, stop) if ema and scores else None
        if scores is None or (ema and ema_scores is None):  # a signal during the evaluation: it is redone on resume
            save(last, epoch, ipe, out["tally"])
            log.info("stopped by signal in the evaluation of epoch %d; %s saved, rerun the command to resume",
                     epoch + 1, last)
            return EXIT_INTERRUPTED
        top1, top5, val_images, val_bad = scores
        ema_top1, ema_top5 = ema_scores[:2] if ema else (None, None)
        if val_bad:  # bad_images=skip: say so, and record it beside the top-1 it changes
            log.warning("epoch %d: %d unreadable validation images skipped (bad_images=skip); top-1 is over the %d "
                        "readable ones", epoch + 1, val_bad, val_images)
        epoch, first_step = epoch + 1, 0
        row = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], train_loss=stats["train_loss"], top1=top1,
                   top5=top5, ema_top1=ema_top1, ema_top5=ema_top5, images_per_s=stats["images_per_s"],
                   data_wait_share=stats["data_wait_share"], skipped_steps=stats["skipped_steps"],
                   bad_images=stats["bad_images"], val_images=val_images, val_bad_images=val_bad)
        history.append(row)
        log.info("epoch %d: top-1 %.2f top-5 %.2f%s, train loss %.4f, %.1f img/s", epoch, top1, top5,
                 f" (EMA top-1 {ema_top1:.2f})" if ema else "", stats["train_loss"], stats["images_per_s"])
        if top1 > best_top1:  # the same state under both names: written once, linked once
            best_top1 = top1
            save(run_dir / BEST, epoch, 0)
            if d.is_main:
                atomic_link(run_dir / BEST, last)
        else:
            save(last, epoch, 0)
        if d.is_main:
            with writing(run_dir / "metrics.jsonl"):
                write_epoch_metrics(run_dir, history, tb)
    if d.is_main:
        with writing(run_dir / "summary.json"):
            write_run_summary(cfg, run_dir, history, len(classes), d.world_size, ipe,
                              wall_before + time.perf_counter() - t0)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m classification.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="recipe YAML (configs/classification/...); only the keys that differ from the "
                                  "defaults in classification/config.py")
    p.add_argument("--data-root", help="ImageFolder root holding train/ and val/ (overrides data_root)")
    p.add_argument("--work-dir", help="run dir (default: work_dirs/cls/<config name>); rerun to resume")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--allow-synthetic", action="store_true",
                   help="train on data generated by tools/make_data.py (refused by default: it is not ImageNet)")
    return p.parse_args(argv)


@cli  # every failure is one line (lifecycle/errors.py); --debug or BOT_DEBUG=1 shows the traceback
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = (list(args.set) + ([f"data_root={args.data_root}"] if args.data_root else [])
                 + (["allow_synthetic=true"] if args.allow_synthetic else []))
    d = Dist()
    try:
        cfg = load_config(args.config, overrides)
        run_dir = Path(args.work_dir or f"work_dirs/cls/{cfg.name}")
        d = setup_distributed()
        setup_logging(run_dir, d.is_main)
        return run(cfg, run_dir, d)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
