"""A study's numbers from its summary.json files (any layout; each names its stage, arm and seed): per arm and metric
the mean and sample std over seeds, and each arm's difference to a reference arm over the seeds both ran (paired: a
seed fixes both runs' data order and initialisation) with its 95 % t-interval (scipy.stats.t)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from export.files import PUBLISHED_KINDS
from lifecycle.artifacts import read_summary
from lifecycle.errors import UserError
from study import paper
from study.run import STATUS_FILE, read_status
from study.transfer_stats import alike

CONFIDENCE = 0.95
FINE_TUNED, FROZEN = "fine-tuned", "frozen"  # a downstream run's backbone (its summary's protocol.backbone)


class ResultsError(UserError, ValueError):
    """Bad study input: one line naming the file and the fix."""


@dataclass(frozen=True)
class Run:
    path: Path  # relative to the study dir
    summary: dict[str, Any]
    stage = property(lambda self: self.summary["stage"])
    arm = property(lambda self: self.summary["arm"])
    seed = property(lambda self: self.summary["seed"])

    @property
    def mode(self) -> str | None:  # downstream: fine-tuned (summaries before the frozen mode: all) or frozen
        return None if self.stage == "classification" else (self.summary.get("protocol") or {}).get("backbone",
                                                                                                     FINE_TUNED)


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample std (n-1); None for one seed
    n: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Difference:
    """The mean of an arm's per-seed differences to the reference and its 95 % t-interval; None without a spread
    to measure: one seed, or differences identical across seeds (``identical``), whose spread is unknown, not zero
    (two seeds agreeing to the last digit say nothing of a third)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    identical: bool = False

    @property
    def direction(self) -> str | None:  # only when the interval excludes zero
        return None if self.low is None or self.low <= 0 <= self.high else "higher" if self.low > 0 else "lower"


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stat(values: dict[int, float]) -> Stat | None:
    xs = list(values.values())
    return Stat(statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs), tuple(sorted(values))
                ) if xs else None


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Difference | None:
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if len(d) < 2:
        return Difference(d[0], None, None, 1) if d else None
    mean, sem = statistics.mean(d), stats.sem(d)
    if alike(d):  # not sem == 0: 50.6 - 49.8 and 50.0 - 49.2 differ in their last bits
        return Difference(mean, None, None, len(d), identical=True)
    low, high = stats.t.interval(CONFIDENCE, len(d) - 1, loc=mean, scale=sem)
    return Difference(mean, float(low), float(high), len(d))


@dataclass
class Results:
    root: Path
    runs: list[Run]
    status: list[dict[str, Any]] | None = None  # study_status.json's entries, where the study wrote one

    @property
    def arms(self) -> list[str]:
        return sorted({r.arm for r in self.runs}, key=paper.arm_sort_key)

    @property
    def reference(self) -> str:  # the arm the others are compared with
        return paper.B_STANDARD if paper.B_STANDARD in self.arms else paper.RANDOM_INIT

    @property
    def modes(self) -> list[str]:
        """The backbone modes of the downstream runs, fine-tuned first."""
        return sorted({r.mode for r in self.runs if r.mode}, key=[FINE_TUNED, FROZEN].index)

    def in_mode(self, mode: str) -> Results:
        """The classification runs and the downstream runs of one backbone mode: every table, finding and statistic
        compares runs of one mode."""
        return Results(self.root, [r for r in self.runs if r.mode in (None, mode)], self.status)

    def select(self, arm: str | None = None, stage: str | None = None) -> list[Run]:
        return [r for r in self.runs if arm in (None, r.arm) and stage in (None, r.stage)]

    def values(self, arm: str, stage: str, metric: str) -> dict[int, float]:
        """seed -> value of one metric, over the arm's runs that report it."""
        out = {}
        for run in self.select(arm, stage):
            if (v := run.summary["metrics"].get(metric)) is not None and not _number(v):
                raise ResultsError(f"{self.root / run.path}: metric {metric!r} is {v!r}, not a number; rerun the "
                                   f"{stage} stage")
            out.update({run.seed: float(v)} if v is not None else {})
        return out

    def stat(self, arm: str, stage: str, metric: str) -> Stat | None:
        return stat(self.values(arm, stage, metric))

    def difference(self, arm: str, stage: str, metric: str, reference: str) -> Difference | None:
        return paired_difference(self.values(arm, stage, metric), self.values(reference, stage, metric))

    def backbone_top1(self, arm: str) -> dict[int, float]:
        """seed -> top-1 of exactly the weights the arm's downstream runs used (their export's source_top1: a trained
        run's exported epoch, or a library's number for published weights), else the classification summary's."""
        out: dict[int, float] = {}
        for run in self.select(arm):
            if run.stage != "classification" and _number((run.summary.get("backbone") or {}).get("source_top1")):
                out.setdefault(run.seed, float(run.summary["backbone"]["source_top1"]))
        return out or self.values(arm, "classification", "top1")

    def published(self, arm: str) -> bool:  # published weights: no classification stage by design
        return any((r.summary.get("backbone") or {}).get("source_kind") in PUBLISHED_KINDS for r in self.select(arm))

    def classification_data(self) -> str:
        """What the top-1 was measured on: 'ImageNet' for its 1000 real classes, else the data's folder, class count
        and whether it was generated (the demo's 10 classes)."""
        seen = {((r.summary.get("protocol") or {}).get("dataset"), (r.summary.get("protocol") or {}).get(
            "num_classes"), bool((r.summary.get("config") or {}).get("allow_synthetic")))
            for r in self.select(stage="classification")}
        return "ImageNet" if seen <= {("imagenet", 1000, False)} else "; ".join(
            f"{d} ({f'{n} classes' if n else 'classes not recorded'}{', generated' if s else ''})"
            for d, n, s in sorted(seen, key=str))


def load_results(study_dir: str | Path) -> Results:
    """Every summary.json below ``study_dir``, checked, and study_status.json's entries if there is one."""
    root = Path(study_dir)
    if not root.is_dir():
        raise ResultsError(f"{root}: not a directory; pass the study directory that holds the runs' summary.json")
    if not (paths := sorted(root.rglob("summary.json"))):
        raise ResultsError(f"{root}: no summary.json found below it; run the study first, or pass its directory")
    runs, seen = [], {}
    for p in paths:
        s = read_summary(p)  # SummaryError: unreadable file or unknown schema version, naming the file
        problem = ("has no 'arm' name" if not isinstance(s.get("arm"), str) or not s["arm"] else
                   f"'seed' is {s.get('seed')!r}, not an integer" if type(s.get("seed")) is not int else
                   "has no 'metrics' dict" if not isinstance(s.get("metrics"), dict) else
                   next((f"metric {k!r} is {v!r}, not a finite number" for k, v in s["metrics"].items()
                         if isinstance(v, float) and not math.isfinite(v)), None))  # checked before a file is written
        if problem:
            raise ResultsError(f"{p}: summary {problem}; rerun the stage that writes it")
        run = Run(p.relative_to(root), s)
        if run.mode not in (None, FINE_TUNED, FROZEN):
            raise ResultsError(f"{p}: protocol.backbone is {run.mode!r}, not {FINE_TUNED!r} or {FROZEN!r}; rerun the "
                               f"{s['stage']} stage")
        if (key := (s["arm"], s["stage"], s["seed"], run.mode)) in seen:
            raise ResultsError(f"{p}: second {s['stage']} summary for arm {s['arm']!r} seed {s['seed']} (first: "
                               f"{seen[key]}); remove the one that does not belong")
        seen[key] = p
        runs.append(run)
    return Results(root, runs, read_status(root) if (root / STATUS_FILE).exists() else None)
