"""Does a better ImageNet backbone transfer better? Across arms, the rank and linear correlation of the exported
weights' top-1 with a downstream metric (Spearman's rho, Pearson's r), with 95 % bootstrap intervals; per arm, the
transfer ratio: its downstream difference to the reference arm over its top-1 difference, and whether the two moved
the same way (Kornblith, Shlens and Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019, measured r = 0.96
fine-tuned and 0.99 with fixed features over 16 networks; the Bag of Tricks paper's Table 9 has tricks that raise
top-1 and lower FCN's pixel accuracy).

The bootstrap resamples arms with replacement and, within each arm with several seeds, its seeds (paired: a seed's
top-1 with the same seed's downstream run), ``BOOTSTRAP`` times from a fixed generator, so a report is reproducible.
A resample in which either quantity is constant has no correlation and is left out; an interval is given only when
most resamples have one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP = 2000
MIN_ARMS = 3  # below this a correlation is not shown: two points always lie on a line


@dataclass(frozen=True)
class Correlation:
    n: int  # arms
    spearman: float | None  # None: undefined (a quantity is constant across the arms)
    pearson: float | None
    spearman_ci: tuple[float, float] | None
    pearson_ci: tuple[float, float] | None


@dataclass(frozen=True)
class Ratio:
    top1: float  # mean paired top-1 difference to the reference
    downstream: float  # mean paired downstream difference
    n: int  # paired seeds
    ratio: float | None  # None when top-1 did not change
    ci: tuple[float, float] | None  # bootstrap over seeds; None with one seed or a degenerate resample set

    @property
    def same_direction(self) -> bool | None:
        if self.top1 == 0 or self.downstream == 0:
            return None
        return (self.top1 > 0) == (self.downstream > 0)

    @property
    def hurts(self) -> bool:  # the paper's case: top-1 up, the downstream metric down
        return self.top1 > 0 and self.downstream < 0


def _coefficients(x: np.ndarray, y: np.ndarray) -> tuple[float | None, float | None]:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, None
    return float(stats.spearmanr(x, y).statistic), float(stats.pearsonr(x, y).statistic)


def _interval(values: list[float], draws: int) -> tuple[float, float] | None:
    if len(values) <= draws / 2:  # undefined in most resamples: no honest interval
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def correlation(points: dict[str, list[tuple[float, float]]], seed: int = 0) -> Correlation | None:
    """``points``: arm -> its (top-1, metric) pairs, one per seed. None with fewer than ``MIN_ARMS`` arms."""
    arms = [pairs for pairs in points.values() if pairs]
    if len(arms) < MIN_ARMS:
        return None
    means = np.array([[statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)]
                      for pairs in arms])
    rho, r = _coefficients(means[:, 0], means[:, 1])
    rng, rhos, rs = np.random.default_rng(seed), [], []
    for _ in range(BOOTSTRAP):
        sample = []
        for i in rng.integers(0, len(arms), len(arms)):
            pairs = arms[i]
            picked = [pairs[j] for j in rng.integers(0, len(pairs), len(pairs))] if len(pairs) > 1 else pairs
            sample.append((statistics.fmean(p[0] for p in picked), statistics.fmean(p[1] for p in picked)))
        b_rho, b_r = _coefficients(*np.array(sample).T)
        if b_rho is not None and not math.isnan(b_rho):
            rhos.append(b_rho)
        if b_r is not None and not math.isnan(b_r):
            rs.append(b_r)
    return Correlation(len(arms), rho, r, _interval(rhos, BOOTSTRAP), _interval(rs, BOOTSTRAP))


def transfer_ratio(top1: dict[int, float], ref_top1: dict[int, float], metric: dict[int, float],
                   ref_metric: dict[int, float], seed: int = 0) -> Ratio | None:
    """An arm's downstream difference to the reference over its top-1 difference, over the seeds where both arms
    have both numbers (paired by seed); the interval by bootstrap over those seeds."""
    seeds = sorted(top1.keys() & ref_top1.keys() & metric.keys() & ref_metric.keys())
    if not seeds:
        return None
    dt = np.array([top1[s] - ref_top1[s] for s in seeds])
    dm = np.array([metric[s] - ref_metric[s] for s in seeds])
    mean_t, mean_m = float(dt.mean()), float(dm.mean())
    ratio = mean_m / mean_t if mean_t != 0 else None
    ci = None
    if len(seeds) > 1 and ratio is not None:
        rng, ratios = np.random.default_rng(seed), []
        for _ in range(BOOTSTRAP):
            idx = rng.integers(0, len(seeds), len(seeds))
            if (t := dt[idx].mean()) != 0:
                ratios.append(float(dm[idx].mean() / t))
        ci = _interval(ratios, BOOTSTRAP) if len(set(ratios)) > 1 else None  # all alike: spread unknown
    return Ratio(mean_t, mean_m, len(seeds), ratio, ci)
