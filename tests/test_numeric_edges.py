"""Numerical edge classes that broke docs/numerics.md's promises (issue 17), in both backends,
and the store-overflow rule: a skip the loss scale cannot cure must not back the scale off."""

import math
import random
import warnings

import numpy
import pytest
import torch

from fusedaccum import GradAccumulator, LossScaler, _store_watch
from fusedaccum.kernels._launch import BLOCK
from fusedaccum.ops import _unscale_clip_stats

from helpers import NORM_RTOL
from test_scaler import CONFIGS, grad_scaler_run


def _fp32(x: float) -> float:
    with numpy.errstate(over="ignore"):
        return float(numpy.float32(x))


def _norm_oracle(x: torch.Tensor, inv: float, p: float) -> float:
    """||x * inv||_p in float64 without under- or overflow: m * (Σ(|x|/m)^p)^(1/p) * |inv|,
    taken in the log domain (the p-th powers of 1e-42 underflow fp64 at p = 12)."""
    a = x.double().abs()
    m = float(a.max()) if a.numel() else 0.0
    if m == 0.0:
        return 0.0
    if math.isinf(p):
        return m * abs(inv)
    total = float(((a / m) ** p).sum())
    return 2.0 ** (math.log2(total) / p + math.log2(m) + math.log2(abs(inv)))


def _check(stats, expected: float) -> None:
    norm = float(stats[0])
    # A subnormal fp32 result cannot be closer than half its spacing, 2**-150.
    assert abs(norm - expected) <= max(NORM_RTOL * expected, 2.0 ** -149), (norm, expected)
    assert float(stats[1]) == 0.0 and float(stats[3]) == 0.0


def _decades(n: int) -> torch.Tensor:
    return torch.logspace(-42, 38, n, dtype=torch.float64).float()


CASES = {
    # The root Σ^(1/p) = 20000^10 overflowed fp32 (Triton: found_inf, a skipped step).
    "p<1, large root": (lambda: torch.rand(20_000, generator=torch.Generator().manual_seed(0)) + 0.5, 1e-38, 0.1),
    # The scaled term 1.9^150 overflowed fp32: inf and found_inf (both backends).
    "p=150": (lambda: torch.tensor([1.9]), 1.0, 150.0),
    "p=150, several": (lambda: torch.tensor([1.9, -1.5, 1e30, 0.0, 9e29]), 1e-9, 150.0),
    # |x| * 2**-e underflowed for the small values: 2.75e-4 relative error at p = 0.1.
    "p=0.1, 80 decades": (lambda: _decades(3 * BLOCK + 5), 1e-40, 0.1),
    # The clamped exponent left (1e-42 * 2**126)**12 to underflow: norm 0.
    "p=12, subnormals": (lambda: torch.full((100,), 1e-42), 1.0, 12.0),
    "p=3, subnormals": (lambda: torch.full((BLOCK + 1,), 3e-44), 1.0, 3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_norm_edge_classes_meet_the_promise(backend, device, case):
    make, inv, p = CASES[case]
    x = make().to(device)
    expected = _norm_oracle(x, _fp32(inv), p)
    stats = _unscale_clip_stats(x.clone(), inv, None, p)
    _check(stats, expected)


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("n", [3, BLOCK + 1])
@pytest.mark.parametrize("zero", [False, True])
def test_infinite_inv_scale_reports_torchs_norm(backend, device, p, n, zero):
    """x * inf is inf, 0 * inf NaN: the norm is NaN when the bucket holds a 0, else inf
    ([1, 1, 1] at p = 2 gave NaN in both backends: the Triton kernel's masked lanes and the
    reference's skipped max were 0 * inf; [1, 0, 1] at p = 3 gave inf in the reference)."""
    x = torch.ones(n, device=device)
    if zero:
        x[n // 2] = 0.0
    before = x.clone()
    stats = _unscale_clip_stats(x, math.inf, 1.0, p)
    expected = float(torch.linalg.vector_norm(before.double().cpu() * math.inf, p))
    assert math.isnan(expected) == zero
    got = float(stats[0])
    assert (math.isnan(got) if zero else got == math.inf), (got, expected)
    assert float(stats[1]) == 1.0 and float(stats[3]) == 0.0
    assert torch.equal(x, before)


def test_zero_times_inf_and_empty_buckets(backend, device):
    """inv 0 times an inf element is NaN; no elements at all have norm 0 (found_inf from the
    inf inv_scale alone)."""
    stats = _unscale_clip_stats(torch.tensor([1.0, math.inf], device=device), 0.0, None, 2.0)
    assert math.isnan(float(stats[0])) and float(stats[1]) == 1.0
    stats = _unscale_clip_stats(torch.empty(0, device=device), math.inf, None, 2.0)
    assert float(stats[0]) == 0.0 and float(stats[1]) == 1.0 and float(stats[3]) == 0.0


@pytest.mark.parametrize("kind", ["store", "nonfinite", "both", "none"])
def test_stats_tell_a_store_overflow_from_a_scaled_one(backend, device, kind):
    """stats[3] is 1 exactly when found_inf comes from an overflow on store alone: every value
    finite, the result too large for its fp16 destination; the norm is then finite."""
    values = {"store": [30000.0, 1.0], "nonfinite": [1.0, math.inf], "both": [30000.0, math.inf],
              "none": [3.0, 1.0]}[kind]
    bucket = torch.tensor(values, device=device)
    out = torch.zeros(2, dtype=torch.float16, device=device)
    stats = _unscale_clip_stats(bucket, 4.0, None, 2.0, out=out)
    assert float(stats[1]) == (0.0 if kind == "none" else 1.0)
    assert float(stats[3]) == (1.0 if kind == "store" else 0.0)
    assert math.isfinite(float(stats[0])) == (kind in ("store", "none"))
    if kind == "store":
        assert math.isclose(float(stats[0]), 4.0 * math.hypot(30000.0, 1.0), rel_tol=NORM_RTOL)
        assert torch.equal(out, torch.zeros(2, dtype=torch.float16, device=device))


def _fp16_run(device, windows: int, max_norm=None):
    """fp16 parameters whose gradient (1e5 per element) exceeds fp16 once unscaled, while the
    scaled one (2.5e4 under scale 0.25) lands finite: an overflow on store every window."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16, device=device))
    scaler = LossScaler(init_scale=0.25, growth_interval=2)
    acc = GradAccumulator([w], accumulation_steps=2, scaler=scaler, max_norm=max_norm)
    opt = torch.optim.SGD([w], lr=1e-6)
    results = []
    for _ in range(windows):
        for _ in range(2):
            acc.backward((w.float() * 1e5).sum())
            result = acc.step(opt)
        results.append(result)
    acc.release()
    return w, scaler, results


def test_store_overflow_keeps_the_scale_and_warns(backend, device):
    """Issue 17 item 15: the scale fell 0.25 -> 2.3e-10 while every window was skipped, with no
    word. Now the scale stays, the growth tracker with it, and a warning names the cure."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, scaler, results = _fp16_run(device, windows=5)
    assert scaler.get_scale() == 0.25 and scaler.state_dict()["_growth_tracker"] == 0
    assert torch.equal(w.detach(), torch.ones(4, dtype=torch.float16, device=device))  # never stepped
    for r in results:
        assert float(r.found_inf) == 1.0
        # finite (see StepResult): 4 elements of fp16(25000) / 0.25, the mean of 2 micro-batches
        landed = float(torch.tensor(25000.0).half())
        assert math.isclose(float(r.total_norm), 2 * landed / 0.25, rel_tol=NORM_RTOL)
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    store = [m for m in messages if "overflow on store" in m]
    assert len(store) == 1, messages  # once per streak
    assert "max_norm < 65504" in store[0] and "fp32 master weights" in store[0]


def test_store_overflow_cured_by_clipping_steps(backend, device):
    """The cure the warning names: with max_norm below fp16's range every window steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no store-overflow warning
        w, scaler, results = _fp16_run(device, windows=3, max_norm=1e4)
    assert all(float(r.found_inf) == 0.0 for r in results)
    assert float(w.detach().float().max()) < 1.0


@pytest.mark.parametrize("weights, kind", [([1.0, 0.0, 1.0], "nan"), ([1.0, 2.0, 3.0], "inf")])
def test_window_of_zero_items_reports_the_norm_of_an_infinite_inverse(backend, device, weights, kind):
    """0 items: the inverse count is inf, so the norm is that of grad * inf: NaN where the
    gradient holds a 0 (0 * inf), else inf (both backends gave NaN for [1, 2, 3])."""
    w = torch.nn.Parameter(torch.ones(3, device=device))
    acc = GradAccumulator([w], accumulation_steps=1)
    opt = torch.optim.SGD([w], lr=0.1)
    acc.backward((w * torch.tensor(weights, device=device)).sum(), num_items=0)
    with pytest.warns(RuntimeWarning, match="0 items"):
        result = acc.step(opt)
    acc.release()
    norm = float(result.total_norm)
    assert (math.isnan(norm) if kind == "nan" else norm == math.inf), norm
    assert float(result.found_inf) == 1.0
    assert torch.equal(w.detach(), torch.ones(3, device=device))


# ---------------------------------------------------------------- LossScaler and store overflows

@pytest.mark.parametrize("seed", range(3))
def test_store_overflow_windows_leave_scale_and_tracker_alone(seed):
    """An overflow on store (stats[3]) cannot be cured by a smaller scale: the scaler goes on as
    if that window had not happened (GradScaler's sequence over the other windows)."""
    rng = random.Random(seed)
    kinds = [rng.choice(["ok", "ok", "inf", "store"]) for _ in range(40)]
    expected, _ = grad_scaler_run([k == "inf" for k in kinds if k != "store"], **CONFIGS[0])
    ls = LossScaler(**CONFIGS[0])
    ls._store_watch.warn_after = 10 ** 9  # the streak's warning is tested below
    got = []
    for k in kinds:
        ls.scale(torch.ones(()))
        ls.update(torch.tensor(float(k != "ok")), store_overflow=torch.tensor(float(k == "store")))
        if k != "store":
            got.append((ls.get_scale(), ls.state_dict()["_growth_tracker"]))
    assert got == expected


def _store_windows(ls, kinds):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in kinds:
            ls.update(torch.tensor(float(k != "ok")), store_overflow=torch.tensor(float(k == "store")))
    return [str(c.message) for c in caught if "overflow on store" in str(c.message)]


def test_store_overflow_streak_warns_once_per_streak():
    ls = LossScaler(init_scale=0.25)
    ls.scale(torch.ones(()))
    assert _store_windows(ls, ["store", "store"]) == []
    assert len(_store_windows(ls, ["store"])) == 1  # the third in a row
    assert _store_windows(ls, ["store", "store", "inf", "store", "store"]) == []  # same streak, then a new one < 3
    assert len(_store_windows(ls, ["ok", "store", "store", "store"])) == 1
    assert ls.get_scale() == 0.125  # backed off once, for the "inf" window only


class _Event:
    done = False

    def record(self):
        pass

    def query(self):
        return _Event.done


def test_store_overflow_watch_on_an_accelerator_never_waits(monkeypatch):
    """Off the CPU the streak is read from a non-blocking copy once its event has landed
    (query() does not wait): the warning comes late, never through a sync."""
    monkeypatch.setattr(_store_watch.StoreOverflowWatch, "_direct", lambda self: False)
    monkeypatch.setattr(_store_watch.StoreOverflowWatch, "_new_event", lambda self: _Event())
    reads = []
    monkeypatch.setattr(_store_watch, "int", lambda t: reads.append(1) or int(t), raising=False)
    ls = LossScaler(init_scale=0.25)
    ls.scale(torch.ones(()))
    _Event.done = False
    assert _store_windows(ls, ["store"] * 5) == [] and reads == []  # the copy never landed: no read
    _Event.done = True
    # The copy made at window 1 (streak 1) is read, and a new one made (streak 6)...
    assert _store_windows(ls, ["store"]) == [] and len(reads) == 1
    assert len(_store_windows(ls, ["store"])) == 1 and len(reads) == 2  # ...which warns a window later
    assert ls.get_scale() == 0.25


def test_store_overflow_without_a_scaler_warns(backend, device):
    """fp16 parameters, no LossScaler: a window whose normalized gradient (1.2e5) exceeds fp16
    is skipped every time; without a scaler there was no word at all."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16, device=device))
    acc = GradAccumulator([w], accumulation_steps=2)
    opt = torch.optim.SGD([w], lr=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            acc.backward((w.float() * 6e4).sum(), num_items=1)  # each micro-batch's gradient fits fp16
            acc.backward((w.float() * 6e4).sum(), num_items=0)
            assert float(acc.step(opt).found_inf) == 1.0
    acc.release()
    assert torch.equal(w.detach(), torch.ones(4, dtype=torch.float16, device=device))
    store = [str(c.message) for c in caught if "overflow on store" in str(c.message)]
    assert len(store) == 1 and "max_norm < 65504" in store[0]


def test_fp32_rounding_of_python_numbers_is_numpys():
    """ops._fp32 (struct's C cast, the step's fixed cost) rounds as numpy.float32 did: to
    nearest even, +-inf from halfway past the largest fp32 on, subnormals, -0.0 and NaN kept."""
    from fusedaccum.ops import _fp32 as ops_fp32

    top = float(numpy.finfo(numpy.float32).max)
    half_ulp = 2.0 ** 103  # half the spacing of fp32 at its largest binade
    edges = [0.0, -0.0, 1.0, 1e-6, 1 / 3, top, -top, top + half_ulp, top + half_ulp * (1 - 2 ** -30),
             -(top + half_ulp), 1e39, -1e39, math.inf, -math.inf, 1.4e-45, 7e-46, 7.1e-46, -1e-50, 2.0 ** -149,
             2.0 ** -126 * (1 - 2 ** -24)]
    rng = random.Random(0)
    edges += [rng.uniform(-1, 1) * 10.0 ** rng.randint(-50, 40) for _ in range(20000)]
    for x in edges:
        got, want = ops_fp32(x), _fp32(x)
        assert got == want and math.copysign(1, got) == math.copysign(1, want), x
    assert math.isnan(ops_fp32(math.nan))


def test_max_norm_changed_on_the_accumulator_is_checked_at_the_step():
    """The step checks acc.max_norm as the public op would (it calls the passes past the
    buckets' checks only): a negative one raises and changes nothing; a new valid one is used."""
    w = torch.nn.Parameter(torch.ones(3))
    acc = GradAccumulator([w], accumulation_steps=1, max_norm=1.0)
    opt = torch.optim.SGD([w], lr=1.0)
    acc.backward((w * 4.0).sum())
    acc.max_norm = -1.0
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        acc.step(opt)
    assert torch.equal(w.detach(), torch.ones(3))
    acc.max_norm = 2.0
    res = acc.step(opt)
    assert float(res.total_norm) == pytest.approx(math.sqrt(48.0))
    torch.testing.assert_close(w.detach(), torch.ones(3) - 2.0 / math.sqrt(3.0) * (1 - 1e-6 / (math.sqrt(48) + 1e-6)),
                               rtol=1e-6, atol=1e-6)
