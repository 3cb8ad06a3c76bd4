"""Dynamic loss scaling with the scale kept on the device.

``LossScaler`` follows ``torch.amp.GradScaler``'s arithmetic and checkpoint format, but does
no unscaling of its own: ``GradAccumulator.step`` folds ``1 / scale`` into the fused
unscale-and-clip pass and hands the device-side ``found_inf`` flag to ``update``.
Nothing on that path reads a value on the host.
"""

import math
import numbers

import torch

from ._store_watch import StoreOverflowWatch

__all__ = ["LossScaler"]

# GradScaler.state_dict()'s keys, in its order.
STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _update_scale_where(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
    """``torch._amp_update_scale_`` written with ``torch.where``: same results, no host sync.

    Used where that op has no kernel for the device (torch builds before CPU support). The
    product is taken in fp64 and rounded to fp32 once, as the ATen kernel does
    (``static_cast<float>(float * double)``), so both give the same bits.
    """
    bad = found_inf > 0
    successful = growth_tracker + 1
    grow = (~bad) & (successful == growth_interval)
    grown = (scale.double() * growth_factor).float()
    grown = torch.where(torch.isfinite(grown), grown, scale)  # never grow into inf
    backed_off = (scale.double() * backoff_factor).float()
    scale.copy_(torch.where(bad, backed_off, torch.where(grow, grown, scale)))
    growth_tracker.copy_(torch.where(bad | grow, torch.zeros_like(successful), successful))
    return scale


_NATIVE_UPDATE_MISSING: set = set()  # device types where torch._amp_update_scale_ has no kernel


def _update_scale_(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
    device_type = scale.device.type
    if device_type not in _NATIVE_UPDATE_MISSING and hasattr(torch, "_amp_update_scale_"):
        try:
            return torch._amp_update_scale_(scale, growth_tracker, found_inf, growth_factor,
                                            backoff_factor, growth_interval)
        except (NotImplementedError, RuntimeError) as exc:
            if "not implemented" not in str(exc).lower() and "could not run" not in str(exc).lower():
                raise
            _NATIVE_UPDATE_MISSING.add(device_type)
    return _update_scale_where(scale, growth_tracker, found_inf, growth_factor, backoff_factor,
                               growth_interval)


class LossScaler:
    """Dynamic loss scaling, the scale and growth tracker kept as device tensors.

    ``scale(loss)`` multiplies by the current scale; ``update(found_inf)`` backs the scale off
    by ``backoff_factor`` when ``found_inf`` (a 0-d device tensor, nonzero when the window's
    gradients held inf/NaN) and multiplies it by ``growth_factor`` after ``growth_interval``
    consecutive finite windows — ``torch.amp.GradScaler``'s rule, computed on the device.

    The tensors are created on the device of the first ``scale``/``update`` call.
    ``state_dict()`` has ``GradScaler.state_dict()``'s keys and value types, so either
    loads the other's checkpoint. ``enabled=False`` makes every method a no-op and the
    scale 1 (``state_dict()`` is then ``{}``, as GradScaler's).

    Pass it to ``GradAccumulator(..., scaler=...)``, which scales each micro-batch loss and
    calls ``update`` once per optimizer step; do not call ``update`` yourself then.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        self._enabled = bool(enabled)
        if self._enabled:
            _check_config(init_scale, growth_factor, backoff_factor, growth_interval)
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._init_growth_tracker = 0
        self._scale: "torch.Tensor | None" = None
        self._growth_tracker: "torch.Tensor | None" = None
        self._store_watch = StoreOverflowWatch()

    # ------------------------------------------------------------------ device state
    def _lazy_init(self, device: torch.device) -> None:
        if self._scale is None:
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
            self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32, device=device)

    def is_enabled(self) -> bool:
        """False when built with ``enabled=False`` (every method is then a no-op), as ``GradScaler.is_enabled``."""
        return self._enabled

    def scale_tensor(self, device: "torch.device | str | None" = None) -> torch.Tensor:
        """The current scale as a 0-d fp32 tensor on ``device`` (no host sync; 1.0 when disabled).

        The scaler's own tensor when it lives on ``device`` (it changes in place at
        ``update``); otherwise a copy."""
        if not self._enabled:
            return torch.ones((), dtype=torch.float32, device=device)
        if self._scale is None:
            self._lazy_init(torch.device(device) if device is not None else torch.device("cpu"))
        if device is None or self._scale.device == torch.device(device):
            return self._scale
        return self._scale.to(device, non_blocking=True)

    def scale(self, outputs):
        """``outputs * scale`` for a tensor or a (nested) list/tuple of tensors; unchanged when disabled."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            self._lazy_init(outputs.device)
            return outputs * self._scale.to(outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"LossScaler.scale expects a tensor or a list/tuple of tensors, got {type(outputs).__name__}")

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled). Reads the device: one sync."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def update(self, found_inf, store_overflow=None) -> None:
        """Back off or grow the scale after one optimizer step, on the device (no host sync).

        ``found_inf``: 0-d tensor (nonzero: the step found inf/NaN and was skipped), or a bool.
        ``store_overflow``: None, or a 0-d tensor (the fused pass's ``stats[3]``, which
        ``GradAccumulator`` passes), nonzero when the skip came from an overflow on store
        alone: every value was finite, but the unscaled gradient exceeds the dtype it is
        stored in (fp16). A smaller scale cannot cure that, so the scale and the growth
        tracker are kept; after a few such windows in a row a ``RuntimeWarning`` says so
        (read without a sync: ``fusedaccum._store_watch``).
        """
        if not self._enabled:
            return
        if isinstance(found_inf, torch.Tensor):
            if found_inf.numel() != 1:
                raise ValueError(f"found_inf must be a one-element tensor, got shape {tuple(found_inf.shape)}")
            self._lazy_init(found_inf.device)
            # non_blocking only towards a device: a non-blocking copy into host memory could be
            # read below before it lands (a scale kept on the CPU, a flag from the GPU).
            flag = found_inf.detach().reshape(()).to(device=self._scale.device, dtype=torch.float32,
                                                     non_blocking=self._scale.device.type != "cpu")
        elif isinstance(found_inf, (bool, numbers.Real)):
            self._lazy_init(torch.device("cpu"))
            flag = torch.full((), float(bool(found_inf)), dtype=torch.float32, device=self._scale.device)
        else:
            raise TypeError(f"found_inf must be a tensor or a bool, got {type(found_inf).__name__}")
        if store_overflow is None:
            _update_scale_(self._scale, self._growth_tracker, flag, self._growth_factor, self._backoff_factor,
                           self._growth_interval)
            return
        store = store_overflow.detach().reshape(()).to(device=self._scale.device,
                                                       non_blocking=self._scale.device.type != "cpu") != 0
        kept = self._scale.clone(), self._growth_tracker.clone()
        _update_scale_(self._scale, self._growth_tracker, flag, self._growth_factor, self._backoff_factor,
                       self._growth_interval)
        self._scale.copy_(torch.where(store, kept[0], self._scale))
        self._growth_tracker.copy_(torch.where(store, kept[1], self._growth_tracker))
        self._store_watch.note(store)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """``GradScaler.state_dict()``'s format: scale, growth_factor, backoff_factor,
        growth_interval, _growth_tracker (Python numbers; reading them is one sync). ``{}``
        when disabled."""
        if not self._enabled:
            return {}
        tracker = self._init_growth_tracker if self._growth_tracker is None else int(self._growth_tracker.item())
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": tracker,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a ``LossScaler`` or ``torch.amp.GradScaler`` state dict (no-op when disabled)."""
        if not self._enabled:
            return
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if len(state_dict) == 0:
            raise RuntimeError("the state dict is empty, possibly because it was saved from a disabled "
                               "LossScaler or GradScaler")
        missing = [k for k in STATE_KEYS if k not in state_dict]
        if missing:
            raise KeyError(f"scaler state dict lacks {missing}; expected the keys {list(STATE_KEYS)}")
        _check_config(state_dict["scale"], state_dict["growth_factor"], state_dict["backoff_factor"],
                      state_dict["growth_interval"])
        tracker = state_dict["_growth_tracker"]
        if isinstance(tracker, torch.Tensor):
            tracker = int(tracker.item())
        if isinstance(tracker, bool) or not isinstance(tracker, numbers.Integral) or tracker < 0:
            raise ValueError(f"_growth_tracker must be an integer >= 0, got {tracker!r}")
        scale = float(state_dict["scale"])
        self._init_scale = scale
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(tracker)
        if self._scale is not None:
            self._scale.fill_(scale)
            self._growth_tracker.fill_(int(tracker))

    def __repr__(self) -> str:
        if not self._enabled:
            return "LossScaler(enabled=False)"
        where = "uninitialized" if self._scale is None else str(self._scale.device)
        return (f"LossScaler(growth_factor={self._growth_factor}, backoff_factor={self._backoff_factor}, "
                f"growth_interval={self._growth_interval}, device={where})")


def _check_config(init_scale, growth_factor, backoff_factor, growth_interval) -> None:
    for name, value in (("scale", init_scale), ("growth_factor", growth_factor), ("backoff_factor", backoff_factor)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not float(init_scale) > 0:
        raise ValueError(f"scale must be > 0, got {init_scale!r}")
    if not float(growth_factor) > 1.0:
        raise ValueError(f"growth_factor must be > 1.0, got {growth_factor!r}")
    if not 0.0 < float(backoff_factor) < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, numbers.Integral) or growth_interval < 1:
        raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")


def window_scale(scaler: "LossScaler | None", device) -> "torch.Tensor | None":
    """The loss scale of a window that starts now (None without active scaling): a copy of the
    scaler's, which ``update`` changes in place.

    Every micro-batch of the window is scaled with it and the step unscales with it. A scaler
    shared by two accumulators (a GAN's generator and discriminator) changes when the other one
    steps, possibly mid-way through this window; with the scale fixed at the window's first
    micro-batch its sum stays one scale times the true sum. One device copy, no host sync."""
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.scale_tensor(device).clone()


def inv_scale(scale: "torch.Tensor | None", denom):
    """1 / (scale * denom): a float, or a 0-d fp32 device tensor (no sync). ``scale``: the
    window's (``window_scale``)."""
    if scale is None and not isinstance(denom, torch.Tensor):
        return 1.0 / denom if denom else math.inf  # 0 items: a non-finite step, skipped
    if scale is not None:
        denom = scale.double() * denom
    # A window of <= 0 items (a negative device count): an inf inverse, skipped as on overflow.
    return torch.where(denom > 0, denom, 0.0).reciprocal().float()
