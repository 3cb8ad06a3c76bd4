"""The reference's finalize on the CPU, where the partials can be read without a device
synchronisation: the scalar math of ``reference.finalize`` in Python floats (fp64) and numpy
fp32 scalars instead of ~25 tensor ops on 0-d tensors (the step's fixed cost at small N)."""

import math

import numpy
import torch

_F32 = numpy.float32


def finalize_host(partials: list, inv_scale: float, max_norm, norm_type: float, eps: float) -> torch.Tensor:
    """``finalize`` of CPU partials (p = 1, 2, inf; their rows as lists), in Python and numpy fp32 scalars: the same
    operations as the tensor path, in the same precisions and order (its ~25 tensor ops cost
    ~140 us per step on the CPU; this, one read of the partials and one tensor, ~20 us). The
    slots are added left to right; the tensor path's sum may pair them differently (fp64, then
    rounded to fp32)."""
    sums, exps, code, maxes, limits = partials  # the partials' rows as lists (reference.py reads them)
    inv = _F32(inv_scale)  # fp32 already (ops._scalar): exact
    a_inv = abs(float(inv))
    worst = max(code, default=0.0)
    if not sums:
        root = norm = 0.0
    elif math.isinf(norm_type):
        root = math.nan if any(map(math.isnan, sums)) else max(sums)
        norm = root * a_inv
    else:
        e_ref = max(exps)
        total = 0.0
        for s, e in zip(sums, exps):
            total += s * 2.0 ** (norm_type * (e - e_ref))
        root = total if norm_type == 1.0 else math.sqrt(total)
        norm = root * (2.0 ** e_ref * a_inv)
    with numpy.errstate(all="ignore"):
        norm = _F32(0.0) if root == 0 else _F32(norm)
        norm = _F32(math.nan) if worst == 2.0 else _F32(math.inf) if worst == 1.0 else norm
        if max_norm is None:
            coef = inv
        else:
            d = norm + _F32(eps)
            # Tensor.__rtruediv__: max_norm / d is reciprocal(d) * max_norm, in fp32; clamp keeps NaN.
            clip = _F32(1.0) / d * _F32(max_norm)
            clip = _F32(1.0) if d == 0 else clip if (clip != clip or clip < 1) else _F32(1.0)
            coef = inv * clip
        a_coef = abs(coef)
        overflow = any(_F32(m) * a_coef >= _F32(lim) for m, lim in zip(maxes, limits))
    nonfinite = worst > 0 or not math.isfinite(norm) or not math.isfinite(inv)
    return torch.tensor([norm, float(nonfinite or overflow), coef, float(overflow and not nonfinite)],
                        dtype=torch.float32)


def host_partials(buckets, out, sum_of_squares) -> "torch.Tensor | None":
    """``norm_partials`` of the CPU fast path for the 2-norm (finite inv_scale, every result
    stored as fp32), built from host numbers in one tensor instead of ~35 0-d tensor ops; None
    when a bucket is outside it (a narrow destination, a sum outside SAFE_SUM). The same values
    as the tensor path: sum = the fp64 fold rounded to fp32, exponent 0, code 0 (every x finite,
    inv finite), max|x| 0 (not needed: no store can overflow), limit inf; an empty bucket
    (0, -126, 0, 0, inf)."""
    if any((b if out is None else out[i]).dtype != torch.float32 for i, b in enumerate(buckets)):
        return None
    cols = []
    for b in buckets:
        if b.numel() == 0:
            cols.append((0.0, -126.0))
            continue
        total = sum_of_squares(b)  # a float, or None
        if total is None:
            return None
        cols.append((float(_F32(total)), 0.0))
    n = len(cols)
    return torch.tensor([[c[0] for c in cols], [c[1] for c in cols], [0.0] * n, [0.0] * n, [math.inf] * n],
                        dtype=torch.float32)
