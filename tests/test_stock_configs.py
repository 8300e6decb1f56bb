"""The installed packages' own configs, with only data_root (and single-process BN) changed, build their datasets
from the generated trees and run one training iteration on CPU: the embedded data is real VOC / ADE20K."""

import pytest
import torch

from mmstack import compat
from transfer.runner import walk

STOCK = {  # the configs as installed with the packages (their .mim folders)
    "mmdet": ("pascal_voc/faster-rcnn_r50_fpn_1x_voc0712.py", "VOCdevkit"),
    "mmseg": ("fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py", "ADEChallengeData2016"),
}


@pytest.mark.parametrize("library", STOCK)
def test_stock_config_trains_one_iteration_on_generated_data(library, tiny_data):
    compat.apply()
    import importlib
    from pathlib import Path

    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    config, data = STOCK[library]
    cfg = Config.fromfile(Path(importlib.import_module(library).__file__).parent / ".mim" / "configs" / config)
    init_default_scope(cfg.default_scope)
    root = str(tiny_data / data)
    walk(cfg.train_dataloader, lambda d: d.__setitem__("data_root", root) if "data_root" in d else None)
    walk(cfg.model, lambda d: d.__setitem__("type", "BN") if d.get("type") == "SyncBN" else None)
    # No network here: the stock pretrained URLs are not fetched (random init is enough for one iteration).
    cfg.model.backbone.init_cfg = None
    cfg.model.pop("pretrained", None)
    if library == "mmdet":
        # The stock VOC filter drops boxes under 32 px; keep the tiny images' boxes so a batch exists.
        walk(cfg.train_dataloader, lambda d: d.__setitem__("bbox_min_size", 4) if "bbox_min_size" in d else None)
    cfg.train_dataloader.update(num_workers=0, persistent_workers=False, batch_size=1)

    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    assert len(loader.dataset) > 0
    from mmengine.registry import MODELS

    model = MODELS.build(cfg.model)
    model.init_weights()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    losses = model.train_step(next(iter(loader)), optim)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total) and total > 0
