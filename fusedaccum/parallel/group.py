"""The accumulator all-reduces its own buckets over a process group (no wrapper model).

At ``step``, right before the fused unscale/norm/clip pass: one ``all_reduce(SUM)`` per fp32
accumulation bucket, plus one of the window's count vector (fp64 on the device: the item
count, and the window's loss and noise-scale sums, ``base.global_normalizer``); all
launched at once (``async_op=True``), the count first, then waited on. The normalizer is the
all-reduced count on every window (ranks may close windows of different lengths at one step),
so the norm, the clip and ``found_inf`` are those of the global gradient on every rank: all
ranks skip or step together with no collective for the decision.
Nothing is communicated during the micro-batches.
"""

import torch

from .base import Engine, Window, all_reduce_async, dist, global_normalizer, local_normalizer, wait
from .local import Local

__all__ = ["Auto", "Group", "broadcast_parameters"]


class Group(Engine):
    """``process_group`` given (or the default group chosen by ``Auto``)."""

    def __init__(self, process_group, world_size: int, *, explicit: bool = True):
        self.group = process_group
        self.world_size = world_size
        # What the user gave, for the refusal of a wrapper model (None: chosen automatically).
        self.process_group = process_group if explicit else None

    @property
    def reduces_locally(self) -> bool:
        return not self.communicates

    def reduce(self, accums, window: Window, force: bool, device):
        self.check_synced(window)
        if not self.communicates:
            return local_normalizer(window), window.items()
        # The count (tiny, needed first) and then every bucket, all in flight at once.
        denom, works = global_normalizer(window, self.group, self.world_size, force, device)
        works += all_reduce_async(accums, self.group)
        wait(works)
        return denom, (denom if window.items_given else None)

    def __repr__(self) -> str:
        return f"Group(world_size={self.world_size})"


class Auto(Engine):
    """``process_group=None``: the default group when torch.distributed is initialized with
    more than one rank at a step, nobody otherwise; a wrapper model shown takes over. Fixed
    at the first step that reduces (a wrapper shown after that would reduce a second time)."""

    def __init__(self):
        self._fixed: "Group | None" = None

    @property
    def world_size(self) -> int:
        """The world the next step reduces over (without fixing the choice)."""
        if self._fixed is not None:
            return self._fixed.world_size
        d = dist()
        return d.get_world_size() if d.is_available() and d.is_initialized() else 1

    @property
    def reduces_locally(self) -> bool:
        return self.world_size == 1  # Local, or a Group of one

    def _current(self) -> Engine:
        if self._fixed is not None:
            return self._fixed
        d = dist()
        if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
            self._fixed = Group(None, d.get_world_size(), explicit=False)
            return self._fixed
        return Local(None)  # not fixed: torch.distributed may be initialized, a wrapper shown, later

    def hand_over(self, cls, model, params) -> Engine:
        cls.check(model, params, None, self.options)
        if self._fixed is not None:
            raise RuntimeError(
                "this GradAccumulator has already all-reduced its own gradients (process_group=None chose "
                "the default group at its first step, when no data-parallel wrapper had been shown to it); "
                f"with a {type(model).__name__} model now, both would reduce. Show the wrapper model from the "
                "start: GradAccumulator(model, ...), or accumulate(model) on every micro-batch")
        return cls(model, self.options)

    def reduce(self, accums, window: Window, force: bool, device):
        return self._current().reduce(accums, window, force, device)

    def __repr__(self) -> str:
        return f"Auto({self._fixed!r})" if self._fixed is not None else "Auto()"  # no side effect


def select(process_group, options=None) -> Engine:
    """The engine for a ``process_group`` argument, before any wrapper model is shown."""
    if process_group is False:
        engine = Local(False)
    elif process_group is None:
        engine = Auto()
    else:
        engine = Group(process_group, dist().get_world_size(process_group))
    engine.options = dict(options or {})
    return engine


@torch.no_grad()
def broadcast_parameters(params, src: int = 0, process_group=None) -> None:
    """Copy ``params`` from rank ``src`` (a global rank) to every rank of ``process_group``.

    ``params``: a module (its parameters and buffers) or an iterable of tensors. What
    DistributedDataParallel's constructor does; call it once before training when the
    GradAccumulator, not DDP, all-reduces the gradients. One ``broadcast`` per tensor.
    """
    if isinstance(params, torch.nn.Module):
        tensors = list(params.parameters()) + list(params.buffers())
    elif isinstance(params, torch.Tensor):
        tensors = [params]
    else:
        tensors = list(params)
    d = dist()
    for t in tensors:
        d.broadcast(t.detach(), src=src, group=process_group)
