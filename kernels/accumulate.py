"""Accumulate a micro-batch gradient into an fp32 bucket: ``acc += grad * scale``.

Optionally (``sq_out``) also Σ grad² per program, for the gradient noise scale
(``fusedaccum.signals``): the pass reads grad anyway, so the statistic costs no bytes. And
optionally (``norm_out``) the norm partials of the sum it writes, for a window's last pass: the
step then needs no norm pass over the bucket (the same bits as ``norm_partials`` of ``acc``
afterwards: the same grid, tiles and code, ``_norm._norm_values``)."""

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, MAX_PROGRAMS, NUM_WARPS, grid_for, launcher
from ._norm import _norm_values, norm_start, norm_store
from ._tile import load_tile, store_tile, to_f32
from .unscale_clip import NORM_INF, _inv_args, norm_kind, norm_partials_kernel, store_limit


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
        return a, tl.sum(g * g, axis=0)
    else:
        return a, tl.full([], 0.0, tl.float32)  # a tensor, as in the other branch


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
    norm_ptr,  # *fp32 [NUM_ROWS, norm_stride]: when NORM, program pid writes column norm_slot + pid
    norm_slot,
    norm_stride,
    inv_ptr,  # *fp32 [1]: the inverse scale the non-finite code is taken at, read when INV_FROM_PTR
    inv_value,
    p,  # fp32 norm order (NORM_KIND == 3)
    limit,  # fp32: store_limit of the dtype the processed sum will be stored in
    NORM: tl.constexpr,  # write the norm partials of the sum (what norm_partials_kernel would)
    INV_FROM_PTR: tl.constexpr,
    NORM_KIND: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if SCALE_FROM_PTR:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = scale_value
    sq = tl.full([], 0.0, tl.float32)
    if INV_FROM_PTR:
        inv = tl.load(inv_ptr).to(tl.float32)
    else:
        inv = inv_value
    n_acc, n_bad, n_m, n_e = norm_start(NORM_KIND, BLOCK)
    for i in range(tiles_per_program):
        # int64 before the multiply: a bucket may exceed 2**31 elements.
        start = (i * num_programs + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            a, tile_sq = _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, True, SQ)
            if NORM:
                # a as stored (fp32): what the norm pass would load from acc.
                n_acc, n_bad, n_m, n_e = _norm_values(a, offs, n, inv, n_acc, n_bad, n_m, n_e, p, NORM_KIND, True)
        else:
            a, tile_sq = _accumulate_tile(acc_ptr, grad_ptr, offs, n, scale, OVERWRITE, ZERO_GRAD, False, SQ)
            if NORM:
                a = tl.where(offs < n, a, 0.0)  # the norm pass loads 0 there (here: 0 * scale, maybe NaN)
                n_acc, n_bad, n_m, n_e = _norm_values(a, offs, n, inv, n_acc, n_bad, n_m, n_e, p, NORM_KIND, False)
        if SQ:
            sq += tile_sq
    if NORM:
        norm_store(norm_ptr, norm_slot + pid, norm_stride, n_acc, n_bad, n_m, n_e, limit, NORM_KIND)
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
    norm_out: "torch.Tensor | None" = None,
    norm_slot: int = 0,
    inv_scale: "float | torch.Tensor" = 1.0,
    norm_type: float = 2.0,
    norm_dtype: torch.dtype = torch.float32,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Launch helper; inputs are validated by ``fusedaccum.ops``. ``scale`` and ``sq_weight``
    are floats or one-element fp32 tensors on ``acc``'s device. ``sq_out``: fp32, at least
    one slot; its sum grows by ``sq_weight * Σ grad²`` (``overwrite``: becomes it).
    ``norm_out``: fp32 ``[NUM_ROWS, slots]``; columns ``norm_slot`` to ``norm_slot +
    sq_slots(n) - 1`` get what ``norm_partials([acc], inv_scale, norm_type, out=[a tensor of
    norm_dtype])`` would give for the finished ``acc`` (with ``sq_out``, which then must have
    ``sq_slots(n)`` slots: the norm needs the full grid)."""
    n = acc.numel()
    if norm_out is not None:
        return _accumulate_with_norm(acc, grad, scale, zero_grad, overwrite, sq_out, sq_weight, norm_out, norm_slot,
                                     inv_scale, norm_type, norm_dtype, max_programs)
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
        norm_ptr=acc, inv_ptr=acc, **_NO_NORM,  # unused pointers: no norm
        num_warps=NUM_WARPS,
    )
    return acc


_NO_NORM = dict(norm_slot=0, norm_stride=0, inv_value=1.0, p=0.0, limit=0.0, NORM=False, INV_FROM_PTR=False,
                NORM_KIND=0)


def _accumulate_with_norm(acc, grad, scale, zero_grad, overwrite, sq_out, sq_weight, norm_out, slot, inv_scale,
                          norm_type, norm_dtype, max_programs):
    n = acc.numel()
    kind = norm_kind(norm_type)
    p = 0.0 if kind == NORM_INF else float(norm_type)
    inv_ptr, inv_value, inv_from_ptr = _inv_args(inv_scale, acc)
    limit = store_limit(norm_dtype)
    programs, tiles = grid_for(n, max_programs)
    if sq_out is not None and sq_out.numel() < programs:
        raise ValueError(f"sq_out has {sq_out.numel()} slots; with norm_out it needs {programs} (the norm's grid)")
    if sq_out is not None and overwrite and (n == 0 or sq_out.numel() > programs):
        sq_out.zero_()
    if n == 0:
        # The norm pass's empty slot (a program with no tiles); nothing to add.
        launcher(norm_partials_kernel)[(1,)](
            norm_out, inv_ptr, inv_value, norm_out, slot, norm_out.shape[-1], 0, 0, p, limit,
            INV_FROM_PTR=inv_from_ptr, NORM_KIND=kind, BLOCK=BLOCK, num_warps=NUM_WARPS)
        return acc
    from_ptr = isinstance(scale, torch.Tensor)
    w_ptr = isinstance(sq_weight, torch.Tensor)
    # Grid: as norm_partials' for this bucket (grid_for(n)), so that program k's tiles and their
    # order are those of the norm pass's program k.
    launcher(accumulate_kernel)[(programs,)](
        acc, grad, scale if from_ptr else acc, 0.0 if from_ptr else float(scale), n, tiles,
        SCALE_FROM_PTR=from_ptr, OVERWRITE=overwrite, ZERO_GRAD=zero_grad, BLOCK=BLOCK,
        sq_ptr=acc if sq_out is None else sq_out, sq_weight_ptr=sq_weight if w_ptr else acc,
        sq_weight_value=0.0 if w_ptr else float(sq_weight), SQ=sq_out is not None, SQ_WEIGHT_FROM_PTR=w_ptr,
        norm_ptr=norm_out, norm_slot=slot, norm_stride=norm_out.shape[-1], inv_ptr=inv_ptr, inv_value=inv_value,
        p=p, limit=limit, NORM=True, INV_FROM_PTR=inv_from_ptr, NORM_KIND=kind,
        num_warps=NUM_WARPS,
    )
    return acc


def sq_slots(n: int) -> int:
    """How many ``sq_out`` slots a bucket of ``n`` elements fills (one per program)."""
    return grid_for(n)[0]
