"""Property-based tests of accumulate_ and unscale_clip_ against float64, in both backends.

The oracle is the documented contract (docs/numerics.md): values are rounded to fp32 where
the kernels read them, results are correctly rounded (one rounding) into their dtype, and a
step is skipped (found_inf, nothing written) when some x * inv_scale is inf/NaN, the norm
exceeds fp32, or a stored value would round to inf. Within a relative 1e-5 of a threshold
either outcome is accepted (the kernels compute the norm in fp32); the rest must hold.
Derandomized with a fixed number of examples, so CI runs the same cases every time.
"""

import math

import numpy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedaccum
from fusedaccum import _backend
from fusedaccum.kernels._launch import BLOCK
from fusedaccum.ops import _unscale_clip_stats

from conftest import _triton_usable
from helpers import TOL, same_bits

FLT_MAX = float(torch.finfo(torch.float32).max)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LIMIT = {torch.float32: math.inf, torch.bfloat16: 3.3961775292304611e38, torch.float16: 65520.0}
SIZES = [0, 1, 2, 97, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3]
SCALES = [0.0, -0.5, 1e-30, 1e-20, 2.0 ** -24, 0.25, 1.0, 3.0, 65536.0, 1e20, 3e38, 1e39,
          math.inf, -math.inf, math.nan]
MAGNITUDES = [1e-40, 1e-25, 1e-3, 1.0, 300.0, 6e4, 1e19, 1e30, 3e38]
SPECIALS = [math.inf, -math.inf, math.nan, 65504.0, 65520.0, -3.4e38, 1e-45, 0.0, -0.0]
PROFILE = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BACKENDS = ["torch"] + ([] if _triton_usable("cpu") else ["triton"])


def _fp32(x: float) -> float:
    with numpy.errstate(over="ignore"):
        return float(numpy.float32(x))


@st.composite
def _bucket(draw, dtypes=DTYPES):
    n = draw(st.sampled_from(SIZES))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 16))
    scale = draw(st.sampled_from(MAGNITUDES))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    for _ in range(draw(st.integers(0, 2)) if n else 0):
        x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
    return x.to(dtype)


def _scale(draw):
    value = draw(st.sampled_from(SCALES))
    return torch.tensor(value, dtype=torch.float64) if draw(st.booleans()) else value


def _run(backend, fn):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_backend.ENV_VAR, backend)
        return fn()


def _near(a: float, threshold: float) -> bool:
    return math.isfinite(threshold) and abs(a - threshold) <= 1e-5 * threshold


def _norm64(y: torch.Tensor, p: float) -> float:
    """||y||_p of finite float64 y without under- or overflow (p = 150, or 12 over subnormals,
    leave torch's vector_norm at 0 or inf): m * (Σ(|y|/m)^p)^(1/p), in the log domain."""
    a = y.abs()
    m = float(a.max()) if a.numel() else 0.0
    if m == 0.0 or math.isinf(p):
        return m
    return 2.0 ** (math.log2(float(((a / m) ** p).sum())) / p + math.log2(m))


@given(data=st.data())
@PROFILE
def test_unscale_clip_against_float64(data):
    buckets = data.draw(st.lists(_bucket(), min_size=1, max_size=3))
    inv = _scale(data.draw)
    max_norm = data.draw(st.sampled_from([None, 0.0, 1e-3, 1.0, 1e30]))
    p = data.draw(st.sampled_from([0.1, 0.5, 1.0, 2.0, 3.0, 12.0, 150.0, math.inf]))
    out_dtypes = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(DTYPES), min_size=len(buckets),
                                                         max_size=len(buckets))))
    inv32 = _fp32(float(inv))
    x64 = [b.double() for b in buckets]
    dst_dtypes = [b.dtype for b in buckets] if out_dtypes is None else out_dtypes
    with numpy.errstate(all="ignore"):
        y = torch.cat([x * inv32 for x in x64]) if x64 else torch.zeros(0, dtype=torch.float64)
    nonfinite = not bool(torch.isfinite(y).all()) or not math.isfinite(inv32)  # an inf/NaN scale: found
    norm64 = _norm64(y, p) if bool(torch.isfinite(y).all()) else float(torch.linalg.vector_norm(y, p))
    ambiguous = any(_near(float(v), FLT_MAX) for v in y.abs()) or _near(norm64, FLT_MAX)
    # The norm reported: NaN when some y is (0 * inf too), else inf when one is or the norm
    # exceeds fp32 (0 with no elements); finite on a skip for an overflow on store alone.
    norm_kind = "nan" if bool(y.isnan().any()) else "inf" if nonfinite and y.numel() or norm64 > FLT_MAX else "finite"
    expect_found = nonfinite or norm64 > FLT_MAX
    coef = inv32
    if not expect_found and max_norm is not None:
        denom = norm64 + _fp32(1e-6)
        clip = 1.0 if denom == 0 else min(1.0, max_norm / denom)
        coef = inv32 * clip
    z = [x * coef for x in x64]
    if not expect_found:
        for zi, dt in zip(z, dst_dtypes):
            if zi.numel():
                top = float(zi.abs().max())
                ambiguous |= _near(top, LIMIT[dt])
                expect_found |= top >= LIMIT[dt]

    for backend in BACKENDS:
        work = [b.clone() for b in buckets]
        out = None if out_dtypes is None else [torch.full((b.numel(),), 7.0, dtype=d) for b, d in zip(buckets, out_dtypes)]
        before = [t.clone() for t in work + (out or [])]
        stats = _run(backend, lambda: _unscale_clip_stats(work, inv, max_norm, p, out=out))
        found = float(stats[1]) == 1.0
        if found or not ambiguous:
            assert found == expect_found or ambiguous, (backend, float(stats[0]), norm64)
        norm = float(stats[0])
        got_kind = "nan" if math.isnan(norm) else "inf" if math.isinf(norm) else "finite"
        assert got_kind == norm_kind or ambiguous, (backend, norm, norm_kind)
        # stats[3]: the skip came from an overflow on store alone (all finite), which a
        # LossScaler does not back off for.
        assert float(stats[3]) == float(found and got_kind == "finite" and math.isfinite(inv32)), backend
        if found:
            assert all(same_bits(a, b) for a, b in zip(work + (out or []), before)), backend
            continue
        assert math.isclose(float(stats[0]), norm64, rel_tol=1e-5, abs_tol=1e-38), (backend, float(stats[0]), norm64)
        for dst, zi in zip(out or work, z):
            tol = dict(TOL[dst.dtype])
            tol["rtol"] += 1e-5 if max_norm is not None else 0.0  # the clip follows the fp32 norm
            torch.testing.assert_close(dst.double(), zi, check_dtype=False, **tol)
        if out is not None:
            assert all(same_bits(a, b) for a, b in zip(work, before)), "out= must leave the buckets alone"


@given(data=st.data())
@PROFILE
def test_accumulate_against_float64(data):
    grad = data.draw(_bucket())
    n = grad.numel()
    base = data.draw(_bucket([torch.float32]))
    acc = base.repeat(n // max(base.numel(), 1) + 1)[:n] if base.numel() else torch.zeros(n)
    scale = _scale(data.draw)
    zero_grad, overwrite = data.draw(st.booleans()), data.draw(st.booleans())
    s32 = _fp32(float(scale))
    with numpy.errstate(all="ignore"):
        product = grad.double() * s32  # exact: 24 x 24 bits
        expected = (product if overwrite else acc.double() + product)
    for backend in BACKENDS:
        a, g = acc.clone(), grad.clone()
        _run(backend, lambda: fusedaccum.accumulate_(a, g, scale, zero_grad=zero_grad, overwrite=overwrite))
        assert torch.equal(torch.isnan(a), torch.isnan(expected)), backend
        finite = expected.abs() < FLT_MAX  # the rest rounds to +-inf (or is on the edge)
        # One rounding of the exact value: within half an fp32 ulp of it (subnormals: of 2**-149).
        torch.testing.assert_close(a[finite].double(), expected[finite], rtol=2.0 ** -24, atol=2.0 ** -150)
        beyond = expected.abs() >= FLT_MAX * (1 + 2.0 ** -24)
        assert torch.equal(a[beyond], expected[beyond].float()), backend
        assert same_bits(g, torch.zeros_like(grad)) if zero_grad else same_bits(g, grad), backend
