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
    if sq_out is not None:
        # Σ grad² before grad is zeroed: fp32 rows folded in fp64, like the norm; the whole
        # sum goes into slot 0 (the kernels spread it over one slot per program).
        parts = _partial_norms(g, 2.0)
        sq = (torch.cat(parts).double().square().sum() if parts else torch.zeros((), dtype=torch.float64,
                                                                                  device=g.device)).float()
        if overwrite:
            sq_out.zero_()
        sq_out[0] += sq * sq_weight
    if overwrite:
        # copy_ then mul_, not torch.mul(g, s, out=acc): that would round the product to
        # grad's (possibly bf16) dtype before it lands in fp32.
        acc.copy_(g)
        acc.mul_(scale)
    elif g.dtype == acc.dtype:
        _add_(acc, g, scale)
    else:
        # The sum in fp32 of an exact fp32 copy of grad, piece by piece: the same bits as a
        # mixed-dtype add_, which converts element by element and is slow on the CPU.
        scratch = torch.empty(0, dtype=acc.dtype, device=acc.device)
        for piece in _pieces(acc):
            _add_(acc[piece], scratch.resize_(piece.stop - piece.start).copy_(g[piece]), scale)
    if zero_grad:
        grad.zero_()
    return acc


def sq_slots(n: int) -> int:
    """How many ``sq_out`` slots ``accumulate_`` fills for a bucket of ``n`` elements."""
    return 1


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
    device = buckets[0].device
    # One read pass: ‖b·inv‖ = |inv|·‖b‖ for every p-norm, so the buckets are never copied
    # (the Triton kernels also sum the raw values and multiply by |inv| at the end). An
    # inf/NaN element makes the norm inf/NaN, so the norm doubles as the non-finite check;
    # a fp32 sum of |x|^p of the raw values that overflows counts as non-finite too.
    parts = [part for b in buckets for part in _partial_norms(b, norm_type)]
    if not parts:
        raw = torch.zeros((), device=device)
    elif math.isinf(norm_type):
        raw = torch.cat(parts).max()
    else:
        # Σ|x|^p folded in fp64 and rounded to fp32 before the root, as the Triton finalize
        # does: the sum overflows (found_inf) at the same point in both backends, whatever
        # the pieces. A row's fp32 norm is inf only if its own fp32 sum overflowed.
        total = torch.cat(parts).double().pow(norm_type).sum().float()
        if norm_type == 1.0:
            raw = total
        elif norm_type == 2.0:
            raw = total.sqrt()
        else:
            raw = total.pow(1.0 / norm_type)
    # full(), not as_tensor(): a Python number becomes a fill on the device, not a copy from
    # the host (which the CUDA sync checker counts).
    inv = (inv_scale.to(torch.float32) if isinstance(inv_scale, torch.Tensor)
           else torch.full((), inv_scale, dtype=torch.float32, device=device))
    norm = raw * inv.abs()
    found_inf = (~torch.isfinite(norm)).to(torch.float32)
    if max_norm is None:
        coef = inv.clone()
    else:
        coef = inv * torch.clamp(max_norm / (norm + eps), max=1.0)
    stats = torch.stack([norm, found_inf, coef])
    skip = found_inf > 0
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
    return stats
