"""Does a better ImageNet backbone transfer better? Across arms, the rank and linear correlation of the exported
weights' top-1 with a downstream metric (Spearman's rho, Pearson's r); per arm, the transfer ratio: its downstream
difference to the reference arm over its top-1 difference, and whether the two moved the same way (Kornblith, Shlens
and Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019, measured r = 0.96 fine-tuned and 0.99 with fixed
features over 16 networks; the Bag of Tricks paper's Table 9 has tricks that raise top-1 and lower FCN's pixel
accuracy).

A study has few arms (3 to 10) and few seeds (1 to 5), where a bootstrap is overconfident: resampling five arms that
lie in order gives rho = 1 every time, an interval [+1, +1]; resampling two seeds gives only their range, which held
the true ratio in 51 % of simulated two-seed studies (docs/protocol.md). So the uncertainty comes from small-sample
methods instead:
- Spearman's rho: the exact permutation p-value (every order of the arms; a fixed sample of orders above
  ``EXACT_ARMS``), the chance that arms unrelated to top-1 rank as much alike. Three arms in order: p = 0.33.
- Pearson's r: the Fisher z interval (needs four arms).
- The transfer ratio: Fieller's interval for a ratio of two paired means (t with n - 1 degrees of freedom); it is
  unbounded where the top-1 difference's own interval includes zero.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MIN_ARMS = 3  # below this a correlation is not shown: two points always lie on a line
EXACT_ARMS = 8  # up to 8! = 40,320 orders the permutation p-value is exact; above, PERMUTATIONS drawn orders
PERMUTATIONS = 20_000
ALIKE = 1e-9  # a spread below this (relative to the values) is rounding: the values are identical


@dataclass(frozen=True)
class Correlation:
    n: int  # arms
    spearman: float | None  # None: undefined (a quantity is constant across the arms)
    pearson: float | None
    spearman_p: float | None  # two-sided permutation p-value
    pearson_ci: tuple[float, float] | None  # Fisher z; None below four arms or at |r| = 1


@dataclass(frozen=True)
class Ratio:
    top1: float  # mean paired top-1 difference to the reference
    downstream: float  # mean paired downstream difference
    n: int  # paired seeds
    ratio: float | None  # None when top-1 did not change
    ci: tuple[float, float] | None  # Fieller's interval; None when ``no_ci`` says why
    no_ci: str | None = None

    @property
    def same_direction(self) -> bool | None:
        if self.top1 == 0 or self.downstream == 0:
            return None
        return (self.top1 > 0) == (self.downstream > 0)

    @property
    def hurts(self) -> bool:  # the paper's case: top-1 up, the downstream metric down
        return self.top1 > 0 and self.downstream < 0


def alike(values) -> bool:
    """Whether values differ by rounding only (100 * 403 / 500 - 100 * 399 / 500 is not exactly 0.8)."""
    v = np.asarray(values, dtype=float)
    return bool(np.ptp(v) <= ALIKE * max(1.0, float(np.abs(v).max())))


def _spearman_p(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The share of orders of the arms (all of them, or ``PERMUTATIONS`` drawn) whose rank correlation is at least
    as far from 0 as the observed one."""
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    if len(x) <= EXACT_ARMS:
        orders = np.array(list(itertools.permutations(range(len(x)))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.array([rng.permutation(len(x)) for _ in range(PERMUTATIONS)])
    scale = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    observed, null = abs(float(rx @ ry)) / scale, np.abs(ry[orders] @ rx) / scale
    return float(np.mean(null >= observed - ALIKE))


def _fisher_interval(r: float, n: int) -> tuple[float, float] | None:
    if n < 4 or abs(r) >= 1 - ALIKE:  # z = atanh(r) has standard error 1 / sqrt(n - 3)
        return None
    half = stats.norm.ppf(0.5 + CONFIDENCE / 2) / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def correlation(points: dict[str, list[tuple[float, float]]], seed: int = 0) -> Correlation | None:
    """``points``: arm -> its (top-1, metric) pairs, one per seed; each arm counts at its means over seeds. None with
    fewer than ``MIN_ARMS`` arms."""
    arms = [pairs for pairs in points.values() if pairs]
    if len(arms) < MIN_ARMS:
        return None
    x, y = np.array([[statistics.fmean(p[i] for p in pairs) for pairs in arms] for i in (0, 1)])
    if alike(x) or alike(y):
        return Correlation(len(arms), None, None, None, None)
    rho, r = float(stats.spearmanr(x, y).statistic), float(stats.pearsonr(x, y).statistic)
    return Correlation(len(arms), rho, r, _spearman_p(x, y, seed), _fisher_interval(r, len(arms)))


def fieller(dm: np.ndarray, dt: np.ndarray) -> tuple[float, float] | None:
    """Fieller's interval for mean(dm) / mean(dt), paired samples: the ratios R for which mean(dm) - R mean(dt) is
    within its t interval of 0. None when unbounded (mean(dt) itself is not clear of 0)."""
    n = len(dm)
    cov = np.cov(np.vstack([dm, dt]), ddof=1) / n  # of the two means
    a, b, t2 = float(dm.mean()), float(dt.mean()), stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) ** 2
    qa, qb, qc = b * b - t2 * cov[1, 1], a * b - t2 * cov[0, 1], a * a - t2 * cov[0, 0]
    if qa <= 0:
        return None
    half = math.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0: the estimate a / b always lies inside
    return float((qb - half) / qa), float((qb + half) / qa)


def transfer_ratio(top1: dict[int, float], ref_top1: dict[int, float], metric: dict[int, float],
                   ref_metric: dict[int, float]) -> Ratio | None:
    """An arm's downstream difference to the reference over its top-1 difference, over the seeds where both arms
    have both numbers (paired by seed), with Fieller's interval over those seeds."""
    seeds = sorted(top1.keys() & ref_top1.keys() & metric.keys() & ref_metric.keys())
    if not seeds:
        return None
    dt = np.array([top1[s] - ref_top1[s] for s in seeds])
    dm = np.array([metric[s] - ref_metric[s] for s in seeds])
    mean_t, mean_m = float(dt.mean()), float(dm.mean())
    if alike(np.append(dt, 0.0)):
        return Ratio(mean_t, mean_m, len(seeds), None, None, "top-1 unchanged")
    ratio, ci, why = mean_m / mean_t, None, None
    if len(seeds) == 1:
        why = "no interval: 1 seed"
    elif alike(dt) and alike(dm):
        why = "no interval: identical in each seed"
    elif (ci := fieller(dm, dt)) is None:
        why = "unbounded: top-1's own interval includes 0"
    return Ratio(mean_t, mean_m, len(seeds), ratio, ci, why)
