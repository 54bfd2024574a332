"""The statistics the experiments report, each small enough to check by hand.

- ``paired``: per-seed differences between two arms (a seed gives both arms the same batches and
  the same validation windows), their mean, standard deviation, two-sided p-value and 95%
  t-interval over seeds.
- ``holm``: Holm's step-down adjustment of a table of p-values, so that a table of many
  comparisons claims no more than its family-wise error rate allows.
- ``clustered_se``: the standard error of a mean over validation windows when windows from one
  document are not independent (a window of code resembles its neighbours): the cluster-robust
  (sandwich) estimator with documents as clusters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from dsmoe_jax.errors import ExperimentError

EXTRA = "pip install 'dsmoe-jax[experiments]' (or '.[experiments]' in a checkout)"
try:
    import scipy.stats
except ImportError as e:  # the experiments' dependencies are an extra
    raise ExperimentError(f"the experiments need scipy, which this install lacks: {EXTRA}") from e

LEVEL = 0.95  # every interval the experiments report


@dataclasses.dataclass(frozen=True)
class Paired:
    """Per-seed differences A - B and what they say; the spread, p-value and interval are None
    for a single seed (nothing to estimate a spread from)."""

    mean: float
    sd: float | None
    p_value: float | None  # two-sided, one-sample t-test of mean 0
    ci95: tuple[float, float] | None
    n: int


def paired(diffs: Sequence[float]) -> Paired:
    """Mean, standard deviation, two-sided t-test p-value and 95% t-interval of ``diffs``."""
    d = np.asarray(diffs, float)
    if len(d) == 0:
        raise ValueError("no differences to summarise: give at least one seed")
    mean = float(d.mean())
    if len(d) < 2:
        return Paired(mean, None, None, None, 1)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(len(d))
    half = float(scipy.stats.t.ppf(0.5 + LEVEL / 2, len(d) - 1)) * se
    if se == 0:  # identical differences: no spread to test against
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * scipy.stats.t.sf(abs(mean) / se, len(d) - 1))
    return Paired(mean, sd, p, (mean - half, mean + half), len(d))


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's adjusted p-values, in the given order (None stays None and is not counted): the
    i-th smallest of m p-values is multiplied by m - i + 1, made monotone, capped at 1. A
    comparison whose adjusted p is below 0.05 survives the family-wise correction at 5%."""
    present = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def clustered_se(values: Sequence[float], clusters: Sequence[int]) -> float:
    """Standard error of the mean of ``values`` with observations grouped by ``clusters`` (e.g.
    the document each validation window starts in): sqrt(G / (G - 1) * sum_g r_g^2) / n with
    r_g the sum of the residuals from the mean in cluster g, G clusters and n values. With every
    value its own cluster it is the usual standard error."""
    v, c = np.asarray(values, float), np.asarray(clusters)
    if v.shape != c.shape:
        raise ValueError(f"{len(v)} values but {len(c)} cluster labels")
    ids, inverse = np.unique(c, return_inverse=True)
    if len(ids) < 2:
        raise ValueError("a clustered standard error needs at least two clusters")
    residual_sums = np.bincount(inverse, weights=v - v.mean())
    g = len(ids)
    return float(math.sqrt(g / (g - 1) * np.sum(residual_sums**2)) / len(v))
