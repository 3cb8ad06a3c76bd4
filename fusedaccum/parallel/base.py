"""The interface every data-parallel engine answers, and what the engines share.

``GradAccumulator`` drives one window of micro-batches; what differs between one process, a
process group, DistributedDataParallel and FSDP2 is a fixed set of questions, each answered
by one ``Engine`` object (one module per engine in this package):

- ``adopt(model, params)``: a model was shown to the accumulator (its constructor, or
  ``accumulate``); the engine that drives the window from now on (itself, or another), after
  checking, before anything changes, that it can;
- ``micro_batch(model, window, sync=..., lowp=...)``: the context a micro-batch's forward and
  backward run in (``no_sync()`` for a data-parallel wrapper, ...);
- ``reduce(accums, window, force, device)``: at the step, before the norm: the collectives
  that make the buckets and the normalizer global; returns ``(denom, items)``, the number the
  window's sums are divided by (the "normalizer": a host number or a 0-d fp64 device tensor)
  and the item count ``StepResult.num_items`` reports;
- ``reduce_partials``: how the norm's per-program partials become global (a callable, see
  ``fusedaccum.ops._unscale_clip_stats``), or None when the buckets are global already.

No host sync anywhere: counts are all-reduced on the device, collectives launched
asynchronously and waited on (on CUDA/NCCL ``wait()`` orders the streams, the host does not block).
"""

import contextlib

import torch

from .window import Window

__all__ = ["Engine", "Window", "all_reduce_async", "check_process_group", "dist", "local_normalizer",
           "global_normalizer"]


def dist():
    import torch.distributed

    return torch.distributed


def check_process_group(process_group) -> None:
    """``process_group`` must be None (auto), False (never communicate) or a ProcessGroup."""
    if process_group is None or process_group is False:
        return
    if not dist().is_available() or not isinstance(process_group, dist().ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, None (the default group when "
                        f"torch.distributed is initialized) or False (no communication), got "
                        f"{type(process_group).__name__}")


def all_reduce_async(tensors, group) -> list:
    """Launch ``all_reduce(SUM)`` on every tensor at once; returns the work handles.
    (Through the module attribute, so that a wrapped ``dist.all_reduce`` sees every call.)"""
    d = dist()
    return [d.all_reduce(t, op=d.ReduceOp.SUM, group=group, async_op=True) for t in tensors]


def local_normalizer(window: Window):
    """The window's own count: micro-batches, or items (host number or 0-d fp64 tensor)."""
    if not window.items_given:
        return window.micro
    return window.items()


def global_normalizer(window: Window, group, world_size: int, force: bool, device):
    """The window's count over all ranks: (0-d fp64 device tensor, work handles to wait on).

    Always all-reduced, whatever ``force`` is: ranks may close a window differently (one a
    full window with ``step()``, another a short one with ``step(force=True)``, as uneven data
    gives), and the decision to communicate must depend only on what every rank shares; every
    rank then divides by the same global count. No host sync. ``window.signals`` ride in the
    same all-reduce (one fp64 vector ``[count, signals...]``) and become global in place."""
    del force  # rank-local: it must not decide a collective, nor the count
    host = window.items_host if window.items_given else window.micro
    count = torch.full((1,), host, dtype=torch.float64, device=device)
    if window.items_given and window.items_dev is not None:
        count += window.items_dev
    if window.signals is not None:
        count = torch.cat([count, window.signals])
        window.signals = count[1:]  # a view: global once the all-reduce is waited on
    works = all_reduce_async([count], group)
    return count[0], works


def wait(works) -> None:
    for work in works:
        work.wait()


class Engine:
    """One data-parallel engine (see the module docstring). This base is "nobody communicates"
    with the generic micro-batch context; subclasses answer differently."""

    #: how the norm's partials become global; None: the buckets are already global
    reduce_partials = None
    group = None
    world_size = 1

    @property
    def communicates(self) -> bool:
        return self.world_size > 1

    @property
    def reduces_locally(self) -> bool:
        """Whether ``reduce`` leaves the buckets as the last backward left them and divides by the
        window's own count (``local_normalizer``): then the norm partials taken in the window's last
        accumulate pass are the step's (``fusedaccum._last_pass``)."""
        return False

    #: the ``process_group`` argument the engine was built from (None: chosen automatically)
    process_group = None
    #: the accumulator's engine options (``fsdp_sync``), handed to a wrapper's engine
    options: dict = {}

    def adopt(self, model, params) -> "Engine":
        """The engine after ``model`` was shown; raises (changing nothing) when it cannot be.
        A data-parallel wrapper (DDP, an FSDP2 module) brings its own engine: ``hand_over``."""
        from . import WRAPPERS

        for cls in WRAPPERS:
            if cls.wraps(model):
                return self.hand_over(cls, model, params)
        return self

    def hand_over(self, cls, model, params) -> "Engine":
        """Give the window to ``cls``'s engine for the wrapper ``model``. ``cls.check`` refuses
        when this engine was built with an explicit ``process_group`` (two owners)."""
        cls.check(model, params, self.process_group, self.options)
        return cls(model, self.options)

    def start_window(self, buckets) -> None:
        """A window's first micro-batch is about to run (before its backward)."""
        if buckets.sharded:
            raise RuntimeError(
                "this GradAccumulator's parameters are DTensors (FSDP2 shards) but no FSDP2 model was shown to "
                "it: nothing would make their norm global, and a process-group all-reduce would add different "
                "shards together. Build GradAccumulator(fsdp_model, ...) or run each micro-batch in "
                "accumulate(fsdp_model)")

    def discard(self) -> None:
        """``discard_window()``: drop whatever the engine holds of the window besides the buckets."""

    def syncs_in_backward(self, needs_small_batch: bool) -> bool:
        """Whether a window's last micro-batch may run with a wrapper's reduction in its backward;
        ``needs_small_batch``: the noise statistics need the unreduced buckets of a K = 1 window.
        Decided from what every rank shares (K, the settings, the engine)."""
        return True

    def check_saveable(self, window: Window) -> None:
        """``state_dict()`` mid-window: raise if the buckets do not hold the whole window."""

    @contextlib.contextmanager
    def micro_batch(self, model, window: Window, *, sync: bool, lowp: bool):
        """A model with ``no_sync()`` (DDP, or a wrapper like it) runs every micro-batch but the
        synchronising one (``sync``) under it, so its gradients are reduced once per window;
        not when bf16/fp16 gradients move out of ``param.grad`` after each backward (a
        reduction skipped then could not be caught up)."""
        no_sync = getattr(model, "no_sync", None)
        unsynced = not (sync or not callable(no_sync) or lowp)
        # The window records the mode when the micro-batch's backward has run (Window.add_micro_batch):
        # an exception after acc.backward cannot lose it, one before it changes nothing.
        window.context_unsynced = unsynced
        try:
            with no_sync() if unsynced else contextlib.nullcontext():
                yield
        finally:
            window.context_unsynced = None

    def reduce(self, accums, window: Window, force: bool, device):
        raise NotImplementedError

    def check_synced(self, window: Window) -> None:
        if window.unsynced:
            raise RuntimeError(
                "the last micro-batch of this window ran under model.no_sync() of a model that is not a "
                "DistributedDataParallel shown to this GradAccumulator, so nobody all-reduced the window's "
                "gradients; use accumulate(model, sync=True) on the last micro-batch of a partial window")
