"""Pure-PyTorch reference of every fused op: same signatures as the launch helpers in
``fusedaccum.kernels``, same results within the tolerance table in the README, and the
oracle of the tests. It runs on any device, with no host synchronisation: on other devices
every decision is taken on the device; on the CPU, where the data already is on the host, it
reads three of its own values (whether the 2-norm's fast path is in range, whether inv_scale
is infinite, whether to skip the write) to spare a pass, and folds the partials on the host
(``_finalize_host``: a step's fixed cost), which is no synchronisation.

Inputs are validated by ``fusedaccum.ops`` before they get here.
"""

import math

import torch

from ._finalize_host import finalize_host, host_partials

# Rows of the partials, the same as the Triton kernels' (fusedaccum.kernels.unscale_clip), one
# column per slot. Every row folds across slots, so the partials of several ranks concatenated
# along the slots finalize to the global result.
ROW_SUM, ROW_EXP, ROW_BAD, ROW_MAX, ROW_LIMIT = range(5)
# The CPU fast path for the 2-norm: fp32 norms of rows of this many elements (one pass, as fast
# as a copy), folded in fp64. Used when the folded Σx² shows that no row left the range in
# which fp32 squares are exact enough (SAFE_SUM); otherwise the scaled path.
NORM_ROW = 1024
MAX_SLOTS_PER_BUCKET = 1  # norm_partials gives every bucket one slot
SAFE_SUM = (2.0 ** -100, 2.0 ** 100)


def _pieces(t: torch.Tensor) -> "list[slice]":
    """Slices of t to work on. On the CPU, cache-sized pieces: mixed-dtype elementwise ops
    and temporaries run several times faster there when each piece stays in cache (measured
    at 1e8 elements: bf16 accumulate 185 -> 48 ms). Elsewhere one piece: a launch per piece
    would cost more than it saves."""
    n = t.numel()
    if t.device.type != "cpu" or n <= CPU_PIECE:
        return [slice(0, n)]
    return [slice(i, min(i + CPU_PIECE, n)) for i in range(0, n, CPU_PIECE)]


CPU_PIECE = 1 << 18


def _add_(acc: torch.Tensor, x: torch.Tensor, scale: "float | torch.Tensor") -> None:
    if isinstance(scale, torch.Tensor):
        acc.addcmul_(x, scale)
    else:
        acc.add_(x, alpha=scale)


def _accumulate_pieces(acc, g, scale, overwrite: bool, squares: "list | None") -> None:
    """acc (+)= g * scale; with ``squares``, also the fp32 row norms of g's values."""
    note = (lambda x: None) if squares is None else (lambda x: squares.extend(_row_norms(x)))
    if overwrite:
        # copy_ then mul_, not torch.mul(g, s, out=acc): that would round the product to
        # grad's (possibly bf16) dtype before it lands in fp32.
        for piece in (_pieces(acc) if squares is not None else [slice(0, acc.numel())]):
            a = acc[piece]
            a.copy_(g[piece])
            note(a)
            a.mul_(scale)
    elif g.dtype == acc.dtype:
        note(g)
        _add_(acc, g, scale)
    else:
        # The sum in fp32 of an exact fp32 copy of grad, piece by piece: the same bits as a
        # mixed-dtype add_, which converts element by element and is slow on the CPU.
        scratch = torch.empty(0, dtype=acc.dtype, device=acc.device)
        for piece in _pieces(acc):
            x = scratch.resize_(piece.stop - piece.start).copy_(g[piece])
            note(x)
            _add_(acc[piece], x, scale)


def accumulate_(
    acc: torch.Tensor,
    grad: torch.Tensor,
    scale: "float | torch.Tensor",
    *,
    zero_grad: bool,
    overwrite: bool,
    sq_out: "torch.Tensor | None" = None,
    sq_weight: "float | torch.Tensor" = 1.0,
) -> torch.Tensor:
    g = grad.view(-1)
    if sq_out is None:
        _accumulate_pieces(acc, g, scale, overwrite, None)
    else:
        # Σ grad² of the fp32 values the pass adds, piece by piece while each is in cache:
        # fp32 rows folded in fp64, like the norm. The whole sum goes into slot 0 (the kernels
        # spread it over one slot per program).
        squares = []
        _accumulate_pieces(acc, g, scale, overwrite, squares)
        sq = torch.cat(squares).double().square().sum().float() if squares else torch.zeros((), device=g.device)
        if overwrite:
            sq_out.zero_()
        sq_out[0] += sq * sq_weight
    if zero_grad:
        grad.zero_()
    return acc


def sq_slots(n: int) -> int:
    """How many ``sq_out`` slots ``accumulate_`` fills for a bucket of ``n`` elements."""
    return 1


def _inv(inv_scale, device) -> torch.Tensor:
    # full(), not as_tensor(): a Python number becomes a fill on the device, not a copy from
    # the host (which the CUDA sync checker counts).
    return (inv_scale.to(torch.float32) if isinstance(inv_scale, torch.Tensor)
            else torch.full((), inv_scale, dtype=torch.float32, device=device))


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


def _reads_host(device: torch.device) -> bool:
    """Whether this device's values can be read without a synchronisation (the CPU's)."""
    return device.type == "cpu"


def _row_norms(b: torch.Tensor) -> "list[torch.Tensor]":
    """fp32 2-norms of b's rows of NORM_ROW elements (and of its tail): one pass."""
    n = b.numel()
    bulk = n - n % NORM_ROW
    rows = []
    if bulk:
        rows.append(torch.linalg.vector_norm(b[:bulk].view(-1, NORM_ROW), 2, dim=1, dtype=torch.float32))
    if bulk != n:
        rows.append(torch.linalg.vector_norm(b[bulk:], 2, dtype=torch.float32).reshape(1))
    return rows


def _fast_sum_of_squares(b: torch.Tensor) -> "torch.Tensor | None":
    """Σx² of b from fp32 row norms folded in fp64, or None when the fold is outside SAFE_SUM
    (a row's fp32 sum may have overflowed, or lost its small squares to underflow). CPU only:
    the check reads a CPU tensor, which is no device synchronisation."""
    total = torch.cat(_row_norms(b)).double().square().sum()
    return total if SAFE_SUM[0] <= float(total) <= SAFE_SUM[1] else None


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


def norm_partials(buckets: "list[torch.Tensor]", inv_scale: "float | torch.Tensor", norm_type: float, *,
                  out: "list[torch.Tensor] | None" = None) -> torch.Tensor:
    """Phase 1, one read pass: the fp32 partials ``[5, len(buckets)]`` (rows ``ROW_*``, as the
    Triton kernels'), one slot per bucket, whatever its values. The scaled path: per
    cache-sized piece its max|x| m; p = 1, 2: e = _scale_exponent(m), Σ|x·2^-e|^p summed
    pairwise in fp32 (accurate), the pieces folded in fp64 at the largest e; other p:
    Σ(|x|/m)^p in fp64, folded at the largest m. The CPU fast path for the 2-norm: e = 0.
    ``out``: where the results go (their dtypes set the overflow-on-store limits); None: in
    place."""
    device = buckets[0].device
    inv = _inv(inv_scale, device)
    # Whether x * inv can be 0 * inf: only then a bucket's min|x| matters. On the CPU the
    # host knows; elsewhere min|x| is taken with the max (aminmax, the same pass).
    host = _reads_host(device)
    need_min = not host or math.isinf(float(inv))
    if host and norm_type == 2.0 and not need_min and math.isfinite(float(inv)):
        fast = host_partials(buckets, out, lambda b: None if (t := _fast_sum_of_squares(b)) is None else float(t))
        if fast is not None:
            return fast
    cols = []  # per bucket: (sum, exponent, max|x| or None when not needed, holds a zero)
    limits = []
    scratch = torch.empty(0, dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    general = not (math.isinf(norm_type) or norm_type in (1.0, 2.0))
    for i, b in enumerate(buckets):
        limit = store_limit((b if out is None else out[i]).dtype)
        limits.append(limit)
        fast = (_fast_sum_of_squares(b) if norm_type == 2.0 and b.numel() and host and not need_min
                and math.isfinite(float(inv)) else None)
        if b.numel() == 0:
            cols.append((zero, zero - 126, zero, no))  # an empty slot: every bucket has one
        elif fast is not None:
            # max|x| only where a store can overflow (an extra pass, for narrow dtypes only).
            # In range, every x is finite and no 0 * inf can occur (inv is finite).
            cols.append((fast.float(), zero, None if math.isinf(limit) else _max_abs(b), no))
        else:
            sums, exps, maxes, zeros = [], [], [], []
            for piece in _pieces(b):
                # |x| in a cached fp32 scratch; its max; then scaled by 2**-e and summed there.
                t = scratch.resize_(piece.stop - piece.start)
                if b.dtype == torch.float32:
                    torch.abs(b[piece], out=t)
                else:
                    t.copy_(b[piece]).abs_()  # abs(out=) wants out in b's dtype
                if need_min:
                    lo, m = torch.aminmax(t)
                    zeros.append(lo == 0)
                else:
                    m = t.amax()
                maxes.append(m)
                if math.isinf(norm_type):
                    continue
                if general:
                    sums.append(_p_sum(t, m, norm_type))
                    continue
                e = _scale_exponent(m)
                t.mul_(torch.ldexp(one, -e))
                if norm_type == 2.0:
                    t.square_()
                sums.append(t.sum())  # torch.sum adds pairwise on the CPU
                exps.append(e)
            m = torch.stack(maxes).max()
            has_zero = torch.stack(zeros).any() if zeros else no
            if math.isinf(norm_type):
                cols.append((m, zero, m, has_zero))
                continue
            if general:
                # The pieces' sums brought to the bucket's max: Σ_j S_j · (m_j / m)^p, in fp64.
                ms = torch.stack(maxes).double()
                total = (torch.stack(sums) * torch.where(ms > 0, ms / m.double(), 0.0).pow(norm_type)).sum()
                cols.append((total.float(), zero, m, has_zero))
                continue
            # The pieces folded into the bucket's one slot, at the largest piece's exponent.
            e = torch.stack(exps).double()
            e_top = e.max()
            total = (torch.stack(sums).double() * torch.exp2(norm_type * (e - e_top))).sum()
            cols.append((total.float(), e_top.float(), m, has_zero))
    sums = torch.stack([c[0] for c in cols])
    maxes = torch.stack([zero if c[2] is None else c[2] for c in cols])
    # Where max|x| is not taken (fast path, fp32 result), every x is finite and at most
    # 2**50: the finalize's check of the norm, which bounds every |x * inv|, finds the same
    # steps, so 1 stands in for it here.
    present = torch.stack([one if c[2] is None else c[2] for c in cols])
    nonempty = torch.stack([one if b.numel() else zero for b in buckets]) > 0  # fills, not a host copy
    # From max|x| alone, not from the sums: inf / inf in Σ(|x|/m)^p is NaN for an inf x.
    code = _codes(present, torch.stack([c[3] for c in cols]), nonempty, inv)
    limits = torch.stack([torch.full((), lim, dtype=torch.float32, device=device) for lim in limits])  # fills
    return torch.stack([sums, torch.stack([c[1] for c in cols]), code, maxes, limits])


def finalize(partials: torch.Tensor, inv_scale: "float | torch.Tensor", max_norm: "float | None",
             norm_type: float, eps: float) -> torch.Tensor:
    """Phase 2: the fp32 ``stats`` ``[total_norm, found_inf, coef, store_overflow]`` from the
    partials (of one or of several ranks, concatenated along the slots); ``store_overflow``
    is 1.0 when found_inf comes from an overflow on store alone (every value finite)."""
    device = partials.device
    if _reads_host(device) and (math.isinf(norm_type) or norm_type in (1.0, 2.0)):  # the same math, host scalars
        return finalize_host(partials.tolist(), float(inv_scale), max_norm, norm_type, eps)
    inv = _inv(inv_scale, device)
    sums, exps, code, maxes, limits = partials.unbind(0)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    a_inv = inv.abs().double()
    if sums.numel() == 0:
        root, norm, worst = zero.double(), zero.double(), zero
    elif math.isinf(norm_type):
        root = sums.max().double()
        norm, worst = root * a_inv, code.max()
    elif norm_type not in (1.0, 2.0):
        worst = code.max()
        # Each slot is S·m^p: brought to the largest m and added in fp64; then the norm in the
        # log domain, log2(norm) = log2(Σ)/p + log2(m) + log2|inv|: the root Σ^(1/p) alone
        # overflows for p < 1 while the norm does not.
        m = maxes.double()
        m_ref = m.max()
        root = (sums.double() * torch.where(m > 0, m / m_ref, 0.0).pow(norm_type)).sum()
        norm = torch.exp2(torch.log2(root) / norm_type + torch.log2(m_ref) + torch.log2(a_inv))
    else:
        worst = code.max()
        # The slots brought to a common power of two and added in fp64; then the root, and
        # times 2**e_ref * |inv| in fp64 before rounding to fp32: the raw norm may exceed
        # fp32 while the unscaled one does not.
        e = exps.double()
        e_ref = e.max()
        total = (sums.double() * torch.exp2(norm_type * (e - e_ref))).sum()
        root = total if norm_type == 1.0 else total.sqrt()
        norm = root * (torch.exp2(e_ref) * a_inv)
    # No elements, or all zero: 0 whatever inv (an inf inv_scale is caught below); an inf or
    # NaN x * inv_scale (e.g. 0 * inf) sets the code instead.
    norm = torch.where(root == 0, 0.0, norm).float()
    norm = torch.where(worst == 2.0, math.nan, torch.where(worst == 1.0, math.inf, norm))
    if max_norm is None:
        coef = inv.clone()
    else:
        # 0 / 0 (max_norm 0, an all-zero gradient, eps 0) leaves the gradient as it is.
        clip = torch.where(norm + eps == 0, 1.0, torch.clamp(max_norm / (norm + eps), max=1.0))
        coef = inv * clip
    # Overflow on store: a slot's largest |x * coef| (fp32 rounding is monotonic) at or above
    # the limit of the dtype it is stored in becomes inf there.
    overflow = (maxes * coef.abs() >= limits).any() if maxes.numel() else zero > 0
    # Non-finite (a smaller loss scale cures it) or an overflow on store alone (it cannot).
    nonfinite = (worst > 0) | ~torch.isfinite(norm) | ~torch.isfinite(inv)
    found_inf = (nonfinite | overflow).to(torch.float32)
    store_only = (overflow & ~nonfinite).to(torch.float32)
    return torch.stack([norm, found_inf, coef, store_only])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def apply(buckets: "list[torch.Tensor]", stats: torch.Tensor, out: "list[torch.Tensor] | None",
          skip_if_nonfinite: bool) -> None:
    """Phase 3, one read-write pass: ``dst = bucket * stats[2]`` computed in fp32 and rounded
    once to dst's dtype. When ``stats[1]`` (found_inf) is set and ``skip_if_nonfinite``,
    nothing is written: dst keeps every bit (signaling NaNs too). On the CPU the flag is read
    directly (a CPU tensor: no device synchronisation); elsewhere a bitwise select decides on
    the device."""
    coef = stats[2]
    write = None
    if skip_if_nonfinite and _reads_host(stats.device):
        if bool(stats[1]):
            return
        skip_if_nonfinite = False
    for i, b in enumerate(buckets):
        dst = b if out is None else out[i]
        if not skip_if_nonfinite and b.dtype == torch.float32 and dst.dtype == torch.float32:
            torch.mul(b, coef, out=dst)
            continue
        scratch = torch.empty(0, dtype=torch.float32, device=b.device)
        narrow = torch.empty(0, dtype=dst.dtype, device=b.device)
        if skip_if_nonfinite:
            # All ones to write, zeros to keep dst: a select on the bits. Not x * 1.0, which
            # would quiet a signaling NaN.
            write = (stats[1] == 0).to(torch.int32).neg().to(_bits(narrow).dtype)
        for piece in _pieces(b):
            # In fp32 whatever b's dtype (the Triton kernel's arithmetic), in a cached scratch.
            v = scratch.resize_(piece.stop - piece.start)
            if b.dtype == torch.float32:
                torch.mul(b[piece], coef, out=v)
            else:
                v.copy_(b[piece]).mul_(coef)  # torch.mul would multiply in b's dtype
            if skip_if_nonfinite:
                if dst.dtype != torch.float32:
                    v = narrow.resize_(v.numel()).copy_(v)
                d = _bits(dst[piece])
                d.bitwise_xor_(_bits(v).bitwise_xor_(d).bitwise_and_(write))
            else:
                dst[piece].copy_(v)


def unscale_clip_(
    buckets: "list[torch.Tensor]",
    inv_scale: "float | torch.Tensor",
    max_norm: "float | None",
    norm_type: float,
    eps: float,
    *,
    out: "list[torch.Tensor] | None",
    skip_if_nonfinite: bool,
) -> torch.Tensor:
    """Returns the fp32 ``stats`` tensor ``[total_norm, found_inf, coef, store_overflow]``."""
    partials = norm_partials(buckets, inv_scale, norm_type, out=out)
    stats = finalize(partials, inv_scale, max_norm, norm_type, eps)
    apply(buckets, stats, out, skip_if_nonfinite)
    return stats
