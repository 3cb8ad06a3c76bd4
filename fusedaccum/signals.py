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
``AdaptiveSteps`` (``fusedaccum.adaptive``), which reads ``b_simple`` on the host once every
``every`` windows.
"""

import math
import numbers
from dataclasses import dataclass, field

import torch

from .adaptive import AdaptiveSteps, StepsChange, next_k

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
    pending: list = field(default_factory=list)  # the targets of the current run of out-of-band decisions

    def __post_init__(self):
        self.smoother = _Smoother(float(self.settings.beta))

    def update(self, small_sq, small_inv, small_n, big_sq, big_size, valid, unit: str) -> NoiseScale:
        """One window: ``valid`` a 0-d bool device tensor (False on a skipped step)."""
        trace_cov, grad_sq = estimate_noise(small_sq, small_inv, small_n, big_sq, big_size)
        ok = valid & torch.isfinite(trace_cov) & torch.isfinite(grad_sq)
        self.windows += 1
        return self.smoother.update(trace_cov, grad_sq, ok, unit)

    def warmup(self) -> int:
        """Windows before the first decision: the averages' time constant, 1 / (1 - beta) (a
        bias-corrected average of fewer windows swings by several times)."""
        return math.ceil(1.0 / (1.0 - self.settings.beta) - 1e-9)

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
        per_micro = (items_per_micro_batch.to(stats.b_simple) if isinstance(items_per_micro_batch, torch.Tensor)
                     else torch.full_like(stats.b_simple, items_per_micro_batch))
        b_simple, per_micro = torch.stack([stats.b_simple, per_micro]).tolist()
        want = policy.want(b_simple, per_micro, world_size)
        if want is None or self.windows < self.warmup():
            return None
        new = next_k(policy, self.pending, want, k)
        if new is None:
            return None
        change = StepsChange(window=self.windows, old=k, new=new, b_simple=b_simple, items_per_micro_batch=per_micro)
        self.changes.append(change)
        if policy.on_change is not None:
            policy.on_change(change)
        return change

    def state_dict(self) -> dict:
        return {"ema": None if self.smoother.state is None else self.smoother.state.clone(),
                "windows_since_decision": self.windows_since_decision, "windows": self.windows,
                "pending": list(self.pending)}

    @staticmethod
    def check_state(state) -> None:
        """Raise, changing nothing, unless ``state`` is what ``state_dict`` returns."""
        if not isinstance(state, dict) or not {"ema", "windows_since_decision", "windows"} <= set(state):
            raise ValueError("the state dict's noise-scale state must be a dict with 'ema', "
                             "'windows_since_decision' and 'windows'")
        ema = state["ema"]
        if ema is not None and (not isinstance(ema, torch.Tensor) or ema.numel() != 4):
            raise ValueError("the state dict's noise-scale EMA must be None or a 4-element tensor")
        for key in ("windows_since_decision", "windows"):
            if isinstance(state[key], bool) or not isinstance(state[key], numbers.Integral) or state[key] < 0:
                raise ValueError(f"{key}={state[key]!r} in the state dict's noise-scale state; expected an integer >= 0")
        pending = state.get("pending", [])  # absent from checkpoints written before the hysteresis
        if not isinstance(pending, (list, tuple)) or not all(
                isinstance(v, numbers.Real) and math.isfinite(v) and v > 0 for v in pending):
            raise ValueError(f"pending={pending!r} in the state dict's noise-scale state; expected a list of "
                             "positive numbers")

    def load_state_dict(self, state: dict, device) -> None:
        self.check_state(state)
        ema = state["ema"]
        self.smoother.state = None if ema is None else ema.to(device, torch.float64).clone()
        self.windows_since_decision = int(state["windows_since_decision"])
        self.windows = int(state["windows"])
        self.pending = [float(v) for v in state.get("pending", [])]


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
        first = self.losses[0]
        if all(t.dtype == first.dtype and t.device == device for t in self.losses):
            return torch.stack(self.losses).sum(dtype=torch.float64)  # two launches per window
        return torch.stack([t.to(device, torch.float64) for t in self.losses]).sum()


class WindowSignals:
    """The window's signals as the accumulator collects them: the micro-batch losses, and
    with the noise scale on, the small-batch squared norms (``m``'s numerator, ``h``'s).

    Small batches: every micro-batch when all buckets are bf16/fp16 (Σg² of the landing
    bucket comes out of the accumulate pass: no extra bytes); else the window's first
    micro-batch (its fp32 bucket is read once after that backward: 4 B/element/window).
    Squared norms are of the raw (loss-scaled) gradient times ``1 / c²``, with ``c`` the
    micro-batch's item count (num_items: its loss is a sum) or 1 (a mean loss); the loss
    scale is divided out at the step. Device tensors throughout; nothing reads the host.
    """

    def __init__(self, buckets, settings: "NoiseScaleSettings | None", sq_slots):
        self.tracker = NoiseTracker(settings) if settings is not None else None
        lowp = [b for b in buckets if b.landing is not None]
        self.every_micro_batch = len(lowp) == len(buckets)
        self.sq = [torch.zeros(sq_slots(b.accum), dtype=torch.float32, device=b.device) for b in lowp] \
            if self.tracker is not None else []
        self.fp32 = [b.accum for b in buckets if b.landing is None]
        self.last: "NoiseScale | None" = None
        self.reset()

    def reset(self) -> None:
        self.loss = WindowLoss()
        self.inv_host = 0.0  # Σ 1/c over the small batches (host part)
        self.n_host = 0  # their number (host part)
        self.dev_sizes: list = []  # c of small batches counted on the device (num_items tensors)
        self.fp32_sq: "torch.Tensor | None" = None
        self.sampled = False  # whether the lowp slots hold this window's values

    def weight(self, first: bool, sample_fp32, host_items, dev_items, given: bool):
        """The ``sq_weight`` (1/c²) for this micro-batch's accumulate pass, or None when it
        is not sampled (statistics off, not a sampled micro-batch, or a host count of 0).
        ``sample_fp32()``: whether the fp32 buckets after a first backward are a small batch."""
        if self.tracker is None or not (self.every_micro_batch or (first and sample_fp32())):
            return None
        if not given:
            self.inv_host += 1.0
            self.n_host += 1
            return 1.0
        if dev_items is None:
            if host_items == 0:
                return 0.0 if first else None  # no items: no small batch (first: clear the slots)
            self.inv_host += 1.0 / host_items
            self.n_host += 1
            return 1.0 / host_items**2
        self.dev_sizes.append(dev_items)
        return torch.where(dev_items > 0, dev_items.reciprocal().square(), 0.0).float()

    def after_backward(self, loss: torch.Tensor, first: bool, weight, sum_squares) -> None:
        """Record the micro-batch's loss; for a sampled first micro-batch, the fp32 buckets'
        Σg² (``sum_squares(tensors)``: one read pass, fp64 0-d)."""
        self.loss.add(loss)
        if weight is not None:
            self.sampled = self.sampled or bool(self.sq)
            if first and self.fp32:
                self.fp32_sq = sum_squares(self.fp32) * weight

    def local_loss(self, device) -> torch.Tensor:
        """Σ of this rank's micro-batch losses since the window started or was loaded, fp64 0-d
        (those before a resume are ``Window.carried``)."""
        return self.loss.total(device)

    def local_sums(self, device) -> torch.Tensor:
        """fp64 ``[Σ loss, Σ |g_s|²·scale², Σ 1/b_s, n]`` of this rank's micro-batches since the
        window started or was loaded (``Window.sums`` adds those before a resume)."""
        parts = [self.loss.total(device)]
        if self.tracker is None:
            return torch.cat([parts[0].reshape(1), torch.zeros(3, dtype=torch.float64, device=device)])
        sq = [s.sum(dtype=torch.float64) for s in self.sq] if self.sampled else []
        if self.fp32_sq is not None:
            sq.append(self.fp32_sq)
        inv, n = self.inv_host, self.n_host
        parts.append(torch.stack(sq).sum() if sq else torch.zeros((), dtype=torch.float64, device=device))
        if self.dev_sizes:
            sizes = torch.stack(self.dev_sizes)
            ok = sizes > 0
            inv = torch.where(ok, sizes.reciprocal(), 0.0).sum() + inv
            n = ok.sum() + n
        parts += [torch.full((), inv, dtype=torch.float64, device=device) if not torch.is_tensor(inv) else inv,
                  torch.full((), n, dtype=torch.float64, device=device) if not torch.is_tensor(n) else n.double()]
        return torch.stack(parts)

    def state_dict(self) -> "dict | None":
        """The smoothing state (the window's sums are ``Window``'s)."""
        return None if self.tracker is None else self.tracker.state_dict()

    def load_state_dict(self, noise, mid_window: bool, device) -> None:
        """``noise``: checked by the caller (``NoiseTracker.check_state``) or None. A window in
        progress resumes with its sums carried by the ``Window`` and the small-batch slots cleared."""
        self.reset()
        if mid_window:
            for sq in self.sq:
                sq.zero_()
            self.sampled = bool(self.sq)
        if self.tracker is not None and noise is not None:
            self.tracker.load_state_dict(noise, device)

    def finish(self, sums, count, total_norm, found_inf, scale, given: bool):
        """The window's loss (fp64 0-d) and noise statistics, from the global ``sums`` (as
        ``local_sums``), the global normalizer ``count`` (items, or micro-batches) and the
        step's stats. ``scale``: the loss scale of the
        window (tensor) or None."""
        loss = sums[0] / count
        if self.tracker is None:
            return loss, None
        small_sq = sums[1] if scale is None else sums[1] / scale.double().square()
        self.last = self.tracker.update(small_sq, sums[2], sums[3], total_norm.double().square(), count,
                                        found_inf == 0, "items" if given else "micro-batches")
        return loss, self.last
