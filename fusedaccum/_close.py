"""GradAccumulator's step, closing a window: the engine's reductions, then the norm pass and
the finalize over the accumulator's own buckets (the passes past their argument checks,
``ops._checked_stats``: a fixed cost per step), then the window's loss and statistics."""

import numbers
import warnings

import torch

from . import _last_pass
from .ops import CLIP_EPS, _checked_stats, _clip_args, _in_place_as_flat, _scalar
from .scaler import inv_scale


def close_window(acc, force: bool):
    """The engine's reductions, then the norm pass and the finalize. Returns (stats, the window's
    item count for the result, (loss, noise, items per micro-batch), the apply pass owed: step's
    or a fused optimizer's, see _optim.window_step). The signals ride on the engine's count all-reduce."""
    win = acc._win
    # Only what has to travel is packed: one process without statistics needs the loss alone.
    lean = acc._signals.tracker is None and not acc._engine.communicates
    win.signals = None if lean else torch.cat([
        win.sums(acc._signals.local_sums(acc.device)),
        torch.full((1,), win.micro, dtype=torch.float64, device=acc.device),
        *acc._usage.local_mask(acc.device, acc._engine.communicates)])  # [5:]: who used which parameter
    denom, items = acc._engine.reduce(acc._accums, win, force, acc.device)
    if isinstance(denom, numbers.Real) and denom == 0:
        warnings.warn(f"the window's {acc._win.micro} micro-batches hold 0 items in total (num_items): "
                      "there is no gradient to normalize, so the step is skipped as on overflow "
                      "(found_inf = 1)", RuntimeWarning, stacklevel=3)
    # optimizer.zero_grad() between the last backward and here would leave the optimizer
    # no gradient to step with: the window's sum is in the buckets, so point at it again.
    acc.buckets.attach()
    scale = win.scale
    out = acc.buckets.step_outputs()
    stats, owed = _checked_stats(acc._accums, out and _in_place_as_flat(out, acc._accums),
                                 _scalar(inv_scale(scale, denom), "inv_scale", acc.device),
                                 *_clip_args(acc.max_norm, acc.norm_type, CLIP_EPS), partials=_last_pass.take(acc),
                                 reduce_partials=acc._engine.reduce_partials, apply=False)
    # win.signals is global now: [Σ loss, Σ |g_s|²·scale², Σ 1/b_s, n, micro-batches].
    # (lean: only sums[0], the loss, is read; the carried sums broadcast onto it.)
    sums = win.sums(acc._signals.local_loss(acc.device).reshape(1)) if lean else win.signals[:4]
    micro = win.micro if lean else win.signals[4]
    count = items if win.items_given else micro  # items (or micro-batches) over all ranks
    loss, noise = acc._signals.finish(sums, count, stats[0], stats[1], scale, bool(win.items_given))
    acc._usage.drop_unused(win.signals[5:] if acc._engine.communicates else None)
    return stats, items, (loss, noise, None if noise is None else count / micro), owed
