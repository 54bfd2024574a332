"""The experiments' statistics against scipy and hand computations."""

import math

import numpy as np
import pytest
import scipy.stats

from dsmoe_jax.experiments import stats


@pytest.mark.parametrize("diffs", [[0.1, 0.2, 0.3], [-0.05, -0.02, -0.04, 0.01, -0.03, -0.06], [1.0, -2.0]])
def test_paired_matches_scipys_t_test_and_interval(diffs):
    s = stats.paired(diffs)
    test = scipy.stats.ttest_1samp(diffs, 0.0)
    low, high = scipy.stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=scipy.stats.sem(diffs))
    assert s.p_value == pytest.approx(test.pvalue, rel=1e-10), (s, test)
    assert s.ci95 == pytest.approx((low, high), rel=1e-10), s
    assert s.sd == pytest.approx(np.std(diffs, ddof=1)) and s.n == len(diffs)


def test_paired_by_hand_and_for_one_seed():
    """0.1, 0.2, 0.3: mean 0.2, std 0.1, t(0.975, 2) = 4.3027 -> +- 0.24841."""
    s = stats.paired([0.1, 0.2, 0.3])
    assert s.mean == pytest.approx(0.2) and s.sd == pytest.approx(0.1)
    assert s.ci95 == pytest.approx((0.2 - 0.24841, 0.2 + 0.24841), abs=1e-5)
    one = stats.paired([0.4])
    assert (one.mean, one.sd, one.p_value, one.ci95) == (0.4, None, None, None), "one seed: nothing to estimate"
    assert stats.paired([0.1, 0.1]).p_value == 0.0, "no spread and a nonzero mean"
    with pytest.raises(ValueError, match="at least one seed"):
        stats.paired([])


def test_holm_by_hand():
    """p = 0.01, 0.04, 0.03, 0.2 (m = 4): sorted 0.01 x4 = 0.04, 0.03 x3 = 0.09, 0.04 x2 = 0.08 -> made
    monotone 0.09, 0.2 x1 = 0.2; back in the given order."""
    assert stats.holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert stats.holm([0.5, None, 0.6]) == [pytest.approx(1.0), None, pytest.approx(1.0)], "capped at 1, None kept"
    assert stats.holm([]) == []


def test_holm_rejects_what_the_step_down_procedure_rejects():
    """Holm at 5% as the textbook procedure: walk the sorted p-values, reject while p_(i) <= 0.05 / (m - i)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 0.1, size=8)
        order = np.argsort(p)
        rejected = set()
        for i, j in enumerate(order):
            if p[j] > 0.05 / (len(p) - i):
                break
            rejected.add(j)
        adjusted = stats.holm(list(p))
        assert {j for j, a in enumerate(adjusted) if a <= 0.05} == rejected, p


def test_clustered_se_by_hand_and_without_clusters():
    """Values 1, 3 (cluster 0) and 2, 6 (cluster 1): mean 3, residual sums -2 and +2, G = 2, n = 4:
    sqrt(2 / 1 * 8) / 4 = 1; with each value its own cluster it is the usual std / sqrt(n)."""
    assert stats.clustered_se([1, 3, 2, 6], [0, 0, 1, 1]) == pytest.approx(1.0)
    values = np.random.default_rng(1).normal(size=40)
    assert stats.clustered_se(values, np.arange(40)) == pytest.approx(scipy.stats.sem(values), rel=1e-12)
    with pytest.raises(ValueError, match="at least two clusters"):
        stats.clustered_se([1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        stats.clustered_se([1.0, 2.0, 3.0], [0, 1])


def test_clustering_widens_the_error_of_correlated_windows():
    """Windows that share their document's offset are not independent: the clustered error sees the
    spread of 5 document means, the independent one 50 windows' noise (about sqrt(10) narrower)."""
    rng = np.random.default_rng(2)
    documents = np.repeat(np.arange(5), 10)
    values = rng.normal(size=5)[documents] + 0.01 * rng.normal(size=50)
    independent = np.std(values, ddof=1) / math.sqrt(50)
    assert stats.clustered_se(values, documents) > 2 * independent
