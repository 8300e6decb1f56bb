"""One definition of a dataset file (datakit/files.py): the classification loader and the checker see the same tree,
and the checker refuses what a loader would read wrongly (link loops, odd pixel formats, hidden folders MMSegmentation
reads, masks without images)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classification.data import DataError, ImageFolderData
from datakit import check
from datakit.files import TreeError, ade_images, image_files, load_rgb
from datakit.render import CATEGORIES
from datakit.synthetic import synthetic_problem

C0 = CATEGORIES[0].name


@pytest.fixture
def imagenet(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data / "imagenet", tmp_path / "imagenet"))


@pytest.fixture
def ade(tiny_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_data / "ADEChallengeData2016", tmp_path / "ade"))


def samples(split: Path) -> list[str]:
    return [p for p, _ in ImageFolderData(split, None, seed=0, skip_bad=False).folder.samples]


def test_hidden_files_and_folders_are_not_data_for_loader_and_checker(imagenet: Path) -> None:
    before = samples(imagenet / "train")
    cls = imagenet / "train" / C0
    (cls / "._0.jpg").write_bytes(b"\0\5\x16\7AppleDouble")  # what a macOS copy leaves beside each file
    (cls / ".ipynb_checkpoints").mkdir()
    (cls / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"not an image")
    (imagenet / "train" / ".trash").mkdir()
    (imagenet / "train" / ".trash" / "y.jpg").write_bytes(b"not an image")
    assert check.check("imagenet", imagenet, full=True).problems == []
    assert samples(imagenet / "train") == before  # the loader skips exactly what the checker skips
    assert [str(p) for p in image_files(cls)] == [p for p in before if p.startswith(str(cls) + os.sep)]


def test_symlink_loop_is_one_line_in_checker_and_loader(imagenet: Path) -> None:
    link = imagenet / "train" / C0 / "again"
    link.symlink_to(imagenet / "train" / C0, target_is_directory=True)  # a folder linked into itself
    (line,) = check.check("imagenet", imagenet).problems
    assert line.startswith(f"{link}: links to ") and "remove the link" in line
    with pytest.raises(TreeError) as info:
        samples(imagenet / "train")
    assert str(info.value).startswith(f"{link}: ") and "\n" not in str(info.value)


def test_linked_folders_are_read_once(imagenet: Path, tmp_path: Path) -> None:
    """A class folder that is a link to elsewhere is data (datasets live on other disks); the same folder linked
    twice into one class is not."""
    moved = tmp_path / "elsewhere"
    shutil.move(imagenet / "train" / C0, moved)
    (imagenet / "train" / C0).symlink_to(moved, target_is_directory=True)
    assert check.check("imagenet", imagenet).problems == []
    n = len(image_files(imagenet / "train" / C0))
    assert n == len(list(moved.glob("*.jpg"))) > 0
    (moved / "twice").symlink_to(moved, target_is_directory=True)
    with pytest.raises(TreeError):
        image_files(imagenet / "train" / C0)


def test_link_to_a_missing_image_is_one_line_in_checker_and_loader(imagenet: Path, ade: Path) -> None:
    link = imagenet / "val" / C0 / "gone.jpg"
    link.symlink_to(imagenet / "nowhere.jpg")
    (line,) = check.check("imagenet", imagenet).problems
    assert line.startswith(f"{link}: a link to ") and "does not exist" in line
    with pytest.raises(TreeError, match=f"^{link}: "):
        samples(imagenet / "val")
    mask = ade / "annotations" / "validation" / "gone.png"
    mask.symlink_to(ade / "nowhere.png")
    (line,) = check.check("ade20k", ade).problems
    assert line.startswith(f"{mask}: a link to ")


def test_link_to_a_missing_folder_is_one_line_in_checker_and_loader(imagenet: Path, tmp_path: Path) -> None:
    """A class, or part of one, on a disk that is not mounted: refused, not trained on as a class or images fewer."""
    shutil.rmtree(imagenet / "train" / C0)
    link = imagenet / "train" / C0
    link.symlink_to(tmp_path / "unmounted" / C0, target_is_directory=True)
    (line,) = check.check("imagenet", imagenet).problems
    assert line == f"{link}: a link to {tmp_path / 'unmounted' / C0}, which does not exist (restore it or remove the " \
                   "link)"
    with pytest.raises(TreeError, match=f"^{link}: "):
        samples(imagenet / "train")
    part = imagenet / "val" / C0 / "part2"  # no image extension: a folder, as far as anyone can tell
    part.symlink_to(tmp_path / "unmounted" / "part2", target_is_directory=True)
    with pytest.raises(TreeError, match=f"^{part}: a link to "):
        samples(imagenet / "val")


def test_16bit_grayscale_is_scaled_not_clipped(imagenet: Path) -> None:
    path = imagenet / "train" / C0 / "deep.png"
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250  # Pillow's own conversion: nearly all white
    rgb = np.asarray(load_rgb(path)).astype(float)
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 2  # the ramp, in 8 bits
    assert check.check("imagenet", imagenet, full=True).problems == []  # read correctly: not a problem


def test_float_image_is_refused_by_both(imagenet: Path) -> None:
    path = imagenet / "val" / C0 / "float.tif"
    Image.fromarray(np.random.default_rng(0).random((32, 32), dtype=np.float32)).save(path)
    assert Image.open(path).mode == "F"
    (line,) = check.check("imagenet", imagenet).problems  # found from the header
    assert line.startswith(f"{path}: pixel format 'F'") and "8-bit RGB" in line
    data = ImageFolderData(imagenet / "val", lambda img: img, seed=0, skip_bad=False)
    index = [p for p, _ in data.folder.samples].index(str(path))
    with pytest.raises(DataError) as info:
        data[index]
    assert str(info.value).startswith(f"{path}: pixel format 'F'") and "bad_images=skip" in str(info.value)
    assert ImageFolderData(imagenet / "val", None, seed=0, skip_bad=True)[index] == (None, -1)


def test_ade_listing_is_mmengines(ade: Path) -> None:
    """ade_images lists what MMSegmentation will read: the same as mmengine's list_dir_or_file (hidden files
    skipped, hidden and nested folders read)."""
    from mmengine import fileio

    img_dir = ade / "images" / "training"
    first = sorted(img_dir.glob("*.jpg"))[0]
    (img_dir / "._x.jpg").write_bytes(b"AppleDouble")
    (img_dir / "sub").mkdir()
    shutil.copy(first, img_dir / "sub" / "nested.jpg")
    (img_dir / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, img_dir / ".ipynb_checkpoints" / "copy.jpg")
    theirs = sorted(fileio.list_dir_or_file(str(img_dir), list_dir=False, suffix=".jpg", recursive=True))
    assert ade_images(img_dir) == theirs and "._x.jpg" not in theirs


def test_ade_hidden_folder_and_orphan_mask_are_reported(ade: Path) -> None:
    img_dir, ann_dir = ade / "images" / "training", ade / "annotations" / "training"
    first = sorted(img_dir.glob("*.jpg"))[0]
    (img_dir / ".ipynb_checkpoints").mkdir()
    shutil.copy(first, img_dir / ".ipynb_checkpoints" / first.name)
    shutil.copy(ann_dir / f"{first.stem}.png", ann_dir / "lost.png")
    (img_dir / "._x.jpg").write_bytes(b"AppleDouble")  # skipped by MMSegmentation too: no problem
    problems = check.check("ade20k", ade).problems
    assert [p.split(": ")[0] for p in problems] == [str(img_dir / ".ipynb_checkpoints"),
                                                    str(img_dir / ".ipynb_checkpoints" / f"{first.stem}.png"
                                                        ).replace("images", "annotations"),
                                                    str(ann_dir / "lost.png")]
    assert "MMSegmentation reads" in problems[0] and "mask without an image" in problems[2]


def test_ade_symlink_loop_is_one_line(ade: Path) -> None:
    link = ade / "images" / "validation" / "loop"
    link.symlink_to(link.parent, target_is_directory=True)
    problems = check.check("ade20k", ade).problems
    assert len(problems) == 1 and problems[0].startswith(f"{link}: links to ")



LISTED_ONCE = """
import sys
from pathlib import Path

import torch.distributed as dist

from classification import data

dist.init_process_group("gloo")
rank, root = dist.get_rank(), Path(sys.argv[1])
said = open(Path(sys.argv[2]) / f"rank{rank}.txt", "w")  # a file per rank: two ranks' lines on one pipe interleave
if rank == 1:  # this rank must not list nor judge: its view of the tree would be its own
    data.list_split = lambda split: (_ for _ in ()).throw(AssertionError(f"rank 1 listed {split}"))
    data.synthetic_problem = lambda root, allowed: None
listed = data.listed_once(root, allow_synthetic=True)
print("listed", repr([listed["train"].classes, list(listed["train"].samples), list(listed["val"].samples)]),
      file=said)
for where, allowed in ((root / "absent", True), (root, False)):  # rank 0's refusals: every rank's
    try:
        data.listed_once(where, allow_synthetic=allowed)
    except data.DataError as e:
        print("error", e, file=said)
"""


def test_rank_0_lists_the_tree_once_and_every_rank_gets_its_listing(imagenet: Path, tmp_path: Path) -> None:
    """Under torchrun only rank 0 walks the tree (1.33 M names at ImageNet size, every rank at once before) and the
    other ranks get its listing, so every rank indexes the same files; a tree rank 0 cannot list or refuses
    (generated data not allowed) is every rank's one-line error, not a hang in the broadcast."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / "listed_once.py"
    script.write_text(LISTED_ONCE)
    listing = [ImageFolderData(imagenet / "train", None, seed=0, skip_bad=False).classes,
               *(list(ImageFolderData(imagenet / split, None, seed=0, skip_bad=False).folder.samples)
                 for split in ("train", "val"))]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
                          str(script), str(imagenet), str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stdout + out.stderr
    absent = f"error {imagenet / 'absent' / 'train'}: no such folder; point --data-root at the ImageFolder holding " \
             f"train/ and val/"
    generated = f"error {synthetic_problem(imagenet, False)}"
    for rank in (0, 1):
        said = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert said == [f"listed {listing!r}", absent, generated], (rank, said)
