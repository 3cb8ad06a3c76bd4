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
from ._ref_norm import (NORM_ROW, SAFE_SUM, _max_abs, _p_sum, _partials, _row_norms,  # noqa: F401
                        _scale_exponent, store_limit)

# Rows of the partials, the same as the Triton kernels' (fusedaccum.kernels._norm), one
# column per slot. Every row folds across slots, so the partials of several ranks concatenated
# along the slots finalize to the global result.
ROW_SUM, ROW_EXP, ROW_BAD, ROW_MAX, ROW_LIMIT = range(5)
NUM_ROWS = 5
MAX_SLOTS_PER_BUCKET = 1  # norm_partials gives every bucket one slot


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
NORM_GROUP = 1 << 20  # _LastPassNorm: elements looked at together (4 pieces)


def _add_(acc: torch.Tensor, x: torch.Tensor, scale: "float | torch.Tensor") -> None:
    if isinstance(scale, torch.Tensor):
        acc.addcmul_(x, scale)
    else:
        acc.add_(x, alpha=scale)


def _accumulate_pieces(acc, g, scale, overwrite: bool, squares: "list | None", after=None) -> None:
    """acc (+)= g * scale; with ``squares``, also the fp32 row norms of g's values; ``after(piece)``
    runs once each piece of acc is final (while it is in cache)."""
    note = (lambda x: None) if squares is None else (lambda x: squares.extend(_row_norms(x)))
    done = (lambda piece: None) if after is None else after
    by_piece = squares is not None or after is not None
    if overwrite:
        # copy_ then mul_, not torch.mul(g, s, out=acc): that would round the product to
        # grad's (possibly bf16) dtype before it lands in fp32.
        for piece in (_pieces(acc) if by_piece else [slice(0, acc.numel())]):
            a = acc[piece]
            a.copy_(g[piece])
            note(a)
            a.mul_(scale)
            done(piece)
    elif g.dtype == acc.dtype:
        note(g)
        for piece in (_pieces(acc) if after is not None else [slice(0, acc.numel())]):
            _add_(acc[piece], g[piece], scale)
            done(piece)
    elif not by_piece and not isinstance(scale, torch.Tensor):
        # _pieces' pieces in one foreach call (a Python loop over them: 15 % slower at 1e8 on the CPU).
        n = CPU_PIECE if acc.device.type == "cpu" else max(acc.numel(), 1)
        torch._foreach_add_(acc.split(n), g.split(n), alpha=scale)
    else:
        # The sum in fp32 of an exact fp32 copy of grad, piece by piece: the same bits as a
        # mixed-dtype add_ (as above), which converts the whole operand first, out of cache on the CPU.
        scratch = torch.empty(0, dtype=acc.dtype, device=acc.device)
        for piece in _pieces(acc):
            x = scratch.resize_(piece.stop - piece.start).copy_(g[piece])
            note(x)
            _add_(acc[piece], x, scale)
            done(piece)


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
) -> torch.Tensor:
    """``norm_out``: column ``norm_slot`` gets ``norm_partials([acc], inv_scale, norm_type)`` of
    the finished acc, stored as ``norm_dtype`` (the same bits). The CPU's 2-norm fast path is
    taken a few pieces at a time while they are in cache (no second pass over acc); every
    other case (and a sum outside the fast path's range) runs ``norm_partials`` after the add."""
    g = grad.view(-1)
    last = _LastPassNorm(acc, inv_scale, norm_type, norm_dtype) if norm_out is not None else None
    after = None if last is None else last.after
    if sq_out is None:
        _accumulate_pieces(acc, g, scale, overwrite, None, after)
    else:
        # Σ grad² of the fp32 values the pass adds, piece by piece while each is in cache:
        # fp32 rows folded in fp64, like the norm. The whole sum goes into slot 0 (the kernels
        # spread it over one slot per program).
        squares = []
        _accumulate_pieces(acc, g, scale, overwrite, squares, after)
        sq = torch.cat(squares).double().square().sum().float() if squares else torch.zeros((), device=g.device)
        if overwrite:
            sq_out.zero_()
        sq_out[0] += sq * sq_weight
    if last is not None:
        norm_out[:, norm_slot].copy_(last.column())
    if zero_grad:
        grad.zero_()
    return acc


class _LastPassNorm:
    """The partials of a bucket as its accumulate pass finishes each piece: norm_partials' CPU
    fast path for the 2-norm (row norms, max|x| where a store can overflow), taken per group of pieces;
    ``column()`` is norm_partials' column, from them or (outside the fast path) from a pass."""

    def __init__(self, acc, inv_scale, norm_type, norm_dtype):
        self.acc, self.inv_scale, self.norm_type, self.dtype = acc, inv_scale, norm_type, norm_dtype
        inv = float(inv_scale) if _reads_host(acc.device) else math.nan  # a CPU value: no sync
        # norm_partials' own choice of its fast path (a finite inv: no 0 * inf, no min|x|).
        self.fast = _reads_host(acc.device) and norm_type == 2.0 and math.isfinite(inv) and acc.numel() > 0
        self.need_max = not math.isinf(store_limit(norm_dtype))
        self.rows, self.maxes = [], []
        self.start = 0  # where the finished part not yet looked at begins

    def after(self, piece: slice) -> None:
        if not self.fast or (piece.stop - self.start < NORM_GROUP and piece.stop < self.acc.numel()):
            return
        # A few pieces at a time: still in the last-level cache, and fewer, larger ops (at one
        # piece each, the ops' fixed cost is a third of the time). Groups start at multiples of
        # CPU_PIECE (of NORM_ROW): the rows are the whole bucket's.
        group = self.acc[self.start:piece.stop]
        self.start = piece.stop
        self.rows.extend(_row_norms(group))
        if self.need_max:
            self.maxes.append(_max_abs(group))

    def column(self) -> torch.Tensor:
        like = [torch.empty(0, dtype=self.dtype, device=self.acc.device)]  # norm_partials reads its dtype
        if self.fast:
            total = _fold_rows(self.rows)
            if total is not None:
                m = torch.stack(self.maxes).max() if self.need_max else None
                return _partials([(total.float(), None, m, None)], [self.acc], like, _inv(self.inv_scale,
                                                                                          self.acc.device))[:, 0]
        return norm_partials([self.acc], self.inv_scale, self.norm_type, out=like)[:, 0]


def sq_slots(n: int) -> int:
    """How many ``sq_out`` slots ``accumulate_`` fills for a bucket of ``n`` elements."""
    return 1


def _fold_rows(rows: list) -> "torch.Tensor | None":
    """Σx² from fp32 row norms (``_row_norms``) folded in fp64, or None when the fold is outside SAFE_SUM
    (a row's fp32 sum may have overflowed, or lost its small squares to underflow). CPU only:
    the check reads a CPU tensor, which is no device synchronisation (here, in reference.py: the tests
    tell the reference's own reads by the file)."""
    total = (rows[0] if len(rows) == 1 else torch.cat(rows)).double().square().sum()
    return total if SAFE_SUM[0] <= float(total) <= SAFE_SUM[1] else None


def _inv(inv_scale, device) -> torch.Tensor:
    # full(), not as_tensor(): a Python number becomes a fill on the device, not a copy from
    # the host (which the CUDA sync checker counts).
    return (inv_scale.to(torch.float32) if isinstance(inv_scale, torch.Tensor)
            else torch.full((), inv_scale, dtype=torch.float32, device=device))


def _reads_host(device: torch.device) -> bool:
    """Whether this device's values can be read without a synchronisation (the CPU's)."""
    return device.type == "cpu"


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
        fast = host_partials(buckets, out, lambda b: None if (t := _fold_rows(_row_norms(b))) is None else float(t))
        if fast is not None:
            return fast
    cols = []  # per bucket: (sum, exponent, max|x| or None when not needed, holds a zero)
    scratch = torch.empty(0, dtype=torch.float32, device=device)
    one = torch.ones((), dtype=torch.float32, device=device)
    zero = torch.zeros((), dtype=torch.float32, device=device)
    no = torch.zeros((), dtype=torch.bool, device=device)
    general = not (math.isinf(norm_type) or norm_type in (1.0, 2.0))
    for i, b in enumerate(buckets):
        limit = store_limit((b if out is None else out[i]).dtype)
        fast = (_fold_rows(_row_norms(b)) if norm_type == 2.0 and b.numel() and host and not need_min
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
    return _partials(cols, buckets, out, inv)


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
