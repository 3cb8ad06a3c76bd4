"""How ``GradAccumulator.step`` calls the optimizer: on the device when it can, with one
documented host sync otherwise, and which optimizers it accepts."""

import inspect
import weakref

import torch

__all__ = ["OptimizerMemo", "check_optimizer", "optimizer_step"]


class OptimizerMemo:
    """A value per optimizer and param-group layout, forgotten with the optimizer.

    Keyed by weak reference, not ``id()``: a new optimizer that reuses a dead one's address
    would inherit its entry (a direct ``opt.step()`` mid-window then slipped past the guard).
    The layout is kept as the param lists themselves, compared by identity, for the same
    reason: a new list can reuse a dead one's address. An optimizer that cannot be weakly
    referenced (or hashed) is never memoised: it is checked every time."""

    def __init__(self):
        self._entries = weakref.WeakKeyDictionary()

    def get(self, optimizer, default=None):
        try:
            entry = self._entries.get(optimizer)
        except TypeError:
            return default
        if entry is None:
            return default
        layout, value = entry
        groups = optimizer.param_groups
        if len(layout) != len(groups) or any(lst is not g["params"] or n != len(lst)
                                             for (lst, n), g in zip(layout, groups)):
            return default
        return value

    def set(self, optimizer, value) -> None:
        layout = tuple((g["params"], len(g["params"])) for g in optimizer.param_groups)
        try:
            self._entries[optimizer] = (layout, value)
        except TypeError:
            pass

    def __len__(self) -> int:
        return len(self._entries)


def check_optimizer(optimizer, param_ids: set, checked: OptimizerMemo) -> None:
    """Every trainable parameter the optimizer steps must be one of ``param_ids``
    (memoised in ``checked`` per optimizer and param-group layout)."""
    if not callable(getattr(optimizer, "step", None)) or not hasattr(optimizer, "param_groups"):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    groups = optimizer.param_groups
    if checked.get(optimizer, False):
        return
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            if p.requires_grad and id(p) not in param_ids:
                raise ValueError(
                    f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}, {p.dtype}) "
                    "is not managed by this GradAccumulator: its gradient would be neither accumulated "
                    "nor normalized; build the GradAccumulator over the same parameters")
    checked.set(optimizer, True)


def state_survives_device_skip(optimizer) -> bool:
    """Whether a step that a fused optimizer skips on the device leaves its state as it was.

    A fused optimizer creates a parameter's state in the first step that sees its gradient,
    and SGD(fused=True, momentum != 0) creates momentum buffers uninitialised (empty_like):
    a skipped step would leave garbage that the next step reads (torch.amp.GradScaler has
    the same hole). So every parameter with a gradient must already have its state; until
    then, the caller syncs instead. SGD keeps no state without momentum, and needs none."""
    sgd = isinstance(optimizer, torch.optim.SGD)
    return all(optimizer.state.get(p) or p.grad is None
               for group in optimizer.param_groups if not (sgd and group.get("momentum", 0) == 0)
               for p in group["params"])


_GRAD_SCALER_KWARG: dict = {}


def takes_grad_scaler(optimizer) -> bool:
    """Optimizers with the older ``step(grad_scaler=...)`` contract expect a GradScaler object;
    they get the synchronous path instead."""
    cls = type(optimizer)
    if cls not in _GRAD_SCALER_KWARG:
        try:
            _GRAD_SCALER_KWARG[cls] = "grad_scaler" in inspect.signature(optimizer.step).parameters
        except (TypeError, ValueError):
            _GRAD_SCALER_KWARG[cls] = False
    return _GRAD_SCALER_KWARG[cls]


def optimizer_step(optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf``: decided on the device for fused optimizers
    whose state exists, with one ``found_inf.item()`` otherwise."""
    if (getattr(optimizer, "_step_supports_amp_scaling", False) and not takes_grad_scaler(optimizer)
            and state_survives_device_skip(optimizer)):
        # torch.amp.GradScaler's contract for fused optimizers: the gradients are already
        # unscaled (grad_scale None); found_inf makes the kernel skip the update, and
        # undo its step count, on the device.
        optimizer.grad_scale = None
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
    elif not found_inf.item():  # the one host sync per optimizer step, documented in GradAccumulator.step
        optimizer.step()
