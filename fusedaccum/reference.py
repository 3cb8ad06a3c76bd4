"""Pure-PyTorch reference of every fused op: same signatures as the launch helpers in
``fusedaccum.kernels``, same results within the tolerance table in the README, and the
oracle of the tests. It runs on any device, with no host synchronisation.

Inputs are validated by ``fusedaccum.ops`` before they get here.
"""

import math

import torch

# Rows of this many elements get fp32 partial norms; the rows are then folded in fp64.
# One vector_norm over a whole bucket accumulates naively in fp32 on the CPU (1e-2 relative
# error at 1.2e8 elements: bench/norm_accuracy.py); rows are accurate and no slower.
NORM_ROW = 1024


def _partial_norms(b: torch.Tensor, p: float) -> "list[torch.Tensor]":
    n = b.numel()
    bulk = n - n % NORM_ROW
    parts = []
    if bulk:
        parts.append(torch.linalg.vector_norm(b[:bulk].view(-1, NORM_ROW), p, dim=1, dtype=torch.float32))
    if bulk != n:
        parts.append(torch.linalg.vector_norm(b[bulk:], p, dtype=torch.float32).reshape(1))
    return parts


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
    note = (lambda x: None) if squares is None else (lambda x: squares.extend(_partial_norms(x, 2.0)))
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


def norm_partials(buckets: "list[torch.Tensor]", inv_scale: "float | torch.Tensor", norm_type: float) -> torch.Tensor:
    """Phase 1, one read pass: the fp32 partials ``[2, num_slots]``, one slot per non-empty
    bucket: row 0 its Σ|x|^p (max|x| for inf), row 1 its non-finite code of ``x * inv_scale``
    (0 finite, 1 inf, 2 NaN). Slots fold by concatenation along the last dim."""
    device = buckets[0].device
    inv = _inv(inv_scale, device)
    slots = []
    for b in buckets:
        if b.numel() == 0:
            continue
        # ‖b·inv‖ = |inv|·‖b‖ for every p-norm, so the buckets are never copied (the Triton
        # kernels also sum the raw values and multiply by |inv| at the end). An inf/NaN
        # element makes the row norm inf/NaN, so the norm doubles as the non-finite check.
        rows = torch.cat(_partial_norms(b, norm_type))
        if math.isinf(norm_type):
            part = rows.max()
        else:
            # Σ|x|^p folded in fp64 and rounded to fp32, as the Triton finalize does.
            part = rows.double().pow(norm_type).sum().float()
        y = rows.max() * inv.abs()  # non-finite iff some x * inv is (or the row norm overflowed)
        code = torch.where(rows.isnan().any() | y.isnan(), 2.0, torch.where(torch.isinf(y), 1.0, 0.0))
        slots.append(torch.stack([part, code.float()]))
    if not slots:
        return torch.zeros(2, 0, dtype=torch.float32, device=device)
    return torch.stack(slots, dim=1)


def finalize(partials: torch.Tensor, inv_scale: "float | torch.Tensor", max_norm: "float | None",
             norm_type: float, eps: float) -> torch.Tensor:
    """Phase 2: the fp32 ``stats`` ``[total_norm, found_inf, coef]`` from the partials."""
    device = partials.device
    part, code = partials[0], partials[1]
    if part.numel() == 0:
        raw = torch.zeros((), device=device)
    elif math.isinf(norm_type):
        raw = part.max()
    else:
        # Folded in fp64, rounded to fp32 before the root: the sum overflows (found_inf) at
        # the same point in both backends, whatever the pieces.
        total = part.double().sum().float()
        if norm_type == 1.0:
            raw = total
        elif norm_type == 2.0:
            raw = total.sqrt()
        else:
            raw = total.pow(1.0 / norm_type)
    inv = _inv(inv_scale, device)
    norm = raw * inv.abs()
    worst = code.max() if code.numel() else torch.zeros((), device=device)
    norm = torch.where(worst == 2.0, float("nan"), norm)
    found_inf = ((worst > 0) | ~torch.isfinite(norm)).to(torch.float32)
    if max_norm is None:
        coef = inv.clone()
    else:
        coef = inv * torch.clamp(max_norm / (norm + eps), max=1.0)
    return torch.stack([norm, found_inf, coef])


def apply(buckets: "list[torch.Tensor]", stats: torch.Tensor, out: "list[torch.Tensor] | None",
          skip_if_nonfinite: bool) -> None:
    """Phase 3, one read-write pass: ``dst = bucket * stats[2]``, kept as it was on the device
    when ``stats[1]`` (found_inf) is set and ``skip_if_nonfinite``."""
    coef = stats[2]
    skip = stats[1] > 0
    for i, b in enumerate(buckets):
        dst = b if out is None else out[i]
        if not skip_if_nonfinite:
            if dst is b:
                b.mul_(coef)
            else:
                dst.copy_(b * coef)
        elif dst is b and b.dtype == torch.float32:
            # Skipping is decided on the device: x * 1.0 keeps every bit of x (NaN payloads
            # too), so one in-place pass serves both outcomes.
            b.mul_(torch.where(skip, 1.0, coef))
        else:
            # Rounding to bf16/fp16 canonicalises NaN, and dst may be another tensor: select.
            for piece in _pieces(b):
                torch.where(skip, dst[piece], (b[piece] * coef).to(dst.dtype), out=dst[piece])


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
    """Returns the fp32 ``stats`` tensor ``[total_norm, found_inf, coef]``."""
    stats = finalize(norm_partials(buckets, inv_scale, norm_type), inv_scale, max_norm, norm_type, eps)
    apply(buckets, stats, out, skip_if_nonfinite)
    return stats
