"""Memory layouts of gradients over flat buffers: which layouts a bucket view can take, and
which flat buffers a list of gradients tiles exactly (``clip_grad_norm_``'s fused path)."""

from collections.abc import Sequence

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the gradient dtypes the fused ops take


def _dense_layout(t: torch.Tensor) -> bool:
    """Whether t's elements fill storage[offset, offset + numel) once each, in any order of
    dimensions (contiguous, channels_last, a transpose...)."""
    if t.numel() <= 1:
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _covering_buckets(grads: Sequence[torch.Tensor]):
    """The flat buffers that ``grads`` tile exactly (every element once, nothing else), or
    None. Then the norm over the buffers is the norm over the grads, one launch per buffer."""
    bases: dict[int, tuple[torch.Tensor, list]] = {}
    for g in grads:
        base = g._base
        if (base is None or base.dim() != 1 or not base.is_contiguous() or not _dense_layout(g)
                or base.dtype not in GRAD_DTYPES or base.requires_grad):
            return None
        bases.setdefault(id(base), (base, []))[1].append((g.storage_offset() - base.storage_offset(), g.numel()))
    for base, spans in bases.values():
        position = 0
        for offset, numel in sorted(spans):
            if offset != position:
                return None
            position += numel
        if position != base.numel():
            return None
    buffers = [base for base, _ in bases.values()]
    if len({b.device for b in buffers}) != 1:
        return None
    return buffers
