"""Training signals: the noise-scale estimator against known truth, its smoothing, the
adaptive policy, and their integration into GradAccumulator (window loss, noise scale,
changing K), through both backends.

Known truth: least squares at fixed weights, ``loss = ½ (xᵀw - y)²`` with
``x ~ N(0, I_d)``, ``y = xᵀw* + ε``, ``ε ~ N(0, σ²)``. With ``δ = w - w*`` the per-example
gradient ``x (xᵀδ - ε)`` has mean ``𝒢 = δ`` and ``E|g|² = (d + 2)|δ|² + d σ²`` (Gaussian
fourth moments), so ``tr(Σ) = (d + 1)|δ|² + d σ²`` and ``|𝒢|² = |δ|²``, exactly.
"""

import math
import sys

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
    tracker = NoiseTracker(NoiseScaleSettings(beta=0.0, adaptive=AdaptiveSteps(1, 64, every=3, on_change=seen.append,
                                                                                 patience=1)))
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

from helpers import GRAD_DTYPES, SIZES as BOUNDARY_SIZES, randn, read_by_cpu_reference  # noqa: E402

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


# ---------------------------------------------------------------- GradAccumulator integration

import copy  # noqa: E402

from torch import nn  # noqa: E402

from fusedaccum import GradAccumulator, LossScaler  # noqa: E402

IN, HID, OUT = 6, 12, 3


def make_model(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.to(device=device, dtype=dtype)


def make_data(n, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g).to(device), torch.randn(n, OUT, generator=g).to(device)


def loss_of(model, x, y, summed):
    """Mean squared error of the rows, their mean or (summed) their sum; in the model's dtype."""
    p = next(model.parameters())
    per_row = (model(x.to(p.dtype)).float() - y).pow(2).mean(-1)
    return per_row.sum() if summed else per_row.mean()


def micro_batches(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def reference_window(model, micro, summed, every):
    """float64 expectations at the model's current weights: (window loss, S, G²) from the
    micro-batch gradients in the model's dtype (what the buckets receive)."""
    twin = copy.deepcopy(model)
    grads, losses, sizes = [], [], []
    for x, y in micro:
        twin.zero_grad()
        loss = loss_of(twin, x, y, summed)
        loss.backward()
        losses.append(float(loss.detach().double()))
        grads.append(torch.cat([p.grad.double().reshape(-1) for p in twin.parameters()]))
        sizes.append(len(x) if summed else 1)
    big = sum(sizes)
    window_grad = torch.stack(grads).sum(0) / big
    small = [(grads[i] / sizes[i], sizes[i]) for i in (range(len(micro)) if every else [0])]
    s, g2 = estimate_noise(sum(g.pow(2).sum() for g, _ in small), sum(1 / b for _, b in small), len(small),
                           window_grad.pow(2).sum(), big)
    return sum(losses) / big, float(s), float(g2)


WINDOW_SIZES = [(3, 5, 2, 6), (4, 4, 4, 4), (1, 7, 3, 5)]


@pytest.mark.parametrize("items", ["mean", "host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_loss_and_noise_statistics_match_float64(backend, device, dtype, items):
    """Three windows of 4 uneven micro-batches, with a loss scale of 2^10. The window loss
    equals the large-batch loss (mean of micro-batch means, or the per-item mean) to 1e-6;
    the window's S and G² estimates equal the float64 estimator on the same micro-batch
    gradients: fp32 parameters sample the first micro-batch, bf16 every one (the kernel's
    Σg²). Tolerance 1e-4 relative: fp32 sums of a few hundred terms, cancelling in S."""
    torch.manual_seed(0)
    model = make_model(dtype, device)
    x, y = make_data(64, device)
    acc = GradAccumulator(model.parameters(), 4, scaler=LossScaler(init_scale=2.0**10), noise_scale=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    summed = items != "mean"
    start = 0
    for sizes in WINDOW_SIZES:
        micro = micro_batches(x[start:], y[start:], sizes)
        start += sum(sizes)
        want_loss, want_s, want_g2 = reference_window(model, micro, summed, every=dtype != torch.float32)
        for xb, yb in micro:
            n = None if items == "mean" else len(xb) if items == "host" else torch.tensor(len(xb), device=device)
            acc.backward(loss_of(model, xb, yb, summed), num_items=n)
        result = acc.step(opt)
        assert result.loss.dtype == torch.float64 and result.loss.device == torch.device(device)
        assert not result.loss.requires_grad
        assert float(result.loss) == pytest.approx(want_loss, rel=0, abs=1e-6)
        ns = result.noise_scale
        assert ns.unit == ("items" if summed else "micro-batches")
        assert float(ns.window_trace_cov) == pytest.approx(want_s, rel=1e-4)
        assert float(ns.window_grad_sq) == pytest.approx(want_g2, rel=1e-4, abs=1e-4 * abs(want_s) / 16)
    host = acc.noise_scale
    assert host["windows"] == 3.0 and math.isfinite(host["b_simple"])
    assert host["b_simple"] == pytest.approx(host["trace_cov"] / host["grad_sq"])


def test_window_loss_equals_the_large_batch_loss_when_noise_scale_is_off():
    model = make_model(torch.float32, "cpu")
    x, y = make_data(16, "cpu")
    acc = GradAccumulator(model.parameters(), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = float(loss_of(copy.deepcopy(model).double(), x.double(), y.double(), False).detach())
    acc.backward(loss_of(model, x[:8], y[:8], False))
    acc.backward(loss_of(model, x[8:], y[8:], False))
    result = acc.step(opt)
    assert float(result.loss) == pytest.approx(want, abs=1e-6) and result.noise_scale is None
    assert acc.noise_scale is None


def spy_host_reads(monkeypatch):
    """Every conversion of a tensor to a host value from now on (on CUDA each is a sync)."""
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if not read_by_cpu_reference():
                reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return reads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_statistics_never_read_the_device(monkeypatch, dtype):
    """With the noise scale on, a LossScaler and device item counts, the backward/step path
    converts nothing to a host value once a fused optimizer has its state."""
    model = make_model(dtype, "cpu")
    x, y = make_data(24, "cpu")
    acc = GradAccumulator(model.parameters(), 3, max_norm=0.5, scaler=LossScaler(), noise_scale=True)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    items = [torch.tensor(n) for n in (2, 3, 3)]
    losses = [loss_of(model, x[i:i + 3], y[i:i + 3], True) for i in range(0, 24, 3)]
    for loss, n in zip(losses[:3], items):  # warm-up: the optimizer state is created
        acc.backward(loss, num_items=n)
    acc.step(opt)
    reads = spy_host_reads(monkeypatch)
    for loss, n in zip(losses[3:6], items):
        acc.backward(loss, num_items=n)
    result = acc.step(opt)
    assert reads == []
    assert result.noise_scale is not None and result.loss is not None


def count_backend_calls(monkeypatch):
    """Calls into the backends (each a launch set on a GPU) and the fp32 norm read."""
    from fusedaccum import kernels, reference
    calls = []
    for module in (reference, kernels):
        for name in ("accumulate_", "norm_partials", "finalize", "apply"):
            original = getattr(module, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append((_name, kwargs.get("sq_out") is not None))
                return _original(*args, **kwargs)
            monkeypatch.setattr(module, name, spy)
    import fusedaccum.accumulator as accumulator_module
    original_sum = accumulator_module._sum_squares

    def sum_spy(tensors):
        calls.append(("sum_squares", True))
        return original_sum(tensors)
    monkeypatch.setattr(accumulator_module, "_sum_squares", sum_spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_statistics_off_cost_no_launch_and_on_cost_what_is_documented(backend, device, monkeypatch, dtype):
    """Off: the window's backend calls are those of plain accumulation (bf16: K accumulate
    passes, no Σg²; the step's three phases) and nothing else. On: bf16 the same passes carry
    the Σg² (no extra launch); fp32 one extra norm-partials read of the buckets per window (and its one-program finalize)."""
    calls = count_backend_calls(monkeypatch)
    x, y = make_data(12, device)
    for on in (False, True):
        model = make_model(dtype, device)
        acc = GradAccumulator(model.parameters(), 3, noise_scale=on)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        calls.clear()
        for i in range(0, 12, 4):
            acc.backward(loss_of(model, x[i:i + 4], y[i:i + 4], False))
        acc.step(opt)
        accumulates = [sq for name, sq in calls if name == "accumulate_"]
        # Off, bf16 goes straight into fp32 where Tensor.grad_dtype exists (no accumulate pass).
        assert accumulates == ([on] * 3 if dtype == torch.bfloat16 and not acc.buckets.direct else [])
        # bf16 landing buckets in one process: the window's last accumulate pass writes the norm partials.
        step = ["norm_partials", "finalize", "apply"][1 if accumulates else 0:]
        assert [name for name, _ in calls if name != "accumulate_"] == (
            ["sum_squares", "norm_partials", "finalize"] + step if on and dtype == torch.float32 else step)
        acc.release()


def test_changing_k_between_windows_trains_like_a_hand_written_loop(backend, device):
    """K = 2, 3, 1, 4 set between windows (clipped AdamW) == a loop that sums each window's
    micro-batch mean gradients by hand, divides by its K, clips and steps (fp32, 1e-6)."""
    schedule = [2, 3, 1, 4]
    x, y = make_data(4 * sum(schedule), device)
    model, hand = make_model(torch.float32, device), make_model(torch.float32, device)
    acc = GradAccumulator(model.parameters(), schedule[0], max_norm=0.3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    hand_opt = torch.optim.AdamW(hand.parameters(), lr=0.05)
    start = 0
    for k in schedule:
        acc.accumulation_steps = k
        hand_opt.zero_grad()
        for j in range(k):
            xb, yb = x[start + 4 * j:start + 4 * j + 4], y[start + 4 * j:start + 4 * j + 4]
            acc.backward(loss_of(model, xb, yb, False))
            (loss_of(hand, xb, yb, False) / k).backward()
        start += 4 * k
        result = acc.step(opt)
        assert result is not None and result.micro_batches == k
        torch.nn.utils.clip_grad_norm_(hand.parameters(), 0.3)
        hand_opt.step()
    for p, q in zip(model.parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_accumulation_steps_is_validated_and_refused_mid_window():
    model = make_model(torch.float32, "cpu")
    x, y = make_data(4, "cpu")
    acc = GradAccumulator(model.parameters(), 2)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="accumulation_steps"):
            acc.accumulation_steps = bad
    assert acc.accumulation_steps == 2
    acc.backward(loss_of(model, x, y, False))
    with pytest.raises(RuntimeError, match="between windows"):
        acc.accumulation_steps = 3
    assert acc.accumulation_steps == 2 and acc.micro_batches == 1
    acc.backward(loss_of(model, x, y, False))
    assert acc.step(torch.optim.SGD(model.parameters(), lr=0.1)) is not None
    acc.accumulation_steps = 3
    assert acc.accumulation_steps == 3


def test_noise_scale_needs_the_2_norm_and_a_valid_setting():
    model = make_model(torch.float32, "cpu")
    with pytest.raises(ValueError, match="norm_type"):
        GradAccumulator(model.parameters(), 2, norm_type=1.0, noise_scale=True)
    with pytest.raises(TypeError, match="noise_scale"):
        GradAccumulator(model.parameters(), 2, noise_scale=0.9)
    assert all(p.grad is None for p in model.parameters())  # nothing was attached


def test_adaptive_k_follows_b_simple_and_reads_the_host_only_when_deciding(monkeypatch):
    """bf16 parameters, 2 items per micro-batch: after `every` = 3 windows K becomes
    round(b_simple / 2) clamped to [2, 12], reported in the result, the accumulator and the
    callback; the windows in between read nothing on the host."""
    model = make_model(torch.bfloat16, "cpu")
    x, y = make_data(400, "cpu", seed=5)
    seen = []
    settings = NoiseScaleSettings(beta=0.5, adaptive=AdaptiveSteps(min_steps=2, max_steps=12, every=3,
                                                                   on_change=seen.append, patience=1,
                                                                   tolerance=1 + 1e-9))  # no hysteresis
    acc = GradAccumulator(model.parameters(), 4, noise_scale=settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, fused=True)  # no state: skips on the device
    reads = spy_host_reads(monkeypatch)
    start, results, read_log = 0, [], []
    for window in range(6):
        k = acc.accumulation_steps
        for _ in range(k):
            acc.backward(loss_of(model, x[start:start + 2], y[start:start + 2], True), num_items=2)
            start += 2
        reads.clear()
        results.append(acc.step(opt))
        read_log.append(list(reads))
    assert read_log == [[], [], ["tolist"], [], [], ["tolist"]]  # the decisions' one read each
    first = results[2].accumulation_steps_change
    b_simple = float(results[2].noise_scale.b_simple)
    assert first is not None and first.old == 4 and first.b_simple == pytest.approx(b_simple)
    assert first.new == min(12, max(2, round(b_simple / 2)))
    assert acc.accumulation_steps_changes == seen == [r.accumulation_steps_change for r in results
                                                      if r.accumulation_steps_change is not None]
    assert results[3].micro_batches == first.new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_resume_mid_window_keeps_the_signals(dtype):
    """A checkpoint after 2 of 3 micro-batches (the second window, K changed by the adaptive
    policy's owner) resumed into a fresh accumulator built with K = 2: the same loss, noise
    statistics and K as the uninterrupted run (an adaptive policy owns K: it is restored)."""
    x, y = make_data(24, "cpu")
    settings = NoiseScaleSettings(beta=0.5, adaptive=AdaptiveSteps(every=1000))

    def run(split):
        model = make_model(dtype, "cpu")
        acc = GradAccumulator(model.parameters(), 2, noise_scale=settings)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for i in range(0, 8, 4):
            acc.backward(loss_of(model, x[i:i + 4], y[i:i + 4], True), num_items=4)
        acc.step(opt)
        acc.accumulation_steps = 3
        for i in range(8, 16, 4):
            acc.backward(loss_of(model, x[i:i + 4], y[i:i + 4], True), num_items=4)
        if split:
            state = acc.state_dict()
            acc.release()
            acc = GradAccumulator(model.parameters(), 2, noise_scale=settings)
            acc.load_state_dict(state)
            assert acc.accumulation_steps == 3 and acc.micro_batches == 2
        acc.backward(loss_of(model, x[16:20], y[16:20], True), num_items=4)
        return acc.step(opt)

    a, b = run(False), run(True)
    for name in ("trace_cov", "grad_sq", "window_trace_cov", "windows"):
        torch.testing.assert_close(getattr(a.noise_scale, name), getattr(b.noise_scale, name), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)


def test_demo_shows_the_window_loss_noise_scale_and_adaptive_k(tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fusedaccum[demo]')")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib (pip install 'fusedaccum[demo]')")
    import io

    from fusedaccum import demo
    stream = io.StringIO()
    rows = demo.run(epochs=2, out=str(tmp_path / "d.png"), stream=stream)
    text = stream.getvalue()
    assert "K from the noise scale" in text and "adaptive K" in text and "b_simple" in text
    fixed, adaptive = rows[1], rows[3]
    assert fixed["method"] == "GradAccumulator" and adaptive["method"] == "adaptive K"
    for row in (fixed, adaptive):
        assert row["reach"]["target"] >= row["loss"] - 1e-12 and 0 < row["reach"]["steps"] <= row["steps"]
    assert adaptive["reach"]["images"] <= 2 * 1500


def test_exports():
    modules = {"AdaptiveSteps": "adaptive", "NoiseScale": "signals", "NoiseScaleSettings": "signals",
               "StepsChange": "adaptive"}
    for name, module in modules.items():
        assert name in fusedaccum.__all__ and getattr(fusedaccum, name).__module__ == f"fusedaccum.{module}"
        assert getattr(fusedaccum.signals, name) is getattr(fusedaccum, name)  # still importable from signals


# ---------------------------------------------------------------- data parallel (gloo, 2 ranks)

import test_distributed as td  # noqa: E402  (its worker-launch machinery, one launch here)

DP_SETTINGS = dict(beta=0.5)


def _dp_scenario(kind, per_item, ddp=False, scaler=False):
    def scenario(rank, world, original):
        from torch.nn.parallel import DistributedDataParallel

        model = td.make_model(kind)
        shown = DistributedDataParallel(model) if ddp else model
        acc = GradAccumulator(shown if ddp else model.parameters(), td.K, noise_scale=NoiseScaleSettings(**DP_SETTINGS),
                              scaler=LossScaler(init_scale=2.0**8) if scaler else None)
        opt = td.make_opt("sgd", model.parameters())
        plan = td.ITEMS_PLAN if per_item else td.MEAN_PLAN
        rec = {"before": [], "stats": [], "calls": []}
        for w in range(len(plan)):
            rec["before"].append([p.detach().clone() for p in model.parameters()])
            forced = any(len(sizes) < td.K for sizes in plan[w])
            micro = td.window_data(plan, w)[rank]
            for k, (x, y) in enumerate(micro):
                with acc.accumulate(shown, sync=True if forced and k == len(micro) - 1 else None):
                    if per_item:  # the forward through DDP, so that it reduces
                        acc.backward(td.sum_loss(shown, x, y), num_items=len(x))
                    else:
                        acc.backward(td.mean_loss(shown, x, y))
            before = len(td.CALLS)
            res = acc.step(opt, force=forced)
            rec["calls"].append(td.CALLS[before:])
            ns = res.noise_scale
            rec["stats"].append(torch.stack([res.loss, ns.window_trace_cov, ns.window_grad_sq, ns.trace_cov,
                                             ns.grad_sq, ns.b_simple]).clone())
        return rec
    return scenario


def _dp_adaptive(rank, world, original):
    """K from the noise scale on 2 ranks (process_group=None: the default group): micro-batches
    of 2 rows, a decision every 2 windows; what each rank saw."""
    model = td.make_model("fp32")
    policy = AdaptiveSteps(min_steps=2, max_steps=6, every=2, patience=1, tolerance=1 + 1e-9)  # no hysteresis
    acc = GradAccumulator(model.parameters(), 3, noise_scale=NoiseScaleSettings(beta=0.0, adaptive=policy))
    opt = td.make_opt("sgd", model.parameters())
    g = torch.Generator().manual_seed(100 + rank)
    rec = {"k": [], "changes": []}
    for _ in range(6):
        for _ in range(acc.accumulation_steps):
            x, y = torch.randn(2, td.IN, generator=g, dtype=torch.float64), torch.randn(2, td.OUT, generator=g,
                                                                                         dtype=torch.float64)
            acc.backward(td.sum_loss(model, x, y), num_items=2)
        res = acc.step(opt)
        rec["k"].append(res.micro_batches)
        if res.accumulation_steps_change is not None:
            c = res.accumulation_steps_change
            rec["changes"].append((c.old, c.new, c.b_simple, c.items_per_micro_batch))
    return rec


DP_SCENARIOS = {"sig_adaptive": _dp_adaptive,
                "sig_items_fp32_scaler": _dp_scenario("fp32", True, scaler=True),
                "sig_mean_bf16": _dp_scenario("bf16", False),
                "sig_ddp_mean": _dp_scenario("fp32", False, ddp=True)}


def _dp_expected(kind, per_item, before, ddp):
    """One process, all the data, float64 arithmetic on the micro-batch gradients in the
    model's dtype: (loss, S, G²) per window; small batches as the accumulator samples them
    (fp32: each rank's first micro-batch, unless DDP reduced in its backward, i.e. it was
    the rank's only one; bf16: every micro-batch)."""
    plan = td.ITEMS_PLAN if per_item else td.MEAN_PLAN
    out = []
    for w in range(len(plan)):
        model = td.make_model(kind)
        with torch.no_grad():
            for p, q in zip(model.parameters(), before[w]):
                p.copy_(q)
        grads, losses, small = [], [], []
        for rank_micro in td.window_data(plan, w):
            for k, (x, y) in enumerate(rank_micro):
                model.zero_grad()
                loss = td.sum_loss(model, x, y) if per_item else td.mean_loss(model, x, y)
                loss.backward()
                g = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
                c = len(x) if per_item else 1
                grads.append(g)
                losses.append(float(loss.detach()))
                if kind == "bf16" or (k == 0 and not (ddp and len(rank_micro) == 1)):
                    small.append((g / c, c))
        big = sum(len(x) if per_item else 1 for rank_micro in td.window_data(plan, w) for x, _ in rank_micro)
        window_grad = torch.stack(grads).sum(0) / big
        s, g2 = estimate_noise(sum(g.pow(2).sum() for g, _ in small), sum(1 / c for _, c in small), len(small),
                               window_grad.pow(2).sum(), big)
        out.append((sum(losses) / big, float(s), float(g2)))
    return out


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    ranks = td.launch(tmp_path_factory.mktemp("dist_signals"), "torch", list(DP_SCENARIOS), script=__file__)
    return {name: td.ok([r.get(name, {"error": "not run"}) for r in ranks]) for name in DP_SCENARIOS}


@pytest.mark.parametrize("name", [n for n in DP_SCENARIOS if n != "sig_adaptive"])
def test_data_parallel_statistics_equal_one_process_on_all_data(dp_runs, name):
    """Two gloo ranks (uneven items within and across ranks; a forced partial window of 2 and
    1 micro-batches; DDP; a loss scale): every rank reports the same bits, and the window's
    loss (1e-6), S and G² (1e-4 relative, 1e-3 for bf16 gradients) are those of one process
    over both ranks' micro-batches. The signals ride in the count vector: one fp64 all-reduce
    per step of 6 elements and one "used" flag per parameter (4)."""
    r0, r1 = dp_runs[name]
    kind = "bf16" if "bf16" in name else "fp32"
    per_item = "items" in name
    for a, b in zip(r0["stats"], r1["stats"]):
        assert torch.equal(a, b)
    rtol = 1e-3 if kind == "bf16" else 1e-4
    for w, (stats, (loss, s, g2)) in enumerate(zip(r0["stats"], _dp_expected(kind, per_item, r0["before"], "ddp" in name))):
        assert float(stats[0]) == pytest.approx(loss, abs=1e-6), w
        assert float(stats[1]) == pytest.approx(s, rel=rtol), w
        assert float(stats[2]) == pytest.approx(g2, rel=rtol, abs=rtol * abs(s) / 10), w
    for calls in r0["calls"]:
        assert calls.count((6 + 4, "float64")) == 1


def test_data_parallel_adaptive_k_is_the_same_on_every_rank(dp_runs):
    """Each rank sees other data, yet both reach the same K at the same windows: decided from
    global statistics, K = round(b_simple / (2 ranks x 2 items)) clamped to [2, 6]."""
    r0, r1 = dp_runs["sig_adaptive"]
    assert r0["k"] == r1["k"] and r0["changes"] == r1["changes"]
    assert len(r0["changes"]) >= 2 and len(set(r0["k"])) >= 2  # this data makes K move (measured: 3 changes)
    for old, new, b_simple, per_micro in r0["changes"]:
        assert per_micro == 2.0 and new == min(6, max(2, round(b_simple / 4)))


if __name__ == "__main__":
    td.SCENARIOS.update(DP_SCENARIOS)
    rank, world, rdzv, out_dir, names = sys.argv[1:6]
    td.worker(int(rank), int(world), rdzv, out_dir, names.split(","))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host syncs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_sync_on_cuda_with_statistics(dtype):
    """The CUDA sync checker over a window with the noise scale and the window loss on."""
    model = make_model(dtype, "cuda")
    x, y = make_data(8, "cuda")
    acc = GradAccumulator(model.parameters(), 2, max_norm=0.1, scaler=LossScaler(), noise_scale=True)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    items = torch.tensor(4, device="cuda")
    for _ in range(2):  # warm-up: lazy init of scaler, statistics and optimizer state
        for _ in range(2):
            acc.backward(loss_of(model, x, y, True), num_items=items)
        acc.step(opt)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            acc.backward(loss_of(model, x, y, True), num_items=items)
        result = acc.step(opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(result.loss)


@pytest.mark.parametrize("corrupt", ["ema_shape", "windows"])
def test_a_corrupt_noise_state_is_refused_before_anything_changes(corrupt):
    x, y = make_data(8, "cpu")
    model = make_model(torch.float32, "cpu")
    scaler = LossScaler(init_scale=4.0)
    acc = GradAccumulator(model.parameters(), 3, noise_scale=True, scaler=scaler)
    acc.backward(loss_of(model, x[:4], y[:4], False))
    state = acc.state_dict()
    state["scaler"] = dict(state["scaler"], scale=8.0)  # would change the scaler if loaded
    noise = state["signals"]["noise"]
    if corrupt == "ema_shape":
        noise["ema"] = torch.zeros(3, dtype=torch.float64)
    else:
        noise["windows"] = -1
    acc.backward(loss_of(model, x[4:], y[4:], False))
    sums = [b.accum.clone() for b in acc.buckets]
    with pytest.raises(ValueError, match="noise-scale"):
        acc.load_state_dict(state)
    assert acc.micro_batches == 2 and scaler.get_scale() == 4.0
    assert all(torch.equal(s, b.accum) for s, b in zip(sums, acc.buckets))
