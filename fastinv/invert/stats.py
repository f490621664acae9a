"""Statistics a report may lean on: KID between image sets, paired bootstrap intervals, and
the three-way verdict on a finding.

- ``kid``: Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² estimate with
  the cubic polynomial kernel ``k(a, b) = (aᵀb / d + 1)³``, averaged over random subsets; here
  in the feature space of the evaluation judge (no downloaded Inception weights). 0 for two
  samples of one distribution (up to sampling noise, it can go slightly negative), > 0 when
  they differ.
- ``bootstrap_mean``: percentile bootstrap interval of the mean of per-image values — for a
  paired comparison, ``bootstrap_diff`` of the per-image values (same images, two conditions);
  ``bootstrap_stat`` for a statistic of resampled images that is not a mean (an R²).
- ``verdict``: "reproduced" only when the interval excludes 0 in the expected direction and
  every quality gate holds; "contradicted" when it excludes 0 the other way (gates holding);
  otherwise "inconclusive", with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kid(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 50, subset_size: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased KID between feature sets (N, d) and (M, d)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"kid needs two (N, d) feature sets of one width, got "
                         f"{tuple(real.shape)} and {tuple(fake.shape)}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError("kid needs at least 2 samples in each set")
    real, fake = real.double().cpu(), fake.double().cpu()
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        i = torch.randperm(real.shape[0], generator=gen)[:size]
        j = torch.randperm(fake.shape[0], generator=gen)[:size]
        vals.append(_mmd2_unbiased(real[i], fake[j]))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std())


@dataclass
class Interval:
    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n, "level": self.level}

    def __str__(self) -> str:
        return f"{self.mean:+.4g} [{self.lo:+.4g}, {self.hi:+.4g}]"


def _array(values) -> np.ndarray:
    """float64 numpy copy of a tensor (any device) or array-like."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
    return np.asarray(values, dtype=np.float64)


def bootstrap_mean(values, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values`` (1-D, one value per image)."""
    v = _array(values).ravel()
    v = v[np.isfinite(v)]
    if v.size < 2:
        raise ValueError(f"bootstrap_mean needs at least 2 finite values, got {v.size}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return Interval(float(v.mean()), float(lo), float(hi), int(v.size), level)


def bootstrap_stat(fn, n: int, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> Interval:
    """Percentile bootstrap interval of a statistic ``fn(idx)`` of ``n`` images that is not a
    plain mean (an R², say): ``fn`` is called with the full index array, then resampled ones."""
    if n < 2:
        raise ValueError(f"bootstrap_stat needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    full = float(fn(np.arange(n)))
    vals = np.asarray([fn(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    a = (1 - level) / 2
    lo, hi = np.quantile(vals, [a, 1 - a]) if vals.size else (math.nan, math.nan)
    return Interval(full, float(lo), float(hi), n, level)


def bootstrap_diff(a, b, **kw) -> Interval:
    """Interval of mean(a - b) for paired per-image values (the same images in both)."""
    a, b = _array(a), _array(b)
    if a.shape != b.shape:
        raise ValueError(f"bootstrap_diff needs paired values of one shape, got {a.shape}, {b.shape}")
    return bootstrap_mean(a - b, **kw)


@dataclass
class Gate:
    """A quality precondition of a finding: ``value >= threshold``."""

    name: str
    value: float
    threshold: float

    @property
    def holds(self) -> bool:
        return not math.isnan(self.value) and self.value >= self.threshold

    def __str__(self) -> str:
        # 3 decimals for a rate, a count as a count: "0.958 < 0.99", "1 < 5"
        return f"{self.name} {round(self.value, 3):g} {'≥' if self.holds else '<'} {self.threshold:g}"


@dataclass
class Verdict:
    outcome: str  # reproduced | contradicted | inconclusive
    reason: str
    interval: Interval | None = None
    gates: list[Gate] = field(default_factory=list)


def verdict(interval: Interval | None, direction: int, gates: list[Gate]) -> Verdict:
    """``direction`` +1: the paper predicts a positive difference; -1: negative."""
    failed = [g for g in gates if not g.holds]
    if interval is None and not failed:
        return Verdict("inconclusive", "no measurement", None, gates)
    if failed:  # named first: a gate that fails (e.g. too few images) is why there is no interval
        return Verdict("inconclusive", "quality gate not met: " + "; ".join(map(str, failed)),
                       interval, gates)
    if not interval.excludes_zero():
        return Verdict("inconclusive", f"the {interval.level:.0%} interval {interval} includes 0",
                       interval, gates)
    agrees = (interval.mean > 0) == (direction > 0)
    if agrees:
        return Verdict("reproduced", f"the {interval.level:.0%} interval {interval} excludes 0 "
                       "in the paper's direction", interval, gates)
    return Verdict("contradicted", f"the {interval.level:.0%} interval {interval} excludes 0 "
                   "against the paper's direction", interval, gates)
