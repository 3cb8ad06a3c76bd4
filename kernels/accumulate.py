"""Accumulate a micro-batch gradient into an fp32 bucket: ``acc += grad * scale``."""

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, MAX_PROGRAMS, NUM_WARPS, grid_for
from ._tile import load_tile, store_tile, to_f32


@triton.jit
def _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE: tl.constexpr, ZERO_GRAD: tl.constexpr,
                     FULL: tl.constexpr):
    g = to_f32(load_tile(grad_ptr, offs, n, FULL))
    if OVERWRITE:
        a = g * scale
    else:
        # One rounding, as the reference's add_(grad, alpha=scale): an fma.
        a = tl.fma(g, scale, load_tile(acc_ptr, offs, n, FULL))
    store_tile(acc_ptr, offs, n, a, FULL)
    if ZERO_GRAD:
        store_tile(grad_ptr, offs, n, tl.zeros_like(g), FULL)


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
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_value
    for i in range(tiles_per_program):
        # int64 before the multiply: a bucket may exceed 2**31 elements.
        start = (i * num_programs + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, True)
        else:
            _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, False)


def accumulate_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    scale: "float | torch.Tensor",
    *,
    zero_grad: bool,
    overwrite: bool,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Launch helper; inputs are validated by ``fusedaccum.ops``. ``scale`` is a float or a
    one-element fp32 tensor on ``acc``'s device."""
    n = acc.numel()
    if n == 0:
        return acc
    from_ptr = isinstance(scale, torch.Tensor)
    programs, tiles = grid_for(n, max_programs)
    # Grid: one program per tile, capped at max_programs; each walks its tiles grid-stride.
    accumulate_kernel[(programs,)](
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
        num_warps=NUM_WARPS,
    )
    return acc
