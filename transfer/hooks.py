"""mmengine hooks of the downstream stages.

``VerifyBackboneHook``: fail the run unless the backbone holds exactly the exported weights after initialisation.
mmengine loads ``init_cfg=dict(type='Pretrained')`` with strict=False and only logs what it skipped; this hook
turns a partial load into an error. Imported through the generated config's ``custom_imports``, so the check
also runs under MMDetection's / MMSegmentation's own ``tools/train.py``.

``LabelRangeHook``: stop with one line naming the mask when a training batch holds a class id the model has no
output for; registered by our stage command for segmentation.

``ProgressHook``: the toolkit's one progress line (lifecycle/progress.py) at mmengine's logging interval, for training
and the final test. Registered by our stage command (transfer/runner.py), not in the config: it changes no result.
"""

from __future__ import annotations

from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from lifecycle import progress
from lifecycle.errors import UserError
from mmstack import compat

compat.apply()  # importing this module from a config also brings the compatibility fixes


@HOOKS.register_module()
class VerifyBackboneHook(Hook):
    """Compare every backbone tensor with the export, once, before the first iteration of a fresh run."""

    priority = "VERY_HIGH"

    def __init__(self, export: str):
        self.export = export

    def before_train(self, runner) -> None:  # after init_weights() and any resume (mmengine 0.10 order)
        if runner.iter > 0:  # resumed: the backbone has trained since initialisation
            runner.logger.info(f"VerifyBackboneHook: resumed at iteration {runner.iter}, checked at the start")
            return
        from export.mm_check import verify_model_loaded

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        record = verify_model_loaded(model, self.export)  # the backbone, and a C4 detector's shared head
        where = f" ({record['shared_head_tensors']} of them, layer4, in roi_head.shared_head)" \
            if "shared_head_tensors" in record else ""
        runner.logger.info(f"VerifyBackboneHook: every backbone tensor equals the export {self.export}{where}")


class LabelError(UserError, ValueError):
    pass


class LabelRangeHook(Hook):
    """A mask value outside the label space (a class id >= num_classes that is not the ignore index) makes the
    cross-entropy fail with "IndexError: Target 150 is out of bounds" on a CPU and a device-side assert on a GPU,
    naming no file. Checked on the loader's CPU tensors before the batch reaches the model: one max per mask, the
    detail only when it is out of range."""

    priority = "VERY_HIGH"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        samples = data_batch.get("data_samples", ()) if isinstance(data_batch, dict) else ()
        for sample in samples:
            labels = sample.gt_sem_seg.data if "gt_sem_seg" in sample else None
            if labels is None or labels.numel() == 0 or int(labels.max()) < self.num_classes:
                continue
            bad = labels[(labels >= self.num_classes) & (labels != self.ignore_index)].unique()
            if bad.numel():
                shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
                raise LabelError(
                    f"{sample.metainfo.get('seg_map_path', 'a training mask')}: class ids {shown} (after the "
                    f"dataset's label mapping) are outside the model's {self.num_classes} classes (0.."
                    f"{self.num_classes - 1}, ignore {self.ignore_index}); fix the mask, or list every such mask "
                    f"with tools/check_data.py ade20k DATA_ROOT --full")


class ProgressHook(Hook):
    """Print ``progress: iter N/TOTAL, X img/s, eta`` (and ``test N/TOTAL``) on the main process every ``interval``
    iterations and at the last one; images per second over every process, since this process started the phase."""

    priority = "LOWEST"

    def __init__(self, interval: int = 50):
        self.interval = max(1, int(interval))
        self.rate = progress.Rate()

    def before_train(self, runner) -> None:
        self.rate.start()

    def before_test(self, runner) -> None:
        self.rate.start()

    def _tick(self, runner, phase: str, done: int, total: int, data_batch) -> None:
        inputs = data_batch.get("inputs", ()) if isinstance(data_batch, dict) else ()
        self.rate.add(1, len(inputs) * get_world_size())
        if runner.rank == 0 and (done % self.interval == 0 or done == total):
            print(self.rate.line(phase, done, total), flush=True)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._tick(runner, "iter", runner.iter + 1, runner.max_iters, data_batch)  # runner.iter: before this one

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._tick(runner, "test", batch_idx + 1, len(runner.test_dataloader), data_batch)
