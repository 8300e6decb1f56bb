"""Export of a classifier as an mm backbone: the pinned mmdet / mmseg backbones loaded with it compute what timm does.

The reference is the timm classifier itself (stem + layer1..4 run by hand), compared with the mm backbones built
by the installed packages' registries, loaded strictly and through mmengine's Pretrained init.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from classification.checkpoint import save_checkpoint
from classification.config import Config
from classification.models import build_model
from classification.variants import VARIANTS, get_variant
from export.files import BACKBONE_PTH, BACKBONE_ST, META, export_to_timm, load_export
from export.layout import ExportError, mm_to_timm_key, reference_mm_shapes, strip_wrapper_prefixes, timm_to_mm_key
from export.trained import export_backbone

REPO = Path(__file__).resolve().parents[1]
HAS_MM = all(importlib.util.find_spec(m) is not None for m in ("mmdet", "mmseg", "mmengine"))
needs_mm = pytest.mark.skipif(not HAS_MM, reason="mmdet/mmseg not installed (tools/setup_env.sh)")
TOL = 1e-4  # max abs difference allowed between timm's and mm's stage outputs (fp32, eval mode)
NUM_CLASSES = 5
EMA_VARIANT = "D"  # the one fake run that also keeps EMA weights (each checkpoint copy costs ~100 MB of disk)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine parameters and running statistics, so that a wrong or missing buffer shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.2 + 0.4 * torch.rand(n, generator=g))  # < 1: activations stay O(1-10)
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model.eval()


def classifier(variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Config(variant=variant)
    model = build_model(variant, NUM_CLASSES, zero_gamma=False, init="timm", mean=cfg.mean, std=cfg.std)
    return randomize_(model, seed)


def timm_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        outs.append(x)
    return outs


def max_diff(a: list[torch.Tensor], b: tuple[torch.Tensor, ...]) -> float:
    assert len(a) == len(b) == 4
    for u, v in zip(a, b):
        assert u.shape == v.shape
    return max((u - v).abs().max().item() for u, v in zip(a, b))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch 1 at 64x64 gains nothing from intra-op threads; on a shared 2-core box their spin-waits halve speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(VARIANTS))
def run(request, tmp_path_factory) -> SimpleNamespace:
    """A fake classification run dir (the trainer's checkpoint format) of one variant, and its export."""
    variant = request.param
    root = tmp_path_factory.mktemp(f"run{variant}")
    cfg = Config(variant=variant, name=f"r50{variant.lower()}_test", ema_decay=0.9 if variant == EMA_VARIANT else 0.0,
                 epochs=1)  # finished: last.pth is at its final epoch
    raw = classifier(variant, seed=1)
    ema = classifier(variant, seed=2) if variant == EMA_VARIANT else None
    history = [dict(epoch=1, top1=40.0, top5=90.0, ema_top1=45.0 if ema else None, ema_top5=None)]
    run_dir = root / "run"
    save_checkpoint(run_dir / "last.pth", model=raw.state_dict(), ema=ema.state_dict() if ema else None,
                    optimizer={}, scaler={}, scheduler={}, epoch=1, step=0, history=history, best_top1=40.0,
                    config=cfg.to_dict(), num_classes=NUM_CLASSES, classes=[f"c{i}" for i in range(NUM_CLASSES)],
                    world_size=1)
    out = root / "export"
    meta = export_backbone(run_dir, out)  # default: last.pth, raw weights (EMA only when asked)
    return SimpleNamespace(variant=variant, cfg=cfg, run_dir=run_dir, out=out, meta=meta, model=raw, ema=ema,
                           root=root)


# -------------------------------------------------------------------------------------------------------------
# The export itself (torch + timm only)
# -------------------------------------------------------------------------------------------------------------


def test_key_mapping():
    # D (and C): timm's conv1 Sequential + bn1 -> mm's stem Sequential(conv, bn, relu) x 3
    assert [timm_to_mm_key(f"conv1.{i}.weight", "D") for i in (0, 1, 3, 4, 6)] == [
        f"stem.{i}.weight" for i in (0, 1, 3, 4, 6)]
    assert timm_to_mm_key("bn1.running_var", "C") == "stem.7.running_var"
    assert timm_to_mm_key("layer3.0.downsample.2.weight", "D") == "layer3.0.downsample.2.weight"
    assert timm_to_mm_key("fc.weight", "D") is None
    for variant in "AB":  # plain 7x7 stem: same names
        assert timm_to_mm_key("conv1.weight", variant) == "conv1.weight"
        assert timm_to_mm_key("bn1.weight", variant) == "bn1.weight"
    for variant in VARIANTS:  # the inverse
        for key in reference_mm_shapes(variant):
            assert timm_to_mm_key(mm_to_timm_key(key, variant), variant) == key
    t = torch.zeros(1)
    assert strip_wrapper_prefixes({"module._orig_mod.layer1.0.conv1.weight": t}) == {"layer1.0.conv1.weight": t}


def test_meta_and_files(run):
    v = get_variant(run.variant)
    meta = json.loads((run.out / META).read_text())
    assert meta == run.meta
    assert {p.name for p in run.out.iterdir()} >= {BACKBONE_PTH, BACKBONE_ST, META}
    assert (meta["variant"], meta["mm_type"], meta["mm_style"]) == (v.name, v.mm_type, v.mm_style)
    assert meta["mean"] == run.cfg.mean and meta["std"] == run.cfg.std and meta["color_order"] == "RGB"
    assert (meta["weights"], meta["checkpoint"], meta["source_epoch"]) == ("raw", "last.pth", 1)  # also with EMA
    assert meta["source_top1"] == 40.0 and meta["top1_from"] == "last.pth history, epoch 1, top1"
    assert meta["source_checkpoint"] == str((run.run_dir / "last.pth").resolve()) and len(meta["sha256"]) == 64
    assert (meta["source_kind"], meta["library"]) == ("trained", "bot-toolkit")
    assert meta["config"] == run.cfg.to_dict() and meta["arm"] == run.cfg.name
    assert meta["export_format_version"] == 1
    # backbone.pth: weights_only-loadable, same tensors as the safetensors file, no head
    pth = torch.load(run.out / BACKBONE_PTH, map_location="cpu", weights_only=True)
    state, _ = load_export(run.out)
    assert pth["meta"] == meta and meta["num_keys"] == len(state) == len(pth["state_dict"])
    load_export(run.out, source="pth")  # checks backbone.pth's tensors against meta's hash, as for the safetensors
    assert not any(k.startswith("fc.") for k in state)
    exported = {timm_to_mm_key(k, run.variant): t for k, t in run.model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(exported[k], t) for k, t in state.items())


def test_export_round_trip_reproduces_logits(run, x):
    timm_model = build_model(run.variant, NUM_CLASSES, zero_gamma=False, init="timm", mean=run.cfg.mean,
                             std=run.cfg.std)
    timm_model.load_state_dict(export_to_timm(run.out), strict=True)
    with torch.no_grad():
        assert torch.equal(timm_model.eval()(x), run.model(x))


def test_ema_weights_are_an_opt_in(run, x, tmp_path):
    if run.variant != EMA_VARIANT:
        with pytest.raises(ExportError, match="no EMA weights.*raw weights are the default"):
            export_backbone(run.run_dir, tmp_path / "e", weights="ema")
        return
    meta = export_backbone(run.run_dir, tmp_path / "ema", weights="ema")
    assert meta["weights"] == "ema" and meta["source_top1"] == 45.0 and meta["top1_from"].endswith("ema_top1")
    model = build_model(run.variant, NUM_CLASSES, zero_gamma=False, init="timm", mean=run.cfg.mean, std=run.cfg.std)
    model.load_state_dict(export_to_timm(tmp_path / "ema"), strict=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), run.ema(x))


def test_default_is_the_final_epoch_raw_weights_best_is_an_opt_in(tmp_path):
    """The paper reports final weights: with best.pth (an earlier epoch) and EMA weights in the run, the default
    export is last.pth's raw model, tensor for tensor; --checkpoint best is recorded with its epoch and top-1."""
    variant = "B"
    cfg = Config(variant=variant, name="r50b_test", ema_decay=0.9, epochs=2)
    run_dir = tmp_path / "run"
    last, best, ema = classifier(variant, seed=3), classifier(variant, seed=4), classifier(variant, seed=5)
    history = [dict(epoch=1, top1=50.0, ema_top1=48.0), dict(epoch=2, top1=45.0, ema_top1=47.0)]
    common = dict(optimizer={}, scaler={}, scheduler={}, step=0, best_top1=50.0, config=cfg.to_dict(),
                  num_classes=NUM_CLASSES, classes=[f"c{i}" for i in range(NUM_CLASSES)], world_size=1)
    save_checkpoint(run_dir / "best.pth", model=best.state_dict(), ema=ema.state_dict(), epoch=1, history=history[:1],
                    **common)
    save_checkpoint(run_dir / "last.pth", model=last.state_dict(), ema=ema.state_dict(), epoch=2, history=history,
                    **common)
    meta = export_backbone(run_dir, tmp_path / "default")
    state, _ = load_export(tmp_path / "default")
    want = {timm_to_mm_key(k, variant): t for k, t in last.state_dict().items() if not k.startswith("fc.")}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in state)
    assert (meta["checkpoint"], meta["weights"], meta["source_epoch"], meta["source_top1"]) == ("last.pth", "raw", 2,
                                                                                               45.0)
    meta = export_backbone(run_dir, tmp_path / "best", checkpoint="best")
    assert (meta["checkpoint"], meta["weights"], meta["source_epoch"], meta["source_top1"]) == ("best.pth", "raw", 1,
                                                                                               50.0)
    assert torch.equal(load_export(tmp_path / "best")[0]["layer1.0.conv1.weight"], best.layer1[0].conv1.weight)
    meta = export_backbone(run_dir, tmp_path / "best_ema", checkpoint="best", weights="ema")
    assert (meta["weights"], meta["source_top1"]) == ("ema", 48.0)
    with pytest.raises(ExportError, match=r"--checkpoint best picks a file of a run dir"):
        export_backbone(run_dir / "last.pth", tmp_path / "x", checkpoint="best")
    (run_dir / "best.pth").unlink()
    with pytest.raises(ExportError, match=r"best\.pth: no such checkpoint in this run dir; .*use last\.pth"):
        export_backbone(run_dir, tmp_path / "y", checkpoint="best")


# -------------------------------------------------------------------------------------------------------------
# Against the pinned mmdet / mmseg
# -------------------------------------------------------------------------------------------------------------


# Which (variant, library) pairs also load through mmengine's init_cfg Pretrained (its init_weights() takes about a
# second on CPU, mostly logging a mean of every tensor): each library twice; the CLI test adds both for B.
THROUGH_MMENGINE = {("A", "mmdet"), ("B", "mmseg"), ("C", "mmdet"), ("D", "mmseg")}


@needs_mm
@pytest.mark.parametrize("library", ["mmdet", "mmseg"])
def test_mm_backbone_equals_timm(run, x, library, record_property):
    from export.mm_check import build_mm_backbone, check_export_matches, load_into, verify_backbone_loaded

    state, meta = load_export(run.out)
    diffs = {}
    with torch.no_grad():
        want = timm_stages(run.model, x)
        # strictly, into a randomly initialised backbone built by the pinned package's registry
        strict = build_mm_backbone(meta, library)
        # the mapping of export/layout.py is the package's own layout, key for key, shape for shape
        assert {k: tuple(t.shape) for k, t in strict.state_dict().items()} == reference_mm_shapes(run.variant)
        check_export_matches(state, strict)
        load_into(strict, state)
        strict.eval()  # mm's ResNet.train() returns None: no chaining
        diffs["strict"] = max_diff(want, strict(x))
        if run.variant == "A":
            # A and B share every key and shape: only meta's mm_style ('caffe') puts the stride where A has it
            as_b = load_into(build_mm_backbone(dict(meta, variant="B"), library), state)
            as_b.eval()
            assert max_diff(want, as_b(x)) > 1e-2
        if (run.variant, library) in THROUGH_MMENGINE:  # as the detection / segmentation stages load it
            pretrained = build_mm_backbone(meta, library, checkpoint=run.out / BACKBONE_PTH)
            pretrained.init_weights()
            assert verify_backbone_loaded(pretrained, run.out)["tensors_checked"] == len(state)
            pretrained.eval()
            diffs["init_cfg"] = max_diff(want, pretrained(x))
    record_property("max_abs_diff", max(diffs.values()))
    print(f"\nResNet-50-{run.variant} {library} {type(strict).__name__}: max |timm - mm| "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL


@needs_mm
@pytest.mark.parametrize("run", ["C", "D"], indirect=True)  # mmseg's dilated FCN backbones: ResNetV1c / ResNetV1d
def test_mmseg_dilated_equals_timm_output_stride_8(run, x, record_property):
    """mmseg's FCN backbone (dilations 1,1,2,4; strides 1,2,1,1; contract_dilation) vs timm's output_stride=8."""
    from export.mm_check import build_mm_backbone, load_into

    v = get_variant(run.variant)
    state, meta = load_export(run.out)
    os8 = timm.create_model(v.timm_name, num_classes=NUM_CLASSES, output_stride=8)
    os8.load_state_dict(run.model.state_dict(), strict=True)
    os8.eval()
    mm = load_into(build_mm_backbone(meta, "mmseg", dilated=True), state)
    mm.eval()
    with torch.no_grad():
        got = mm(x)
        if v.avg_down:
            # A design difference of the two libraries, not of the weights: in a stride-1 dilated stage timm's D
            # shortcut keeps a 2x2 stride-1 average pool (AvgPool2dSame), mmseg's ResLayer an AvgPool2d(1, 1),
            # i.e. an identity. With the pool, layer3/layer4 differ; without it they are equal.
            assert max_diff(timm_stages(os8, x), got) > 1e-2
            for stage in (os8.layer3, os8.layer4):
                assert type(stage[0].downsample[0]).__name__ == "AvgPool2dSame"
                stage[0].downsample[0] = nn.Identity()
        diff = max_diff(timm_stages(os8, x), got)
    assert got[3].shape[-1] == x.shape[-1] // 8
    record_property("max_abs_diff", diff)
    print(f"\nResNet-50-{run.variant} mmseg dilated {type(mm).__name__}: max |timm os8 - mm| {diff:.3g}")
    assert diff <= TOL


# -------------------------------------------------------------------------------------------------------------
# Corrupted exports and backbones that did not load
# -------------------------------------------------------------------------------------------------------------


def corrupt(run, dest: Path, edit_state=None, edit_meta=None) -> Path:
    """A copy of run's export with its state dict and/or meta.json edited."""
    dest.mkdir()
    state, meta = load_export(run.out)
    if edit_state:
        state = dict(state)
        edit_state(state)
        save_file(state, dest / BACKBONE_ST)
    else:
        os.link(run.out / BACKBONE_ST, dest / BACKBONE_ST)  # read-only use: no 100 MB copy
    meta = json.loads(json.dumps(meta))
    if edit_meta:
        edit_meta(meta)
    (dest / META).write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize("run", ["C"], indirect=True)
def test_corrupted_exports_are_refused(run, tmp_path):

    def rename(s):
        s["layer1.0.conv1.weightX"] = s.pop("layer1.0.conv1.weight")

    def reshape(s):
        s["layer2.0.conv2.weight"] = s["layer2.0.conv2.weight"].reshape(128, 128, 9, 1).contiguous()

    def perturb(s):
        s["layer4.2.bn3.running_var"] = s["layer4.2.bn3.running_var"] + 1

    def wrong_variant(m):
        m["variant"] = "D"

    def wrong_variant_and_config(m):
        m["variant"], m["mm_type"], m["config"]["variant"] = "D", "ResNetV1d", "D"

    def wrong_version(m):
        m["export_format_version"] = 2

    cases = [
        (dict(edit_state=rename), r"missing 1 key\(s\): layer1\.0\.conv1\.weight; unexpected 1 key\(s\): "
                                  r"layer1\.0\.conv1\.weightX"),
        (dict(edit_state=reshape), r"wrong shape: layer2\.0\.conv2\.weight \(128, 128, 9, 1\) != \(128, 128, 3, 3\)"),
        (dict(edit_state=perturb), r"tensor values do not match meta\.json"),
        (dict(edit_meta=wrong_variant), r"meta variant 'D' does not match its config's variant 'C'"),
        # a C export labelled D throughout: D's shortcut is downsample.1/.2 (pool first), C's downsample.0/.1
        (dict(edit_meta=wrong_variant_and_config), r"missing 20 key\(s\): layer1\.0\.downsample\.2\.bias.*"
                                                    r"unexpected 20 key\(s\): layer1\.0\.downsample\.0\.weight"),
        (dict(edit_meta=wrong_version), r"export_format_version 2 is not supported"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(ExportError, match=message) as e:
            load_export(corrupt(run, tmp_path / f"case{i}", **edit))
        assert "\n" not in str(e.value)

    with pytest.raises(ExportError, match=r"no such export dir"):
        load_export(tmp_path / "nowhere")
    broken = tmp_path / "no_meta"
    broken.mkdir()
    with pytest.raises(ExportError, match=r"meta\.json: missing"):
        load_export(broken)
    (broken / META).write_text((run.out / META).read_text())
    with pytest.raises(ExportError, match=r"backbone\.safetensors: missing"):
        load_export(broken)


@pytest.mark.parametrize("run", ["C"], indirect=True)
def test_a_damaged_export_of_an_unchanged_source_is_re_exported(run, tmp_path):
    """meta.json matching the source is not enough: a damaged file taken for up to date failed every stage, whose
    "rerun tools/export_backbone.py" found it up to date again."""
    from export.refresh import refresh_export

    out = tmp_path / "e"
    assert refresh_export(str(run.run_dir), out)[0] == "exported"
    with open(out / BACKBONE_ST, "r+b") as f:  # a partial copy / a full disk
        f.truncate(1000)
    what = refresh_export(str(run.run_dir), out)[0]
    assert what.startswith("re-exported: ") and "backbone.safetensors: cannot read" in what, what
    (out / BACKBONE_PTH).unlink()
    what = refresh_export(str(run.run_dir), out)[0]
    assert what.startswith("re-exported: ") and "backbone.pth: missing" in what, what
    for fmt in ("safetensors", "pth"):
        assert load_export(out, fmt)[1]["state_sha256"] == run.meta["state_sha256"]
    assert refresh_export(str(run.run_dir), out)[0] == "up to date"


@pytest.mark.parametrize("run", ["C"], indirect=True)
def test_a_kill_at_any_point_of_the_export_swap_loses_no_other_file(run, tmp_path, monkeypatch):
    """Other files in the export dir (a study's stage.log beside the export; everything when --out is a run dir)
    survive a SIGKILL at every point of the swap: the next run's recover leaves them in ``out``, with the previous or
    the new export. Moved into the new export before the two renames, a kill between them lost them with the stale
    ``.NAME.new-PID`` that recover deletes (and a run dir without an export was not even restored)."""
    import shutil

    from export import refresh
    from export import source as sources
    from export.refresh import export_and_swap, recover, refresh_export

    def an_export(dest: Path, tag: str) -> dict:
        shutil.copytree(run.out, dest)
        meta = json.loads((dest / META).read_text())
        (dest / META).write_text(json.dumps(dict(meta, test_tag=tag)))  # which export ``out`` holds
        return meta

    def fake_export(src, new):
        return an_export(new, "new")

    class KilledAt:  # export/refresh.py's ``os``, whose Nth os.replace is never reached (SIGKILL: no cleanup runs)
        def __init__(self, n: int):
            self.n = n

        def replace(self, a, b):
            self.n -= 1
            if self.n == 0:
                raise SystemExit("killed")
            os.replace(a, b)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(sources, "export_source", fake_export)
    others = {"stage.log": "line 1\nline 2\n", "logs/arm.log": "arm\n", "last.pth": "not a checkpoint"}
    for with_export in (True, False):  # an export with a stage.log beside it; a run dir exported for the first time
        n, killed = 0, True
        while killed:
            n += 1
            out = tmp_path / f"case{int(with_export)}_{n}" / "e"
            if with_export:
                an_export(out, "old")
            for name, text in others.items():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                (out / name).write_text(text)
            monkeypatch.setattr(refresh, "os", KilledAt(n))
            try:
                export_and_swap(sources.as_source(str(run.run_dir)), out)
                killed = False
            except SystemExit:
                pass
            monkeypatch.setattr(refresh, "os", os)
            repairs = recover(out)
            where = f"killed before os.replace #{n}" if killed else "not killed"
            for name, text in others.items():
                assert (out / name).is_file() and (out / name).read_text() == text, (where, name, repairs)
            assert sorted(p.name for p in out.parent.iterdir()) == ["e"], (where, repairs)  # no sibling is left
            if with_export or (out / META).exists():
                assert load_export(out)[1]["test_tag"] in ("old", "new"), where
            assert killed or load_export(out)[1]["test_tag"] == "new"
        assert n == 2 + 3 + 1, n  # cut before each of the two renames and the three other entries' moves
    # what recover left is an export like any other: the next refresh finds it up to date
    monkeypatch.undo()
    assert refresh_export(str(run.run_dir), tmp_path / "case1_1" / "e")[0] == "up to date"


@needs_mm
@pytest.mark.parametrize("run", ["D"], indirect=True)
def test_check_export_matches_lists_keys(run):
    from export.mm_check import build_mm_backbone, check_export_matches

    state, meta = load_export(run.out)
    backbone = build_mm_backbone(meta, "mmdet")
    bad = dict(state)
    bad["stem.7.weightX"] = bad.pop("stem.7.weight")
    bad["layer3.0.conv1.weight"] = bad["layer3.0.conv1.weight"][:, :-1]
    with pytest.raises(ExportError, match=r"missing 1 key\(s\): stem\.7\.weight; unexpected 1 key\(s\): "
                                          r"stem\.7\.weightX; wrong shape: layer3\.0\.conv1\.weight"):
        check_export_matches(bad, backbone)
    # a D export cannot go into a C backbone (the shortcut's pool shifts the indices)
    with pytest.raises(ExportError, match=r"layer1\.0\.downsample\.2\.weight"):
        check_export_matches(state, build_mm_backbone(dict(meta, variant="C"), "mmseg"))


@needs_mm
@pytest.mark.parametrize("run", ["B"], indirect=True)
def test_verify_backbone_loaded_catches_what_mmengine_skips(run, tmp_path):
    from export.mm_check import build_mm_backbone, load_into, verify_backbone_loaded

    state, meta = load_export(run.out)
    # loaded, then re-initialised randomly: every tensor differs (BN running statistics reset too)
    fresh = load_into(build_mm_backbone(meta, "mmdet"), state)
    for m in fresh.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.reset_parameters()
    with pytest.raises(ExportError, match=r"ResNet does not hold .*: 318 of 318 tensors differ \(conv1\.weight, "
                                          r"bn1\.weight, .*set init_cfg=dict\(type='Pretrained'"):
        verify_backbone_loaded(fresh, run.out)
    # the silent failure: keys with a 'backbone.' prefix, which mmengine's strict=False load skips with a log line
    prefixed = tmp_path / "prefixed.pth"
    torch.save({"state_dict": {f"backbone.{k}": t for k, t in state.items()}}, prefixed)
    skipped = build_mm_backbone(meta, "mmseg", checkpoint=prefixed)
    skipped.init_weights()
    with pytest.raises(ExportError, match=r"tensors differ"):
        verify_backbone_loaded(skipped, state)
    # a single buffer off is named; a whole model with a .backbone is accepted
    loaded = load_into(build_mm_backbone(meta, "mmdet"), state)
    model = nn.Module()
    model.backbone = loaded
    assert verify_backbone_loaded(model, run.out)["backbone_loaded"]
    with torch.no_grad():
        loaded.layer3[2].bn2.running_var += 1
    with pytest.raises(ExportError, match=r": 1 of \d+ tensors differ \(layer3\.2\.bn2\.running_var\)"):
        verify_backbone_loaded(model, state)


# -------------------------------------------------------------------------------------------------------------
# The CLI
# -------------------------------------------------------------------------------------------------------------


def cli_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("export_backbone_cli", REPO / "tools" / "export_backbone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.mark.parametrize("run", ["B"], indirect=True)
def test_cli(run, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main([str(run.run_dir), "--out", str(out)]) == 0  # in-process: mm is imported already
    stdout = capsys.readouterr().out
    assert "raw weights of last.pth (default: final epoch, raw weights, epoch 1 of 1)" in stdout
    assert {BACKBONE_PTH, BACKBONE_ST, META} <= {p.name for p in out.iterdir()}
    if HAS_MM:
        assert stdout.count("strict check passed") == 2 and stdout.count("stage outputs within") == 2, stdout
    # as a script, from another working directory
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_backbone.py"), str(tmp_path / "missing_run"),
                           "--out", str(tmp_path / "o")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "missing_run" in proc.stderr
    assert cli_main([str(run.run_dir), "--out", str(tmp_path / "o"), "--weights", "ema"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no EMA weights" in err and "raw weights are the default" in err


@pytest.mark.parametrize("run", ["B"], indirect=True)
def test_an_unfinished_run_is_refused_unless_asked_and_its_epoch_is_said(run, tmp_path, capsys):
    """A preempted or still-training run's last.pth passed silently for the final weights: the export tool and
    resolve (what tools/transfer_det.sh / transfer_seg.sh call) refuse it in one line naming the checkpoint and both
    ways out; --allow-unfinished exports it, saying its epoch in meta.json and in the output."""
    from export.resolve import resolve

    ckpt = torch.load(run.run_dir / "last.pth", map_location="cpu", weights_only=True)
    ckpt["config"]["epochs"] = 120
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    torch.save(dict(ckpt, epoch=37), unfinished / "last.pth")
    for refuse in (lambda: resolve(str(unfinished)), lambda: export_backbone(unfinished, tmp_path / "e")):
        with pytest.raises(ExportError) as e:
            refuse()
        line = str(e.value)
        assert line.startswith(f"{unfinished / 'last.pth'}: epoch 37 of 120, unfinished") and "\n" not in line
        assert "tools/train_cls.sh" in line
        assert f"tools/export_backbone.py {unfinished} --out DIR --allow-unfinished" in line
    assert not (unfinished / "export").exists()

    out = tmp_path / "cli"
    assert cli_main([str(unfinished), "--out", str(out), "--allow-unfinished"]) == 0
    assert "(as asked, epoch 37 of 120, unfinished)" in capsys.readouterr().out
    meta = json.loads((out / META).read_text())
    assert (meta["source_epoch"], meta["source_epochs"], meta["source_step"], meta["source_finished"]) == (37, 120, 0,
                                                                                                           False)
    assert cli_main([str(unfinished), "--out", str(out)]) == 1  # not "up to date": asked for once, not for good
    assert "epoch 37 of 120, unfinished" in capsys.readouterr().err

    torch.save(dict(ckpt, epoch=120, step=3), unfinished / "last.pth")  # saved mid-epoch at a preemption
    with pytest.raises(ExportError, match=r"epoch 120 of 120, mid-epoch, unfinished"):
        resolve(str(unfinished))
    torch.save(dict(ckpt, epoch=120, step=0), unfinished / "last.pth")
    assert resolve(str(unfinished)) == str(unfinished / "export")
    assert f"exported {unfinished} (epoch 120 of 120) -> {unfinished / 'export'}" in capsys.readouterr().err


@pytest.mark.parametrize("run", ["B"], indirect=True)
def test_a_finished_runs_export_stays_up_to_date_after_its_checkpoints_were_removed(run, tmp_path, capsys):
    """docs/preemption.md: a run is complete by its summary.json, also after its checkpoints were deleted to save
    space. A rerun of the export (a study's rerun) finds its export up to date by what meta.json and the summary both
    record, its files still verified; an export of another run, a damaged one or none is one line, not a pass."""
    run_dir, out = tmp_path / "run", tmp_path / "export"
    run_dir.mkdir()
    os.link(run.run_dir / "last.pth", run_dir / "last.pth")  # the module's run stays whole
    summary = {"stage": "classification", "arm": run.cfg.name, "seed": run.cfg.seed, "config": run.cfg.to_dict(),
               "metrics": {"top1": 40.0, "ema_top1": None}, "history": [dict(epoch=1, top1=40.0, top5=90.0)]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    export_backbone(run_dir, out)
    (run_dir / "last.pth").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli_main([str(run_dir), "--out", str(out)]) == 0
    assert f"{out}: up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    def refused(out_dir: Path) -> str:
        assert cli_main([str(run_dir), "--out", str(out_dir)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    (run_dir / "summary.json").write_text(json.dumps({**summary, "metrics": {"top1": 41.0}}))  # another run's
    assert "does not match its summary.json" in refused(out) and "last.pth: no such checkpoint" in refused(out)
    (run_dir / "summary.json").write_text(json.dumps({**summary, "config": {**summary["config"], "seed": 1}}))
    assert "does not match its summary.json" in refused(out)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert "holds no export" in refused(tmp_path / "none")
    (out / "head.safetensors").write_bytes(b"damaged")
    assert "cannot be exported again" in refused(out)
