"""The norm's partials between ``fusedaccum.ops``' phases: neutral padding for a gather, the
apply pass owed after the finalize, and partials that some buckets already have (written by a
window's last accumulate pass, ``accumulate_(norm_out=...)``) merged with those of a norm pass
over the others, in bucket order: the same tensor a norm pass over every bucket gives."""

import math
import numbers

import torch

from .reference import NUM_ROWS, ROW_EXP, ROW_LIMIT  # the partials' row layout, shared by both backends


class OwedApply:
    """The apply pass of a finalized ``_unscale_clip_stats``: runs once, on the first call."""

    def __init__(self, run):
        self._run = run

    @property
    def pending(self) -> bool:
        return self._run is not None

    def __call__(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run()


def _pad_slots(partials: torch.Tensor, width: int) -> torch.Tensor:
    """partials with neutral slots appended up to ``width``: nothing summed, the smallest scale
    exponent, nothing non-finite, no store limit (what the finalize uses for no elements).
    Fills on the device, no copy from the host."""
    missing = width - partials.shape[-1]
    if missing <= 0:
        return partials
    neutral = partials.new_zeros(partials.shape[0], missing)
    neutral[ROW_EXP].fill_(-126.0)
    neutral[ROW_LIMIT].fill_(math.inf)
    return torch.cat([partials, neutral], dim=-1)


def check_norm_out(norm_out, norm_slot, slots: int, acc, others) -> None:
    """``accumulate_``'s ``norm_out``: fp32 ``[NUM_ROWS, k]`` on acc's device, columns
    ``norm_slot .. norm_slot + slots - 1`` inside it, apart from the op's other tensors."""
    if not isinstance(norm_out, torch.Tensor):
        raise TypeError(f"norm_out must be a torch.Tensor, got {type(norm_out).__name__}")
    if (norm_out.dtype != torch.float32 or norm_out.dim() != 2 or norm_out.shape[0] != NUM_ROWS
            or not norm_out.is_contiguous() or norm_out.device != acc.device):
        raise ValueError(f"norm_out must be a contiguous fp32 [{NUM_ROWS}, slots] tensor on {acc.device}, got "
                         f"{norm_out.dtype} {tuple(norm_out.shape)} on {norm_out.device}")
    if isinstance(norm_slot, bool) or not isinstance(norm_slot, numbers.Integral):
        raise TypeError(f"norm_slot must be an int, got {type(norm_slot).__name__}")
    if not 0 <= norm_slot <= norm_out.shape[1] - slots:
        raise ValueError(f"norm_slot={norm_slot}: the bucket's {slots} slot(s) from there do not fit in norm_out's "
                         f"{norm_out.shape[1]} columns")
    for name, t in others.items():
        if t is not None and _overlaps(norm_out, t):
            raise ValueError(f"norm_out overlaps {name} in memory")


def _overlaps(a, b) -> bool:
    from .ops import _overlap

    return _overlap(a, b)


def check_given(given, flat: list, impl) -> list:
    """``_unscale_clip_stats``' ``partials``: one entry per bucket, None (a norm pass runs over
    it) or the bucket's partials, fp32 ``[NUM_ROWS, impl.sq_slots(numel)]`` on its device."""
    if isinstance(given, torch.Tensor) or not isinstance(given, (list, tuple)):
        raise TypeError(f"partials must be a list with one entry per bucket, got {type(given).__name__}")
    if len(given) != len(flat):
        raise ValueError(f"partials has {len(given)} entries for {len(flat)} buckets")
    for i, (g, b) in enumerate(zip(given, flat)):
        if g is None:
            continue
        shape = (NUM_ROWS, impl.sq_slots(b.numel()))
        if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or tuple(g.shape) != shape or g.device != b.device:
            raise ValueError(f"partials[{i}] must be None or an fp32 tensor of shape {shape} on {b.device}, got "
                             + (f"{g.dtype} {tuple(g.shape)} on {g.device}" if isinstance(g, torch.Tensor)
                                else type(g).__name__))
    return list(given)


def merged(impl, flat: list, given: list, inv, p: float, out) -> torch.Tensor:
    """The partials of every bucket: ``given`` where there, a norm pass over the others."""
    missing = [i for i, g in enumerate(given) if g is None]
    cols = list(given)
    if missing:
        fresh = impl.norm_partials([flat[i] for i in missing], inv, p, out=None if out is None else [out[i] for i in missing])
        if len(missing) == len(flat):
            return fresh
        for i, part in zip(missing, fresh.split([impl.sq_slots(flat[i].numel()) for i in missing], dim=-1)):
            cols[i] = part
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=-1)
