"""The dataset checkers: generated trees pass; each kind of breakage is reported naming the exact file."""

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datakit import check, check_cli
from datakit.render import CATEGORIES

REPO = Path(__file__).resolve().parent.parent
SET_DIRS = {"imagenet": "imagenet", "voc": "VOCdevkit", "ade20k": "ADEChallengeData2016"}
C0, C1, C2 = (c.name for c in CATEGORIES[:3])


@pytest.mark.parametrize("kind", list(check.CHECKS))
def test_generated_trees_pass(kind: str, tiny_data: Path, capsys: pytest.CaptureFixture) -> None:
    root = tiny_data / SET_DIRS[kind]
    assert check.CHECKS[kind](root) == []
    assert check.CHECKS[kind](root, quick=True) == []
    assert check_cli.main([kind, str(root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith(f"check_data {kind}: ok")


# ---- breakers: each breaks one thing in a copy of the set and returns the path the problem must name


def _first(folder: Path, pattern: str = "*") -> Path:
    return sorted(folder.glob(pattern))[0]


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _edit_xml(path: Path, edit: Callable[[ET.Element], None]) -> Path:
    tree = ET.parse(path)
    edit(tree.getroot())
    tree.write(path)
    return path


def _voc_xml(root: Path, year: str = "VOC2007", split: str = "trainval") -> Path:
    first_id = (root / year / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]
    return root / year / "Annotations" / f"{first_id}.xml"


def _voc_jpeg(root: Path, year: str) -> Path:
    return root / year / "JPEGImages" / _voc_xml(root, year).with_suffix(".jpg").name


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _empty_folder(folder: Path, pattern: str) -> Path:
    for f in folder.glob(pattern):
        f.unlink()
    return folder


def _set_box(coord: str, value: Callable[[ET.Element], int | str]) -> Callable[[ET.Element], None]:
    def edit(ann: ET.Element) -> None:
        ann.find(f"object/bndbox/{coord}").text = str(value(ann))
    return edit


def _loose_val(root: Path) -> Path:
    for d in list((root / "val").iterdir()):
        for f in d.iterdir():
            f.rename(root / "val" / f.name)
        d.rmdir()
    return root / "val"


def _partly_sorted_val(root: Path) -> Path:
    """An interrupted valprep.sh: the class folders exist, but some images still lie in val/ itself."""
    f = _first(root / "val" / C0, "*.jpg")
    f.rename(root / "val" / f.name)
    return root / "val"


def _garbage(root: Path) -> Path:
    path = root / "val" / C2 / "broken.jpg"
    path.write_bytes(b"this is not a jpeg")
    return path


def _no_mask(root: Path) -> Path:
    mask = _first(root / "annotations" / "training", "*.png")
    mask.unlink()
    return mask


def _mask_value(root: Path, value: int = 200) -> Path:
    mask = _first(root / "annotations" / "validation", "*.png")
    arr = np.asarray(Image.open(mask)).copy()
    arr[0, 0] = value
    Image.fromarray(arr).save(mask)
    return mask


def _mask_size(root: Path) -> Path:
    mask = _first(root / "annotations" / "training", "*.png")
    with Image.open(mask) as im:
        small = im.resize((im.width // 2, im.height // 2), Image.NEAREST)
    small.save(mask)
    return mask


def _mask_rgb(root: Path) -> Path:
    mask = _first(root / "annotations" / "training", "*.png")
    with Image.open(mask) as im:
        rgb = im.convert("RGB")
    rgb.save(mask)
    return mask


def _delete(path: Path) -> Path:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    return path


CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    # ImageFolder
    "imagenet-missing-val": ("imagenet", lambda r: _delete(r / "val")),
    "imagenet-empty-class": ("imagenet", lambda r: _empty_folder(r / "train" / C0, "*")),
    "imagenet-class-missing-in-val": ("imagenet", lambda r: _delete(r / "val" / C1)),
    "imagenet-class-missing-in-train": ("imagenet", lambda r: _delete(r / "train" / C1)),
    "imagenet-truncated-jpeg": ("imagenet", lambda r: _truncate(_first(r / "train" / C0, "*.jpg"))),
    "imagenet-not-an-image": ("imagenet", _garbage),
    "imagenet-val-not-in-class-folders": ("imagenet", _loose_val),
    "imagenet-val-partly-sorted": ("imagenet", _partly_sorted_val),
    # Pascal VOC
    "voc-missing-xml": ("voc", lambda r: _delete(_voc_xml(r))),
    "voc-missing-jpeg": ("voc", lambda r: _delete(_voc_jpeg(r, "VOC2012"))),
    "voc-missing-list": ("voc", lambda r: _delete(r / "VOC2007" / "ImageSets" / "Main" / "test.txt")),
    "voc-missing-year": ("voc", lambda r: _delete(r / "VOC2012")),
    "voc-missing-annotations-dir": ("voc", lambda r: _delete(r / "VOC2012" / "Annotations")),
    "voc-invalid-xml": ("voc", lambda r: _write(_voc_xml(r, "VOC2007", "test"), "<annotation><size>")),
    "voc-missing-tag": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: a.find("object/bndbox").remove(
        a.find("object/bndbox/xmax")))),
    "voc-missing-size": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: a.remove(a.find("size")))),
    "voc-box-outside": ("voc", lambda r: _edit_xml(_voc_xml(r), _set_box(
        "xmax", lambda a: int(a.findtext("size/width")) + 10))),
    "voc-empty-box": ("voc", lambda r: _edit_xml(_voc_xml(r, "VOC2012"), _set_box(
        "ymax", lambda a: int(a.findtext("object/bndbox/ymin"))))),
    "voc-unknown-class": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: setattr(
        a.find("object/name"), "text", "unicorn"))),
    "voc-bad-difficult": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: setattr(
        a.find("object/difficult"), "text", "yes"))),
    "voc-size-mismatch": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: setattr(
        a.find("size/height"), "text", "999"))),
    # What MMDetection 3.3 (mmdet/datasets/xml_style.py) drops silently or stops on (an inf box is outside the image).
    "voc-class-name-spaces": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: setattr(
        a.find("object/name"), "text", f"\n\t\t{a.findtext('object/name')}\n\t"))),
    "voc-size-not-integer": ("voc", lambda r: _edit_xml(_voc_xml(r), lambda a: setattr(
        a.find("size/width"), "text", f"{a.findtext('size/width')}.0"))),
    "voc-box-nan": ("voc", lambda r: _edit_xml(_voc_xml(r), _set_box("xmin", lambda a: "nan"))),
    "voc-truncated-jpeg": ("voc", lambda r: _truncate(_first(r / "VOC2007" / "JPEGImages", "*.jpg"))),
    # ADE20K
    "ade-missing-mask": ("ade20k", _no_mask),
    "ade-mask-value-200": ("ade20k", _mask_value),
    "ade-mask-wrong-size": ("ade20k", _mask_size),
    "ade-mask-rgb": ("ade20k", _mask_rgb),
    "ade-truncated-image": ("ade20k", lambda r: _truncate(_first(r / "images" / "validation", "*.jpg"))),
    "ade-missing-annotation-split": ("ade20k", lambda r: _delete(r / "annotations" / "validation")),
    "ade-no-images": ("ade20k", lambda r: _empty_folder(r / "images" / "training", "*.jpg")),
}


@pytest.fixture
def copy_of(tiny_data: Path, tmp_path: Path) -> Callable[[str], Path]:
    def make(kind: str) -> Path:
        return Path(shutil.copytree(tiny_data / SET_DIRS[kind], tmp_path / SET_DIRS[kind]))
    return make


# Found only by decoding every pixel (--full); everything else is found from structure, headers and file ends too
# (a truncated image has no end marker: the header check decodes it, and says what --full says).
DECODE_ONLY = {"ade-mask-value-200"}


@pytest.mark.parametrize("case", list(CASES))
def test_breakage_is_reported(case: str, copy_of: Callable[[str], Path], capsys: pytest.CaptureFixture) -> None:
    kind, breaker = CASES[case]
    root = copy_of(kind)
    broken = breaker(root)
    problems = check.CHECKS[kind](root)
    assert problems, f"{case}: nothing reported"
    # One problem (or one per consequence) and every line names the broken path, in `path: what (fix)` form.
    for line in problems:
        assert line.startswith(f"{broken}: ") and line.endswith(")"), line
    assert check.check(kind, root).problems == ([] if case in DECODE_ONLY else problems)  # headers only
    assert check_cli.main([kind, str(root), "--full"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[:-1] == problems
    assert out[-1].startswith(f"check_data {kind}: {len(problems)} problem")


def test_missing_root(tmp_path: Path) -> None:
    for fn in check.CHECKS.values():
        (line,) = fn(tmp_path / "nowhere")
        assert line.startswith(f"{tmp_path / 'nowhere'}: folder not found (")


def test_quick_mode_still_checks_files_and_labels(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("voc")
    missing = _delete(_voc_xml(root))
    unknown = _edit_xml(_voc_xml(root, "VOC2012"), lambda a: setattr(a.find("object/name"), "text", "Person"))
    problems = check.check_voc(root, quick=True)
    assert [p.split(": ")[0] for p in problems] == [str(missing), str(unknown)]


def test_many_problems_are_capped_summary_last(copy_of: Callable[[str], Path],
                                               capsys: pytest.CaptureFixture) -> None:
    root = copy_of("imagenet")
    for f in sorted((root / "train" / C0).glob("*.jpg"))[:4]:
        _truncate(f)
    assert check_cli.main(["imagenet", str(root), "--max-lines", "2", "--full"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and "2 more problems" in out[2] and out[-1].startswith("check_data imagenet: 4 problems")


def test_cli_subprocess_exit_codes(tiny_data: Path, copy_of: Callable[[str], Path]) -> None:
    tool = [sys.executable, str(REPO / "tools" / "check_data.py")]
    ok = subprocess.run([*tool, "ade20k", str(tiny_data / SET_DIRS["ade20k"])], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and "ok" in ok.stdout.splitlines()[-1]
    root = copy_of("ade20k")
    mask = _mask_value(root)
    bad = subprocess.run([*tool, "ade20k", str(root), "--full"], capture_output=True, text=True, timeout=60)
    lines = bad.stdout.strip().splitlines()
    assert bad.returncode == 1 and lines[0].startswith(f"{mask}: ") and "200" in lines[0]
    assert lines[-1].startswith("check_data ade20k: 1 problem in")
    usage = subprocess.run([*tool, "coco", str(root)], capture_output=True, text=True, timeout=60)
    assert usage.returncode != 0 and len(usage.stderr.strip().splitlines()) == 1


def test_parallel_check_gives_the_same_lines_in_the_same_order(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("ade20k")
    _truncate(_first(root / "images" / "validation", "*.jpg"))
    _mask_value(root)
    _mask_rgb(root)
    _delete(sorted((root / "annotations" / "training").glob("*.png"))[-1])
    for full in (False, True):  # threads for headers, processes for decoding
        one = check.check("ade20k", root, full=full, jobs=1)
        assert len(one.problems) == (4 if full else 3)  # headers: all but the mask value
        two = check.check("ade20k", root, full=full, jobs=2)
        assert (two.problems, two.files) == (one.problems, one.files)


def test_cli_full_shows_progress_and_remembers_a_pass(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from datakit import check_cache

    monkeypatch.setenv("DATA_CHECK_CACHE", str(tmp_path / "cache"))
    root = tiny_data / SET_DIRS["voc"]
    calls: list[int] = []
    rep = check.check("voc", root, full=True, jobs=2, progress=calls.append)
    assert calls[0] < 0 and calls[-1] == -calls[0] and calls[1:] == sorted(calls[1:])  # total first, then counts
    assert rep.problems == [] and rep.full
    assert check_cli.main(["voc", str(root), "--full", "--jobs", "2"]) == 0
    assert check_cache.lookup("voc", root, check_cache.Manifest.of(root))["depth"] == "full"


def test_cli_stats_the_tree_only_for_a_pass_that_is_looked_up(tiny_data: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest stats every file (1.33 M for ImageNet): only voc and ade20k passes are ever looked up, and
    only while the cache is on."""
    from datakit import check_cache

    def no_manifest(root):
        raise AssertionError(f"Manifest.of({root}) computed for nothing")

    monkeypatch.setattr(check_cache.Manifest, "of", no_manifest)
    assert check_cli.main(["imagenet", str(tiny_data / SET_DIRS["imagenet"])]) == 0
    monkeypatch.setenv("DATA_CHECK_CACHE", "off")
    assert check_cli.main(["voc", str(tiny_data / SET_DIRS["voc"])]) == 0


def test_cli_jobs_0_is_the_cpus_the_process_may_use(tiny_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under taskset or a Slurm CPU set, all of the machine's cores would oversubscribe the ones it has."""
    import os

    jobs: list[int] = []
    real = check_cli.check
    monkeypatch.setattr(check_cli, "check", lambda *a, **kw: jobs.append(kw["jobs"]) or real(*a, **kw))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert check_cli.main(["ade20k", str(tiny_data / SET_DIRS["ade20k"])]) == 0 and jobs == [1]
