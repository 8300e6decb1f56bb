"""mmengine hook: the preemption contract (lifecycle/preemption.py) for the detection and segmentation stages.

SIGTERM, SIGUSR1 and SIGINT save a resumable checkpoint of the current iteration (at the next optimizer-update
boundary, the same on every rank) and exit with EXIT_INTERRUPTED; rerunning the same command resumes from it. Without
this, mmengine saves only every ``checkpoint.interval`` iterations (8,000 in the MMSegmentation recipe): a preemption
lost up to that much training. Registered in the generated config (``custom_hooks``, imported through
``custom_imports``), so it also works under MMDetection's / MMSegmentation's own ``tools/train.py``.

Also, for epoch-based loops (the full VOC recipe), a checkpoint saved in the middle of an epoch resumes in the middle
of it: mmengine itself restarts the epoch from its first batch, which would train those batches twice; the batch
sampler is moved past them, reading none of their images. And an iteration-based loop (the ADE20K recipe) resumes
without reading what it already trained: mmengine advances its dataloader by loading every batch up to the resumed
iteration (80k iterations x 16 crops: 1.28 M images decoded after a preemption at the end); the sampler is advanced
instead, which reads indices only.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop, IterBasedTrainLoop
from torch.utils.data import DataLoader

from lifecycle.artifacts import atomic_write_bytes, remove_stale_temporaries
from lifecycle.errors import quiet_exit_of_loader_workers
from lifecycle.run_lock import RunLock
from lifecycle.stop_flag import Preempted, StopFlag
from mmstack import compat

compat.apply()  # atomic checkpoint writes and their loading, also under the libraries' own tools

LAST_CHECKPOINT = "last_checkpoint"  # mmengine's pointer file: resume=True reads the path written in it
SAVED_ON_SIGNAL = "preemption_checkpoints"  # message-hub key (saved in every checkpoint): the files this hook wrote


class _Advanced:
    """The loop's iterator after the sampler was moved past the resumed iterations: mmengine's own advance (one
    ``next`` per trained iteration) gets nothing for those calls, then the batches come from the new position."""

    def __init__(self, iterator, skip: int):
        self.iterator, self.skip = iterator, skip

    def __iter__(self):
        return self

    def __next__(self):
        if self.skip:
            self.skip -= 1
            return None
        return next(self.iterator)


class _SkipBatches:
    """The train dataloader minus its first ``skip`` batches, for one epoch; everything else is the loader's. The
    loader's batch sampler is moved past them (indices, and for mmdet's AspectRatioBatchSampler the images' sizes
    from the annotations: no image read), and a loader of the same settings reads the rest. Reading the skipped
    batches instead, as mmengine would, decoded up to an epoch of images (49,653 VOC images of 1000x600 with the
    recipe's 2 workers) after every preemption. The same batches either way: the sampler's order is its seed's and
    epoch's."""

    def __init__(self, loader, skip: int):
        self.loader, self.skip = loader, skip

    def __iter__(self):
        loader = self.loader
        if getattr(loader, "batch_sampler", None) is None or not isinstance(loader, DataLoader):
            return itertools.islice(iter(loader), self.skip, None)  # no batch sampler to move: read and dropped
        batches = iter(loader.batch_sampler)
        next(itertools.islice(batches, self.skip - 1, None), None)
        workers = dict(prefetch_factor=loader.prefetch_factor) if loader.num_workers else {}
        return iter(DataLoader(loader.dataset, batch_sampler=list(batches), num_workers=loader.num_workers,
                               collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                               worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                               multiprocessing_context=loader.multiprocessing_context, **workers))

    def __len__(self):
        return len(self.loader) - self.skip

    def __getattr__(self, name):
        return getattr(self.loader, name)


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Poll the stop flag after every training, validation and test iteration; on a signal save and exit 75."""

    priority = "VERY_LOW"  # after the iteration's own hooks (logging, the interval checkpoint)

    def __init__(self):
        # Built with the Runner, before its dataloaders start their workers: forked workers inherit these handlers,
        # so a Ctrl-C to the terminal's process group does not kill them under the main process. Kept for the
        # whole process (train, then test): the flag's collectives run in the same order on every rank.
        self.stop = StopFlag()
        self.lock: RunLock | None = None  # held until the process exits

    def before_run(self, runner) -> None:
        if is_main_process() and self.lock is None:  # one writer per work dir (lifecycle/run_lock.py)
            self.lock = RunLock(runner.work_dir)
        if is_main_process():
            for tmp in remove_stale_temporaries(runner.work_dir):
                runner.logger.info(f"PreemptionHook: removed {tmp}, left by an interrupted save")

    def before_train_epoch(self, runner) -> None:
        loop = runner.train_loop
        if isinstance(loop, IterBasedTrainLoop):
            self._advance_sampler(runner, loop)
            return
        if not hasattr(loop, "max_epochs") or not hasattr(loop.dataloader, "__len__"):
            return
        done = runner.iter - runner.epoch * len(loop.dataloader)  # batches of this epoch trained before a resume
        if 0 < done <= len(loop.dataloader):
            runner.logger.info(f"PreemptionHook: resuming epoch {runner.epoch + 1} after its first {done} batches")
            loop.dataloader = _SkipBatches(loop.dataloader, done)

    @staticmethod
    def _advance_sampler(runner, loop) -> None:
        """An iteration-based loop resumed at iteration N (called just before mmengine's own advance): this rank's
        index stream of the InfiniteSampler moved past the N x batch_size indices those iterations trained on (the
        same batches as reading them would give; the workers' augmentation draws restart from their seeds), the
        loop's iterator rebuilt on it."""
        from mmengine.dataset import InfiniteSampler
        from mmengine.runner.loops import _InfiniteDataloaderIterator

        sampler, done = getattr(loop.dataloader, "sampler", None), loop.iter
        if done <= 0 or not isinstance(sampler, InfiniteSampler) or not loop.dataloader.batch_size:
            return
        # The iterator built with the loop has prefetched from the start of the stream: replaced (persistent workers
        # are reset by the new iter(); others shut down when the old iterator is dropped).
        sampler.indices = sampler._indices_of_rank()
        next(itertools.islice(sampler.indices, done * loop.dataloader.batch_size - 1, None), None)
        loop.dataloader_iterator = _Advanced(_InfiniteDataloaderIterator(loop.dataloader), done)
        runner.logger.info(f"PreemptionHook: resuming at iteration {done}; the sampler skips its first "
                           f"{done * loop.dataloader.batch_size} indices on this rank, no image is read for them")

    def after_train_epoch(self, runner) -> None:
        loop = runner.train_loop
        if isinstance(loop.dataloader, _SkipBatches):
            loop.dataloader = loop.dataloader.loader

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._remove_superseded(runner)
        if self._update_done(runner, runner.iter + 1) and self.stop.agreed():
            self._save_and_exit(runner, runner.iter + 1)

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        training = isinstance(getattr(runner, "_train_loop", None), BaseLoop)  # (runner.val() alone: not)
        # Validation inside an update (an epoch's end in an epoch-based loop, with accumulation: mmengine counts
        # passes across epochs) is no state to save: the stop is not polled, so it waits for the update's end.
        # Every rank is at the same iteration, so all skip the poll together.
        if training and not self._update_done(runner, runner.iter):
            return
        if self.stop.agreed():  # validation during training: the weights of the iterations trained so far
            self._save_and_exit(runner, runner.iter if training else None)

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.stop.agreed():  # the final test: training is saved already (CheckpointHook's save_last)
            self._save_and_exit(runner, None)

    def _save_and_exit(self, runner, iteration: int | None) -> None:
        if iteration is not None and not self._saved(runner, iteration):
            name = f"iter_{iteration}.pth"
            path = os.path.join(runner.work_dir, name)
            # Recorded before the save, so that the checkpoint knows itself as the latest and as this hook's.
            runner.message_hub.update_info("last_ckpt", path)
            runner.message_hub.update_info(SAVED_ON_SIGNAL, [*runner.message_hub.get_info(SAVED_ON_SIGNAL, []), name])
            # Runner.save_checkpoint writes on the main process only; meta as an iteration-based save, also in an
            # epoch-based loop (before_train_epoch skips the batches of the epoch already trained).
            runner.save_checkpoint(runner.work_dir, name, meta=dict(epoch=runner.epoch, iter=iteration),
                                   by_epoch=False)
            if is_main_process():
                atomic_write_bytes(Path(runner.work_dir) / LAST_CHECKPOINT, path.encode())
            runner.logger.info(f"PreemptionHook: saved {path} (iteration {iteration}); rerun the same command to "
                               f"resume")
        if self.lock is not None:  # written and done: the rerun (in this process too, in tests) may take over
            self.lock.release()
            self.lock = None
        quiet_exit_of_loader_workers()  # the loop is left without the loaders' shutdown
        where = f"iteration {iteration}" if iteration is not None else "the test"
        raise Preempted(f"stopped by a signal at {where}; rerun the same command to resume")

    @staticmethod
    def _update_done(runner, passes: int) -> bool:
        """After ``passes`` training passes the optimizer has just updated (mmengine's OptimWrapper.should_update):
        with gradient accumulation only that is a consistent state, the partial gradients are not saved."""
        counts = getattr(runner.optim_wrapper, "_accumulative_counts", 1)
        return passes % counts == 0 or passes == runner.max_iters

    @staticmethod
    def _remove_superseded(runner) -> None:
        """A checkpoint saved on a signal is outside CheckpointHook's ``max_keep_ckpts`` rotation: once a newer one
        is written (CheckpointHook runs before this hook in an iteration), it is removed, so that preemptions do not
        leave one full checkpoint each. Names, not paths: a run dir may have been moved between resumes."""
        mine = runner.message_hub.get_info(SAVED_ON_SIGNAL, [])
        latest = Path(runner.message_hub.get_info("last_ckpt", "") or "").name
        stale = [name for name in mine if name != latest]
        if not stale:
            return
        if is_main_process():
            for name in stale:
                (Path(runner.work_dir) / name).unlink(missing_ok=True)
        runner.message_hub.update_info(SAVED_ON_SIGNAL, [name for name in mine if name == latest])

    @staticmethod
    def _saved(runner, iteration: int) -> bool:
        """The checkpoint of ``iteration`` exists already (CheckpointHook saved it in this iteration)."""
        last = Path(runner.work_dir) / LAST_CHECKPOINT
        try:
            return last.read_text().strip().endswith(f"iter_{iteration}.pth") and \
                Path(last.read_text().strip()).is_file()
        except OSError:
            return False
