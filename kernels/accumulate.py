"""Accumulate a micro-batch gradient into an fp32 bucket: ``acc += grad * scale``.

Optionally (``sq_out``) also Σ grad² per program, for the gradient noise scale
(``fusedaccum.signals``): the pass reads grad anyway, so the statistic costs no bytes."""

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, MAX_PROGRAMS, NUM_WARPS, grid_for, launcher
from ._tile import load_tile, store_tile, to_f32


@triton.jit
def _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE: tl.constexpr, ZERO_GRAD: tl.constexpr,
                     FULL: tl.constexpr, SQ: tl.constexpr):
    g = to_f32(load_tile(grad_ptr, offs, n, FULL))
    if OVERWRITE:
        a = g * scale
    else:
        # One rounding, as the reference's add_(grad, alpha=scale): an fma.
        a = tl.fma(g, scale, load_tile(acc_ptr, offs, n, FULL))
    store_tile(acc_ptr, offs, n, a, FULL)
    if ZERO_GRAD:
        store_tile(grad_ptr, offs, n, tl.zeros_like(g), FULL)
    if SQ:
        return tl.sum(g * g, axis=0)
    else:
        return 0.0


@triton.jit
def accumulate_kernel(
    acc_ptr,  # *fp32 [n]: accumulation bucket, updated in place
    grad_ptr,  # *fp32|bf16|fp16 [n]: micro-batch gradient; zeroed when ZERO_GRAD
    scale_ptr,  # *fp32 [1]: the multiplier, read when SCALE_FROM_PTR
    scale_value,  # fp32: the multiplier when not SCALE_FROM_PTR
    n,  # number of elements
    tiles_per_program,
    SCALE_FROM_PTR: tl.constexpr,
    OVERWRITE: tl.constexpr,  # acc = grad * scale (first micro-batch of a window: acc is not read)
    ZERO_GRAD: tl.constexpr,  # also write zeros into grad, so the landing bucket is ready for the next backward
    BLOCK: tl.constexpr,
    sq_ptr,  # *fp32 [num_programs]: when SQ, slot pid (+)= sq_weight * Σ grad² over the program's tiles
    sq_weight_ptr,  # *fp32 [1]: sq_weight, read when SQ_WEIGHT_FROM_PTR
    sq_weight_value,  # fp32: sq_weight otherwise
    SQ: tl.constexpr,  # write the Σ grad² partials (OVERWRITE: set the slot, else add to it)
    SQ_WEIGHT_FROM_PTR: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_value
    sq = tl.full([], 0.0, tl.float32)
    for i in range(tiles_per_program):
        # int64 before the multiply: a bucket may exceed 2**31 elements.
        start = (i * num_programs + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            tile_sq = _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, True, SQ)
        else:
            tile_sq = _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, False, SQ)
        if SQ:
            sq += tile_sq
    if SQ:
        # One slot per program, no atomics: the same bucket always gives the same partials.
        if SQ_WEIGHT_FROM_PTR:
            sq = sq * tl.load(sq_weight_ptr).to(tl.float32)
        else:
            sq = sq * sq_weight_value
        if not OVERWRITE:
            sq += tl.load(sq_ptr + pid)
        tl.store(sq_ptr + pid, sq)


def accumulate_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    scale: "float | torch.Tensor",
    *,
    zero_grad: bool,
    overwrite: bool,
    sq_out: "torch.Tensor | None" = None,
    sq_weight: "float | torch.Tensor" = 1.0,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Launch helper; inputs are validated by ``fusedaccum.ops``. ``scale`` and ``sq_weight``
    are floats or one-element fp32 tensors on ``acc``'s device. ``sq_out``: fp32, at least
    one slot; its sum grows by ``sq_weight * Σ grad²`` (``overwrite``: becomes it)."""
    n = acc.numel()
    if sq_out is not None:
        # One slot per program (sq_slots(n) of them); slots beyond the grid hold zeros.
        max_programs = min(max_programs, sq_out.numel())
        if overwrite and (n == 0 or sq_out.numel() > grid_for(n, max_programs)[0]):
            sq_out.zero_()
    if n == 0:
        return acc
    from_ptr = isinstance(scale, torch.Tensor)
    programs, tiles = grid_for(n, max_programs)
    # Grid: one program per tile, capped at max_programs; each walks its tiles grid-stride.
    launcher(accumulate_kernel)[(programs,)](
        acc,
        grad,
        scale if from_ptr else acc,  # unused pointer when the scale is a float
        0.0 if from_ptr else float(scale),
        n,
        tiles,
        SCALE_FROM_PTR=from_ptr,
        OVERWRITE=overwrite,
        ZERO_GRAD=zero_grad,
        BLOCK=BLOCK,
        sq_ptr=acc if sq_out is None else sq_out,  # unused pointers when not SQ
        sq_weight_ptr=sq_weight if isinstance(sq_weight, torch.Tensor) else acc,
        sq_weight_value=0.0 if isinstance(sq_weight, torch.Tensor) else float(sq_weight),
        SQ=sq_out is not None,
        SQ_WEIGHT_FROM_PTR=isinstance(sq_weight, torch.Tensor),
        num_warps=NUM_WARPS,
    )
    return acc


def sq_slots(n: int) -> int:
    """How many ``sq_out`` slots a bucket of ``n`` elements fills (one per program)."""
    return grid_for(n)[0]
