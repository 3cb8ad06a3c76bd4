"""Tile loads and stores shared by the kernels.

Full tiles go unmasked: a mask against a length that is not a multiple of 16 (any real
bucket) defeats the 16-byte vector loads and stores, so only the last, partial tile of a
bucket pays for one. ``FULL`` is a constexpr; the caller branches on ``start + BLOCK <= n``.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, offs, n, FULL: tl.constexpr):
    if FULL:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=offs < n, other=0.0)


@triton.jit
def store_tile(ptr, offs, n, value, FULL: tl.constexpr):
    if FULL:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=offs < n)
