"""The adaptive accumulation-steps policy: K from the gradient noise scale, with hysteresis.

Its rule (warm-up, tolerance band, patience) and the measurements behind it are in
docs/signals.md; ``fusedaccum.signals.NoiseTracker`` calls it once every ``every`` windows
with the target read on the host.
"""

import math
import numbers
from dataclasses import dataclass

__all__ = ["AdaptiveSteps", "StepsChange", "next_k"]


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
    items per micro-batch)``, clamped to ``[min_steps, max_steps]``, with hysteresis.

    min_steps: the smallest K (default 2: with fp32 parameters in one process a window of one
        micro-batch gives no estimate, so K = 1 would never be left).
    max_steps: the largest K.
    every: decide every ``every`` windows (the first time after ``every`` windows); each
        decision reads ``b_simple`` and the items per micro-batch on the host: one sync, the
        only one of these signals.
    on_change: called with each change (a ``StepsChange``), which is also recorded in
        ``GradAccumulator.accumulation_steps_changes`` and returned as
        ``StepResult.accumulation_steps_change`` of that window.
    tolerance: a target within a factor ``tolerance`` of the current K (``K / tolerance ≤
        target ≤ K · tolerance``) is no reason to change (a number > 1).
    patience: K changes only after this many consecutive decisions found the target outside
        that band on the same side; then to the last of them, rounded.

    No decision in the first ``1 / (1 - beta)`` windows (the averages' warm-up). A decision
    without a finite, positive ``b_simple`` (no estimate yet) keeps K and does not count. The averages' noise moves single targets by a factor 1.5 and more (docs/signals.md),
    so both rules are needed for K to settle; a real change of the noise scale is followed
    within about ``(patience + 1) · every`` windows plus the averages' lag.
    """

    min_steps: int = 2
    max_steps: int = 64
    every: int = 10
    on_change: "object | None" = None
    tolerance: float = 1.5
    patience: int = 3

    def __post_init__(self):
        for name in ("min_steps", "max_steps", "every", "patience"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"AdaptiveSteps.{name} must be an integer >= 1, got {v!r}")
        if self.max_steps < self.min_steps:
            raise ValueError(f"AdaptiveSteps: max_steps={self.max_steps} < min_steps={self.min_steps}")
        if self.on_change is not None and not callable(self.on_change):
            raise TypeError(f"AdaptiveSteps.on_change must be callable or None, got {type(self.on_change).__name__}")
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (1 < t < math.inf):
            raise ValueError(f"AdaptiveSteps.tolerance must be a finite number > 1, got {t!r}")

    def want(self, b_simple: float, items_per_micro_batch: float, world_size: int) -> "float | None":
        """The K the statistics ask for, clamped but not rounded, or None when they give no answer."""
        want = b_simple / (items_per_micro_batch * world_size)
        if not (math.isfinite(want) and want > 0):
            return None
        return float(min(self.max_steps, max(self.min_steps, want)))

    def target(self, b_simple: float, items_per_micro_batch: float, world_size: int) -> "int | None":
        """``want`` rounded: the K one decision alone would pick, or None."""
        want = self.want(b_simple, items_per_micro_batch, world_size)
        return None if want is None else self._round(want)

    def _round(self, want: float) -> int:
        return int(min(self.max_steps, max(self.min_steps, round(want))))

    def side(self, want: float, k: int) -> int:
        """+1 (-1) when ``want`` is above (below) the band around ``k``, else 0."""
        return 1 if want > k * self.tolerance else -1 if want < k / self.tolerance else 0


def next_k(policy: AdaptiveSteps, pending: list, want: float, k: int) -> "int | None":
    """One decision of ``policy`` at K = ``k`` with the target ``want``: the new K, or None.
    ``pending`` (updated in place) holds the targets of the current run of decisions outside
    the band, all on one side; a decision inside it, or on the other side, ends the run."""
    side = policy.side(want, k)
    if side == 0 or (pending and policy.side(pending[-1], k) != side):
        pending.clear()
    if side == 0:
        return None
    pending.append(want)
    if len(pending) < policy.patience:
        return None
    new = policy._round(pending[-1])
    pending.clear()
    return None if new == k else new
