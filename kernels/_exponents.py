"""Exact power-of-two arithmetic for the norm's scaling (kernels/unscale_clip.py): built from
the exponent bits, so that scaling by them never rounds."""

import triton
import triton.language as tl


@triton.jit
def pow2(e):
    """2**e as fp32, exactly, for integer e in [-126, 127] (built from the exponent bits)."""
    return ((e + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_exponent(m):
    """The power of two a slot's sum is kept relative to: floor(log2(m)) of its largest |x|,
    clamped to [-126, 126] so that 2**-e is a normal fp32 number. Bit arithmetic, exact."""
    biased = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(biased - 127, -126), 126)


@triton.jit
def log2_split(a):
    """log2(a) of a > 0 as (integer part, log2 of the mantissa in [0, 1)): exact exponent, the
    fraction to fp32's precision. One fp32 log2(a) near 2**126 would be off by 4e-6 (its ulp),
    which the p-th powers carry into the norm. a = 0 gives (-151, 0); subnormals are scaled
    into the normal range first."""
    sub = a < 1.1754943508222875e-38
    bits = tl.where(sub, a * 16777216.0, a).to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - tl.where(sub, 151, 127)
    mant = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    return exp, tl.log2(mant)
