"""bf16/fp16 gradients of large parameters on the CPU, added into the fp32 bucket by a hook.

A direct bucket (``GradBuckets(direct=True)``) keeps no landing bucket: its parameters' gradients
go straight into the fp32 sums. Autograd can add them itself into an fp32 ``.grad`` view
(``Tensor.grad_dtype``), with one mixed-dtype ``add_``. On the CPU that ``add_`` first converts
the whole bf16 operand into an fp32 temporary, which for a large parameter leaves the cache:
at 1e8 elements 8x slower than the same add in cache-sized pieces, and slower than the landing
bucket it replaces. So a large parameter on the CPU keeps ``.grad`` None between backwards; its
pre-hook hands autograd's own gradient tensor over uncopied, and its post-accumulate hook adds it
into the bucket in pieces and drops it. A small one keeps the view: a Python hook per parameter
per backward would cost more than its add (docs/kernels.md, "bf16 gradients on the CPU").
"""

import torch

from .reference import CPU_PIECE, accumulate_


def direct_arrival(device: torch.device, numel: int) -> str:
    """How a direct bucket's parameter of ``numel`` elements gets its gradient into the fp32 sum:
    ``"view"`` (autograd adds into an fp32 ``.grad`` view) or ``"hook"`` (the fold hook)."""
    return "hook" if device.type == "cpu" and numel > CPU_PIECE else "view"


def fold_target(accum: torch.Tensor, offset: int, local: torch.Tensor) -> torch.Tensor:
    """``local``'s span of ``accum`` as a tensor of its own: the same memory, but not a view, so
    the fold's writes leave the bucket's shared version counter to autograd's adds into the
    views (what ``GradBuckets.settle`` and the guards count)."""
    return torch.empty(0, dtype=accum.dtype, device=accum.device).set_(
        accum.untyped_storage(), accum.storage_offset() + offset, (local.numel(),), (1,))


def steal(grad: torch.Tensor) -> torch.Tensor:
    """Pre-hook of a folded parameter: a new tensor object over the same gradient, which autograd
    then stores as ``.grad`` without copying it (it copies one that something else still
    references); the fold hook reads it once and drops it."""
    return grad.detach()


def fold_hook(state, i: int, target: torch.Tensor, shape, stride):
    """Post-accumulate-grad hook of parameter ``i`` (``state``: the buckets' ``_Reattach``): add
    the gradient autograd just stored into ``target`` (fp32, flat) and set ``.grad`` back to None.
    Counted as an eager hook counts."""
    shaped = target.as_strided(shape, stride)

    @torch.no_grad()
    def fold(p: torch.Tensor) -> None:
        g, p.grad = p.grad, None
        state.accumulations += 1
        state.used[i] = True
        if g is None:  # an earlier post-accumulate hook of the caller's took it
            return
        if g.is_contiguous() and shaped.is_contiguous():
            accumulate_(target, g, 1.0, zero_grad=False, overwrite=False)  # in cache-sized pieces
        else:  # the parameter's own dense layout (channels_last...), one add
            shaped.add_(g)

    return fold


def fold_hooks(state, buckets) -> dict:
    """Index in the buckets' (param, view) pairs -> the fold hook, for every folded parameter."""
    folds, i = {}, 0
    for b in buckets:
        for off, view, folded in zip(b.offsets, b.views, b.folded):
            if folded:
                folds[i] = fold_hook(state, i, fold_target(b.accum, off, view), view.shape, view.stride())
            i += 1
    return folds
