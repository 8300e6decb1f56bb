"""A classification run dir's bookkeeping: what may change on resume, the logs, metrics and summary it writes, and
when a finished run needs nothing more (docs/artifacts.md lists every file)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from lifecycle.artifacts import atomic_write_bytes, read_summary, write_summary

from .checkpoint import LAST, CheckpointError
from .config import Config
from .tricks import lr_at

log = logging.getLogger("classification")

# Keys that may change between a run and its resume without changing the result. bad_images too: it decides only
# what an unreadable image does from now on, stop the run (error) or be dropped and counted in its epoch's row
# (skip); no update already done differs either way (under error none skipped an image; under skip each skip is in
# the history), and "set bad_images=skip" is the fix the error itself gives a run stopped on day 3.
# data_root too (data moved to a faster disk): check_same_data compares what it holds instead.
RUNTIME_KEYS = {"name", "data_root", "workers", "pin_memory", "persistent_workers", "log_interval",
                "checkpoint_interval", "compile", "compile_backend", "max_steps", "allow_synthetic", "bad_images"}


def check_resumable(ckpt: dict, cfg: Config, path: Path) -> None:
    # A checkpoint that pins its teacher (check_same_teacher compares the teacher file's sha256) leaves its path
    # out: the same file spelled another way (relative, a work dir moved) resumes, another file at that path not.
    ignored = RUNTIME_KEYS | ({"distill_teacher"} if "teacher" in ckpt else set())
    saved = {k: v for k, v in ckpt["config"].items() if k not in ignored}
    now = {k: v for k, v in cfg.to_dict().items() if k not in ignored}
    defaults = Config().to_dict()  # a key added since the run started (e.g. decode) counts as its default
    changed = sorted(k for k in now if saved.get(k, defaults[k]) != now[k])
    if changed:
        raise CheckpointError(f"{path}: this run dir was started with different settings ({', '.join(changed)}); "
                              f"use another --work-dir or restore the original settings")


def check_resume(ckpt: dict, cfg: Config, path: Path, classes: list[str], train_images: int, val_images: int,
                 teacher: dict | None) -> None:
    """What a resume from ``path`` must keep: the settings, and the data and teacher, unless the run is complete
    (its summary written): it trains nothing more, and what it trained on is its record."""
    check_resumable(ckpt, cfg, path)
    if ckpt["epoch"] >= cfg.epochs and (path.parent / "summary.json").exists():
        return
    check_same_data(ckpt, classes, train_images, val_images, cfg, path)
    check_same_teacher(ckpt, teacher, cfg, path)


def check_same_data(ckpt: dict, classes: list[str], train_images: int, val_images: int, cfg: Config,
                    path: Path) -> None:
    """The data a run resumes on must be the data it started on: other class names relabel every image silently,
    and another training image count (a file deleted or added) reshuffles every later epoch and moves the updates
    per epoch and with them the lr schedule; another validation image count makes the top-1 of its epochs (and
    best.pth, the best of them) compare different sets. Checkpoints from before a count was kept resume unchecked
    on it."""
    train = Path(cfg.data_root) / "train"
    saved = ckpt.get("classes")
    if saved is not None and list(saved) != list(classes):
        k = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b), min(len(saved), len(classes)))
        was = f"class {k} was {saved[k]!r}" if k < len(saved) else f"{len(saved)} classes"
        now = f"{classes[k]!r}" if k < len(classes) else f"{len(classes)} classes"
        raise CheckpointError(f"{path}: the run trained on other classes than {train} holds ({was}, now {now}): "
                              f"resumed, labels would change meaning; point --data-root at the run's data or use "
                              f"another --work-dir")
    count = ckpt.get("train_images")
    if count is not None and count != train_images:
        raise CheckpointError(f"{path}: the run trained on {count} images, {train} now holds {train_images} "
                              f"({_change(count, train_images)}), which would reshuffle every later epoch and move the "
                              f"lr schedule; {RESTORE}")
    count = ckpt.get("val_images")
    if count is not None and count != val_images:
        raise CheckpointError(f"{path}: the run was evaluated on {count} images, {Path(cfg.data_root) / 'val'} now "
                              f"holds {val_images} ({_change(count, val_images)}), so its epochs' top-1 (and best.pth) "
                              f"would compare different sets; {RESTORE}")


RESTORE = ("restore the files (an unreadable one: put it back and rerun with --set bad_images=skip, which skips it in "
           "place) or use another --work-dir")


def _change(before: int, now: int) -> str:
    return f"{abs(now - before)} {'fewer' if now < before else 'more'}"


def check_same_teacher(ckpt: dict, teacher: dict | None, cfg: Config, path: Path) -> None:
    """A run distils from one teacher throughout: a teacher run dir trained further (or replaced) between two
    starts of the student would otherwise change the targets mid-run. Checkpoints from before teachers were pinned
    have no ``teacher``: check_resumable compared distill_teacher's path instead."""
    old = ckpt.get("teacher")
    if "teacher" not in ckpt or _teacher_key(old) == _teacher_key(teacher):
        return
    was = f"distilled from {_teacher_words(old)}" if old else "trained without a teacher"
    now = f"distill_teacher {cfg.distill_teacher} is {_teacher_words(teacher)}" if teacher else "distill_teacher is off"
    raise CheckpointError(f"{path}: the run was {was}, now {now}; restore the run's teacher or use another --work-dir")


def _teacher_key(teacher: dict | None) -> str | None:
    return None if teacher is None else teacher.get("sha256") or teacher.get("timm")


def _teacher_words(teacher: dict) -> str:
    if "timm" in teacher:
        return f"timm's {teacher['timm']}"
    step = f" step {teacher['step']}" if teacher.get("step") else ""
    return f"a checkpoint of epoch {teacher.get('epoch')}{step} (sha256 {teacher['sha256'][:12]})"


def complete_without_checkpoint(cfg: Config, run_dir: Path) -> bool:
    """The run's summary says it finished all its epochs with these settings although last.pth is gone (removed
    to save space once exported): done, not retrained from scratch. The summary, not the checkpoint, decides."""
    summary = run_dir / "summary.json"
    if (run_dir / LAST).exists() or not summary.exists():
        return False
    done = read_summary(summary)
    if done.get("stage") != "classification" or len(done.get("history", [])) < cfg.epochs:
        return False
    check_resumable(done, cfg, summary)
    log.info("%s: already complete (%d epochs, its summary.json; the checkpoints were removed); nothing to do",
             run_dir, len(done["history"]))
    return True


def setup_logging(run_dir: Path, is_main: bool) -> None:
    """Rank 0 logs to the console and train.log; the other ranks stay quiet."""
    handlers: list[logging.Handler] = []
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")]
    else:
        handlers = [logging.NullHandler()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


def write_epoch_metrics(run_dir: Path, history: list[dict], tb) -> None:
    """Rewrite metrics.jsonl / metrics.csv from the history (the checkpoint's copy is the truth: a crash between
    a checkpoint and these files never duplicates or loses a row) and log the newest row to TensorBoard."""
    atomic_write_bytes(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())
    keys = list(dict.fromkeys(k for r in history for k in r))  # a run resumed from an older version gains columns
    lines = [",".join(keys)] + [",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in history]
    atomic_write_bytes(run_dir / "metrics.csv", ("\n".join(lines) + "\n").encode())
    row = history[-1]
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)):
            tb.add_scalar(key, value, row["epoch"])
    tb.flush()


def write_run_summary(cfg: Config, run_dir: Path, history: list[dict], num_classes: int, world_size: int,
                      ipe: int, wall: float) -> None:
    final = history[-1]
    total = cfg.epochs * ipe
    points = sorted({round(i * (total - 1) / 199) for i in range(200)})
    write_summary(
        run_dir / "summary.json", stage="classification", arm=cfg.name, seed=cfg.seed,
        metrics=dict(top1=final["top1"], top5=final["top5"], ema_top1=final["ema_top1"], ema_top5=final["ema_top5"],
                     best_top1=max(r["top1"] for r in history),
                     # top-1 is over val_images; val_bad_images were unreadable and skipped (bad_images=skip)
                     val_images=final.get("val_images"), val_bad_images=final.get("val_bad_images", 0),
                     images_per_s=sum(r["images_per_s"] for r in history) / len(history)),
        protocol=dict(dataset=str(Path(cfg.data_root).resolve().name), num_classes=num_classes,
                      image_size=cfg.image_size, epochs=cfg.epochs, global_batch=cfg.global_batch,
                      bn_batch=cfg.device_batch, peak_lr=cfg.peak_lr,  # BatchNorm per process (the paper's)
                      eval=f"resize {round(cfg.image_size * cfg.eval_resize)}, center crop {cfg.image_size}"),
        layout=dict(processes=world_size, per_device=cfg.device_batch,
                    accumulation=cfg.batch_plan(world_size).accumulation, line=cfg.batch_line(world_size)),
        config=cfg.to_dict(), wall_time_s=wall, history=history,
        lr_schedule=[[i / ipe, lr_at(cfg, ipe, i)] for i in points],
    )
    log.info("summary: %s (top-1 %.2f, top-5 %.2f)", run_dir / "summary.json", final["top1"], final["top5"])
