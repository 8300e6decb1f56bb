"""Generation of the embedded datasets: layout, counts, label spaces, determinism, CLI errors."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datakit import make
from datakit.render import BACKGROUND_IDS, CATEGORIES, IGNORE_ID, SHAPES, TEXTURES, VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent
TINY = make.SCALES["tiny"]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagenet_layout_and_counts(tiny_data: Path) -> None:
    for split, per_class in (("train", TINY.cls_train), ("val", TINY.cls_val)):
        folders = sorted(p.name for p in (tiny_data / "imagenet" / split).iterdir())
        assert folders == sorted(c.name for c in CATEGORIES[:TINY.cls_classes])
        for name in folders:
            files = sorted((tiny_data / "imagenet" / split / name).glob("*.jpg"))
            assert len(files) == per_class
            with Image.open(files[0]) as im:
                assert im.mode == "RGB" and im.size == (64, 64)


def test_voc_layout_counts_and_annotations(tiny_data: Path) -> None:
    devkit = tiny_data / "VOCdevkit"
    lists = {}
    for year, split in (("VOC2007", "trainval"), ("VOC2007", "test"), ("VOC2012", "trainval")):
        lists[year, split] = (devkit / year / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    assert len(lists["VOC2007", "trainval"]) == len(lists["VOC2012", "trainval"]) == TINY.voc_trainval
    assert len(lists["VOC2007", "test"]) == TINY.voc_test
    assert not set(lists["VOC2007", "trainval"]) & set(lists["VOC2007", "test"])
    assert not (devkit / "VOC2012" / "ImageSets" / "Main" / "test.txt").exists()
    n_objects = n_difficult = 0
    for (year, _), ids in lists.items():
        for image_id in ids:
            ann = ET.parse(devkit / year / "Annotations" / f"{image_id}.xml").getroot()
            with Image.open(devkit / year / "JPEGImages" / f"{image_id}.jpg") as im:
                size = im.size
            assert ann.findtext("filename") == f"{image_id}.jpg"
            assert (int(ann.findtext("size/width")), int(ann.findtext("size/height"))) == size
            assert ann.findtext("size/depth") == "3"
            objects = ann.findall("object")
            assert objects, f"{image_id} has no objects"
            for obj in objects:
                assert obj.findtext("name") in VOC_CLASSES
                assert obj.findtext("pose") == "Unspecified"
                assert obj.findtext("truncated") in ("0", "1") and obj.findtext("difficult") in ("0", "1")
                x0, y0, x1, y1 = (int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))
                assert 1 <= x0 < x1 <= size[0] and 1 <= y0 < y1 <= size[1]  # 1-based, inside the image
                n_objects += 1
                n_difficult += obj.findtext("difficult") == "1"
    assert 0 < n_difficult < n_objects


def test_ade20k_layout_and_masks(tiny_data: Path) -> None:
    ade = tiny_data / "ADEChallengeData2016"
    allowed = {IGNORE_ID, *BACKGROUND_IDS.values(), *(c.ade_id for c in CATEGORIES)}
    seen: set[int] = set()
    for split, prefix, count in (("training", "ADE_train", TINY.ade_train), ("validation", "ADE_val", TINY.ade_val)):
        images = sorted((ade / "images" / split).glob("*.jpg"))
        assert [p.name for p in images] == [f"{prefix}_{i:08d}.jpg" for i in range(1, count + 1)]
        for img in images:
            with Image.open(img) as im, Image.open(ade / "annotations" / split / f"{img.stem}.png") as mask:
                assert mask.mode == "L" and mask.size == im.size
                values = set(np.unique(np.asarray(mask)).tolist())
            assert values <= allowed
            seen |= values
    assert seen & {c.ade_id for c in CATEGORIES}, "no vocabulary object in any mask"
    assert seen & set(BACKGROUND_IDS.values()) and IGNORE_ID in seen


def test_data_json_records_seed_scale_and_mappings(tiny_data: Path) -> None:
    meta = json.loads((tiny_data / "data.json").read_text())
    assert meta["seed"] == 0 and meta["scale"] == "tiny"
    assert [(c["name"], c["voc_class"], c["ade_id"]) for c in meta["categories"]] == \
        [(c.name, c.voc_class, c.ade_id) for c in CATEGORIES]
    assert meta["sets"]["imagenet"]["classes"] == [c.name for c in CATEGORIES[:TINY.cls_classes]]
    assert "circle_stripes" in (tiny_data / "README.txt").read_text()
    assert not (tiny_data / ".make_data.tmp").exists()


def test_vocabulary_is_shared_and_learnable() -> None:
    assert len(CATEGORIES) == len(VOC_CLASSES) == 20
    assert len({(c.shape, c.texture) for c in CATEGORIES}) == 20
    ade_ids = {c.ade_id for c in CATEGORIES}
    assert len(ade_ids) == 20 and not ade_ids & set(BACKGROUND_IDS.values())
    # The ImageFolder subsets must force both cues: distinct shapes, and every texture in the small set.
    small = CATEGORIES[:make.SCALES["small"].cls_classes]
    assert len({c.shape for c in small}) == len(small) == len(SHAPES)
    assert {c.texture for c in small} == set(TEXTURES)
    tiny = CATEGORIES[:TINY.cls_classes]
    assert len({c.shape for c in tiny}) == len({c.texture for c in tiny}) == len(tiny)


def test_same_seed_same_bytes_other_seed_differs(tiny_data: Path, tmp_path: Path) -> None:
    make.generate(tmp_path / "again", seed=0, scale="tiny", log=None)
    reference = _files(tiny_data)
    assert _files(tmp_path / "again") == reference
    make.generate(tmp_path / "other", seed=1, scale="tiny", log=None)
    other = _files(tmp_path / "other")
    assert other.keys() == reference.keys()
    images = [k for k in reference if k.endswith((".jpg", ".png"))]
    assert sum(other[k] != reference[k] for k in images) == len(images)


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "imagenet" / "keep.txt"
    marker.parent.mkdir()
    marker.write_text("earlier results")
    assert make.main(["--out", str(tmp_path), "--sets", "imagenet", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and str(tmp_path / "imagenet") in err[0]
    assert marker.read_text() == "earlier results"
    assert make.main(["--out", str(tmp_path), "--sets", "imagenet", "--force"]) == 0
    out = capsys.readouterr().out
    assert "imagenet:" in out and "make_data: wrote" in out
    assert not marker.exists() and (tmp_path / "imagenet" / "train" / CATEGORIES[0].name).is_dir()


@pytest.mark.parametrize("args", [["--scale", "huge"], ["--seed", "-1"], ["--seed", "x"], []])
def test_cli_bad_arguments_one_line(args: list[str], tmp_path: Path) -> None:
    out = [] if not args else ["--out", str(tmp_path / "d")]
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_data.py"), *out, *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "d").exists()


def test_scenes_draw_only_the_scale_categories() -> None:
    """`scene_classes` limits VOC / ADE20K objects to the first N categories (small: the 10 it classifies)."""
    from datakit.render import image_rng, render_detection, render_segmentation

    assert make.SCALES["small"].scene_classes == make.SCALES["small"].cls_classes == 10
    seen_det, seen_seg = set(), set()
    for i in range(30):
        seen_det |= {o.category.index for o in render_detection(image_rng(0, 99, i), 96, 128, categories=3).objects}
        scene = render_segmentation(image_rng(0, 98, i), 96, 96, categories=3)
        seen_seg |= set(np.unique(scene.labels).tolist())
    assert seen_det == {0, 1, 2}
    objects_ids = {c.ade_id for c in CATEGORIES}
    assert seen_seg & objects_ids == {c.ade_id for c in CATEGORIES[:3]}
    assert seen_seg - objects_ids <= set(BACKGROUND_IDS.values()) | {IGNORE_ID}
