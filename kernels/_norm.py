"""The norm's per-program partials, written once: the norm pass (``unscale_clip.norm_partials_kernel``)
and the accumulate pass that writes a window's finished sum (``accumulate.accumulate_kernel`` with
``NORM``) run this same code over the same tiles in the same order, so they give the same bits."""

import triton
import triton.language as tl

from ._exponents import log2_split, pow2, scale_exponent

# Rows of the partials, one column (slot) per program. Every row folds across slots, so the
# partials of several ranks concatenated along the slots finalize to the global result.
# ROW_SUM: p = 1, 2: Σ|x·2^-e|^p; other p: Σ(|x|/m)^p, m = max|x| (every term <= 1 and the
# largest exactly 1, so no p overflows or loses the sum); the inf-norm: m. ROW_EXP: p = 1, 2:
# that e (an integer), so tiny and huge values stay in the fp32 range; else 0. ROW_BAD: the
# non-finite code of x·inv_scale (0 finite, 1 inf, 2 NaN); ROW_MAX: m; ROW_LIMIT: store_limit
# of the dtype the slot's result is stored in. The reference fills the same rows (its ROW_MAX
# may be 0 where p = 2 and the limit is inf).
ROW_SUM, ROW_EXP, ROW_BAD, ROW_MAX, ROW_LIMIT = (tl.constexpr(i) for i in range(5))
NUM_ROWS = 5


@triton.jit
def _norm_values(x, offs, n, inv, acc, bad, m, e, p, NORM_KIND: tl.constexpr, FULL: tl.constexpr):
    """One tile of fp32 values ``x`` (masked lanes 0) into the running partials: the one
    implementation of the norm's math, for the norm pass and the accumulate pass that writes the
    window's finished sum (kernels/accumulate.py), so that both give the same bits."""
    # The flag looks at the unscaled value; the norm sums the raw one and the finalize
    # multiplies by |inv|, as the reference does.
    y = x * inv
    code = tl.where(y != y, 2.0, tl.where(tl.abs(y) == float("inf"), 1.0, 0.0))
    if not FULL:
        code = tl.where(offs < n, code, 0.0)  # a masked lane's 0 * inf is not the bucket's NaN
    bad = tl.maximum(bad, code)
    a = tl.abs(x)
    if NORM_KIND == 0:
        acc = tl.maximum(acc, a)
    else:
        # Relative to the running maximum m (LAPACK nrm2's idea, per tile): no underflow of
        # tiny values, no overflow of huge ones. A new maximum rescales the sum.
        m_new = tl.maximum(m, tl.max(a, axis=0))
        if NORM_KIND == 3:
            # (|x| / m)^p = 2**(p * (log2|x| - log2 m)), the logs split into exact exponents
            # and mantissa logs: terms <= 1 for any p (no overflow at p = 150), the largest
            # exactly 1, and none lost to an underflowing |x| * 2**-e (p = 0.1 over 80 decades).
            ex, fx = log2_split(a)
            e_new, f_new = log2_split(m_new)
            f = log2_split(m)[1]
            term = tl.exp2(p * (ex - e_new).to(tl.float32) + p * (fx - f_new))
            acc = acc * tl.exp2(p * (e - e_new).to(tl.float32) + p * (f - f_new)) + tl.where(a > 0.0, term, 0.0)
        else:
            # |x * 2**-e|^p, e = floor(log2 m): terms in [0, 4), exact powers of two.
            e_new = scale_exponent(m_new)
            s = a * pow2(-e_new)
            if NORM_KIND == 1:
                acc = acc * pow2(tl.maximum(e - e_new, -126)) + s
            else:
                acc = acc * pow2(tl.maximum(2 * (e - e_new), -126)) + s * s
        m = m_new
        e = e_new
    return acc, bad, m, e


@triton.jit
def norm_start(NORM_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """A program's empty partials: (acc, bad, m, e) for ``_norm_values``."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Non-finite code per lane: 0 finite, 1 inf, 2 NaN. The finalize needs NaN apart from
    # inf because max() does not propagate NaN on the GPU, yet torch's inf-norm does.
    bad = tl.zeros([BLOCK], dtype=tl.float32)
    m = tl.zeros([], dtype=tl.float32)  # running max|x| (finite-p kinds)
    if NORM_KIND == 3:
        e = log2_split(m)[0]  # its exponent; the mantissa's log is recomputed from m
    else:
        e = scale_exponent(m)
    return acc, bad, m, e


@triton.jit
def norm_store(partials_ptr, slot, num_slots, acc, bad, m, e, limit, NORM_KIND: tl.constexpr):
    """Write a program's partials into column ``slot`` of ``[NUM_ROWS, num_slots]``."""
    if NORM_KIND == 0:
        m = tl.max(acc, axis=0)
        part = m
        e = tl.zeros([], dtype=tl.int32)  # the max is kept as it is
    elif NORM_KIND == 3:
        part = tl.sum(acc, axis=0)  # relative to m**p; the finalize takes m from ROW_MAX
        e = tl.zeros([], dtype=tl.int32)
    else:
        part = tl.sum(acc, axis=0)  # relative to 2**scale_exponent(m)
    ptr = partials_ptr + slot
    tl.store(ptr + ROW_SUM * num_slots, part)
    tl.store(ptr + ROW_EXP * num_slots, e.to(tl.float32))
    tl.store(ptr + ROW_BAD * num_slots, tl.max(bad, axis=0))
    tl.store(ptr + ROW_MAX * num_slots, m)
    tl.store(ptr + ROW_LIMIT * num_slots, limit)
