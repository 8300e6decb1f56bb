"""mmengine hook: fail the run unless the backbone holds exactly the exported weights after initialisation.

mmengine loads ``init_cfg=dict(type='Pretrained')`` with strict=False and only logs what it skipped; this hook
turns a partial load into an error. Imported through the generated config's ``custom_imports``, so the check
also runs under MMDetection's / MMSegmentation's own ``tools/train.py``.
"""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from transfer import compat

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
        from transfer.backbone_check import verify_model_loaded

        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        record = verify_model_loaded(model, self.export)  # the backbone, and a C4 detector's shared head
        where = f" ({record['shared_head_tensors']} of them, layer4, in roi_head.shared_head)" \
            if "shared_head_tensors" in record else ""
        runner.logger.info(f"VerifyBackboneHook: every backbone tensor equals the export {self.export}{where}")
