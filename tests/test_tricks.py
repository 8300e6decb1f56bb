"""Each trick against an independent reference formula, on tiny inputs."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classification.config import ConfigError, load_config
from classification.models import build_model, zero_gamma_bns
from classification.tricks import (
    build_criterion,
    build_mixup,
    build_optimizer,
    build_scheduler,
    build_task,
    lr_at,
    param_groups,
)

REPO = Path(__file__).resolve().parents[1]
IPE = 10  # iterations per epoch in the schedule tests


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def cfg_with(**kv):
    return load_config(None, [f"{k}={v}" for k, v in kv.items()])


def reference_lr(i, *, peak, warmup, total, schedule, steps=(), gamma=0.1):
    """The paper's formulas, written independently: update i (0-based) is batch i + 1 of §3.1."""
    t = i + 1
    if t < warmup:
        return peak * t / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) * peak
    return peak * gamma ** len([s for s in steps if i >= s])


@pytest.mark.parametrize("schedule", ["step", "cosine"])
@pytest.mark.parametrize("warmup_epochs", [0, 2])
@pytest.mark.parametrize("batch,scaling", [(256, "linear"), (1024, "linear"), (64, "none")])
def test_lr_schedule_matches_closed_form(schedule, warmup_epochs, batch, scaling):
    cfg = cfg_with(schedule=schedule, warmup_epochs=warmup_epochs, global_batch=batch, device_batch=32,
                   lr_scaling=scaling, epochs=12, step_epochs="[4, 8]")
    peak = 0.1 * batch / 256 if scaling == "linear" else 0.1
    assert cfg.peak_lr == pytest.approx(peak)
    opt = build_optimizer(tiny_model(), cfg)
    sched = build_scheduler(opt, cfg, IPE)
    for i in [0, 1, 5, 19, 20, 21, 39, 40, 41, 60, 79, 80, 81, 119]:
        sched.step_update(num_updates=i + 1)
        want = reference_lr(i, peak=peak, warmup=warmup_epochs * IPE, total=12 * IPE, schedule=schedule,
                            steps=(40, 80))
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(want, abs=1e-12), (i, group["lr"], want)
        assert lr_at(cfg, IPE, i) == pytest.approx(want, abs=1e-12)


def test_linear_scaling_rule_numbers():
    # §3.1: 0.1 at batch 256, 0.4 at batch 1024, whatever the number of processes.
    assert cfg_with(lr_scaling="linear", global_batch=256).peak_lr == pytest.approx(0.1)
    assert cfg_with(lr_scaling="linear", global_batch=1024, device_batch=128).peak_lr == pytest.approx(0.4)


@pytest.mark.parametrize("recipe,world,line", [
    ("r50b_standard.yaml", 1, "global batch 256 = 1 x 32 x 8 accumulation steps, BN batch 32, peak lr 0.1"),
    ("r50b_standard.yaml", 2, "global batch 256 = 2 x 32 x 4 accumulation steps, BN batch 32, peak lr 0.1"),
    ("r50b_standard.yaml", 8, "global batch 256 = 8 x 32 x 1 accumulation steps, BN batch 32, peak lr 0.1"),
    ("r50d_cosine_ls_mixup.yaml", 1, "global batch 1024 = 1 x 128 x 8 accumulation steps, BN batch 128, peak lr 0.4"),
    ("r50d_cosine_ls_mixup.yaml", 4, "global batch 1024 = 4 x 128 x 2 accumulation steps, BN batch 128, peak lr 0.4"),
])
def test_paper_recipes_keep_their_global_batch_and_lr_on_any_gpu_count(recipe, world, line):
    cfg = load_config(REPO / "configs/classification" / recipe)
    assert cfg.batch_line(world) == line


def test_a_gpu_count_that_cannot_keep_the_batch_is_refused_naming_the_counts_that_can():
    cfg = load_config(REPO / "configs/classification/r50b_standard.yaml")
    for world in (3, 16):
        with pytest.raises(ConfigError, match=r"run on 1, 2, 4, 8 GPUs") as e:
            cfg.batch_plan(world)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="global_batch .* and device_batch"):
        load_config(None, ["batch_size=32"])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_loss_is_ce_against_smoothed_targets(eps):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    q = (1 - eps) * F.one_hot(y, 5).float() + eps / 5
    want = -(q * logits.log_softmax(1)).sum(1).mean()
    assert build_criterion(cfg_with(label_smoothing=eps))(logits, y).item() == pytest.approx(want.item(), rel=1e-6)


def test_mixup_targets_are_smoothed_convex_combinations():
    cfg = cfg_with(mixup_alpha=0.2, label_smoothing=0.1)
    mixup = build_mixup(cfg, num_classes=4)
    np.random.seed(0)
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    xm, t = mixup(x.clone(), y)
    assert torch.allclose(t.sum(1), torch.ones(6))
    q = 0.9 * F.one_hot(y, 4).float() + 0.1 / 4
    # Recover lambda from the targets, then check images and targets mix the same pairs (batch mode: i <-> flip).
    lam = ((t - q.flip(0)) / (q - q.flip(0) + 1e-12))[0, y[0]].item()
    assert 0 <= lam <= 1
    assert torch.allclose(t, lam * q + (1 - lam) * q.flip(0), atol=1e-6)
    assert torch.allclose(xm, lam * x + (1 - lam) * x.flip(0), atol=1e-5)


def test_mixup_lambda_one_is_identity():
    from timm.data.mixup import mixup_target

    y = torch.tensor([0, 2, 1, 1])
    t = mixup_target(y, num_classes=3, lam=1.0, smoothing=0.1)
    assert torch.allclose(t, 0.9 * F.one_hot(y, 3).float() + 0.1 / 3)
    mixup = build_mixup(cfg_with(mixup_alpha=0.2), num_classes=3)
    mixup._params_per_batch = lambda: (1.0, False)  # force lambda = 1
    x = torch.randn(4, 3, 2, 2)
    xm, t = mixup(x.clone(), y)
    assert torch.equal(xm, x) and torch.allclose(t, F.one_hot(y, 3).float())


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = nn.Parameter(torch.zeros(()))
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
        self.num_classes, self.in_chans = logits.shape[1], 3

    def forward(self, x):
        return self.logits + 0 * self.w


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_distillation_loss_is_ce_plus_t2_kl(T):
    torch.manual_seed(0)
    z, r, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    cfg = cfg_with(distill_temperature=T, distill_weight=1.0, task_weight=1.0)
    task = build_task(FixedLogits(z), cfg, FixedLogits(r), torch.device("cpu"))
    loss = task(torch.zeros(4, 3, 2, 2), y)["loss"]
    p_t, log_p_s = (r / T).softmax(1), (z / T).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    assert loss.item() == pytest.approx((F.cross_entropy(z, y) + T * T * kl).item(), rel=1e-5)


def test_distillation_term_is_zero_when_student_equals_teacher():
    z = torch.randn(4, 5)
    task = build_task(FixedLogits(z), cfg_with(distill_temperature=20.0, task_weight=0.0), FixedLogits(z.clone()),
                      torch.device("cpu"))
    assert abs(task(torch.zeros(4, 3, 2, 2), torch.tensor([0, 1, 2, 3]))["loss"].item()) < 1e-6


@pytest.mark.parametrize("variant", ["B", "D"])
def test_no_bias_decay_groups(variant):
    model = build_model(variant, 10, zero_gamma=False, init="timm", mean=[0, 0, 0], std=[1, 1, 1])
    cfg = cfg_with(no_bias_decay=True, weight_decay=1e-4)
    opt = build_optimizer(model, cfg)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))  # every parameter exactly once
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight":
                assert wd_of[id(p)] == 1e-4, f"{name}.{pname}"
            else:
                assert wd_of[id(p)] == 0.0, f"{name}.{pname}"
    # Off: the §2 baseline decays everything.
    groups = param_groups(model, cfg_with(no_bias_decay=False))
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4


@pytest.mark.parametrize("variant", ["A", "B", "C", "D"])
@pytest.mark.parametrize("init", ["xavier", "timm"])
def test_zero_gamma(variant, init):
    on = build_model(variant, 10, zero_gamma=True, init=init, mean=[0, 0, 0], std=[1, 1, 1])
    off = build_model(variant, 10, zero_gamma=False, init=init, mean=[0, 0, 0], std=[1, 1, 1])
    assert len(zero_gamma_bns(on)) == 16
    assert all(torch.all(w == 0) for w in zero_gamma_bns(on))
    assert all(torch.all(w == 1) for w in zero_gamma_bns(off))


def test_variants_differ_where_the_paper_says():
    m = {v: build_model(v, 10, zero_gamma=False, init="timm", mean=[0, 0, 0], std=[1, 1, 1]) for v in "ABCD"}
    for stage in ("layer2", "layer3", "layer4"):
        a, b = getattr(m["A"], stage)[0], getattr(m["B"], stage)[0]
        assert a.conv1.stride == (2, 2) and a.conv2.stride == (1, 1)  # A: stride in the 1x1
        assert b.conv1.stride == (1, 1) and b.conv2.stride == (2, 2)  # B: stride in the 3x3
        d = getattr(m["D"], stage)[0]
        assert isinstance(d.downsample[0], nn.AvgPool2d) and d.downsample[0].stride == 2  # D: avg-pool shortcut
        assert isinstance(getattr(m["C"], stage)[0].downsample[0], nn.Conv2d)
    assert isinstance(m["B"].conv1, nn.Conv2d) and m["B"].conv1.kernel_size == (7, 7)
    for v in "CD":  # three 3x3 convs (32, 32, 64) replace the 7x7 stem
        convs = [c for c in m[v].conv1 if isinstance(c, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and [c.out_channels for c in convs] == [32, 32, 64]
    x = torch.randn(1, 3, 64, 64)
    for model in m.values():
        assert model.eval()(x).shape == (1, 10)
        assert model.forward_features(x).shape == (1, 2048, 2, 2)


def test_xavier_init_is_applied():
    model = build_model("D", 10, zero_gamma=False, init="xavier", mean=[0, 0, 0], std=[1, 1, 1])
    w = model.layer3[1].conv2.weight
    fan_in, fan_out = w.shape[1] * 9, w.shape[0] * 9
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.fc.bias == 0)


def test_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lr'"):
        cfg_with(lr=0.1)
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        cfg_with(epochs=1.5)
    with pytest.raises(ConfigError, match="'schedule' must be one of"):
        cfg_with(schedule="linear")
    bad = tmp_path / "bad.yaml"
    bad.write_text("variant: D\nmixup: 0.2\n")
    with pytest.raises(ConfigError, match=f"{bad}: unknown key 'mixup'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="'zero_gamma' must be bool"):
        cfg_with(zero_gamma='"yes"')


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_first_fused_update_skipped_as_non_finite_leaves_no_momentum_behind(amp):
    """A fused SGD skipping its very first update in the kernel kept the momenta it had allocated uninitialised;
    now the first update skipped as non-finite leaves the optimizer untouched, and the next finite update equals a
    fresh optimizer's first one."""
    from classification.config import Config
    from classification.tricks import build_scaler, optimizer_step

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        return model, opt, build_scaler(Config(amp=amp), torch.device("cpu"))

    def update(model, opt, scaler, bad: bool):
        opt.zero_grad(set_to_none=True)
        loss = model(torch.ones(2, 4)).square().mean() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        return optimizer_step(opt, scaler, loss.detach()).item()

    model, opt, scaler = setup()
    assert update(model, opt, scaler, bad=True) == 1.0
    assert not opt.state  # no momentum buffer was made
    update(model, opt, scaler, bad=False)
    fresh_model, fresh_opt, fresh_scaler = setup()
    update(fresh_model, fresh_opt, fresh_scaler, bad=False)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], fresh_opt.state[q]["momentum_buffer"])


def test_a_teacher_must_predict_the_datas_classes_in_the_datas_order(tmp_path, monkeypatch):
    """The teacher's logit k must be the data's label k. One of our runs names its classes: another order (or
    another set of the same size) is refused, naming the first class that differs. A timm ImageNet-1k teacher
    predicts the sorted WordNet ids: class folders named otherwise (0..999, which sort as strings) are refused
    with the fix; ImageNet's own layout passes. (Before, only the number of classes was compared.)"""
    import timm

    from classification.checkpoint import save_checkpoint
    from classification.tricks import load_teacher

    cfg = cfg_with()
    model = build_model("B", 4, zero_gamma=False, init="timm", mean=cfg.mean, std=cfg.std)
    save_checkpoint(tmp_path / "teacher.pth", model=model.state_dict(), config=cfg.to_dict(), num_classes=4,
                    classes=["ant", "bee", "cat", "dog"])
    cfg = cfg_with(distill_teacher=tmp_path / "teacher.pth")
    teacher, identity = load_teacher(cfg, ["ant", "bee", "cat", "dog"], torch.device("cpu"))
    assert teacher is not None and len(identity["sha256"]) == 64
    with pytest.raises(ConfigError, match=r"its class 2 is 'cat', the data's class 2 is 'dog' .*train the teacher"):
        load_teacher(cfg, ["ant", "bee", "dog", "cat"], torch.device("cpu"))

    created = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: created(name, pretrained=False))  # offline
    cfg = cfg_with(distill_teacher="resnet18.tv_in1k")
    wnids = timm.data.ImageNetInfo("imagenet-1k").label_names()
    assert load_teacher(cfg, list(wnids), torch.device("cpu"))[1] == {"timm": "resnet18.tv_in1k"}
    with pytest.raises(ConfigError, match=r"its class 0 is 'n01440764', the data's class 0 is '0' .*WordNet id"):
        load_teacher(cfg, sorted(str(i) for i in range(1000)), torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"predicts 1000 classes, the data has 4; use a teacher trained on this"):
        load_teacher(cfg, ["ant", "bee", "cat", "dog"], torch.device("cpu"))


def test_a_warmup_rounded_to_the_whole_run_and_a_device_batch_of_one_are_refused_with_their_reasons():
    """warmup_epochs < epochs passes the config, but rounded to updates it can be the whole run (1.9 of 2 epochs of
    one update each): the cosine schedule then had no updates left (timm's assertion: "unexpected AssertionError"),
    the step schedule was all warmup. device_batch=1 passed the config and stopped at the first update,
    blaming unreadable images."""
    for schedule in ("cosine", "step"):
        cfg = cfg_with(epochs=2, warmup_epochs=1.9, schedule=schedule)
        with pytest.raises(ConfigError, match=r"warmup_epochs 1.9 is 2 of the run's 2 updates .* at least one") as e:
            build_scheduler(build_optimizer(tiny_model(), cfg), cfg, 1)
        assert "\n" not in str(e.value)
    cfg = cfg_with(epochs=2, warmup_epochs=1.4, schedule="cosine")  # 1 update of warmup, 1 of cosine
    build_scheduler(build_optimizer(tiny_model(), cfg), cfg, 1)
    with pytest.raises(ConfigError, match=r"'device_batch' must be >= 2, got 1: BatchNorm normalises over"):
        cfg_with(device_batch=1, global_batch=4)
