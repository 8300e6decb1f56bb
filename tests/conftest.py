"""Shared pytest fixtures."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # import the toolkit's packages from the checkout, installed or not
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder: two colour classes, 8 train / 2 val JPEGs each, 40 px (4 updates of 4 per epoch)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 2)):
        for c, base in enumerate(([200, 40, 40], [40, 40, 200])):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(base, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="session", autouse=True)
def _data_check_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remembered data-check passes go to a per-session folder, not the user's ~/.cache (subprocesses inherit it)."""
    os.environ["DATA_CHECK_CACHE"] = str(tmp_path_factory.mktemp("data_checks"))


@pytest.fixture(autouse=True)
def _detach_mm_log_files():
    """A Runner built in this process leaves mmengine's current logger writing to a file in the test's tmp_path,
    which is removed when the test passes: a later test logging through it would fail to reopen it. Likewise its
    console handler may hold the test's captured stderr (capsys), closed after the test: a later test's mmengine
    warning (init_default_scope switching scope) failed on it with "I/O operation on closed file"."""
    yield
    if "mmengine" in sys.modules:
        import logging

        from mmengine.logging import MMLogger

        for logger in MMLogger._instance_dict.values():
            for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
                handler.close()
                logger.removeHandler(handler)
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                    handler.stream = sys.stderr  # not setStream: it flushes the closed one


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` generated datasets (seed 0), made once per session. Read-only: copy before breaking things.
    Holds imagenet/, VOCdevkit/, ADEChallengeData2016/, data.json, README.txt."""
    from datakit.make import generate

    root = tmp_path_factory.mktemp("tiny_data")
    generate(root, seed=0, scale="tiny", log=None)
    return root


@pytest.fixture(scope="session")
def tiny_export(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-50-D trained for one epoch on the tiny ImageFolder, exported (tools/export_backbone.py's library)."""
    from classification import train
    from export.trained import export_backbone

    run = tmp_path_factory.mktemp("tiny_cls")
    rc = train.main([str(REPO / "configs/classification/demo/r50d_all_tricks.yaml"), "--data-root",
                     str(tiny_data / "imagenet"), "--work-dir", str(run), "--set", "image_size=32", "epochs=1",
                     "global_batch=4", "device_batch=4", "workers=0", "log_interval=4", "warmup_epochs=0.5"])
    assert rc == 0
    out = run / "export"
    export_backbone(run, out)
    return out


def jpeg_tree(root, size: tuple[int, int], n: int = 6):
    """A 2-class ImageFolder of textured JPEGs (smooth regions plus noise, like photographs) and one PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                coarse = rng.uniform(0, 255, (size[1] // 25 + 2, size[0] // 25 + 2, 3)).astype(np.uint8)
                img = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), np.float32)
                img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
            Image.fromarray(img).save(d / "png.png")
    return root


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    return jpeg_tree(tmp_path_factory.mktemp("photos"), (400, 300))


@pytest.fixture
def restore_handlers():
    """The stop signals' handlers as they were before the test (a PreemptionHook or StopFlag installs its own)."""
    import signal

    from lifecycle.preemption import SIGNALS

    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)
