"""Training signals: the noise-scale estimator against known truth, its smoothing, the
adaptive policy, and their integration into GradAccumulator (window loss, noise scale,
changing K), through both backends.

Known truth: least squares at fixed weights, ``loss = ½ (xᵀw - y)²`` with
``x ~ N(0, I_d)``, ``y = xᵀw* + ε``, ``ε ~ N(0, σ²)``. With ``δ = w - w*`` the per-example
gradient ``x (xᵀδ - ε)`` has mean ``𝒢 = δ`` and ``E|g|² = (d + 2)|δ|² + d σ²`` (Gaussian
fourth moments), so ``tr(Σ) = (d + 1)|δ|² + d σ²`` and ``|𝒢|² = |δ|²``, exactly.
"""

import math

import pytest
import torch

from fusedaccum.signals import (AdaptiveSteps, NoiseScaleSettings, NoiseTracker, _Smoother, estimate_noise,
                                settings_from)

D, SIGMA = 8, 0.5


def lsq_truth(delta):
    d2 = float(delta.pow(2).sum())
    return (D + 1) * d2 + D * SIGMA**2, d2


def lsq_windows(windows, sizes, seed):
    """Per-micro-batch mean gradients [windows, K, D] of the least-squares model (float64)."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.linspace(-1, 1, D, dtype=torch.float64) * 0.3
    n = sum(sizes)
    x = torch.randn(windows, n, D, generator=g, dtype=torch.float64)
    eps = torch.randn(windows, n, generator=g, dtype=torch.float64) * SIGMA
    per_item = x * (x @ delta - eps).unsqueeze(-1)  # [windows, n, D]
    micro = torch.stack([chunk.mean(1) for chunk in per_item.split(list(sizes), dim=1)], dim=1)
    return micro, per_item.mean(1), delta


SIZES = (1, 3, 8, 20)  # very unequal: h = mean(1/b) = 0.377, 1/mean(b) = 0.125
WINDOWS = 20000


def test_estimator_is_unbiased_for_unequal_micro_batches_and_the_naive_one_is_not():
    """20000 windows of 4 micro-batches of 1, 3, 8 and 20 items. The mean of the
    estimates must be within 4 standard errors (and 3 %) of the truth; the naive estimator,
    which takes 1/mean(b) for mean(1/b), must be off by more than 20 standard errors."""
    micro, window, delta = lsq_windows(WINDOWS, SIZES, seed=0)
    true_s, true_g2 = lsq_truth(delta)
    b = torch.tensor(SIZES, dtype=torch.float64)
    big = sum(SIZES)
    # The window's gradient is the items' mean: Σ b_i g_i / B, as the accumulator forms it.
    torch.testing.assert_close(window, (micro * b[:, None]).sum(1) / big)
    small_sq = micro.pow(2).sum(-1).sum(-1)  # Σ_i |g_i|² per window
    big_sq = window.pow(2).sum(-1)
    s, g2 = estimate_noise(small_sq, b.reciprocal().sum(), len(SIZES), big_sq, big)
    for est, truth in ((s, true_s), (g2, true_g2)):
        se = est.std() / math.sqrt(WINDOWS)
        assert abs(est.mean() - truth) < 4 * se, (float(est.mean()), truth, float(se))
        assert abs(est.mean() - truth) < 0.03 * truth
    naive_s, naive_g2 = estimate_noise(small_sq, len(SIZES) / b.mean(), len(SIZES), big_sq, big)
    assert abs(naive_s.mean() - true_s) > 20 * naive_s.std() / math.sqrt(WINDOWS)
    assert abs(naive_s.mean() - true_s) > 0.5 * true_s  # a factor, not a rounding
    assert abs(naive_g2.mean() - true_g2) > 20 * naive_g2.std() / math.sqrt(WINDOWS)


def test_estimator_with_equal_sizes_is_the_classic_two_batch_one():
    """b_i = b for all K: S = (m - |G|²) / (1/b - 1/B), McCandlish et al.'s formula."""
    m, big_sq, b, k = torch.tensor(5.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 4, 8
    s, g2 = estimate_noise(m * k, k / b, k, big_sq, k * b)
    assert float(s) == pytest.approx(3.0 / (1 / 4 - 1 / 32))
    assert float(g2) == pytest.approx(2.0 - float(s) / 32)
    s1, _ = estimate_noise(big_sq, 1 / 32, 1, big_sq, 32)  # the only small batch is the window
    assert not torch.isfinite(s1)


def test_smoother_bias_correction_and_skipped_windows():
    sm = _Smoother(0.9)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    yes, no = torch.tensor(True), torch.tensor(False)
    out = sm.update(t(4.0), t(2.0), no, "items")
    assert torch.isnan(out.trace_cov) and float(out.windows) == 0 and torch.isnan(out.window_trace_cov)
    out = sm.update(t(4.0), t(2.0), yes, "items")  # bias corrected: the first value itself
    assert float(out.trace_cov) == pytest.approx(4.0) and float(out.b_simple) == pytest.approx(2.0)
    out = sm.update(t(math.nan), t(2.0), no, "items")  # a skipped window leaves the state alone
    assert float(out.trace_cov) == pytest.approx(4.0) and float(out.windows) == 1
    out = sm.update(t(8.0), t(2.0), yes, "items")
    # (0.9·0.1·4 + 0.1·8) / (1 - 0.81)
    assert float(out.trace_cov) == pytest.approx((0.09 * 4 + 0.1 * 8) / 0.19)
    assert float(out.window_trace_cov) == 8.0 and float(out.windows) == 2
    sm0 = _Smoother(0.0)
    sm0.update(t(4.0), t(2.0), yes, "items")
    assert float(sm0.update(t(6.0), t(3.0), yes, "items").trace_cov) == 6.0


def test_adaptive_policy_target_clamps_and_decides_every_n_windows():
    policy = AdaptiveSteps(min_steps=2, max_steps=16, every=3)
    assert policy.target(64.0, 4.0, 1) == 16
    assert policy.target(64.0, 4.0, 2) == 8
    assert policy.target(1000.0, 1.0, 1) == 16 and policy.target(1.0, 4.0, 1) == 2
    assert policy.target(math.nan, 4.0, 1) is None and policy.target(-3.0, 1.0, 1) is None
    seen = []
    tracker = NoiseTracker(NoiseScaleSettings(beta=0.0, adaptive=AdaptiveSteps(1, 64, every=3, on_change=seen.append)))
    one = torch.ones((), dtype=torch.float64)
    stats = tracker.update(one * 40, one * 10, 4, one, 16, torch.tensor(True), "items")
    b_simple = float(stats.b_simple)
    k, decided = 4, []
    for _ in range(6):
        change = tracker.decide(stats, one * 2, 1, k)
        decided.append(change)
        k = change.new if change else k
    assert decided[:2] == [None, None] and decided[3:] == [None, None, None]  # windows 3 and 6 only decide
    assert decided[2].old == 4 and decided[2].new == k == round(b_simple / 2) and decided[2].window == 1
    assert seen == tracker.changes == [decided[2]]  # window 6 wanted the same K: no change reported


@pytest.mark.parametrize("bad", [dict(min_steps=0), dict(max_steps=0), dict(every=0), dict(min_steps=4, max_steps=2),
                                 dict(min_steps=1.5), dict(on_change=3)])
def test_adaptive_policy_rejects_bad_settings(bad):
    with pytest.raises((ValueError, TypeError)):
        AdaptiveSteps(**bad)


def test_settings_argument():
    assert settings_from(False) is None and settings_from(None) is None
    assert settings_from(True) == NoiseScaleSettings()
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleSettings(beta=1.0)
    with pytest.raises(TypeError, match="noise_scale"):
        settings_from("yes")
