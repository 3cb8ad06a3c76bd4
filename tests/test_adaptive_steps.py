"""AdaptiveSteps' hysteresis: K settles under a stationary noise scale and follows a real change.

The simulation feeds the package's own estimator, averages and policy (``NoiseTracker``)
with exact window statistics of Gaussian per-item gradients: d = 10 dimensions, |𝒢|² = 1,
tr(Σ) = B_simple · |𝒢|², micro-batches of 3 items, one small batch per window (the fp32
case), beta = 0.95, a decision every 10 windows. With B_simple = 21 items the right K is 7,
the case where the policy without hysteresis made 44 changes in 600 windows swinging between
4 and 16; here (tolerance 1 and patience 1 reproduce it) it makes 37-49.
"""

import math

import pytest
import torch
from torch import nn

import fusedaccum
from fusedaccum.signals import AdaptiveSteps, NoiseScaleSettings, NoiseTracker

ITEMS = 3


def simulate(policy, *, b_simple=21.0, k0=7, windows=600, switch=None, seed=0, d=10):
    """K after every window, and the changes ``(window, old, new)``; ``switch=(w, factor)``
    multiplies tr(Σ) (so B_simple) by factor from window w on."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    mean /= mean.norm()
    tracker = NoiseTracker(NoiseScaleSettings(beta=0.95, adaptive=policy))
    one = torch.ones((), dtype=torch.float64)
    k, ks, changes, trace = k0, [], [], b_simple
    for w in range(windows):
        if switch is not None and w == switch[0]:
            trace = b_simple * switch[1]
        items = mean + math.sqrt(trace / d) * torch.randn(k * ITEMS, d, generator=g, dtype=torch.float64)
        small, big = items[:ITEMS].mean(0), items.mean(0)
        stats = tracker.update(small.square().sum(), one / ITEMS, one, big.square().sum(), k * ITEMS,
                               torch.tensor(True), "items")
        change = tracker.decide(stats, float(ITEMS), 1, k)
        if change is not None:
            changes.append((w, change.old, change.new))
            k = change.new
        ks.append(k)
    return ks, changes


POLICY = AdaptiveSteps(min_steps=2, max_steps=64, every=10)
JUMPY = AdaptiveSteps(min_steps=2, max_steps=64, every=10, tolerance=1 + 1e-9, patience=1)  # as before


@pytest.mark.parametrize("seed", range(2))
def test_k_settles_under_a_stationary_noise_scale(seed):
    ks, changes = simulate(POLICY, seed=seed)
    assert len(changes) <= 2, changes
    assert all(5 <= k <= 10 for k in ks), sorted(set(ks))
    _, jumpy = simulate(JUMPY, seed=seed, windows=300)
    assert len(jumpy) >= 12  # the same estimates without hysteresis: a change most decisions


@pytest.mark.parametrize("seed", range(2))
def test_k_settles_after_starting_far_off(seed):
    """From K = 2 (B_simple says 7): a few changes early, then a handful at most."""
    ks, changes = simulate(POLICY, k0=2, seed=seed)
    assert len(changes) <= 5, changes
    assert len([c for c in changes if c[0] >= 150]) <= 3, changes
    assert 4 <= ks[150] <= 12


@pytest.mark.parametrize("factor, k0, base, seed", [(4.0, 7, 21.0, 0), (0.25, 28, 84.0, 1)])
def test_k_follows_a_real_fourfold_change_within_bounded_windows(factor, k0, base, seed):
    """B_simple x4 (K 7 -> 28) or /4 (28 -> 7) at window 200: K is within a factor 2 of the new
    target 50 windows later (the averages' lag + patience · every), within the tolerance band
    (x1.6: K is an integer) 120 windows later, and stays there."""
    ks, changes = simulate(POLICY, b_simple=base, k0=k0, switch=(200, factor), seed=seed, windows=450)
    new = base * factor / ITEMS
    assert ks[199] == k0
    assert all(new / 2 <= k <= new * 2 for k in ks[250:]), (changes, sorted(set(ks[250:])))
    assert all(new / 1.6 <= k <= new * 1.6 for k in ks[320:]), (changes, sorted(set(ks[320:])))
    assert len(changes) <= 3, changes


def test_hysteresis_state_survives_a_checkpoint():
    """The pending run of out-of-band decisions is saved and loaded: a resumed policy decides alike."""
    settings = NoiseScaleSettings(adaptive=AdaptiveSteps(min_steps=1, every=1, patience=3))
    stats = fusedaccum.NoiseScale(*(torch.tensor(v, dtype=torch.float64) for v in (30.0, 1.0, 30.0, 1, 1, 1)))
    a = NoiseTracker(settings)
    a.windows = 20  # warmed up (1 / (1 - beta) windows)
    assert a.decide(stats, 1.0, 1, 4) is None and a.decide(stats, 1.0, 1, 4) is None
    b = NoiseTracker(settings)
    b.load_state_dict(a.state_dict(), "cpu")
    assert a.decide(stats, 1.0, 1, 4).new == b.decide(stats, 1.0, 1, 4).new == 30
    old = a.state_dict()
    del old["pending"]  # a checkpoint from before the hysteresis loads with none pending
    NoiseTracker(settings).load_state_dict(old, "cpu")
    with pytest.raises(ValueError, match="pending"):
        NoiseTracker(settings).load_state_dict(dict(old, pending=[-1.0]), "cpu")


def test_no_decision_before_the_averages_warmed_up():
    """The first 1 / (1 - beta) windows decide nothing, whatever the (noisy) estimate says."""
    settings = NoiseScaleSettings(beta=0.9, adaptive=AdaptiveSteps(min_steps=1, every=1, patience=1))
    stats = fusedaccum.NoiseScale(*(torch.tensor(v, dtype=torch.float64) for v in (30.0, 1.0, 30.0, 1, 1, 1)))
    t = NoiseTracker(settings)
    decided = []
    for _ in range(12):
        t.windows += 1
        decided.append(t.decide(stats, 1.0, 1, 4) is not None)
    assert decided.index(True) == 9  # window 10 = 1 / (1 - 0.9)


@pytest.mark.parametrize("kw, match", [({"tolerance": 1.0}, "tolerance"), ({"tolerance": float("inf")}, "tolerance"),
                                       ({"patience": 0}, "patience"), ({"tolerance": True}, "tolerance")])
def test_bad_hysteresis_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveSteps(**kw)


def test_a_real_stationary_run_settles():
    """GradAccumulator on least squares at fixed weights (SGD with lr 0: a stationary noise
    scale). x ~ N(0, I_4), y = ε ~ N(0, 4), w of norm 1: the per-item gradient (w·x - y)x has
    mean w and tr(Σ) = |w|²(d + 1) + 4d, so B_simple = 21 items; micro-batches of 3 items
    (summed loss, num_items=3), fp32 (one small batch per window), beta 0.98, K = 7. Its
    heavy-tailed estimates made the policy without hysteresis change K 18 times in these 240
    windows (between 4 and 16); it now keeps K."""
    torch.manual_seed(0)
    d = 4
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 1.0
    policy = AdaptiveSteps(min_steps=2, max_steps=64, every=10)
    acc = fusedaccum.GradAccumulator(model, 7, noise_scale=NoiseScaleSettings(beta=0.98, adaptive=policy))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ks = []
    for _ in range(240):
        for _ in range(acc.accumulation_steps):
            x, y = torch.randn(ITEMS, d), 2.0 * torch.randn(ITEMS)
            acc.backward(0.5 * (model(x).squeeze(1) - y).square().sum(), num_items=ITEMS)
        acc.step(opt)
        ks.append(acc.accumulation_steps)
    changes = acc.accumulation_steps_changes
    assert len(changes) <= 2 and all(4 <= k <= 12 for k in ks), changes
