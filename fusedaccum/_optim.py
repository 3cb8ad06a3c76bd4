"""How ``GradAccumulator.step`` calls the optimizer: on the device when it can, with one
documented host sync otherwise, and which optimizers it accepts."""

import inspect
import weakref

import torch

__all__ = ["Fold", "OptimizerMemo", "check_optimizer", "optimizer_step", "window_step"]


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


# torch's optimizers whose fused kernels divide every gradient by ``grad_scale`` in registers,
# write the quotient back to ``.grad`` and leave params, state and step count as they were when
# ``found_inf`` is 1 (ATen FusedAdamKernel, FusedSGDKernel, FusedAdagradKernel; fused_adam_utils.cuh).
# Exact types: a subclass may override step() and ignore the two attributes.
FOLD_TYPES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
# The devices whose fused kernels read grad_scale and found_inf (MPS ignores both).
FOLD_DEVICES = ("cuda", "cpu", "xpu")


class Fold:
    """Whether a window's multiplier can go to the optimizer instead of the apply pass.

    It can when every parameter is an fp32 plain tensor on a device in ``FOLD_DEVICES``
    (bf16/fp16 need the apply pass to round into their landing bucket, and the store-overflow
    check is about that rounding; DTensor shards are left to the apply pass), the optimizer is
    exactly one of ``FOLD_TYPES`` with ``fused=True`` in every param group, and it steps every
    parameter of the accumulator (else the ones it leaves would keep the raw sum in ``.grad``)."""

    def __init__(self, params, device: torch.device):
        from ._dtensor import is_dtensor

        self._possible = device.type in FOLD_DEVICES and all(
            p.dtype == torch.float32 and not is_dtensor(p) for p in params)
        self._ids = {id(p) for p in params}
        self._covers = OptimizerMemo()

    def __call__(self, optimizer) -> bool:
        if not (self._possible and type(optimizer) in FOLD_TYPES
                and all(g.get("fused") for g in optimizer.param_groups)):
            return False
        covers = self._covers.get(optimizer)
        if covers is None:
            covers = self._ids <= {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._covers.set(optimizer, covers)
        return covers


def optimizer_step(optimizer, found_inf: torch.Tensor, coef: "torch.Tensor | None" = None) -> None:
    """``optimizer.step()`` unless ``found_inf``: decided on the device for fused optimizers
    whose state exists, with one ``found_inf.item()`` otherwise. ``coef`` (a ``Fold``
    optimizer only): the gradients still hold the raw sums, and the optimizer multiplies them
    by ``coef`` (divides by ``grad_scale = 1 / coef``) on its way, writing the result back."""
    # 1 / coef in fp32, as GradScaler's grad_scale: coef = 0 (max_norm = 0) gives inf, and
    # g / inf = 0 with g's sign, as g * 0. A coef below 2**-128 (1 / coef beyond fp32) flushes
    # the gradient to 0 where the apply pass would give |g| * coef (docs/kernels.md, "The fold").
    grad_scale = None if coef is None else coef.reciprocal()
    if (getattr(optimizer, "_step_supports_amp_scaling", False) and not takes_grad_scaler(optimizer)
            and state_survives_device_skip(optimizer)):
        # torch.amp.GradScaler's contract for fused optimizers: grad_scale divides the
        # gradients (None: already unscaled); found_inf makes the kernel skip the update,
        # and undo its step count, on the device.
        optimizer.grad_scale = grad_scale
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
            del optimizer.found_inf
    elif not found_inf.item():  # the one host sync per optimizer step, documented in GradAccumulator.step
        if grad_scale is None:
            optimizer.step()
            return
        optimizer.grad_scale = grad_scale  # state missing: the skip was decided on the host
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale


def window_step(optimizer, stats: torch.Tensor, owed, fold: Fold, synced) -> None:
    """The step of a closed window whose apply pass ``owed`` (a callable, run at most once:
    ``ops.OwedApply``) has not run yet: handed to a ``fold`` optimizer as its ``grad_scale``,
    else run here, then ``synced()`` (the accumulator wrote its buckets itself)."""
    folded = owed.pending and fold(optimizer)
    if owed.pending and not folded:
        owed()
        synced()
    optimizer_step(optimizer, stats[1], stats[2] if folded else None)
