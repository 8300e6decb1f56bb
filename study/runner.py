"""The whole transfer study in one command: for every seed and arm, classification -> export -> detection ->
segmentation, each stage a subprocess running the stage's own CLI, then the report.

    python tools/study.py configs/studies/demo.yaml --work-dir work_dirs/demo
    python tools/study.py configs/studies/paper.yaml --work-dir work_dirs/paper --dry-run     # commands only
    GPUS=8 python tools/study.py configs/studies/paper.yaml --work-dir work_dirs/paper --only cls --arms d_cosine

Layout: ``WORK_DIR/<arm>/seed<S>/{cls,export,det,seg}``, ``WORK_DIR/study_status.json``, ``WORK_DIR/report``.
An arm with ``backbone: timm:NAME | torchvision:WEIGHTS | FILE`` (published weights) has no classification stage:
its export stage runs tools/export_backbone.py on that source (configs/studies/published.yaml).

A stage is skipped when its output (``summary.json``; ``meta.json`` for the export) exists and its inputs have
not changed. The inputs are fingerprinted in ``<stage dir>/.study_inputs.json``: the command line (paths made
canonical: absolute, or relative to WORK_DIR below it, so a moved study dir stays valid), the bytes of every
config file it names (with the local ``_base_`` files they inherit) and the bytes of the upstream output it
reads; the file also records whether the stage's last run succeeded (one that failed after writing its output
reruns). The launcher (the python path, GPUS) is not an input: checking a GPU study from a login node does not
rerun it. Changed inputs move the old stage dir aside to ``<stage>.stale-<n>`` (its ``summary.json`` renamed
``summary.stale.json`` so that the report does not count it twice) and rerun; a stage dir without output (an
interrupted run) reruns the same command, and the stages resume themselves.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from classification.artifacts import atomic_write_json
from classification.config import Config

REPO = Path(__file__).resolve().parent.parent
STATUS_FILE = "study_status.json"  # the name study/report.py reads
FINGERPRINT = ".study_inputs.json"
STAGE_LOG = "stage.log"
STAGES = ("classification", "export", "detection", "segmentation")
SHORT = {"classification": "cls", "export": "export", "detection": "det", "segmentation": "seg"}  # = dir names
OUTPUT = {"classification": "summary.json", "export": "meta.json", "detection": "summary.json",
          "segmentation": "summary.json"}
MODULE = {"classification": "classification.train", "detection": "detection.train",
          "segmentation": "segmentation.train"}
EXPORT_TOOL = "tools/export_backbone.py"
DATA_KEYS = {"imagenet": "classification", "voc": "detection", "ade20k": "segmentation"}  # data root -> its stage
TEACHER_REF = re.compile(r"\{cls:([^{}]*)\}")
ARM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
RUNNER_KEYS = ("name", "seed", "data_root")  # the runner sets these itself
ERROR_LINES = 5  # log lines kept as a failed stage's error


class StudyError(ValueError):
    """Bad study file or command line: one line naming the file and the fix."""


# ----------------------------------------------------------------------------------------------------------
# The study file


@dataclass(frozen=True)
class Downstream:  # a study's `detection:` / `segmentation:` section
    config: Path
    cfg_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arm:
    name: str
    classification: Path | None  # None: no pretraining (detection/segmentation with --export none), or `backbone`
    set: tuple[str, ...] = ()  # classification --set items, may hold {cls:ARM}
    teachers: tuple[str, ...] = ()  # the arms that {cls:ARM} names
    backbone: str | None = None  # published weights instead of a classification stage: timm:NAME, torchvision:...,
    variant: str | None = None  # or a weights file (with its --variant where the keys fit several)

    @property
    def pretrained(self) -> bool:
        return self.classification is not None or self.backbone is not None


@dataclass(frozen=True)
class Study:
    path: Path
    data: dict[str, Path]
    seeds: tuple[int, ...]
    detection: Downstream | None
    segmentation: Downstream | None
    arms: dict[str, Arm]  # in dependency order: every teacher before its students

    def defines(self, stage: str) -> bool:
        if stage == "classification":
            return any(a.classification is not None for a in self.arms.values())
        if stage == "export":
            return (any(a.pretrained for a in self.arms.values())
                    and (self.detection is not None or self.segmentation is not None))
        return getattr(self, stage) is not None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every problem is a StudyError naming the file and the key."""
    path = Path(path)
    src = str(path)

    def fail(where: str, msg: str) -> StudyError:
        return StudyError(f"{src}: {where}: {msg}" if where else f"{src}: {msg}")

    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except OSError as e:
        raise StudyError(f"{src}: cannot read study file ({e.strerror}); check the path") from e
    except yaml.YAMLError as e:
        raise StudyError(f"{src}: invalid YAML ({' '.join(str(e).split())}); fix the file") from e
    if not isinstance(raw, dict):
        raise fail("", "expected a mapping with data, seeds, arms and optional detection / segmentation sections")

    def mapping(value: Any, where: str, allowed: set[str], required: set[str] = frozenset()) -> dict:
        if not isinstance(value, dict):
            raise fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(map(str, set(value) - allowed))
        if unknown:
            raise fail(where, f"unknown key '{unknown[0]}' (valid keys: {', '.join(sorted(allowed))})")
        missing = sorted(required - set(value))
        if missing:
            raise fail(where, f"missing key '{missing[0]}'")
        return value

    def existing_file(value: Any, where: str) -> Path:
        if not isinstance(value, str) or not value:
            raise fail(where, f"expected a file path, got {value!r}")
        p = Path(value)
        if not p.is_file():
            raise fail(where, f"{value}: no such file (paths are relative to the current directory, {Path.cwd()})")
        return p

    def string_list(value: Any, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(where, f"expected a list of 'key=value' strings, got {value!r}")
        for i, item in enumerate(value):
            if "=" not in item or not item.partition("=")[0].strip():
                raise fail(f"{where}[{i}]", f"{item!r} is not key=value")
        return tuple(value)

    mapping(raw, "", {"data", "seeds", "detection", "segmentation", "arms"}, {"data", "arms"})

    data = mapping(raw["data"], "data", set(DATA_KEYS))
    for key, value in data.items():
        if not isinstance(value, str) or not value:
            raise fail(f"data.{key}", f"expected a directory path, got {value!r}")

    seeds = raw.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise fail("seeds", f"expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise fail("seeds", f"a seed is listed twice in {seeds}")

    downstream: dict[str, Downstream | None] = {}
    for stage in ("detection", "segmentation"):
        if raw.get(stage) is None:
            downstream[stage] = None
            continue
        sec = mapping(raw[stage], stage, {"config", "cfg_options"}, {"config"})
        downstream[stage] = Downstream(existing_file(sec["config"], f"{stage}.config"),
                                       string_list(sec.get("cfg_options"), f"{stage}.cfg_options"))

    if not isinstance(raw["arms"], dict) or not raw["arms"]:
        raise fail("arms", "expected a non-empty mapping of arm name -> {classification: RECIPE|null, set: [...]} "
                           "or {backbone: SOURCE}")
    config_keys = {f.name for f in dataclasses.fields(Config)}
    arms: dict[str, Arm] = {}
    for name, spec in raw["arms"].items():
        where = f"arms.{name}"
        if not isinstance(name, str) or not ARM_NAME.fullmatch(name) or yaml.safe_load(name) != name:
            raise fail(where, "an arm name must be a plain identifier (letters, digits, _ . -), not a YAML "
                              "number/boolean/null: it names a directory and the summaries' 'arm'")
        if name == "report":
            raise fail(where, "'report' is the report's directory in the work dir; rename the arm")
        spec = mapping(spec, where, {"classification", "set", "backbone", "variant"})
        if ("classification" in spec) == ("backbone" in spec):
            raise fail(where, "give either 'classification: RECIPE' (null: random init) or 'backbone: SOURCE' "
                              "(timm:NAME, torchvision:WEIGHTS or a weights file), not both or neither")
        backbone, variant = _backbone_spec(spec, where, fail, existing_file)
        recipe = spec.get("classification")
        recipe = None if recipe is None else existing_file(recipe, f"{where}.classification")
        items = string_list(spec.get("set"), f"{where}.set")
        if recipe is None and items:
            raise fail(f"{where}.set", "this arm has no classification stage (classification: null, or a backbone) "
                                       "to set keys of")
        teachers = []
        for i, item in enumerate(items):
            key = item.partition("=")[0].strip()
            if key not in config_keys:
                raise fail(f"{where}.set[{i}]", f"unknown classification key '{key}' (valid keys are the fields of "
                                                f"classification/config.py)")
            if key in RUNNER_KEYS:
                raise fail(f"{where}.set[{i}]", f"'{key}' is set by the study runner (arm name, seed, data.imagenet)")
            teachers += TEACHER_REF.findall(item)
        arms[name] = Arm(name, recipe, items, tuple(dict.fromkeys(teachers)), backbone, variant)

    for arm in arms.values():
        for t in arm.teachers:
            if t not in arms:
                raise fail(f"arms.{arm.name}.set", f"{{cls:{t}}} names no arm of this study "
                                                   f"(arms: {', '.join(arms)})")
            if arms[t].classification is None:
                raise fail(f"arms.{arm.name}.set", f"{{cls:{t}}}: arm {t} has no classification stage")
    ordered = _dependency_order(arms, src)

    study = Study(path, {k: Path(v) for k, v in data.items()}, tuple(seeds), downstream["detection"],
                  downstream["segmentation"], ordered)
    for key, stage in DATA_KEYS.items():
        if study.defines(stage) and key not in study.data:
            raise fail("data", f"missing key '{key}' (the {stage} stage's dataset root)")
    return study


def _backbone_spec(spec: dict, where: str, fail, existing_file) -> tuple[str | None, str | None]:
    """An arm's ``backbone`` (and ``variant``): published weights, checked against the installed library's registry
    now (no download), so that a typo stops the study before hours of other arms."""
    backbone, variant = spec.get("backbone"), spec.get("variant")
    if backbone is None:
        if variant is not None:
            raise fail(f"{where}.variant", "variant is for a 'backbone:' weights file")
        return None, None
    if not isinstance(backbone, str) or not backbone:
        raise fail(f"{where}.backbone", f"expected timm:NAME, torchvision:WEIGHTS or a weights file, got {backbone!r}")
    if variant is not None and (not isinstance(variant, str) or variant.upper() not in ("A", "B", "C", "D")):
        raise fail(f"{where}.variant", f"expected A, B, C or D, got {variant!r}")
    from classification.export import ExportError
    from classification.published import describe, is_published

    if is_published(backbone):
        if variant is not None:
            raise fail(f"{where}.variant", f"{backbone} fixes its variant; variant is for a weights file")
        try:
            return describe(backbone).source, None
        except ExportError as e:
            raise fail(f"{where}.backbone", str(e)) from None
    existing_file(backbone, f"{where}.backbone")
    return backbone, None if variant is None else variant.upper()


def _dependency_order(arms: dict[str, Arm], src: str) -> dict[str, Arm]:
    """Teachers before students, otherwise the file's order; a cycle of {cls:ARM} references is an error."""
    done: dict[str, Arm] = {}
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = visiting[visiting.index(name):] + [name]
            raise StudyError(f"{src}: arms: {{cls:ARM}} references form a cycle ({' -> '.join(cycle)}); "
                             f"a teacher cannot depend on its student")
        visiting.append(name)
        for t in arms[name].teachers:
            visit(t)
        visiting.pop()
        done[name] = arms[name]

    for name in arms:
        visit(name)
    return done


# ----------------------------------------------------------------------------------------------------------
# The plan: one Step per (seed, arm, stage)


@dataclass
class Step:
    arm: str
    seed: int
    stage: str
    dir: Path
    argv: list[str]  # after the launcher: ["-m", "classification.train", ...] or [tools/export_backbone.py, ...]
    canon: list[str]  # argv with canonical paths: the fingerprinted command line
    files: list[Path]  # config files it names
    upstream: list[Path]  # outputs of other stages it reads
    deps: list[tuple[str, int, str]]  # (arm, seed, stage) of the steps producing ``upstream``
    distributed: bool  # runs under torchrun when GPUS > 1
    status: str = "pending"
    seconds: float | None = None
    error: str | None = None
    command: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.arm, self.seed, self.stage)

    @property
    def output(self) -> Path:
        return self.dir / OUTPUT[self.stage]

    @property
    def label(self) -> str:
        return f"{self.arm} seed{self.seed} {self.stage}"

    def entry(self) -> dict[str, Any]:
        return dict(arm=self.arm, seed=self.seed, stage=self.stage, status=self.status,
                    seconds=None if self.seconds is None else round(self.seconds, 1), error=self.error,
                    command=self.command)


@dataclass
class Paths:
    """Turns paths into command-line text (as the user wrote them) and canonical fingerprint text."""

    work_dir: Path

    def show(self, p: Path) -> str:
        return os.path.normpath(p)

    def canon(self, p: Path) -> str:
        real, root = Path(p).resolve(), self.work_dir.resolve()
        if real == root or root in real.parents:
            return "$WORK_DIR/" + real.relative_to(root).as_posix()
        return real.as_posix()


@dataclass
class _Cmd:
    paths: Paths
    argv: list[str] = field(default_factory=list)
    canon: list[str] = field(default_factory=list)

    def arg(self, *items: str) -> _Cmd:
        self.argv += items
        self.canon += items
        return self

    def path(self, p: Path, prefix: str = "") -> _Cmd:
        self.argv.append(prefix + self.paths.show(p))
        self.canon.append(prefix + self.paths.canon(p))
        return self


def run_dir(work_dir: Path, arm: str, seed: int) -> Path:
    return work_dir / arm / f"seed{seed}"


def stage_dir(work_dir: Path, arm: str, seed: int, stage: str) -> Path:
    return run_dir(work_dir, arm, seed) / SHORT[stage]


def export_tool() -> str:
    """tools/export_backbone.py as seen from the current directory (relative inside the checkout)."""
    rel = os.path.relpath(REPO / EXPORT_TOOL)
    return rel if not rel.startswith("..") else str(REPO / EXPORT_TOOL)


def plan(study: Study, work_dir: Path, stages: tuple[str, ...] = STAGES, arms: list[str] | None = None) -> list[Step]:
    """Every step of ``stages`` for the chosen arms (plus the classification of the teachers they need)."""
    paths = Paths(work_dir)
    chosen = list(study.arms) if arms is None else arms
    teacher_only: set[str] = set()
    if "classification" in stages:  # a student's classification needs its teachers' classification first
        todo = list(chosen)
        while todo:
            for t in study.arms[todo.pop()].teachers:
                if t not in chosen and t not in teacher_only:
                    teacher_only.add(t)
                    todo.append(t)
    steps = []
    for seed in study.seeds:
        for arm in study.arms.values():
            if arm.name not in chosen and arm.name not in teacher_only:
                continue
            for stage in stages:
                if not study.defines(stage) or (arm.name in teacher_only and stage != "classification"):
                    continue
                step = _step(study, paths, arm, seed, stage)
                if step is not None:
                    steps.append(step)
    return steps


def _step(study: Study, paths: Paths, arm: Arm, seed: int, stage: str) -> Step | None:
    wd = paths.work_dir
    here = stage_dir(wd, arm.name, seed, stage)
    cls_dir = stage_dir(wd, arm.name, seed, "classification")
    export_dir = stage_dir(wd, arm.name, seed, "export")
    cmd = _Cmd(paths)
    if stage == "classification":
        if arm.classification is None:
            return None
        cmd.arg("-m", MODULE[stage]).path(arm.classification).arg("--data-root").path(study.data["imagenet"])
        cmd.arg("--work-dir").path(here).arg("--set", f"name={arm.name}", f"seed={seed}")
        for item in arm.set:
            refs = TEACHER_REF.findall(item)
            if not refs:
                cmd.arg(item)
                continue
            # {cls:T} -> T's classification run dir for this seed; fingerprinted canonically like every path
            parts = TEACHER_REF.split(item)  # text, ref, text, ref, ..., text
            shown = "".join(paths.show(stage_dir(wd, p, seed, stage)) if i % 2 else p for i, p in enumerate(parts))
            canon = "".join(paths.canon(stage_dir(wd, p, seed, stage)) if i % 2 else p for i, p in enumerate(parts))
            cmd.argv.append(shown)
            cmd.canon.append(canon)
        return Step(arm.name, seed, stage, here, cmd.argv, cmd.canon, [arm.classification],
                    [stage_dir(wd, t, seed, stage) / OUTPUT[stage] for t in arm.teachers],
                    [(t, seed, stage) for t in arm.teachers], distributed=True)
    if stage == "export":
        if not arm.pretrained:
            return None
        cmd.argv.append(export_tool())
        cmd.canon.append(EXPORT_TOOL)
        if arm.backbone is not None:  # published weights: the source is the whole input (a file's bytes included)
            from classification.published import is_published

            weights_file = None if is_published(arm.backbone) else Path(arm.backbone)
            if weights_file is None:
                cmd.arg(arm.backbone)
            else:
                cmd.path(weights_file)
            if arm.variant:
                cmd.arg("--variant", arm.variant)
            cmd.arg("--out").path(here)
            return Step(arm.name, seed, stage, here, cmd.argv, cmd.canon, [weights_file] if weights_file else [], [],
                        [], distributed=False)
        cmd.path(cls_dir).arg("--out").path(here)
        return Step(arm.name, seed, stage, here, cmd.argv, cmd.canon, [], [cls_dir / OUTPUT["classification"]],
                    [(arm.name, seed, "classification")], distributed=False)
    section: Downstream = getattr(study, stage)
    cmd.arg("-m", MODULE[stage], "--export")
    if not arm.pretrained:
        cmd.arg("none")
        upstream, deps = [], []
    else:
        cmd.path(export_dir)
        upstream, deps = [export_dir / OUTPUT["export"]], [(arm.name, seed, "export")]
    cmd.arg("--config").path(section.config)
    cmd.arg("--data-root").path(study.data["voc" if stage == "detection" else "ade20k"])
    cmd.arg("--work-dir").path(here).arg("--arm", arm.name, "--seed", str(seed))
    if section.cfg_options:
        cmd.arg("--cfg-options", *section.cfg_options)
    return Step(arm.name, seed, stage, here, cmd.argv, cmd.canon, [section.config], upstream, deps, distributed=True)


def gpus() -> int:
    raw = os.environ.get("GPUS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise StudyError(f"GPUS={raw!r}: expected the number of GPUs per machine (an integer), or leave it unset")
    return int(raw)


def launch_argv(step: Step, n_gpus: int) -> list[str]:
    """The full command: plain python, or torchrun with one process per GPU for the distributed stages."""
    if step.distributed and n_gpus > 1:
        extra = ["--launcher", "pytorch"] if step.stage in ("detection", "segmentation") else []
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_gpus}", *step.argv, *extra]
    return [sys.executable, *step.argv]


# ----------------------------------------------------------------------------------------------------------
# Fingerprints


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_closure(path: Path) -> list[Path]:
    """The config file plus the local files it inherits through mmengine's ``_base_`` (not 'mmdet::...')."""
    out: list[Path] = []
    todo = [Path(path)]
    while todo:
        p = todo.pop(0)
        if p.resolve() in (q.resolve() for q in out) or not p.is_file():
            continue
        out.append(p)
        if p.suffix != ".py":
            continue
        try:
            tree = ast.parse(p.read_text())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
                try:
                    bases = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for base in [bases] if isinstance(bases, str) else list(bases):
                    if isinstance(base, str) and "::" not in base:
                        todo.append(p.parent / base)
    return out


def fingerprint(step: Step, paths: Paths) -> dict[str, Any]:
    files = {paths.canon(p): _sha256(p.read_bytes()) for f in step.files for p in config_closure(f)}
    upstream = {paths.canon(p): _sha256(p.read_bytes()) for p in step.upstream}
    record: dict[str, Any] = {"command": step.canon, "files": files, "upstream": upstream}
    record = {"sha256": _sha256(json.dumps(record, sort_keys=True).encode()), **record}
    return record


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    try:
        fp = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return fp if isinstance(fp, dict) and "sha256" in fp else None


def what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    why = []
    if old.get("command") != new["command"]:
        why.append("command line")
    for kind, label in (("files", "config"), ("upstream", "upstream output")):
        a, b = old.get(kind) or {}, new[kind]
        why += [f"{label} {name}" for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    return ", ".join(why) or "fingerprint"


def move_aside(d: Path) -> Path:
    """``d`` -> ``d.stale-<n>`` (first free n); its summary.json becomes summary.stale.json for the report."""
    n = 1
    while d.with_name(f"{d.name}.stale-{n}").exists():
        n += 1
    dest = d.with_name(f"{d.name}.stale-{n}")
    os.replace(d, dest)
    summary = dest / "summary.json"
    if summary.exists():
        os.replace(summary, dest / "summary.stale.json")
    return dest


def decide(step: Step, paths: Paths) -> tuple[str, str]:
    """What to do with a step's dir, and why: 'run' | 'resume' | 'skip' | 'adopt' | 'stale' (move aside, rerun)."""
    if not step.dir.exists() or not any(step.dir.iterdir()):
        return "run", "not run yet"
    old = _read_fingerprint(step.dir / FINGERPRINT)
    if old is None:
        if step.output.exists():  # e.g. the command from --dry-run, run by a scheduler: take it as ours
            return "adopt", f"{step.output} exists without {FINGERPRINT} (run by hand or from --dry-run)"
        return "resume", f"{step.dir} holds an unfinished run; rerunning its command resumes it"
    new = fingerprint(step, paths)
    if old["sha256"] == new["sha256"]:
        if step.output.exists() and old.get("status") != "failed":
            return "skip", "up to date"
        if step.output.exists():  # e.g. an export whose check failed after it wrote meta.json
            return "resume", "failed last time after writing its output, same inputs; rerunning its command"
        return "resume", "interrupted run, same inputs; rerunning its command resumes it"
    return "stale", f"inputs changed ({what_changed(old, new)})"


# ----------------------------------------------------------------------------------------------------------
# Running


class _Interrupted(Exception):
    pass


class _Forward:
    """While a stage runs, SIGTERM/SIGUSR1 (preemption) go to it so that it checkpoints; the study then stops."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.got: int | None = None
        self.log_start = 0  # where the running stage's output starts in its stage.log
        self.old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.got = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


def _echo(text: str) -> None:
    print(f"[study] {text}", flush=True)


_ERROR_LINE = re.compile(r"^(error:|\w+(\.\w+)*(Error|Exception|Interrupt)\b)")


def _tail(log: Path, start: int = 0, n: int = ERROR_LINES) -> str:
    """A failed stage's error from its output after byte ``start`` in ``log``: the last error line (``error: ...``
    or ``XxxError: ...``) first, then the last ``n`` lines of output for context."""
    try:
        with open(log, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - 65536))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", ln.split("\r")[-1]).rstrip()[:300] for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and set(ln.strip()) - set("^~")]  # not the traceback's ^^^ marks
    errors = [ln for ln in lines[-50:] if _ERROR_LINE.match(ln)]
    headline = errors[-1] if errors else (lines[-1] if lines else "")
    context = [ln for ln in lines[-n:] if ln != headline]
    return "\n".join([headline, *context]) if headline else ""


def stream(argv: list[str], log: Path, fwd: _Forward) -> int:
    """Run ``argv``, its stdout+stderr going both to our stdout and (appended) to ``log``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(log, "ab") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}\n".encode())
        f.flush()
        fwd.log_start = f.tell()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        fwd.proc = proc
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                f.write(chunk)
                f.flush()
                sys.stdout.write(decoder.decode(chunk))
                sys.stdout.flush()
            return proc.wait()
        except BaseException:  # Ctrl-C reaches the child too (same process group); give it time to save
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            fwd.proc = None
            proc.stdout.close()


class Runner:
    def __init__(self, study: Study, work_dir: Path, steps: list[Step], n_gpus: int):
        self.study, self.work_dir, self.steps, self.n_gpus = study, work_dir, steps, n_gpus
        self.paths = Paths(work_dir)
        self.by_key = {s.key: s for s in steps}
        for s in steps:
            s.command = shlex.join(launch_argv(s, n_gpus))
        self.previous = self._previous_status()

    # --- study_status.json: this run's steps merged over the previous file's entries for the rest of the study
    def _previous_status(self) -> list[dict[str, Any]]:
        try:
            old = json.loads((self.work_dir / STATUS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return []
        if not isinstance(old, list):
            return []
        keep = []
        for e in old:
            if not isinstance(e, dict):
                continue
            key = (e.get("arm"), e.get("seed"), e.get("stage"))
            if (key not in self.by_key and key[0] in self.study.arms and key[1] in self.study.seeds
                    and key[2] in STAGES and self.study.defines(key[2])):
                keep.append(e)
        return keep

    def write_status(self) -> None:
        arms, seeds = list(self.study.arms), list(self.study.seeds)
        entries = self.previous + [s.entry() for s in self.steps]
        entries.sort(key=lambda e: (seeds.index(e["seed"]), arms.index(e["arm"]), STAGES.index(e["stage"])))
        atomic_write_json(self.work_dir / STATUS_FILE, entries)

    # --- one step
    def blocked_by(self, step: Step) -> str | None:
        for dep in step.deps:
            up = self.by_key.get(dep)
            if up is not None and up.status in ("failed", "blocked", "interrupted"):
                return f"upstream {up.stage} of {up.arm} seed{up.seed} {up.status}"
        for p in step.upstream:
            if not p.exists():
                return f"needs {p}; run the stage that writes it first"
        return None

    def run_step(self, step: Step, fwd: _Forward) -> None:
        why = self.blocked_by(step)
        if why is not None:
            step.status, step.error, step.seconds = "blocked", why, 0.0
            print(f"error: {step.label}: blocked: {why}", file=sys.stderr, flush=True)
            return
        action, why = decide(step, self.paths)
        if action in ("skip", "adopt"):
            if action == "adopt":
                atomic_write_json(step.dir / FINGERPRINT, {**fingerprint(step, self.paths), "status": "ok"})
            step.status, step.seconds = "skipped", 0.0
            _echo(f"{step.label}: {why}, skipped")
            return
        if action == "stale":
            dest = move_aside(step.dir)
            _echo(f"{step.label}: {why}; moved the old run to {dest}")
        else:
            _echo(f"{step.label}: {why}")
        step.dir.mkdir(parents=True, exist_ok=True)
        fp = fingerprint(step, self.paths)
        atomic_write_json(step.dir / FINGERPRINT, {**fp, "status": "running"})
        step.status = "running"
        self.write_status()
        _echo(f"{step.label}: {step.command}")
        t0 = time.perf_counter()
        try:
            rc = stream(launch_argv(step, self.n_gpus), step.dir / STAGE_LOG, fwd)
        except KeyboardInterrupt:
            step.status, step.seconds, step.error = "interrupted", time.perf_counter() - t0, "interrupted (Ctrl-C)"
            raise
        step.seconds = time.perf_counter() - t0
        ok = rc == 0 and step.output.exists()
        atomic_write_json(step.dir / FINGERPRINT, {**fp, "status": "ok" if ok else "failed"})
        if fwd.got is not None:
            step.status = "interrupted"
            step.error = f"stopped by signal {fwd.got}"
            raise _Interrupted(step.error)
        if rc != 0:
            step.status = "failed"
            step.error = _tail(step.dir / STAGE_LOG, fwd.log_start) or f"exit code {rc}"
            _echo(f"{step.label}: FAILED (exit code {rc}) after {_fmt_time(step.seconds)}; "
                  f"log: {step.dir / STAGE_LOG}")
        elif not step.output.exists():
            step.status = "failed"
            step.error = f"exited 0 but wrote no {step.output}"
            _echo(f"{step.label}: FAILED: {step.error}")
        else:
            step.status = "ok"
            _echo(f"{step.label}: ok in {_fmt_time(step.seconds)}")

    def run(self) -> int:
        t0 = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.write_status()
        try:
            with _Forward() as fwd:
                for step in self.steps:
                    if fwd.got is not None:  # a signal between two stages
                        raise _Interrupted(f"stopped by signal {fwd.got}")
                    self.run_step(step, fwd)
                    self.write_status()
        except (KeyboardInterrupt, _Interrupted) as e:
            self.write_status()
            print(f"error: study interrupted ({e or 'Ctrl-C'}); rerun the same command to resume", file=sys.stderr)
            return 128 + (fwd.got or signal.SIGINT)
        print(status_table(self.steps))
        _echo(f"total {_fmt_time(time.perf_counter() - t0)}; status in {self.work_dir / STATUS_FILE}")
        return 1 if any(s.status != "ok" and s.status != "skipped" for s in self.steps) else 0


def _fmt_time(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m{rem % 60:02d}s" if h else f"{rem // 60}m{rem % 60:02d}s"


def status_table(steps: list[Step]) -> str:
    rows = [("arm", "seed", "stage", "status", "time", "error")]
    for s in steps:
        last = (s.error or "").strip().splitlines()[:1] or [""]  # the headline
        rows.append((s.arm, str(s.seed), s.stage, s.status, "" if s.seconds is None else _fmt_time(s.seconds),
                     last[0][:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows).rstrip()


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/study.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a whole transfer study (study YAML: configs/studies/*.yaml): per seed and arm, "
        "classification -> export -> detection -> segmentation, skipping stages whose inputs have not changed, "
        "then the report. GPUS=N runs the training stages under torchrun with N processes.",
        epilog=__doc__)
    p.add_argument("study", type=Path, help="study file (configs/studies/demo.yaml, configs/studies/paper.yaml)")
    p.add_argument("--work-dir", type=Path, required=True, help="study directory: WORK_DIR/<arm>/seed<S>/<stage>")
    p.add_argument("--dry-run", action="store_true",
                   help="print the commands of the stages that would run, one per line, and run nothing")
    p.add_argument("--only", choices=[SHORT[s] for s in STAGES],
                   help="run one stage for every arm (its upstream outputs must exist)")
    p.add_argument("--arms", help="comma-separated arms to run (default: all; the teachers they name run too)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p.parse_args(argv)


def _check_data(study: Study, stages: tuple[str, ...]) -> None:
    for key, stage in DATA_KEYS.items():
        if stage in stages and study.defines(stage) and not study.data[key].is_dir():
            raise StudyError(f"{study.path}: data.{key}: {study.data[key]}: no such directory (paths are relative "
                             f"to the current directory, {Path.cwd()}); generate the embedded data with "
                             f"python tools/make_data.py --out data --scale small, or fix the path")


def dry_run(study: Study, steps: list[Step], n_gpus: int, work_dir: Path) -> int:
    """Commands on stdout (nothing else); skips and missing inputs on stderr. Creates nothing."""
    paths = Paths(work_dir)
    will_run: set[tuple] = set()
    problems = 0
    for step in steps:
        upstream_runs = any(d in will_run for d in step.deps)
        missing = [p for p in step.upstream if not p.exists()]
        if missing and not upstream_runs:
            print(f"error: {step.label}: needs {missing[0]}; run the stage that writes it first", file=sys.stderr,
                  flush=True)
            problems += 1
            continue
        action, why = ("run", "upstream reruns") if upstream_runs else decide(step, paths)
        if action in ("skip", "adopt"):
            print(f"# {step.label}: {why}, skipped", file=sys.stderr, flush=True)
            continue
        will_run.add(step.key)
        print(f"# {step.label}: {why}" + ("; would move the old run aside" if action == "stale" else ""),
              file=sys.stderr, flush=True)
        print(shlex.join(launch_argv(step, n_gpus)), flush=True)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        study = load_study(args.study)
        stages = tuple(s for s in STAGES if args.only is None or SHORT[s] == args.only)
        if args.only and not study.defines(stages[0]):
            raise StudyError(f"{study.path}: --only {args.only}: this study has no {stages[0]} stage")
        arms = None
        if args.arms:
            arms = [a.strip() for a in args.arms.split(",") if a.strip()]
            unknown = [a for a in arms if a not in study.arms]
            if unknown or not arms:
                raise StudyError(f"{study.path}: --arms: no arm named {unknown[0] if unknown else args.arms!r} "
                                 f"(arms: {', '.join(study.arms)})")
        n_gpus = gpus()
        steps = plan(study, args.work_dir, stages, arms)
        if args.dry_run:
            return dry_run(study, steps, n_gpus, args.work_dir)
        _check_data(study, stages)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_arms = len({s.arm for s in steps})
    _echo(f"{study.path}: {n_arms} arm(s) x {len(study.seeds)} seed(s), stages "
          f"{', '.join(s for s in stages if study.defines(s))}, {len(steps)} step(s) -> {args.work_dir}"
          + (f", GPUS={n_gpus}" if n_gpus > 1 else ""))
    rc = Runner(study, args.work_dir, steps, n_gpus).run()
    if rc > 128:  # interrupted: no report
        return rc
    if not args.no_report and not any(args.work_dir.rglob("summary.json")):
        _echo("no report: no stage has written a summary.json yet")
    elif not args.no_report:
        from study import report

        _echo("report")
        report_rc = report.main([str(args.work_dir), "--out", str(args.work_dir / "report")])
        rc = rc or report_rc
    _echo(f"done in {_fmt_time(time.perf_counter() - t0)}" + ("" if rc == 0 else f" (exit code {rc})"))
    return rc
