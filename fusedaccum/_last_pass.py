"""The window's norm from its last accumulate pass (bf16/fp16 landing buckets, one process).

The last ``fold_landing`` of a full window writes each landing bucket's finished fp32 sum; the
same pass can write the norm partials of that sum (``accumulate_(norm_out=...)``), so the step
runs no norm pass over those buckets: 6 B/el of preprocessing instead of 10 (docs/kernels.md).

The partials hold the non-finite code of ``sum * inv``, so ``inv`` must be the one the step will
use: ``inv_scale(window scale, local_normalizer(window))`` of the window as it will be once this
micro-batch is counted, computed here from a copy of the window with the micro-batch added, by
the same functions and operations as the step's ``Local.reduce`` and ``inv_scale``. Only an
engine that ``reduces_locally`` qualifies (one process: ``Local``, or a group of one rank): any
other communicates the buckets, or the partials, after the last pass.

A stale partial would be a wrong norm. The step uses the partials only when the window is the
same object with the same micro-batch count (``discard_window``, ``load_state_dict``, a step
reset it; an exception before the micro-batch was counted leaves a different count) and every
landing bucket's fp32 sum still has the version counter it had right after the pass (any
in-place change since, e.g. ``load_state_dict``'s copy or a user's ``add_``); otherwise it runs
the norm pass as always. Each later ``fold_landing`` replaces the record.
"""

import dataclasses

import torch

from .ops import sq_slots
from .parallel.base import local_normalizer
from .reference import NUM_ROWS
from .scaler import inv_scale

__all__ = ["LastPass", "ask", "take"]


class LastPass:
    """What one window's last accumulate pass is asked for, and the partials it wrote."""

    def __init__(self, window, micro: int, inv, norm_type: float):
        self.window, self.micro, self.inv, self.norm_type = window, micro, inv, norm_type
        self.written = {}  # Bucket -> (partials, its accum's version right after the pass)

    def args(self, b) -> dict:
        """``accumulate_``'s keyword arguments for landing bucket ``b``."""
        out = torch.empty(NUM_ROWS, sq_slots(b.accum), dtype=torch.float32, device=b.accum.device)
        return dict(norm_out=out, inv_scale=self.inv, norm_type=self.norm_type, norm_dtype=b.landing.dtype)

    def done(self, b, args: dict) -> None:
        self.written[b] = (args["norm_out"], b.accum._version)


def ask(acc, num_items, host_items, dev_items, end: bool) -> "LastPass | None":
    """A ``LastPass`` when this backward is the last micro-batch of a full window of ``acc``
    (a ``GradAccumulator``) with landing buckets in one process; else None."""
    win = acc._win
    if not (acc._lowp and end and win.micro + 1 == acc.accumulation_steps and acc._engine.reduces_locally):
        return None
    after = dataclasses.replace(win)  # the window once this micro-batch is counted
    after.add_micro_batch(num_items is not None, host_items, dev_items, end)
    return LastPass(win, after.micro, inv_scale(win.scale, local_normalizer(after)), acc.norm_type)


def take(acc) -> "list | None":
    """At the step: per bucket its last-pass partials (None for the others), or None when any
    is stale or the feature did not apply (then the norm pass runs over every bucket)."""
    record, acc.buckets.last_pass = acc.buckets.last_pass, None
    win = acc._win
    if (record is None or record.window is not win or win.micro != record.micro or win.parts
            or record.norm_type != acc.norm_type or not acc._engine.reduces_locally):
        return None
    partials = []
    for b in acc.buckets:
        if b.landing is None:
            partials.append(None)
            continue
        got = record.written.get(b)
        if got is None or got[1] != b.accum._version:
            return None
        partials.append(got[0])
    return partials
