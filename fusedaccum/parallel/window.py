"""``Window``: everything the micro-batches of the current window left for the step, in one object.

A window's state used to be scattered (the unsynced flag set on a clean exit only and not
saved, the loss sums carried across a resume kept beside the signals, the counts here), and
every scattered field was one more thing a checkpoint or an exception could forget. Here each
field is either saved (``SAVED``: its state-dict key) or transient (``TRANSIENT``: rebuilt
by the step), and ``tests/test_window_state.py`` fails when a new field is neither, so a
checkpoint cannot silently drop part of a window.
"""

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["SAVED", "TRANSIENT", "Window"]


@dataclass
class Window:
    """The current window (host values, and device tensors that are only summed, never read)."""

    micro: int = 0  # micro-batches accumulated (a host int: no sync)
    items_given: "bool | None" = None  # whether num_items came with the micro-batches
    items_host: float = 0  # Python-number part of the items
    items_dev: "torch.Tensor | None" = None  # device part (fp64 0-d), summed without sync
    # The buckets hold sums that nobody all-reduced yet: a micro-batch's backward ran under a
    # wrapper's no_sync() (or FSDP2's set_requires_gradient_sync(False)) and no synchronising
    # backward followed. Set as soon as such a backward has run (``add_micro_batch``), so an
    # exception after it, caught by the loop, cannot hide it from ``step(force=True)``.
    unsynced: bool = False
    # fp64 [Σ loss, Σ |g_s|²·scale², Σ 1/b_s, n] of the micro-batches accumulated before the
    # last load_state_dict (their per-micro-batch records are not in the checkpoint).
    carried: "torch.Tensor | None" = None
    # The loss scale every micro-batch of the window was scaled with (a 0-d fp32 device copy of the
    # scaler's at the window's first backward; None without a scaler): the step unscales with it, so a
    # scaler shared with another accumulator may back off mid-window (``scaler.window_scale``).
    scale: "torch.Tensor | None" = None
    # Transient: backwards of the open micro-batch so far (``backward(..., end_micro_batch=False)``);
    # ``step`` and ``state_dict`` refuse while it is not 0.
    parts: int = 0
    # Transient: whether the micro-batch context now open runs without a gradient sync (None:
    # no accumulate() context is open); set by the engines' micro_batch contexts.
    context_unsynced: "bool | None" = None
    # Transient: the window's signals (fusedaccum.signals: loss, noise-scale sums, micro-batches),
    # fp64 on the device, set at the step: global_normalizer makes them global with the count.
    signals: "torch.Tensor | None" = None

    def items(self):
        """The window's own item count (None without num_items)."""
        if not self.items_given:
            return None
        return self.items_host if self.items_dev is None else self.items_dev + self.items_host

    def add_micro_batch(self, given: bool, host_items, dev_items, ends: bool = True) -> None:
        """A micro-batch's backward has run and its gradient is in the buckets (``ends``: the
        micro-batch's last backward; its earlier parts add their items but count no micro-batch)."""
        self.micro += 1 if ends else 0
        self.parts = 0 if ends else self.parts + 1
        self.items_given = given
        self.items_host += host_items
        if dev_items is not None:
            self.items_dev = dev_items if self.items_dev is None else self.items_dev + dev_items
        if self.context_unsynced is not None:
            self.unsynced = self.context_unsynced

    def sums(self, live: torch.Tensor) -> torch.Tensor:
        """The window's signal sums: ``live`` (this session's micro-batches) plus the carried ones."""
        return live if self.carried is None else live + self.carried

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, live_sums, buckets) -> dict:
        """The saved fields under their state-dict keys; ``live_sums``: a callable giving
        this session's signal sums (fp64, 4 elements), ``buckets``: the fp32 sums."""
        mid = self.micro > 0
        return {
            "micro_batches": self.micro,
            "items_given": self.items_given,
            "items_host": self.items_host,
            "items_device": None if self.items_dev is None else self.items_dev.clone(),
            "unsynced": self.unsynced,
            # Mid-window the fp32 sums are the whole gradient state (landing buffers are zero then).
            "buckets": [b.clone() for b in buckets] if mid else None,
            "sums": self.sums(live_sums()).clone() if mid else None,
            # The scale the sums carry: a scaler shared with another accumulator may have moved since.
            "window_scale": float(self.scale) if mid and self.scale is not None else None,
        }

    @staticmethod
    def check_state(state: dict, max_micro: int, numels, check_host_items) -> None:
        """Raise, changing nothing, unless ``state`` (``state_dict``'s keys; ``unsynced`` and
        ``sums`` may be missing: older versions) is a window this accumulator can hold."""
        micro = state["micro_batches"]
        if isinstance(micro, bool) or not isinstance(micro, numbers.Integral) or not 0 <= micro <= max_micro:
            raise ValueError(f"micro_batches={micro!r} in the state dict; expected 0..{max_micro}")
        buckets = state["buckets"]
        if micro > 0:
            if buckets is None or len(buckets) != len(numels):
                raise ValueError("the state dict holds a partial window but not its bucket contents")
            for i, (t, n) in enumerate(zip(buckets, numels)):
                if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1 or t.numel() != n:
                    raise ValueError(f"state dict bucket {i} is not a 1-D fp32 tensor of {n} elements")
        items_dev = state["items_device"]
        if items_dev is not None and (not isinstance(items_dev, torch.Tensor) or items_dev.numel() != 1):
            raise ValueError("items_device in the state dict must be None or a one-element tensor")
        if state["items_given"] not in (None, True, False):
            raise ValueError(f"items_given={state['items_given']!r} in the state dict; expected a bool or None")
        check_host_items(state["items_host"])
        if state.get("unsynced", False) not in (True, False):
            raise ValueError(f"unsynced={state['unsynced']!r} in the state dict; expected a bool")
        scale = state.get("window_scale")  # absent before version 3
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                                  or not 0 < scale < math.inf):
            raise ValueError(f"window_scale={scale!r} in the state dict; expected a finite number > 0 or None")
        sums = state.get("sums")
        if sums is not None and (not isinstance(sums, torch.Tensor) or sums.numel() != 4):
            raise ValueError("the state dict's signals must be a dict with a 4-element 'sums' tensor (or None) "
                             "and 'noise'")

    @classmethod
    def from_state(cls, state: dict, device, scale: "torch.Tensor | None" = None) -> "Window":
        """The window of a state checked by ``check_state``; ``scale``: a fresh copy of the
        scaler's scale (``scaler.window_scale``; None without a scaler), set to the saved one."""
        micro = int(state["micro_batches"])
        items_dev = state["items_device"]
        sums = state.get("sums")
        return cls(micro=micro, items_given=state["items_given"] if micro > 0 else None,
                   items_host=state["items_host"],
                   items_dev=None if items_dev is None else items_dev.to(device, torch.float64).reshape(()),
                   unsynced=bool(state.get("unsynced", False)) and micro > 0,
                   carried=None if sums is None or micro == 0 else sums.to(device, torch.float64).reshape(4).clone(),
                   scale=_saved_scale(scale, state.get("window_scale")) if micro > 0 else None)


def _saved_scale(scale, saved):
    if scale is not None and saved is not None:
        scale.fill_(saved)
    return scale


#: the fields a checkpoint holds (field -> state-dict key) and those the step rebuilds
SAVED = {"micro": "micro_batches", "items_given": "items_given", "items_host": "items_host",
         "items_dev": "items_device", "unsynced": "unsynced", "carried": "sums", "scale": "window_scale"}
TRANSIENT = frozenset({"context_unsynced", "signals", "parts"})
assert set(SAVED) | TRANSIENT == {f.name for f in dataclasses.fields(Window)}, "classify every Window field"
