"""Unscale + inf/NaN check + global norm + clip over flat buckets, in three phases, each a
launch helper with the signature of its twin in ``fusedaccum.reference``:

1. ``norm_partials`` -> ``norm_partials_kernel`` (one launch per bucket, one read pass): each program writes the
   partial norm of its share of the bucket and a non-finite code of ``bucket * inv_scale``
   into fixed slots.
2. ``finalize`` -> ``finalize_kernel`` (one program): folds the slots into the total norm (times
   ``|inv_scale|``), the found-inf flag and the multiplier ``coef = inv_scale * min(1, max_norm / (norm + eps))``.
3. ``apply`` -> ``apply_kernel`` (one launch per bucket, one read-write pass): ``dst = src * coef``,
   masked off entirely on the device when a non-finite value was found.

Fixed slots instead of float atomics make the norm bitwise reproducible; the device-side
mask instead of an ``if`` on the host keeps the step free of host synchronisation.
"""

import math

import torch
import triton
import triton.language as tl

from ._launch import BLOCK, MAX_PROGRAMS, NUM_WARPS, grid_for, launcher
from ._exponents import pow2
from ._norm import NUM_ROWS, ROW_BAD, ROW_EXP, ROW_LIMIT, ROW_MAX, ROW_SUM, _norm_values, norm_start, norm_store
from ._tile import load_tile, store_tile, to_f32
from .._ref_norm import store_limit  # one definition, the reference's

NORM_INF, NORM_L1, NORM_L2, NORM_P = 0, 1, 2, 3
FINALIZE_BLOCK = 1024
# The finalize's stats: total_norm, found_inf, coef, and 1.0 when found_inf comes from an
# overflow on store alone (every value finite; the unscaled gradient too large for its dtype:
# no loss scale cures that, so a scaler must not back off for it).
STATS_SIZE = 4


def norm_kind(norm_type: float) -> int:
    if math.isinf(norm_type):
        return NORM_INF
    return {1.0: NORM_L1, 2.0: NORM_L2}.get(norm_type, NORM_P)


@triton.jit
def norm_partials_kernel(
    x_ptr,  # *fp32|bf16|fp16 [n]: one bucket
    inv_ptr,  # *fp32 [1]: inverse loss scale, read when INV_FROM_PTR
    inv_value,  # fp32: inverse loss scale when not INV_FROM_PTR
    partials_ptr,  # *fp32 [NUM_ROWS, num_slots]: see the ROW_* constants; this program writes one slot
    slot_base,  # this bucket's first slot
    num_slots,  # row stride of partials
    n,
    tiles_per_program,
    p,  # fp32 norm order, used when NORM_KIND == NORM_P
    limit,  # fp32: store_limit of the dtype this bucket's result is stored in
    INV_FROM_PTR: tl.constexpr,
    NORM_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    if INV_FROM_PTR:
        inv = tl.load(inv_ptr).to(tl.float32)
    else:
        inv = inv_value
    acc, bad, m, e = norm_start(NORM_KIND, BLOCK)
    for i in range(tiles_per_program):
        start = (i * num_programs + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            x = to_f32(load_tile(x_ptr, offs, n, True))
            acc, bad, m, e = _norm_values(x, offs, n, inv, acc, bad, m, e, p, NORM_KIND, True)
        else:
            x = to_f32(load_tile(x_ptr, offs, n, False))
            acc, bad, m, e = _norm_values(x, offs, n, inv, acc, bad, m, e, p, NORM_KIND, False)
    norm_store(partials_ptr, slot_base + pid, num_slots, acc, bad, m, e, limit, NORM_KIND)


@triton.jit
def finalize_kernel(
    partials_ptr,  # *fp32 [NUM_ROWS, num_slots], from norm_partials_kernel (of one or several ranks)
    num_slots,
    stats_ptr,  # *fp32 [STATS_SIZE] out: total norm, found_inf (0/1), coef, store overflow alone (0/1)
    inv_ptr,
    inv_value,
    max_norm,  # fp32, used when HAS_MAX_NORM
    eps,
    p,
    INV_FROM_PTR: tl.constexpr,
    NORM_KIND: tl.constexpr,
    HAS_MAX_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if INV_FROM_PTR:
        inv = tl.load(inv_ptr).to(tl.float32)
    else:
        inv = inv_value
    # Pass 1: the largest sum (inf-norm), scale exponent and max|x|, the worst non-finite code.
    top = tl.zeros([BLOCK], dtype=tl.float32)
    e_top = tl.full([BLOCK], -126.0, dtype=tl.float32)
    m_top = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, num_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_slots
        top = tl.maximum(top, tl.load(partials_ptr + ROW_SUM * num_slots + offs, mask=mask, other=0.0))
        e_top = tl.maximum(e_top, tl.load(partials_ptr + ROW_EXP * num_slots + offs, mask=mask, other=-126.0))
        m_top = tl.maximum(m_top, tl.load(partials_ptr + ROW_MAX * num_slots + offs, mask=mask, other=0.0))
        bad = tl.maximum(bad, tl.load(partials_ptr + ROW_BAD * num_slots + offs, mask=mask, other=0.0))
    worst = tl.max(bad, axis=0)
    a_inv = tl.abs(inv).to(tl.float64)
    if NORM_KIND == 0:
        root = tl.max(top, axis=0).to(tl.float64)
        norm = root * a_inv
    elif NORM_KIND == 3:
        # Each slot is S·m^p: brought to the largest m and added in fp64, then the norm in
        # the log domain, log2(norm) = log2(Σ)/p + log2(m) + log2|inv|: the root Σ^(1/p)
        # alone overflows for p < 1 (20,000 terms at p = 0.1: 1e43) while the norm does not.
        m_ref = tl.max(m_top, axis=0).to(tl.float64)
        l_ref = tl.log2(m_ref)
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, num_slots, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < num_slots
            v = tl.load(partials_ptr + ROW_SUM * num_slots + offs, mask=mask, other=0.0).to(tl.float64)
            m = tl.load(partials_ptr + ROW_MAX * num_slots + offs, mask=mask, other=0.0).to(tl.float64)
            total += tl.where(m > 0.0, v * tl.exp2(p * (tl.log2(m) - l_ref)), 0.0)
        root = tl.sum(total, axis=0)
        norm = tl.exp2(tl.log2(root) / p + l_ref + tl.log2(a_inv))
    else:
        # Pass 2: the slots' sums brought to the common exponent and added in fp64 (a single
        # program: it costs nothing and keeps the total accurate for any number of slots).
        e_ref = tl.max(e_top, axis=0).to(tl.int32)
        total = tl.zeros([BLOCK], dtype=tl.float64)
        for start in range(0, num_slots, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < num_slots
            v = tl.load(partials_ptr + ROW_SUM * num_slots + offs, mask=mask, other=0.0)
            d = tl.load(partials_ptr + ROW_EXP * num_slots + offs, mask=mask, other=-126.0).to(tl.int32) - e_ref
            if NORM_KIND == 1:
                f = pow2(tl.maximum(d, -126))
            else:
                f = pow2(tl.maximum(2 * d, -126))
            total += (v * f).to(tl.float64)
        s = tl.sum(total, axis=0).to(tl.float32)  # in range: every term is <= 4
        if NORM_KIND == 1:
            root = s
        else:
            root = tl.sqrt(s)
        # ||x * inv|| = root * 2**e_ref * |inv|, in fp64: root * 2**e_ref alone may exceed
        # fp32 while the unscaled norm does not.
        norm = root.to(tl.float64) * (pow2(e_ref).to(tl.float64) * a_inv)
    # No elements, or all zero: 0 whatever inv (an inf inv_scale is caught below); an inf
    # or NaN x * inv_scale (e.g. 0 * inf) sets the code instead.
    norm = tl.where(root == 0.0, 0.0, norm).to(tl.float32)
    norm = tl.where(worst == 2.0, float("nan"), tl.where(worst == 1.0, float("inf"), norm))
    if HAS_MAX_NORM:
        ratio = max_norm / (norm + eps)
        # Written so that a NaN ratio stays NaN, as torch.clamp(ratio, max=1) does; 0 / 0
        # (max_norm 0, an all-zero gradient, eps 0) leaves the gradient as it is.
        clip = tl.where(ratio > 1.0, 1.0, ratio)
        clip = tl.where(norm + eps == 0.0, 1.0, clip)
    else:
        clip = 1.0
    coef = inv * clip
    # Pass 3, overflow on store: a slot's largest |x * coef| (fp32 rounding is monotonic) at
    # or above the limit of the dtype it is stored in becomes inf there.
    over = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, num_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_slots
        m = tl.load(partials_ptr + ROW_MAX * num_slots + offs, mask=mask, other=0.0)
        lim = tl.load(partials_ptr + ROW_LIMIT * num_slots + offs, mask=mask, other=float("inf"))
        over = tl.maximum(over, (m * tl.abs(coef) >= lim).to(tl.int32))
    overflow = tl.max(over, axis=0) > 0
    # Non-finite: an inf/NaN inv_scale or x * inv_scale, or a norm beyond fp32. A smaller loss
    # scale cures these (the scaled sums overflowed); not an overflow on store alone, where
    # every value is finite but the unscaled gradient is too large for its dtype.
    nonfinite = (worst > 0.0) | (norm != norm) | (norm == float("inf")) | (inv != inv) | (tl.abs(inv) == float("inf"))
    found_inf = tl.where(nonfinite | overflow, 1.0, 0.0)
    store_only = tl.where(nonfinite, 0.0, tl.where(overflow, 1.0, 0.0))
    tl.store(stats_ptr + 0, norm)
    tl.store(stats_ptr + 1, found_inf)
    tl.store(stats_ptr + 2, coef)
    tl.store(stats_ptr + 3, store_only)


@triton.jit
def _apply_tile(src_ptr, dst_ptr, offs, limit, coef, FULL: tl.constexpr):
    x = to_f32(load_tile(src_ptr, offs, limit, FULL))
    store_tile(dst_ptr, offs, limit, x * coef, FULL)


@triton.jit
def apply_kernel(
    src_ptr,  # *fp32|bf16|fp16 [n]: bucket to read
    dst_ptr,  # *fp32|bf16|fp16 [n]: where src * coef goes (may be src itself)
    stats_ptr,  # *fp32 [STATS_SIZE]: from finalize_kernel; [1] found_inf, [2] coef
    n,
    tiles_per_program,
    SKIP_IF_NONFINITE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    coef = tl.load(stats_ptr + 2)
    limit = n
    if SKIP_IF_NONFINITE:
        # An empty range when found_inf: nothing is read or written, and the host never has
        # to look at the flag.
        limit = tl.where(tl.load(stats_ptr + 1) == 0.0, n, 0)
    for i in range(tiles_per_program):
        start = (i * num_programs + pid).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= limit:
            _apply_tile(src_ptr, dst_ptr, offs, limit, coef, True)
        else:
            _apply_tile(src_ptr, dst_ptr, offs, limit, coef, False)


def _inv_args(inv_scale, like: torch.Tensor):
    """(pointer, value, from_ptr) for a float or a one-element fp32 tensor ``inv_scale``."""
    if isinstance(inv_scale, torch.Tensor):
        return inv_scale, 0.0, True
    return like, float(inv_scale), False  # an unused pointer when the scale is a float


def _grids(buckets, max_programs):
    return [grid_for(b.numel(), max_programs) if b.numel() else (0, 0) for b in buckets]


def norm_partials(
    buckets: "list[torch.Tensor]",
    inv_scale: "float | torch.Tensor",
    norm_type: float,
    *,
    out: "list[torch.Tensor] | None" = None,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Phase 1, one read pass: the fp32 partials ``[NUM_ROWS, num_slots]`` (one slot per
    program; rows ``ROW_*``). ``out``: where the results will be stored (their dtypes set the
    overflow-on-store limits); None: in place. Slots fold by concatenation: ``finalize`` of
    ``torch.cat([a, b], -1)`` is the result over the buckets of both ``a`` and ``b`` (how
    sharded gradients get a global norm)."""
    device = buckets[0].device
    kind = norm_kind(norm_type)
    p = 0.0 if kind == NORM_INF else float(norm_type)
    inv_ptr, inv_value, inv_from_ptr = _inv_args(inv_scale, buckets[0])
    # An empty bucket gets one empty slot (a program with no tiles), so that the number of
    # slots depends on the buckets' sizes only, never on their values or emptiness.
    grids = [(programs or 1, tiles) for programs, tiles in _grids(buckets, max_programs)]
    num_slots = sum(programs for programs, _ in grids)
    partials = torch.empty(NUM_ROWS, num_slots, dtype=torch.float32, device=device)
    slot_base = 0
    for i, (b, (programs, tiles)) in enumerate(zip(buckets, grids)):
        limit = store_limit(b.dtype if out is None else out[i].dtype)
        # Grid: one program per tile up to max_programs; program k owns partial slot slot_base + k.
        launcher(norm_partials_kernel)[(programs,)](
            b if b.numel() else partials, inv_ptr, inv_value, partials, slot_base, num_slots, b.numel(), tiles, p,
            limit,
            INV_FROM_PTR=inv_from_ptr, NORM_KIND=kind, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
        slot_base += programs
    return partials


def finalize(
    partials: torch.Tensor,
    inv_scale: "float | torch.Tensor",
    max_norm: "float | None",
    norm_type: float,
    eps: float,
) -> torch.Tensor:
    """Phase 2, one program: the fp32 ``stats`` ``[total_norm, found_inf, coef, store_overflow]``
    (the last: 1.0 when found_inf comes from an overflow on store alone, see STATS_SIZE)."""
    kind = norm_kind(norm_type)
    p = 0.0 if kind == NORM_INF else float(norm_type)
    if partials.shape[-1] == 0:
        # No elements: one empty slot (nothing to overflow); fills, not a host copy.
        partials = torch.zeros(NUM_ROWS, 1, dtype=torch.float32, device=partials.device)
        partials[ROW_EXP.value].fill_(-126.0)
        partials[ROW_LIMIT.value].fill_(math.inf)
    partials = partials.contiguous()
    stats = torch.empty(STATS_SIZE, dtype=torch.float32, device=partials.device)
    inv_ptr, inv_value, inv_from_ptr = _inv_args(inv_scale, stats)
    # Grid: a single program folds all slots.
    launcher(finalize_kernel)[(1,)](
        partials, partials.shape[-1], stats, inv_ptr, inv_value,
        0.0 if max_norm is None else float(max_norm), float(eps), p,
        INV_FROM_PTR=inv_from_ptr, NORM_KIND=kind, HAS_MAX_NORM=max_norm is not None,
        BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
    return stats


def apply(
    buckets: "list[torch.Tensor]",
    stats: torch.Tensor,
    out: "list[torch.Tensor] | None",
    skip_if_nonfinite: bool,
    *,
    max_programs: int = MAX_PROGRAMS,
) -> None:
    """Phase 3, one read-write pass per bucket: ``dst = bucket * stats[2]``, skipped on the
    device when ``stats[1]`` (found_inf) is set and ``skip_if_nonfinite``."""
    for i, (b, (programs, tiles)) in enumerate(zip(buckets, _grids(buckets, max_programs))):
        if programs == 0:
            continue
        # Grid: as in norm_partials; each program walks its tiles grid-stride.
        launcher(apply_kernel)[(programs,)](
            b, b if out is None else out[i], stats, b.numel(), tiles,
            SKIP_IF_NONFINITE=skip_if_nonfinite, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )


def unscale_clip_(
    buckets: "list[torch.Tensor]",
    inv_scale: "float | torch.Tensor",
    max_norm: "float | None",
    norm_type: float,
    eps: float,
    *,
    out: "list[torch.Tensor] | None",
    skip_if_nonfinite: bool,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Launch helper; inputs are validated by ``fusedaccum.ops``. Returns the fp32 ``stats``
    tensor ``[total_norm, found_inf, coef, store_overflow]`` on the buckets' device."""
    partials = norm_partials(buckets, inv_scale, norm_type, out=out, max_programs=max_programs)
    stats = finalize(partials, inv_scale, max_norm, norm_type, eps)
    apply(buckets, stats, out, skip_if_nonfinite, max_programs=max_programs)
    return stats
