"""A study spec turned into commands: one Step per (seed, arm, stage), the stage's own CLI, in the order they run
(teachers first), in ``WORK_DIR/<arm>/seed<S>/{cls,export,det,seg}``. Whether it has work to do is the stage's call.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from lifecycle.stages import DOWNSTREAM, NAMES, STAGES
from study.spec import STAGE_DIRS, TEACHER_REF, Arm, SpecError, StudySpec

REPO = Path(__file__).resolve().parent.parent
EXPORT_TOOL = "tools/export_backbone.py"
# The multi-node rendezvous's ports (first, count): below Linux's ephemeral range (32768-60999), one per job and
# step (rdzv_port).
RDZV_PORTS = (20000, 10000)
FROZEN = " (frozen)"  # a stage's name in study_status.json when its backbone is frozen; its run dir ends "_frozen"


@dataclass(frozen=True)
class Step:
    arm: str
    seed: int
    stage: str
    dir: Path
    argv: tuple[str, ...]  # after the launcher: ("-m", "classification.train", ...) or (EXPORT_TOOL, ...)
    distributed: bool  # runs under torchrun on several GPUs
    needs: tuple[tuple[str, int, str], ...] = ()  # the steps whose outputs it reads
    frozen: bool = False  # detection / segmentation with the backbone frozen (fixed-feature transfer)

    # A frozen-backbone run is its own entry in study_status.json: "detection (frozen)", in its own run dir.
    key = property(lambda self: (self.arm, self.seed, self.stage + FROZEN * self.frozen))
    label = property(lambda self: f"{self.arm} seed{self.seed} {self.key[2]}")
    output = property(lambda self: self.dir / STAGES[self.stage].output)
    inputs = property(lambda self: [stage_dir(self.dir.parents[2], *n) / STAGES[n[2]].output for n in self.needs])


def stage_dir(work_dir: Path, arm: str, seed: int, stage: str, frozen: bool = False) -> Path:
    return work_dir / arm / f"seed{seed}" / (STAGE_DIRS[stage] + "_frozen" * frozen)


def plan(spec: StudySpec, work_dir: Path, stages: tuple[str, ...] = NAMES, arms: list[str] | None = None
         ) -> list[Step]:
    """Every step of ``stages`` for the chosen arms, plus the classification of the teachers they name."""
    chosen, teachers = set(spec.arms if arms is None else arms), set()
    for name in reversed(spec.arms):  # students before their teachers
        teachers |= set(spec.arms[name].teachers) if name in chosen | teachers else set()
    wanted = [(arm, stage) for arm in spec.arms.values() for stage in stages if spec.defines(stage) and (
        arm.name in chosen or (arm.name in teachers and stage == "classification"))]
    return [step for seed in spec.seeds for arm, stage in wanted if (step := _step(spec, work_dir, arm, seed, stage))]


def _step(spec: StudySpec, work_dir: Path, arm: Arm, seed: int, stage: str) -> Step | None:
    here = stage_dir(work_dir, arm.name, seed, stage)
    path = os.path.normpath
    if stage == "classification":
        if arm.classification is None:
            return None
        items = [TEACHER_REF.sub(lambda m: path(stage_dir(work_dir, m[1], seed, stage)), item) for item in arm.set]
        argv = ["-m", STAGES[stage].module, path(arm.classification), "--data-root",
                path(spec.data[STAGES[stage].data]),
                *(["--allow-synthetic"] if spec.allow_synthetic else []), "--work-dir", path(here),
                "--set", f"name={arm.name}", f"seed={seed}", *items]
        return Step(arm.name, seed, stage, here, tuple(argv), True, tuple((t, seed, stage) for t in arm.teachers))
    if stage == "export":
        if not arm.pretrained:
            return None
        tool = rel if not (rel := os.path.relpath(REPO / EXPORT_TOOL)).startswith("..") else str(REPO / EXPORT_TOOL)
        if arm.backbone is not None:  # published weights (timm:NAME, torchvision:WEIGHTS) or a weights file
            variant = ["--variant", arm.variant] if arm.variant else []
            return Step(arm.name, seed, stage, here, (tool, arm.backbone, *variant, "--out", path(here)), False)
        cls = stage_dir(work_dir, arm.name, seed, "classification")
        return Step(arm.name, seed, stage, here, (tool, path(cls), "--out", path(here)), False,
                    ((arm.name, seed, "classification"),))
    section, export = spec.downstream[stage], stage_dir(work_dir, arm.name, seed, "export")
    frozen = spec.frozen(arm, stage)
    here = stage_dir(work_dir, arm.name, seed, stage, frozen)
    argv = ["-m", STAGES[stage].module, "--export", path(export) if arm.pretrained else "none", "--config",
            path(section.config), "--data-root", path(spec.data[STAGES[stage].data]),
            "--work-dir", path(here), "--arm", arm.name, "--seed", str(seed),
            *(["--allow-synthetic"] if spec.allow_synthetic else []), *(["--frozen-backbone"] if frozen else []),
            *(["--cfg-options", *section.cfg_options] if section.cfg_options else [])]
    return Step(arm.name, seed, stage, here, tuple(argv), True, ((arm.name, seed, "export"),) if arm.pretrained else (),
                frozen)


def stage_protocols(spec: StudySpec, steps: list[Step], gpus: int, nodes: int = 1, downstream: bool = True
                    ) -> list[str]:
    """Each training stage's protocol on ``nodes x gpus`` processes, the line the stage logs first (batch, BN
    batch, lr; detection and segmentation once for the pretrained arms and once for the random-init control, which
    trains BatchNorm). Refuses, before anything runs or queues, a count on which some stage cannot keep its recipe's
    batch, naming the counts on which the whole study can run. ``downstream=False`` skips the detection and
    segmentation lines (building their models takes seconds) where one process is certain to fit them."""
    from classification.config import ConfigError, load_config
    from lifecycle.distributed import process_counts
    from transfer.runner import StageError, describe_recipe, load_mm_config, merge_cfg_options

    processes, lines, problems, counts = max(gpus, 1) * nodes, [], [], None
    for arm in dict.fromkeys(s.arm for s in steps if s.stage == "classification"):
        recipe = spec.arms[arm].classification
        cfg = load_config(recipe, [i for i in spec.arms[arm].set if not TEACHER_REF.search(i)])
        counts = set(cfg.process_counts()) if counts is None else counts & set(cfg.process_counts())
        try:
            lines.append(f"{arm} classification: {cfg.batch_line(processes)}")
        except ConfigError as e:
            problems.append(f"arm {arm} ({recipe}): {e}")
    for stage in DOWNSTREAM if downstream or processes > 1 else ():
        arms = [spec.arms[a] for a in dict.fromkeys(s.arm for s in steps if s.stage == stage)]
        if not arms:
            continue
        section = spec.downstream[stage]
        options = cfg_options(section.cfg_options)
        for pretrained, frozen in dict.fromkeys((a.pretrained, spec.frozen(a, stage)) for a in arms):
            who = ("pretrained arms" if pretrained else ", ".join(a.name for a in arms if not a.pretrained)) + (
                ", frozen" if frozen else "")
            try:
                lines.append(f"{stage} ({who}): "
                             f"{describe_recipe(section.config, options, processes, pretrained, frozen)}")
            except StageError as e:
                problems.append(str(e))
        mm = load_mm_config(section.config)
        merge_cfg_options(mm, options)
        ok = set(process_counts(mm.auto_scale_lr.base_batch_size))
        counts = ok if counts is None else counts & ok
    if problems:
        works = ", ".join(map(str, sorted(counts or ()))) or "no common number of"
        more = f" (and {len(problems) - 1} more stage(s))" if len(problems) > 1 else ""
        raise SpecError(f"{spec.path}: cannot run on {nodes} node(s) x {max(gpus, 1)} GPU(s) = {processes} processes: "
                        f"{problems[0]}{more}; the whole study runs on {works} processes (nodes x GPUs per node)")
    return lines


def cfg_options(items: tuple[str, ...] | list[str]) -> dict:
    """A study section's ``cfg_options`` (KEY=VALUE strings) as the stage's --cfg-options reads them."""
    import argparse

    from mmengine.config import DictAction

    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={})
    return parser.parse_args(["--cfg-options", *items] if items else []).cfg_options


def rdzv_port(step: Step, job_id: str) -> int:
    """The port of a step's rendezvous store on the job's first node: its own per job, since two multi-node jobs may
    share a first node; and per step, since a node starting the next step must not reach the last step's store while
    the first node is still closing it."""
    return RDZV_PORTS[0] + zlib.crc32(f"{job_id}/{step.label}".encode()) % RDZV_PORTS[1]


def command(step: Step, gpus: int, nodes: int = 1, master: str = "$MASTER_ADDR", job_id: str = "0",
            rank: int = 0) -> list[str]:
    """Plain python, or torchrun (lifecycle.torchrun: SIGUSR1 reaches the workers) with ``gpus`` processes per node
    for the distributed stages, across ``nodes`` nodes through torchrun's c10d rendezvous on ``master``, which node
    ``rank`` 0 hosts. Named explicitly (``is_host``), since torchrun's own guess, on finding the port taken, joins
    whatever store holds it: another job's, whose end would then end this one."""
    if not step.distributed or gpus * nodes <= 1:
        return [sys.executable, *step.argv]
    multi = ([f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{rdzv_port(step, job_id)}",
              f"--rdzv-id={job_id}", f"--rdzv-conf=is_host={int(rank == 0)}"] if nodes > 1 else [])
    launcher = ["--launcher", "pytorch"] if step.stage in DOWNSTREAM else []  # mmengine's
    return [sys.executable, "-m", "lifecycle.torchrun", *multi, f"--nproc_per_node={gpus}", *step.argv,
            *launcher]
