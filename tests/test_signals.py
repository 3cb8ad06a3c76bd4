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


# ---------------------------------------------------------------- Σ grad² in the accumulate pass

from helpers import GRAD_DTYPES, SIZES as BOUNDARY_SIZES, randn  # noqa: E402

import fusedaccum  # noqa: E402
from fusedaccum import ops  # noqa: E402


@pytest.mark.parametrize("n", BOUNDARY_SIZES)
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
def test_accumulate_pass_sums_grad_squares(backend, device, dtype, n):
    """Two micro-batches through the pass: the slots' sum is w1·Σg1² (overwrite), then
    + w2·Σg2² (the second weight a device tensor); acc and the zeroed grad as without."""
    acc = torch.full((n,), 7.0, device=device)
    sq = torch.full((ops.sq_slots(acc),), 5.0, device=device)  # garbage: overwrite must reset it
    g1, g2 = randn(n, dtype, device, seed=1), randn(n, dtype, device, seed=2, scale=3.0)
    e1, e2 = g1.double().pow(2).sum(), g2.double().pow(2).sum()
    fusedaccum.accumulate_(acc, g1.clone(), 2.0, overwrite=True, sq_out=sq, sq_weight=0.25)
    assert float(sq.double().sum()) == pytest.approx(0.25 * float(e1), rel=1e-5, abs=1e-30)
    grad = g2.clone()
    fusedaccum.accumulate_(acc, grad, 1.0, zero_grad=True, sq_out=sq,
                           sq_weight=torch.tensor(0.5, device=device))
    assert float(sq.double().sum()) == pytest.approx(0.25 * float(e1) + 0.5 * float(e2), rel=1e-5, abs=1e-30)
    torch.testing.assert_close(acc.double(), 2.0 * g1.double() + g2.double(), rtol=2e-6, atol=1e-6)
    assert not grad.any()


def test_kernel_partials_with_fewer_slots_than_tiles():
    """A program walking several tiles sums them all into its slot; slots past the grid are
    zeroed by an overwrite (an sq_out larger than needed)."""
    pytest.importorskip("triton")
    from conftest import _triton_usable
    if _triton_usable("cpu"):
        pytest.skip(_triton_usable("cpu"))
    from fusedaccum.kernels.accumulate import BLOCK, accumulate_
    n = 3 * BLOCK + 5
    g = randn(n, torch.float32, "cpu", seed=3)
    acc = torch.zeros(n)
    sq = torch.full((2,), 9.0)
    accumulate_(acc, g, 1.0, zero_grad=False, overwrite=True, sq_out=sq, sq_weight=1.0)  # 2 programs, 2 tiles each
    torch.testing.assert_close(sq.double(), torch.stack([g[:BLOCK].double().pow(2).sum() + g[2 * BLOCK:3 * BLOCK].double().pow(2).sum(),
                                                        g[BLOCK:2 * BLOCK].double().pow(2).sum() + g[3 * BLOCK:].double().pow(2).sum()]),
                               rtol=1e-5, atol=0)
    big = torch.full((16,), 9.0)
    acc10 = torch.zeros(10)
    accumulate_(acc10, g[:10], 1.0, zero_grad=False, overwrite=True, sq_out=big, sq_weight=2.0)
    assert float(big[0]) == pytest.approx(2 * float(g[:10].double().pow(2).sum()), rel=1e-6) and not big[1:].any()


def test_accumulate_rejects_bad_sq_out_and_changes_nothing():
    acc, grad = torch.zeros(4), torch.ones(4)
    for bad, err in ((torch.zeros(2, dtype=torch.float64), TypeError), (torch.zeros(0), ValueError),
                     (acc[:2], ValueError)):
        with pytest.raises(err, match="sq_out"):
            fusedaccum.accumulate_(acc, grad, sq_out=bad)
        assert not acc.any() and grad.eq(1).all()
    with pytest.raises(ValueError, match="sq_weight"):
        fusedaccum.accumulate_(acc, grad, sq_out=torch.zeros(1), sq_weight=torch.ones(2))
    assert not acc.any()
