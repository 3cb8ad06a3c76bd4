"""Training signals per window: the window's loss, the gradient noise scale, adaptive K.

The gradient noise scale (McCandlish et al., 2018, "An Empirical Model of Large-Batch
Training", appendix A) compares the squared norms of gradients taken over batches of
different sizes. With per-item gradients of mean 𝒢 and covariance Σ, a batch of b items
has a mean gradient g with ``E|g|² = |𝒢|² + tr(Σ)/b``. Given ``n`` small batches of sizes
``b_s`` (their gradients ``g_s``) and the window's gradient ``G`` over ``B`` items:

    m = (1/n) Σ_s |g_s|²,   h = (1/n) Σ_s 1/b_s
    E[m - |G|²] = tr(Σ) (h - 1/B)
    S   = (m - |G|²) / (h - 1/B)     unbiased for tr(Σ)
    G²  = |G|² - S / B               unbiased for |𝒢|²  (linear in unbiased terms)

Only expectations are used, so the small batches may overlap the window (they are its
micro-batches) and may be of any sizes; ``h`` is what makes unequal sizes exact (taking
``1/b`` of the mean size instead is biased: see docs/signals.md and tests/test_signals.py).
Without ``num_items`` a micro-batch (its mean loss) is the unit: ``b_s = 1``, ``B`` = the
number of micro-batches, and ``S`` is in per-micro-batch units.

Everything here is device arithmetic on 0-d tensors, no host sync, except
``AdaptiveSteps``, which reads ``b_simple`` on the host once every ``every`` windows.
"""

import math
import numbers
from dataclasses import dataclass, field

import torch

__all__ = ["AdaptiveSteps", "NoiseScale", "NoiseScaleSettings", "StepsChange", "estimate_noise"]


def estimate_noise(small_sq, small_inv, small_n, big_sq, big_size):
    """The unbiased two-batch estimates ``(S, G²)`` (fp64 0-d tensors) from sums over the
    small batches: ``small_sq = Σ_s |g_s|²``, ``small_inv = Σ_s 1/b_s``, ``small_n`` = their
    number; ``big_sq = |G|²`` of the window of ``big_size`` items. Non-finite (NaN/inf) when
    the window gives no estimate (no small batch, or every small batch is the window)."""
    # small_sq and big_sq are fp64 device tensors; the sizes may be tensors or numbers.
    m = small_sq / small_n
    h = small_inv / small_n
    trace_cov = (m - big_sq) / (h - 1.0 / big_size)
    return trace_cov, big_sq - trace_cov / big_size


@dataclass(frozen=True)
class StepsChange:
    """One change of ``accumulation_steps`` made by ``AdaptiveSteps``, after ``window``
    windows, from the ``b_simple`` (and items per micro-batch) read then."""

    window: int
    old: int
    new: int
    b_simple: float
    items_per_micro_batch: float


@dataclass(frozen=True)
class AdaptiveSteps:
    """Let ``accumulation_steps`` follow the noise scale: ``K ≈ b_simple / (world ·
    items per micro-batch)``, rounded and clamped to ``[min_steps, max_steps]``.

    Decided every ``every`` windows (the first time after ``every`` windows): each decision
    reads ``b_simple`` and the items per micro-batch on the host (one sync, the only one
    of these signals). ``on_change(change)`` (a ``StepsChange``) is called for each change,
    which is also recorded in ``GradAccumulator.accumulation_steps_changes`` and returned as
    ``StepResult.accumulation_steps`` of that window. A decision without a finite, positive
    ``b_simple`` (no estimate yet) keeps K.
    """

    min_steps: int = 1
    max_steps: int = 64
    every: int = 10
    on_change: "object | None" = None

    def __post_init__(self):
        for name in ("min_steps", "max_steps", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"AdaptiveSteps.{name} must be an integer >= 1, got {v!r}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"AdaptiveSteps: max_steps={self.max_steps} < min_steps={self.min_steps}")
        if self.on_change is not None and not callable(self.on_change):
            raise TypeError(f"AdaptiveSteps.on_change must be callable or None, got {type(self.on_change).__name__}")

    def target(self, b_simple: float, items_per_micro_batch: float, world_size: int) -> "int | None":
        """The K this policy wants, or None when the statistics give no answer."""
        want = b_simple / (items_per_micro_batch * world_size)
        if not (math.isfinite(want) and want > 0):
            return None
        return int(min(self.max_steps, max(self.min_steps, round(want))))


@dataclass(frozen=True)
class NoiseScaleSettings:
    """``GradAccumulator(..., noise_scale=NoiseScaleSettings(...))``.

    beta: the smoothing of the exponential moving averages of ``S`` and ``G²`` (bias
        corrected, so the first windows are not pulled towards 0).
    adaptive: an ``AdaptiveSteps`` policy, or None (K stays what the user sets).
    """

    beta: float = 0.95
    adaptive: "AdaptiveSteps | None" = None

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real) or not 0 <= self.beta < 1:
            raise ValueError(f"NoiseScaleSettings.beta must be a number in [0, 1), got {self.beta!r}")
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveSteps):
            raise TypeError(f"NoiseScaleSettings.adaptive must be an AdaptiveSteps or None, "
                            f"got {type(self.adaptive).__name__}")


def settings_from(noise_scale) -> "NoiseScaleSettings | None":
    """``GradAccumulator``'s ``noise_scale`` argument: False/None, True or a settings object."""
    if noise_scale is None or noise_scale is False:
        return None
    if noise_scale is True:
        return NoiseScaleSettings()
    if isinstance(noise_scale, NoiseScaleSettings):
        return noise_scale
    raise TypeError(f"noise_scale must be False, True or a fusedaccum.NoiseScaleSettings, "
                    f"got {type(noise_scale).__name__}")


@dataclass(frozen=True)
class NoiseScale:
    """The gradient noise statistics after a window, all 0-d fp64 device tensors, in
    per-item-mean units (per micro-batch without ``num_items``), unscaled.

    trace_cov: EMA of the estimates of tr(Σ), bias corrected (S).
    grad_sq: EMA of the estimates of |𝒢|², bias corrected.
    b_simple: ``trace_cov / grad_sq``, the simple noise scale: in items with ``num_items``,
        else in micro-batches.
    window_trace_cov, window_grad_sq: this window's own estimates (NaN when the window gave
        none: a single small batch equal to the window, or a skipped step).
    windows: how many windows have contributed (0-d fp64 tensor; counts on the device).
    """

    trace_cov: torch.Tensor
    grad_sq: torch.Tensor
    b_simple: torch.Tensor
    window_trace_cov: torch.Tensor
    window_grad_sq: torch.Tensor
    windows: torch.Tensor
    unit: str = "items"

    def to_host(self) -> dict:
        """The values as Python floats (one host sync)."""
        names = ("trace_cov", "grad_sq", "b_simple", "window_trace_cov", "window_grad_sq", "windows")
        values = torch.stack([getattr(self, n) for n in names]).tolist()
        return dict(zip(names, values), unit=self.unit)


@dataclass
class _Smoother:
    """Bias-corrected EMAs of (S, G²) on the device: ``state = [ema_S, ema_G², 1 - beta^t,
    t]``, updated only by windows whose estimates are finite (decided on the device)."""

    beta: float
    state: "torch.Tensor | None" = None

    def update(self, trace_cov, grad_sq, ok, unit: str) -> NoiseScale:
        if self.state is None:
            self.state = torch.zeros(4, dtype=torch.float64, device=trace_cov.device)
        one = torch.ones_like(trace_cov)
        sample = torch.stack([trace_cov, grad_sq, one])
        # ema <- beta·ema + (1 - beta)·x for S, G² and the weight 1 - beta^t (so ema / weight is
        # the bias-corrected average); t counts the windows that contributed.
        new = torch.cat([self.state[:3] * self.beta + sample * (1.0 - self.beta), (self.state[3] + 1).reshape(1)])
        self.state = torch.where(ok, new, self.state)
        corrected = self.state[:2] / self.state[2]  # NaN until a window contributes
        nan = torch.full_like(trace_cov, math.nan)
        return NoiseScale(trace_cov=corrected[0], grad_sq=corrected[1], b_simple=corrected[0] / corrected[1],
                          window_trace_cov=torch.where(ok, trace_cov, nan),
                          window_grad_sq=torch.where(ok, grad_sq, nan), windows=self.state[3], unit=unit)


@dataclass
class NoiseTracker:
    """The accumulator's noise-scale state: the smoother and the adaptive policy's counters."""

    settings: NoiseScaleSettings
    smoother: _Smoother = field(init=False)
    windows_since_decision: int = 0
    windows: int = 0
    changes: list = field(default_factory=list)

    def __post_init__(self):
        self.smoother = _Smoother(float(self.settings.beta))

    def update(self, small_sq, small_inv, small_n, big_sq, big_size, valid, unit: str) -> NoiseScale:
        """One window: ``valid`` a 0-d bool device tensor (False on a skipped step)."""
        trace_cov, grad_sq = estimate_noise(small_sq, small_inv, small_n, big_sq, big_size)
        ok = valid & torch.isfinite(trace_cov) & torch.isfinite(grad_sq)
        self.windows += 1
        return self.smoother.update(trace_cov, grad_sq, ok, unit)

    def decide(self, stats: NoiseScale, items_per_micro_batch, world_size: int, k: int) -> "StepsChange | None":
        """The adaptive policy after a window: a new K, or None. Reads the host only every
        ``every`` windows (``.tolist()``: the one documented sync)."""
        policy = self.settings.adaptive
        if policy is None:
            return None
        self.windows_since_decision += 1
        if self.windows_since_decision < policy.every:
            return None
        self.windows_since_decision = 0
        # The documented sync, once every `every` windows.
        b_simple, per_micro = torch.stack([stats.b_simple, items_per_micro_batch.to(stats.b_simple)]).tolist()
        new = policy.target(b_simple, per_micro, world_size)
        if new is None or new == k:
            return None
        change = StepsChange(window=self.windows, old=k, new=new, b_simple=b_simple, items_per_micro_batch=per_micro)
        self.changes.append(change)
        if policy.on_change is not None:
            policy.on_change(change)
        return change

    def state_dict(self) -> dict:
        return {"ema": None if self.smoother.state is None else self.smoother.state.clone(),
                "windows_since_decision": self.windows_since_decision, "windows": self.windows}

    def load_state_dict(self, state: dict, device) -> None:
        ema = state["ema"]
        if ema is not None and (not isinstance(ema, torch.Tensor) or ema.numel() != 4):
            raise ValueError("the state dict's noise-scale EMA must be None or a 4-element tensor")
        self.smoother.state = None if ema is None else ema.to(device, torch.float64).clone()
        self.windows_since_decision = int(state["windows_since_decision"])
        self.windows = int(state["windows"])


class WindowLoss:
    """The window's loss on the device: the micro-batch losses are kept (detached, 0-d) and
    summed once at the step, so a micro-batch costs no launch."""

    def __init__(self):
        self.losses: list = []

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().reshape(()))

    def total(self, device) -> torch.Tensor:
        """Σ of the micro-batch losses, fp64 0-d on ``device`` (0 when there are none)."""
        if not self.losses:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([t.to(device, torch.float64) for t in self.losses]).sum()
