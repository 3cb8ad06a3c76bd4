"""Tile loads and stores shared by the kernels.

Full tiles go unmasked: a mask against a length that is not a multiple of 16 (any real
bucket) defeats the 16-byte vector loads and stores, so only the last, partial tile of a
bucket pays for one. ``FULL`` is a constexpr; the caller branches on ``start + BLOCK <= n``.
"""

import triton
import triton.language as tl


@triton.jit
def _bf16_rtne(value):
    """fp32 -> bf16 rounded to nearest, ties to even, by integer arithmetic. The GPU's
    conversion does this; Triton's interpreter truncates, which would make the interpreted
    kernels (the CI's) less accurate than the compiled ones. NaN stays NaN (quieted)."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(value != value, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_f32(x):
    """x as fp32, exactly. The interpreter's bf16 -> fp32 conversion flushes bf16 subnormals
    to 0 (the GPU's is a shift): shift the bits there too."""
    y = x.to(tl.float32)
    if INTERPRETED:
        if x.dtype == tl.bfloat16:
            y = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _to_element(value, ptr):
    if INTERPRETED:
        if ptr.dtype.element_ty == tl.bfloat16:
            value = _bf16_rtne(value.to(tl.float32))
    return value.to(ptr.dtype.element_ty)


@triton.jit
def load_tile(ptr, offs, n, FULL: tl.constexpr):
    if FULL:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=offs < n, other=0.0)


@triton.jit
def store_tile(ptr, offs, n, value, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, _to_element(value, ptr))
    else:
        tl.store(ptr + offs, _to_element(value, ptr), mask=offs < n)


# Whether @triton.jit made interpreted functions (TRITON_INTERPRET=1 when this was imported).
INTERPRETED = tl.constexpr(type(load_tile).__name__ == "InterpretedFunction")
