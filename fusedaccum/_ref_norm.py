"""The reference norm's per-bucket arithmetic (``fusedaccum.reference``): power-of-two scaling,
max|x|, the CPU fast path's row norms, the non-finite codes, the partials' rows from each
bucket's column. Pure functions of tensors (no host read: ``reference`` keeps those)."""

import math

import torch

# The CPU fast path for the 2-norm: fp32 norms of rows of this many elements (one pass, as fast
# as a copy), folded in fp64. Used when the folded Σx² shows that no row left the range in
# which fp32 squares are exact enough (SAFE_SUM); otherwise the scaled path.
NORM_ROW = 1024
SAFE_SUM = (2.0 ** -100, 2.0 ** 100)


def store_limit(dtype: torch.dtype) -> float:
    """The smallest fp32 magnitude that becomes inf when rounded (to nearest even) to dtype:
    halfway between its largest finite value and the next power of two. inf for fp32."""
    if dtype == torch.float32:
        return math.inf
    top = torch.finfo(dtype).max
    return (top + 2.0 ** math.frexp(top)[1]) / 2  # 65520 for fp16, exact in fp32


def _scale_exponent(m: torch.Tensor) -> torch.Tensor:
    """floor(log2(m)) clamped to [-126, 126] (int32): a slot's sum is kept relative to 2**that,
    so that neither tiny nor huge values leave the fp32 range (LAPACK nrm2's idea)."""
    return (torch.frexp(m).exponent - 1).clamp_(-126, 126)


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(x)
    return torch.maximum(hi, -lo).float()  # NaN if x holds one


def _row_norms(b: torch.Tensor) -> "list[torch.Tensor]":
    """fp32 2-norms of b's rows of NORM_ROW elements (and of its tail): one pass."""
    n = b.numel()
    bulk = n - n % NORM_ROW
    rows = []
    if bulk:
        rows.append(torch.linalg.vector_norm(b[:bulk].view(-1, NORM_ROW), 2, dim=1, dtype=torch.float32))
    if bulk != n:
        rows.append(torch.linalg.vector_norm(b[bulk:] if bulk else b, 2, dtype=torch.float32).reshape(1))
    return rows


def _p_sum(t: torch.Tensor, m: torch.Tensor, p: float) -> torch.Tensor:
    """Σ(t/m)^p (fp64) for t = |x| >= 0 with max m: every term <= 1, the largest exactly 1, so
    no p overflows it (p = 150) and no small term underflows where it counts (subnormal x at
    p = 12). p > 1: in fp32 in t itself (what underflows there is below 2^-149 of the largest
    term); p < 1: in fp64, where t/m = 1e-80 (80 decades) still adds 1e-8 at p = 0.1. 0 when
    m is 0. t is overwritten."""
    if p > 1:
        total = t.div_(m).pow_(p).sum().double()  # torch.sum adds pairwise on the CPU
    else:
        total = t.double().div_(m.double()).pow_(p).sum()
    return torch.where(m > 0, total, 0.0)


def _codes(maxes: torch.Tensor, zeros: torch.Tensor, nonempty: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """The non-finite code of each slot's x * inv (0 finite, 1 inf, 2 NaN) from its max|x|
    (NaN if x holds one), whether it holds a 0 and whether it holds anything: x * inv is NaN
    where x is, where inv is, and for 0 * inf; else inf where max|x| * |inv| overflows
    (fp32 rounding is monotonic)."""
    y = maxes * inv.abs()
    code = torch.where(y.isnan() | (zeros & inv.isinf()), 2.0, torch.where(y.isinf(), 1.0, 0.0))
    return torch.where(nonempty, code, 0.0)


def _partials(cols, buckets, out, inv) -> torch.Tensor:
    """norm_partials' columns from each bucket's (sum, exponent or None: 0, max|x| or None when
    not needed, holds a zero or None: no)."""
    device = inv.device
    one = torch.ones((), dtype=torch.float32, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    sums = torch.stack([c[0] for c in cols])
    maxes = torch.stack([zero if c[2] is None else c[2] for c in cols])
    # Where max|x| is not taken (fast path, fp32 result), every x is finite and at most
    # 2**50: the finalize's check of the norm, which bounds every |x * inv|, finds the same
    # steps, so 1 stands in for it here.
    present = torch.stack([one if c[2] is None else c[2] for c in cols])
    nonempty = torch.stack([one if b.numel() else zero for b in buckets]) > 0  # fills, not a host copy
    # From max|x| alone, not from the sums: inf / inf in Σ(|x|/m)^p is NaN for an inf x.
    code = _codes(present, torch.stack([no if c[3] is None else c[3] for c in cols]), nonempty, inv)
    limits = [store_limit((b if out is None else out[i]).dtype) for i, b in enumerate(buckets)]
    limits = torch.stack([torch.full((), lim, dtype=torch.float32, device=device) for lim in limits])  # fills
    exps = torch.stack([zero if c[1] is None else c[1] for c in cols])
    return torch.stack([sums, exps, code, maxes, limits])
