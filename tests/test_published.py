"""Published ResNet-50 weights as backbones (timm:NAME, torchvision:WEIGHTS, weights files), without a download:
the weights are random tensors in the libraries' own architectures, the hubs' download functions are replaced by
a copy of a local file, and the exports are checked against the pinned mm backbones output by output."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from safetensors.torch import save_file
from test_export import randomize_  # one BN randomiser for both files (pytest puts tests/ on sys.path)
from torch import nn

from export import resolve as source
from export import source as sources
from export.files import BACKBONE_PTH, file_sha256, load_export
from export.layout import ExportError, timm_to_mm_key
from export.published import detect_variant, lookup
from export.source import export_source
from study import cli
from study.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
HAS_MM = all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmseg", "mmengine"))
needs_mm = pytest.mark.skipif(not HAS_MM, reason="mmdet/mmseg not installed (tools/setup_env.sh)")
TOL = 1e-4  # max abs difference of stage outputs (fp32, eval mode); 0.0 is typical on CPU
IMAGENET_MEAN = [123.675, 116.28, 103.53]  # (0.485, 0.456, 0.406) x 255: what timm and torchvision state
IMAGENET_STD = [58.395, 57.12, 57.375]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def timm_d(tmp_path_factory):
    """timm's resnet50d with random weights, saved as safetensors without num_batches_tracked (as the hub's
    GluonCV conversions are): (model, file)."""
    torch.manual_seed(0)
    model = randomize_(timm.create_model("resnet50d", pretrained=False), seed=1)
    path = tmp_path_factory.mktemp("timm_d") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")},
              path)
    return model, path


@pytest.fixture(scope="module")
def tv_b(tmp_path_factory):
    """torchvision's resnet50 with random weights, saved with torch.save as torchvision's own files are."""
    torch.manual_seed(0)
    model = randomize_(torchvision.models.resnet50(weights=None), seed=2)
    path = tmp_path_factory.mktemp("tv_b") / "resnet50-0676ba61.pth"
    torch.save(model.state_dict(), path)
    return model, path


def stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    from export.mm_check import classifier_stages

    return classifier_stages(model, x)


def check_mm(out: Path, model: nn.Module, x: torch.Tensor) -> float:
    """Both libraries' backbones, loaded through mmengine's Pretrained init as the stages load them: every tensor
    equals the export, and the stage outputs equal the source model's (timm's or torchvision's own)."""
    from export.mm_check import build_mm_backbone, verify_backbone_loaded

    state, meta = load_export(out)
    worst = 0.0
    for library in ("mmdet", "mmseg"):
        backbone = build_mm_backbone(meta, library, checkpoint=out / BACKBONE_PTH)
        backbone.init_weights()
        assert verify_backbone_loaded(backbone, state)["tensors_checked"] == len(state)
        backbone.eval()
        with torch.no_grad():
            want, got = stages(model, x), backbone(x)
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(want, got, strict=True)])
    return worst


# -------------------------------------------------------------------------------------------------------------
# Weights files
# -------------------------------------------------------------------------------------------------------------


def test_weights_file_from_timm_resnet50d(timm_d, x, tmp_path):
    model, path = timm_d
    meta = export_source(str(path), tmp_path / "e")  # D detected from the keys (deep stem, pooled shortcut)
    assert (meta["variant"], meta["mm_type"], meta["source_kind"], meta["library"]) == ("D", "ResNetV1d", "file",
                                                                                         None)
    assert meta["sha256"] == file_sha256(path) and meta["source"] == str(path.resolve())
    assert meta["source_top1"] is None and "assumed" in meta["mean_std_from"]
    assert meta["mean"] == IMAGENET_MEAN and meta["std"] == IMAGENET_STD and meta["num_classes"] == 1000
    state, _ = load_export(tmp_path / "e")
    want = {timm_to_mm_key(k, "D"): t for k, t in model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(state[k], want[k]) for k in want if not k.endswith("num_batches_tracked"))
    if HAS_MM:
        diff = check_mm(tmp_path / "e", model, x)
        print(f"\ntimm resnet50d file -> mm ResNetV1d: max |timm - mm| {diff:.3g}")
        assert diff <= TOL


def test_weights_file_from_torchvision_resnet50(tv_b, x, tmp_path):
    model, path = tv_b
    with pytest.raises(ExportError, match=r"fit ResNet-50-A and -B alike.*give --variant B") as e:
        export_source(str(path), tmp_path / "auto")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ExportError, match=r"do not fit ResNet-50-C \(missing \d+: conv1\.0\.weight"):
        export_source(str(path), tmp_path / "c", variant="C")
    meta = export_source(str(path), tmp_path / "b", variant="B")
    assert (meta["variant"], meta["mm_style"], meta["sha256"]) == ("B", "pytorch", file_sha256(path))
    if HAS_MM:
        diff = check_mm(tmp_path / "b", model, x)  # against torchvision's own model
        print(f"\ntorchvision resnet50 file -> mm ResNet: max |torchvision - mm| {diff:.3g}")
        assert diff <= TOL


def test_keys_matching_no_variant_are_named(timm_d):
    model, path = timm_d
    state = dict(model.state_dict())
    state["layer5.0.weight"] = state.pop("layer4.2.conv3.weight")
    with pytest.raises(ExportError, match=r"^f\.pth: the keys match no ResNet-50 variant \(A/B, C, D\); closest is "
                                          r"D: missing 1: layer4\.2\.conv3\.weight; unexpected 1: layer5\.0\.weight"):
        detect_variant(state, None, "f.pth")
    mm_layout = {f"backbone.{k}": v for k, v in model.state_dict().items()}  # an mm checkpoint is not a source
    with pytest.raises(ExportError, match=r"match no ResNet-50 variant.*unexpected \d+: backbone\.bn1\.bias"):
        detect_variant(mm_layout, None, "mm.pth")


def test_options_that_do_not_apply_are_refused(timm_d, tmp_path):
    _, path = timm_d
    with pytest.raises(ExportError, match=r"--weights choose among a training run's"):
        export_source(str(path), tmp_path / "w", weights="ema")
    with pytest.raises(ExportError, match=r"--variant C contradicts the weights' architecture \(ResNet-50-D\)"):
        export_source("timm:resnet50d.gluon_in1k", tmp_path / "v", variant="C")
    assert not (tmp_path / "w").exists() and not (tmp_path / "v").exists()


# -------------------------------------------------------------------------------------------------------------
# The hubs, with their download functions replaced by a local file
# -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hf(timm_d, monkeypatch):
    """huggingface_hub.hf_hub_download (what timm's loader calls) returning the local timm file."""
    import huggingface_hub

    calls = []

    def download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(timm_d[1])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


@pytest.fixture
def fake_torch_hub(tv_b, monkeypatch, tmp_path):
    """torch.hub.download_url_to_file copying the local torchvision file; an empty TORCH_HOME."""
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copyfile(tv_b[1], dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def test_timm_hub_source(timm_d, fake_hf, x, tmp_path):
    meta = export_source("timm:resnet50d.gluon_in1k", tmp_path / "e")
    assert fake_hf == [("timm/resnet50d.gluon_in1k", "model.safetensors", None)]  # timm's preferred file
    assert (meta["source_kind"], meta["library"], meta["source"], meta["source_name"]) == (
        "timm", "timm", "timm:resnet50d.gluon_in1k", "resnet50d.gluon_in1k")
    assert (meta["variant"], meta["sha256"], meta["source_url"]) == ("D", file_sha256(timm_d[1]),
                                                                     "timm/resnet50d.gluon_in1k")
    assert meta["source_top1"] == 79.08 and "results-imagenet.csv" in meta["top1_from"]
    assert meta["mean"] == IMAGENET_MEAN and meta["std"] == IMAGENET_STD and "pretrained_cfg" in meta["mean_std_from"]
    assert meta["arm"] == "resnet50d.gluon_in1k" and meta["config"] is None
    state, _ = load_export(tmp_path / "e")  # read back: no training config, still checked against the variant
    assert torch.equal(state["stem.0.weight"], timm_d[0].conv1[0].weight)
    if HAS_MM:
        assert check_mm(tmp_path / "e", timm_d[0], x) <= TOL


def test_torchvision_hub_source(tv_b, fake_torch_hub, tmp_path):
    meta = export_source("torchvision:ResNet50_Weights.IMAGENET1K_V1", tmp_path / "e")
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert fake_torch_hub == [(url, "0676ba61")]  # torch hub's check of the hash in the file name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-0676ba61.pth"
    assert str(cached).startswith(str(tmp_path)) and meta["source_file"] == str(cached.resolve())
    assert (meta["variant"], meta["library"], meta["sha256"]) == ("B", "torchvision", file_sha256(tv_b[1]))
    assert meta["source_top1"] == 76.13 and meta["top1_from"] == (
        "torchvision ResNet50_Weights.IMAGENET1K_V1.meta['_metrics']['ImageNet-1K']['acc@1']")
    assert meta["mean"] == IMAGENET_MEAN and meta["std"] == IMAGENET_STD
    export_source("torchvision:ResNet50_Weights.IMAGENET1K_V1", tmp_path / "again")
    assert len(fake_torch_hub) == 1  # from the cache


def test_offline_timm_falls_back_to_the_cached_pickle(timm_d, monkeypatch):
    """Offline, with a cache an older timm filled with pytorch_model.bin: used, as timm's own loader does, instead
    of failing on model.safetensors, the first name tried."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from export.published import fetch

    tried = []

    def offline_with_bin_cached(repo_id, filename, revision=None, **kwargs):
        tried.append(filename)
        if filename == "pytorch_model.bin":
            return str(timm_d[1])
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has "
                                      "been disabled.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_with_bin_cached)
    assert fetch(lookup("timm:resnet50d.gluon_in1k")) == timm_d[1]
    assert tried == ["model.safetensors", "pytorch_model.bin"]


def test_parallel_jobs_sharing_torch_home_all_get_the_weights(monkeypatch, tmp_path):
    """One study job per seed, sharing TORCH_HOME, fetch the same weights at once: all of them end with the cached
    file (a fixed X.pth.partial was moved away by one job under the others, which failed blaming the network)."""
    import uuid

    from export.published import fetch

    pub = lookup("torchvision:ResNet50_Weights.IMAGENET1K_V1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-0676ba61.pth"
    got, started = {}, []

    def download(url, dst, hash_prefix=None, progress=True):  # torch hub's: a unique temp file, moved onto dst
        tmp = f"{dst}.{uuid.uuid4().hex}.partial"
        Path(tmp).write_bytes(b"weights")
        shutil.move(tmp, dst)
        if not started:  # job A's download is done; job B starts and finishes before A goes on
            started.append("B")
            got["B"] = fetch(pub)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    got["A"] = fetch(pub)
    assert got == {"A": cached, "B": cached} and cached.read_bytes() == b"weights"
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary file left

    def lost_race(url, dst, hash_prefix=None, progress=True):  # another job's file lands while this one fails
        Path(dst).write_bytes(b"theirs")
        raise ConnectionResetError("[Errno 104] Connection reset by peer")

    cached.unlink()
    monkeypatch.setattr(torch.hub, "download_url_to_file", lost_race)
    assert fetch(pub) == cached and cached.read_bytes() == b"theirs"


def test_offline_is_one_line_naming_the_cache_variable(monkeypatch, tmp_path, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):  # what hf_hub_download raises with no network and an empty cache
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic has "
                                      "been disabled.")

    def unreachable(url, dst, hash_prefix=None, progress=True):  # what urllib raises without network
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for src, variable, fill in [
        ("timm:resnet50c.gluon_in1k", "HF_HOME", "timm.create_model('resnet50c.gluon_in1k', pretrained=True)"),
        ("torchvision:ResNet50_Weights.IMAGENET1K_V2", "TORCH_HOME",
         "torchvision.models.get_weight('ResNet50_Weights.IMAGENET1K_V2').get_state_dict()"),
    ]:
        assert cli_main([src, "--out", str(tmp_path / "o")]) == 1
        captured = capsys.readouterr()
        assert captured.out == f"exporting {src} -> {tmp_path / 'o'}\n", captured.out  # then nothing written
        assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: {src}: ")
        assert f"set {variable} to" in captured.err and fill in captured.err
        assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "torch_home").rglob("*.pth*"))  # no partial download left in the cache


def test_bad_published_names_list_the_choices():
    cases = [
        ("timm:resnet101.gluon_in1k", r"resnet101 is not one of the paper's ResNet-50 variants; use resnet50 \(B\), "
                                      r"resnet50c \(C\), resnet50d \(D\)"),
        ("timm:resnet50d.nope", r"no such pretrained weights; its resnet50d weights are: .*resnet50d\.gluon_in1k"),
        ("torchvision:ResNet18_Weights.IMAGENET1K_V1", r"only ResNet50_Weights"),
        ("torchvision:ResNet50_Weights.NOPE", r"choose one of ResNet50_Weights\.IMAGENET1K_V1, "),
    ]
    for src, message in cases:
        with pytest.raises(ExportError, match=message) as e:
            lookup(src)
        assert str(e.value).startswith(src) and "\n" not in str(e.value)


def test_timm_default_tag_and_its_normalisation():
    """A bare architecture is timm's default weights, named with their tag; their mean/std is timm's for them."""
    pub = lookup("timm:resnet50d")
    cfg = timm.models.get_pretrained_cfg("resnet50d")
    assert pub.source == f"timm:resnet50d.{cfg.tag}" and pub.variant == "D"
    assert list(pub.mean) == pytest.approx([m * 255 for m in cfg.mean])
    assert list(pub.std) == pytest.approx([s * 255 for s in cfg.std])


def cli_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("export_backbone_cli", REPO / "tools" / "export_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


# -------------------------------------------------------------------------------------------------------------
# export/resolve.py: what tools/transfer_{det,seg}.sh export, and when they export again
# -------------------------------------------------------------------------------------------------------------


def test_transfer_source_exports_published_weights_once(timm_d, fake_hf, tmp_path, capsys):
    exports = tmp_path / "exports"
    out = source.resolve("timm:resnet50d.gluon_in1k", exports=exports)
    assert out == str(exports / "timm_resnet50d.gluon_in1k") and len(fake_hf) == 1
    assert source.resolve("timm:resnet50d.gluon_in1k", exports=exports) == out and len(fake_hf) == 1  # reused
    f = source.resolve(str(timm_d[1]), exports=exports)
    assert Path(f).name == f"model-{file_sha256(timm_d[1])[:12]}" and load_export(f)[1]["variant"] == "D"
    assert source.main(["timm:resnet50d.gluon_in1k", "--variant", "B", "--exports", str(exports)]) == 1
    assert "contradicts" in capsys.readouterr().err


def save_run(run: Path, seed: int) -> None:
    """A finished ResNet-50-B run dir of the trainer with one checkpoint: last.pth at epoch ``seed`` of ``seed``,
    top-1 10 x ``seed``."""
    from classification.checkpoint import save_checkpoint
    from classification.config import Config
    from classification.models import build_model

    cfg = Config(variant="B", name="r50b_test", epochs=seed)
    torch.manual_seed(seed)
    model = build_model("B", 3, zero_gamma=False, init="timm", mean=cfg.mean, std=cfg.std)
    save_checkpoint(run / "last.pth", model=model.state_dict(), ema=None, optimizer={}, scaler={}, scheduler={},
                    epoch=seed, step=0, history=[dict(epoch=seed, top1=10.0 * seed)], best_top1=0.0,
                    config=cfg.to_dict(), num_classes=3, classes=["a", "b", "c"], world_size=1)


def test_transfer_source_reexports_a_run_whose_checkpoint_changed(tmp_path, monkeypatch):
    """<run>/export is reused while it holds the run's last.pth; a newer checkpoint is exported beside the old export,
    which stays valid until the new one is complete, then swapped in."""
    run = tmp_path / "run"

    def save(seed: int) -> None:
        save_run(run, seed)

    save(1)
    out = Path(source.resolve(str(run)))
    assert out == run / "export" and load_export(out)[1]["source_top1"] == 10.0
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert source.resolve(str(run)) == str(out) and (out / "meta.json").stat().st_mtime_ns == mtime  # up to date

    save(2)  # training went on: the export beside it is stale
    real = sources.export_source

    def interrupted(src, out_dir, **kwargs):
        real(src, out_dir, **kwargs)
        assert load_export(out)[1]["source_top1"] == 10.0  # the old export is intact while the new one is written
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "export_source", interrupted)  # export/refresh.py reads it per call
    with pytest.raises(KeyboardInterrupt):
        source.resolve(str(run))
    assert load_export(out)[1]["source_top1"] == 10.0  # and no half-written sibling stays (the lock file does)
    assert sorted(p.name for p in run.iterdir()) == [".export.lock", "export", "last.pth"]
    monkeypatch.setattr(sources, "export_source", real)
    assert source.resolve(str(run)) == str(out)
    _, meta = load_export(out)
    assert meta["source_top1"] == 20.0 and meta["sha256"] == file_sha256(run / "last.pth")
    assert sorted(p.name for p in run.iterdir()) == [".export.lock", "export", "last.pth"]  # nothing else beside it


def test_an_option_that_does_not_fit_the_source_is_refused_even_when_its_export_is_up_to_date(timm_d, tmp_path):
    """--variant for a run, --checkpoint / --weights for a weights file: refused whether or not an up-to-date export
    exists (used or refused, never ignored); the export stays as it was."""
    from export.refresh import refresh_export

    run = tmp_path / "run"
    save_run(run, 1)
    assert refresh_export(str(run), tmp_path / "e_run")[0] == "exported"
    with pytest.raises(ExportError, match="--variant is for weights files"):
        refresh_export(str(run), tmp_path / "e_run", variant="B")
    with pytest.raises(ExportError, match="weights must be 'ema' or 'raw'"):
        refresh_export(str(run), tmp_path / "e_run", weights="best")
    assert refresh_export(str(timm_d[1]), tmp_path / "e_file")[0] == "exported"
    for option in ("checkpoint", "weights"):
        with pytest.raises(ExportError, match=f"--{option} choose among a training run's|drop --{option}"):
            refresh_export(str(timm_d[1]), tmp_path / "e_file", **{option: "best" if option == "checkpoint" else "ema"})
    assert refresh_export(str(run), tmp_path / "e_run")[0] == "up to date"
    assert refresh_export(str(timm_d[1]), tmp_path / "e_file")[0] == "up to date"


def test_transfer_scripts_pass_the_source_and_variant(tmp_path):
    """tools/transfer_det.sh hands SRC and --variant to export/resolve.py, which stops a contradiction before
    any training (and before any download)."""
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", str(REPO / "tools/transfer_det.sh"), "timm:resnet50d.gluon_in1k", "--variant", "B"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: timm:resnet50d.gluon_in1k: --variant B contradicts")
    assert not (tmp_path / "work_dirs").exists()


# -------------------------------------------------------------------------------------------------------------
# configs/studies/published.yaml
# -------------------------------------------------------------------------------------------------------------

PUBLISHED_ARMS = {  # arm -> (source, variant, top-1 the library states)
    "b_standard": ("torchvision:ResNet50_Weights.IMAGENET1K_V1", "B", 76.13),
    "gluon_b": ("timm:resnet50.gluon_in1k", "B", 77.58),
    "gluon_c": ("timm:resnet50c.gluon_in1k", "C", 78.016),
    "gluon_d": ("timm:resnet50d.gluon_in1k", "D", 79.08),
    "rsb_d_a1": ("timm:resnet50d.a1_in1k", "D", 80.73),
    "tv_b_v2": ("torchvision:ResNet50_Weights.IMAGENET1K_V2", "B", 80.858),
}


def test_published_study_arms_resolve_to_variants_and_normalisations(monkeypatch):
    from export.mm_check import data_preprocessor_kwargs

    monkeypatch.chdir(REPO)  # the study's paths are relative to the checkout
    study = load_spec("configs/studies/published.yaml")
    assert {a.name: a.backbone for a in study.arms.values() if a.backbone} == {
        arm: src for arm, (src, _, _) in PUBLISHED_ARMS.items()}
    assert study.arms["random_init"].backbone is None and not study.arms["random_init"].pretrained
    assert "imagenet" not in study.data and study.defines("export") and not study.defines("classification")
    for arm, (src, variant, top1) in PUBLISHED_ARMS.items():
        pub = lookup(src)
        assert (pub.variant, pub.top1) == (variant, top1), arm
        # every one of these weights expects the ImageNet statistics, which are not the toolkit's default
        assert list(pub.mean) == IMAGENET_MEAN and list(pub.std) == IMAGENET_STD, arm
        meta = dict(color_order="RGB", mean=list(pub.mean), std=list(pub.std))
        assert data_preprocessor_kwargs(meta) == dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr_to_rgb=True)


def test_published_study_dry_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["configs/studies/published.yaml", "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    # export + detection + segmentation per published arm; the control runs the last two.
    assert len(lines) == 3 * len(PUBLISHED_ARMS) + 2
    exports = [ln for ln in lines if "tools/export_backbone.py" in ln]
    assert [ln.split("tools/export_backbone.py ")[1].split(" --out")[0] for ln in exports] == [
        src for src, _, _ in PUBLISHED_ARMS.values()]
    gluon_d = [ln for ln in lines if "detection.train" in ln and "gluon_d" in ln]
    assert len(gluon_d) == 1 and f"--export {tmp_path / 'w' / 'gluon_d' / 'seed0' / 'export'}" in gluon_d[0]
    assert not (tmp_path / "w").exists()


def test_the_frozen_variant_dry_runs_beside_the_fine_tuned_study_sharing_its_exports(monkeypatch, tmp_path, capsys):
    """published_frozen.yaml: the same backbones with fixed features, into the same work dir: the same export dirs,
    the downstream runs in det_frozen/ and seg_frozen/ with --frozen-backbone, the protocol lines saying so; an arm's
    own frozen_backbone wins over its section's, and a non-boolean is refused naming the key."""
    monkeypatch.chdir(REPO)
    work = tmp_path / "w"
    runs = {}
    for study in ("published", "published_frozen"):
        assert cli.main([f"configs/studies/{study}.yaml", "--work-dir", str(work), "--dry-run"]) == 0
        runs[study] = capsys.readouterr().out.splitlines()
    fine = [ln for ln in runs["published"] if "detection.train" in ln and "--arm gluon_d " in ln]
    frozen = [ln for ln in runs["published_frozen"] if "detection.train" in ln and "--arm gluon_d " in ln]
    assert len(fine) == len(frozen) == 1 and "--frozen-backbone" in frozen[0] and "--frozen-backbone" not in fine[0]
    assert f"--work-dir {work / 'gluon_d' / 'seed0' / 'det_frozen'}" in frozen[0]
    assert f"--export {work / 'gluon_d' / 'seed0' / 'export'}" in frozen[0]  # the fine-tuned study's export
    exports = {study: [ln for ln in lines if "export_backbone.py" in ln] for study, lines in runs.items()}
    assert exports["published"] == exports["published_frozen"]
    protocol = [ln for ln in runs["published_frozen"] if ln.startswith("#   segmentation (pretrained arms, frozen)")]
    assert len(protocol) == 1 and protocol[0].endswith(", backbone frozen")
    assert not work.exists()

    study = yaml.safe_load((REPO / "configs/studies/published_frozen.yaml").read_text())
    study["arms"]["gluon_d"]["frozen_backbone"] = False
    (path := tmp_path / "mixed.yaml").write_text(yaml.safe_dump(study))
    assert cli.main([str(path), "--work-dir", str(work), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{work / 'gluon_d' / 'seed0' / 'det'} " in out and f"{work / 'gluon_c' / 'seed0' / 'det_frozen'} " in out
    study["segmentation"]["frozen_backbone"] = "yes"
    path.write_text(yaml.safe_dump(study))
    assert cli.main([str(path), "--work-dir", str(work), "--dry-run"]) == 2
    assert "segmentation.frozen_backbone: expected true or false, got 'yes'" in capsys.readouterr().err


def test_study_with_a_bad_backbone_gives_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    arms = {"x": {"backbone": "timm:resnet50d.nope"}}
    path.write_text(yaml.safe_dump({"data": {"voc": "v"}, "detection": {"config": str(
        REPO / "configs/detection/faster-rcnn_r50_c4_voc0712.py")}, "arms": arms}))
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: arms.x.backbone: timm:resnet50d.nope: ")
    path.write_text(json.dumps({"data": {"voc": "v"}, "detection": {"config": str(
        REPO / "configs/detection/faster-rcnn_r50_c4_voc0712.py")}, "arms": {"x": {
            "backbone": "timm:resnet50d.gluon_in1k", "classification": None}}}))
    assert cli.main([str(path), "--work-dir", str(tmp_path / "w"), "--dry-run"]) == 2
    assert "give either 'classification: RECIPE'" in capsys.readouterr().err


def test_study_runs_the_export_of_a_published_arm(timm_d, tmp_path, capsys):
    """A study mixing a weights-file arm with the control: the export stage runs tools/export_backbone.py on the
    file, and a rerun runs the same command (the export decides itself whether it is up to date)."""
    weights = tmp_path / "d.safetensors"
    shutil.copyfile(timm_d[1], weights)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"data": {"voc": str(tmp_path)}, "detection": {"config": str(
        REPO / "configs/detection/faster-rcnn_r50_c4_voc0712.py")}, "arms": {
            "mine": {"backbone": str(weights)}, "random_init": {"classification": None}}}))
    work = tmp_path / "w"
    assert cli.main([str(path), "--work-dir", str(work), "--only", "export", "--no-report"]) == 0
    meta = json.loads((work / "mine/seed0/export/meta.json").read_text())
    assert (meta["variant"], meta["source"], meta["sha256"]) == ("D", str(weights.resolve()), file_sha256(weights))
    assert json.loads((work / "study_status.json").read_text())[0]["status"] == "done"
    capsys.readouterr()
    assert cli.main([str(path), "--work-dir", str(work), "--only", "export", "--dry-run"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert f"tools/export_backbone.py {weights} --out {work / 'mine/seed0/export'}" in line
