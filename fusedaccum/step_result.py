"""``StepResult``: what ``GradAccumulator.step`` returns when it closes a window."""

from dataclasses import dataclass

import torch

from . import signals as _signals

__all__ = ["StepResult"]


@dataclass(frozen=True)
class StepResult:
    """What ``GradAccumulator.step`` returns at a window boundary.

    total_norm: 0-d fp32 device tensor, the global ``norm_type``-norm of the window's
        normalized, unscaled gradient before clipping: NaN when an element of it is NaN
        (also 0 * inf: a zero sum in a window of 0 items, whose inverse count is inf), else
        inf when one is inf or the norm exceeds fp32. It is finite on a step skipped for an
        overflow on store alone.
    found_inf: 0-d fp32 device tensor, 1.0 when the optimizer step was skipped, else 0.0:
        skipped when ``total_norm`` is inf/NaN, when the window holds 0 items or fewer, or on
        an overflow on store (the processed gradient, finite in fp32, would round to inf in
        its fp16/bf16 ``param.grad``; a ``LossScaler`` keeps its scale then, and warns when
        it repeats). docs/numerics.md, "found_inf".
    micro_batches: how many micro-batches the window accumulated (on this rank).
    num_items: the window's total items (int, float or 0-d device tensor), or None when the
        window was normalized by ``micro_batches``. Data parallel: the total over all ranks
        (0-d fp64 device tensor), the number the gradient was divided by.
    loss: 0-d fp64 device tensor, the window's loss: the mean of the micro-batch losses, or
        with ``num_items`` their sum over the window's items (the large-batch per-item mean);
        over all ranks when data parallel. Detached; reading it is the caller's sync.
    noise_scale: a ``fusedaccum.NoiseScale`` (0-d device tensors ``trace_cov``, ``grad_sq``,
        ``b_simple``, ...) after this window, or None when ``noise_scale`` is off.
    accumulation_steps_change: the ``StepsChange`` the adaptive policy made after this
        window (the next windows hold ``.new`` micro-batches), or None.
    """

    total_norm: torch.Tensor
    found_inf: torch.Tensor
    micro_batches: int
    num_items: "int | float | torch.Tensor | None"
    loss: "torch.Tensor | None" = None
    noise_scale: "_signals.NoiseScale | None" = None
    accumulation_steps_change: "_signals.StepsChange | None" = None
