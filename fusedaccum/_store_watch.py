"""Say so when steps keep being skipped for an overflow on store, without a host sync per step.

An overflow on store (docs/numerics.md, rule 3) means the window's unscaled gradient does not
fit the dtype it is stored in (fp16 from 65,520): every value is finite in fp32, so no loss
scale cures it, and the same data skips every window. ``LossScaler.update`` keeps the scale
for such a window and hands the flag to a ``StoreOverflowWatch``, which counts consecutive
store-overflow windows on the device and warns once a streak reaches ``WARN_AFTER``.

Reading the count must not stall the step: on the CPU the value is host memory already; on an
accelerator each update starts a non-blocking copy into pinned host memory and records an
event, and a later update reads that copy only once ``event.query()`` says it has landed
(``query`` does not wait). The warning therefore comes a window or two after the streak
reaches ``WARN_AFTER``, never at the cost of a sync.
"""

import warnings

import torch

__all__ = ["StoreOverflowWatch", "WARN_AFTER"]

WARN_AFTER = 3  # consecutive windows; one can be a spike, three is data that does not fit

MESSAGE = ("{n} consecutive windows were skipped for an overflow on store: the window's unscaled gradient "
           "exceeds the range of the dtype it is stored in (fp16: 65504), and no loss scale can cure that "
           "(the scale is kept). Training makes no progress until it fits: clip with max_norm < 65504 "
           "(GradAccumulator(max_norm=...)) or keep fp32 master weights")


class StoreOverflowWatch:
    """Counts consecutive store-overflow windows on the device; warns (``RuntimeWarning``)
    once per streak of ``WARN_AFTER`` or more, reading the count without a sync."""

    def __init__(self, warn_after: int = WARN_AFTER):
        self.warn_after = warn_after
        self._streak: "torch.Tensor | None" = None  # int32, on the flags' device
        self._host: "torch.Tensor | None" = None  # pinned copy of the streak (accelerators)
        self._event = None  # marks when that copy has landed
        self._warned = False  # this streak has been reported

    def note(self, store_overflow: torch.Tensor) -> None:
        """Count one window: ``store_overflow`` is a 0-d bool device tensor."""
        if self._streak is None or self._streak.device != store_overflow.device:
            self._streak = torch.zeros((), dtype=torch.int32, device=store_overflow.device)
            self._host = self._event = None
        self._streak.copy_(torch.where(store_overflow, self._streak + 1, 0))
        streak = self._read()
        if streak is None:
            return
        if streak < self.warn_after:
            self._warned = False
        elif not self._warned:
            self._warned = True
            warnings.warn(MESSAGE.format(n=streak), RuntimeWarning, stacklevel=4)

    def _read(self) -> "int | None":
        """The streak as of some recent window, or None when no copy has landed yet."""
        # Reads go through numpy(), which refuses a device tensor: by construction they read
        # host memory and can never wait for a device.
        if self._direct():
            return int(self._streak.numpy())
        value = None
        if self._event is not None and self._event.query():
            value, self._event = int(self._host.numpy()), None
        if self._event is None:
            if self._host is None:
                self._host = torch.empty((), dtype=torch.int32, pin_memory=self._streak.device.type == "cuda")
            self._host.copy_(self._streak, non_blocking=True)
            self._event = self._new_event()
            self._event.record()
        return value

    def _direct(self) -> bool:
        return self._streak.device.type == "cpu"

    def _new_event(self):
        return torch.Event(device=self._streak.device)
