"""DistributedDataParallel (fp32 parameters, ``gradient_as_bucket_view=False``) reduces.

``accumulate(ddp_model)`` enters ``no_sync()`` on all but the last micro-batch, so DDP
all-reduces (mean) the window's sums once, during the last backward; the buckets then hold
DDP's mean and the multiplier becomes ``world_size / global count``. The accumulator
communicates only the count vector: the count (which can differ between ranks with
``num_items``, or when ranks close windows of different lengths) and the window's loss
and statistics. A partial window closed by ``step(force=True)`` ran its last micro-batch under
``no_sync()`` (``accumulate`` cannot know it was the last): nobody reduced it, so ``step``
all-reduces its buckets over DDP's group then, as the process-group engine would. Every rank
must close such a window alike (docs/data-parallel.md, "Closing a short window under DDP"):
one rank's synchronising backward against another's unreduced step is a collective mismatch
inside DDP, before the accumulator is asked anything.
"""

import weakref

import torch

from .base import Engine, Window, all_reduce_async, dist, global_normalizer, local_normalizer, wait

__all__ = ["DDP", "check_ddp", "is_ddp"]


def is_ddp(model) -> bool:
    if not dist().is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def check_ddp(ddp, params, process_group) -> None:
    """Raise when ``ddp`` (a DistributedDataParallel) cannot all-reduce ``params`` (this
    accumulator's parameters) correctly, saying what to do instead. Changes nothing."""
    if process_group is not None:
        given = "process_group=False" if process_group is False else "a process_group"
        raise ValueError(
            f"this GradAccumulator was built with {given} and the model is wrapped in "
            "DistributedDataParallel: only one of them may own the gradient all-reduce. Leave "
            "process_group=None with a DDP model (DDP reduces), or drop the DDP wrapper (the "
            "GradAccumulator reduces, once per optimizer step)")
    if getattr(ddp, "gradient_as_bucket_view", False):
        raise ValueError(
            "DistributedDataParallel(gradient_as_bucket_view=True) re-points param.grad into DDP's own "
            "buckets on the synchronising backward, so the all-reduced gradient would bypass this "
            "GradAccumulator's buckets and every rank would step on its own local sum. Build DDP with "
            "gradient_as_bucket_view=False (the default), or drop the DDP wrapper and let the "
            "GradAccumulator all-reduce its fp32 buckets (process_group=None or a group)")
    lowp = sorted({str(p.dtype).replace("torch.", "") for p in params if p.dtype != torch.float32})
    if lowp:
        raise ValueError(
            f"DistributedDataParallel over {'/'.join(lowp)} parameters: their gradients move from param.grad "
            "into this GradAccumulator's fp32 buckets after every backward, so DDP would have to all-reduce "
            "every micro-batch (accumulation_steps all-reduces per optimizer step, in low precision). Drop "
            "the DDP wrapper, build GradAccumulator(model, ...) with process_group=None (the default group) "
            "or a group: it all-reduces the fp32 sums once per step. Broadcast the initial weights yourself "
            "then (fusedaccum.broadcast_parameters(model)), as DDP's constructor did")
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    reduced = {id(p) for name, p in ddp.module.named_parameters() if name not in ignored}
    missing = [p for p in params if id(p) not in reduced]
    if missing:
        shapes = ", ".join(str(tuple(p.shape)) for p in missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise ValueError(
            f"{len(missing)} parameters of this GradAccumulator (shapes {shapes}) are not all-reduced by the "
            "DistributedDataParallel model given (not among its parameters, or ignored by it): every rank "
            "would step with its own gradient for them. Wrap the whole model in DDP, or build the "
            "GradAccumulator over the DDP model's parameters only")


class DDP(Engine):
    """DDP's mean all-reduce in the window's last backward; the count at the step."""

    wraps = staticmethod(is_ddp)

    @staticmethod
    def check(model, params, process_group, options=None) -> None:
        check_ddp(model, params, process_group)

    def __init__(self, ddp, options=None):
        self.options = dict(options or {})
        self.group = getattr(ddp, "process_group", None)
        self.world_size = dist().get_world_size(self.group)
        self._checked = weakref.WeakSet([ddp])  # the DDP models already checked

    def hand_over(self, cls, model, params) -> Engine:
        if model in self._checked:
            return self
        if cls is not DDP:
            cls.check(model, params, None, self.options)
            raise ValueError(f"a {type(model).__name__} model after a DistributedDataParallel one: one "
                             "GradAccumulator follows one data-parallel engine")
        check_ddp(model, params, None)
        if getattr(model, "process_group", None) is not self.group:
            raise ValueError("a second DistributedDataParallel model with another process group: one "
                             "GradAccumulator follows one DDP model")
        self._checked.add(model)
        return self

    def syncs_in_backward(self, needs_small_batch: bool) -> bool:
        # Not at K = 1 with the statistics on: DDP would average the only micro-batch before any norm is
        # read, leaving no small batch. It then runs under no_sync() and the step all-reduces the buckets
        # (the partial-window path below): the same bytes, not overlapped with the backward.
        return not (needs_small_batch and self.communicates)

    def reduce(self, accums, window: Window, force: bool, device):
        if not self.communicates:
            return local_normalizer(window), window.items()
        denom, works = global_normalizer(window, self.group, self.world_size, force, device)
        if window.unsynced:  # a partial window whose last micro-batch ran under no_sync()
            works += all_reduce_async(accums, self.group)
        wait(works)
        items = denom if window.items_given else None
        if not window.unsynced:
            # DDP averaged the sums over the ranks: multiply by world_size / global count.
            denom = denom / self.world_size
        return denom, items

    def __repr__(self) -> str:
        return f"DDP(world_size={self.world_size})"
