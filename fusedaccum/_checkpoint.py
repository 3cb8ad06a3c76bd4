"""``GradAccumulator.state_dict`` / ``load_state_dict``: the partial window and the scaler."""

import dataclasses
import math
import numbers
import warnings

import torch

from .parallel import Window
from .scaler import window_scale
from .signals import StepsChange

__all__ = ["load_state", "save_state"]

_STATE_VERSION = 2  # 2 adds "param_shapes"; version 1 state dicts still load


def save_state(acc) -> dict:
    if acc._processed is not None:
        raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                           "step(optimizer) again to finish the window before saving")
    win = acc._win
    acc._engine.check_saveable(win)
    mid_window = win.micro > 0
    acc._guard.saved()  # a window left open after this is not lost: no OpenWindowWarning
    return {
        "version": _STATE_VERSION,
        "accumulation_steps": acc.accumulation_steps,
        "micro_batches": win.micro,
        "items_given": win.items_given,
        "items_host": win.items_host,
        "items_device": None if win.items_dev is None else win.items_dev.clone(),
        "bucket_layout": [(str(b.dtype), b.numel) for b in acc.buckets],
        "param_shapes": _param_shapes(acc),
        # Mid-window the fp32 sums are the whole state (landing buffers are zero then);
        # between windows the buckets are reset before the next window accumulates.
        "buckets": [b.accum.clone() for b in acc.buckets] if mid_window else None,
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        # The scale the window's sums carry: a scaler shared with another accumulator may have moved since.
        "window_scale": float(acc._win_scale) if mid_window and acc._win_scale is not None else None,
        "steps_changes": [dataclasses.asdict(c) for c in acc.accumulation_steps_changes],
        "signals": acc._signals.state_dict(mid_window, acc.device),
    }


def load_state(acc, state_dict: dict, check_host_items) -> None:
    """Every check runs before anything changes."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    required = ("version", "micro_batches", "items_given", "items_host", "items_device", "bucket_layout",
                "buckets", "scaler")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise KeyError(f"GradAccumulator state dict lacks {missing}")
    if state_dict["version"] not in (1, _STATE_VERSION):
        raise ValueError(f"GradAccumulator state dict version {state_dict['version']!r}; "
                         f"this fusedaccum reads versions 1 and {_STATE_VERSION}")
    layout = [(str(b.dtype), b.numel) for b in acc.buckets]
    saved_layout = [tuple(x) for x in state_dict["bucket_layout"]]
    if saved_layout != layout:
        raise ValueError(f"the state dict's buckets {saved_layout} do not match this GradAccumulator's "
                         f"{layout} (different parameters?)")
    if state_dict["version"] >= 2:
        _check_param_shapes(acc, state_dict.get("param_shapes"))
    micro = state_dict["micro_batches"]
    # The accumulator's own K stays, unless an adaptive policy owns K: then it is state and
    # is restored, like the window.
    k = acc.accumulation_steps
    tracker = acc._signals.tracker
    if tracker is not None and tracker.settings.adaptive is not None:
        k = state_dict.get("accumulation_steps", k)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"accumulation_steps={k!r} in the state dict; expected an integer >= 1")
    if (isinstance(micro, bool) or not isinstance(micro, numbers.Integral)
            or not 0 <= micro <= k):
        raise ValueError(f"micro_batches={micro!r} in the state dict; expected 0..{k}")
    signals = state_dict.get("signals")  # absent in state dicts saved before the signals existed
    if signals is not None and (not isinstance(signals, dict) or set(signals) != {"sums", "noise"}
                                or (signals["sums"] is not None and (not isinstance(signals["sums"], torch.Tensor)
                                                                     or signals["sums"].numel() != 4))):
        raise ValueError("the state dict's signals must be a dict with a 4-element 'sums' tensor (or None) "
                         "and 'noise'")
    if signals is not None and tracker is not None and signals["noise"] is not None:
        type(tracker).check_state(signals["noise"])
    buckets = state_dict["buckets"]
    if micro > 0:
        if buckets is None or len(buckets) != len(layout):
            raise ValueError("the state dict holds a partial window but not its bucket contents")
        for i, (t, b) in enumerate(zip(buckets, acc.buckets)):
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1
                    or t.numel() != b.numel):
                raise ValueError(f"state dict bucket {i} is not a 1-D fp32 tensor of {b.numel} elements")
    if (state_dict["scaler"] is None) != (acc.scaler is None):
        raise ValueError("the state dict was saved " + ("with" if acc.scaler is None else "without") +
                         " a scaler but this GradAccumulator has " + ("none" if acc.scaler is None else "one"))
    items_dev = state_dict["items_device"]
    if items_dev is not None and (not isinstance(items_dev, torch.Tensor) or items_dev.numel() != 1):
        raise ValueError("items_device in the state dict must be None or a one-element tensor")
    if state_dict["items_given"] not in (None, True, False):
        raise ValueError(f"items_given={state_dict['items_given']!r} in the state dict; expected a bool or None")
    check_host_items(state_dict["items_host"])
    saved_k = state_dict.get("accumulation_steps", acc.accumulation_steps)
    if micro > 0 and saved_k != k:
        warnings.warn(f"the state dict was saved with accumulation_steps={saved_k} and holds {micro} micro-batch(es); "
                      f"this GradAccumulator closes the window at {acc.accumulation_steps}: the window is normalized "
                      "by the micro-batches (or items) it really holds, so the step is exact, only the window is "
                      "longer or shorter", UserWarning, stacklevel=3)
    elif saved_k != k:
        warnings.warn(f"the state dict was saved with accumulation_steps={saved_k}; this GradAccumulator keeps its "
                      f"own accumulation_steps={k} (set acc.accumulation_steps to change it)", UserWarning, stacklevel=3)
    saved_scale = state_dict.get("window_scale")  # absent before it was saved
    if saved_scale is not None and (isinstance(saved_scale, bool) or not isinstance(saved_scale, numbers.Real)
                                    or not 0 < saved_scale < math.inf):
        raise ValueError(f"window_scale={saved_scale!r} in the state dict; expected a finite number > 0 or None")
    changes = _steps_changes(state_dict.get("steps_changes"))

    if acc.scaler is not None:
        acc.scaler.load_state_dict(state_dict["scaler"])  # validates before it changes anything
    acc._reset_window()
    with torch.no_grad():
        if micro > 0:
            for t, b in zip(buckets, acc.buckets):
                b.accum.copy_(t)
                if b.landing is not None:
                    b.landing.zero_()
    if signals is not None:
        acc._signals.load_state_dict(signals, acc.device)
    if changes is not None and tracker is not None:
        tracker.changes = changes
    if micro > 0:
        acc._win_scale = window_scale(acc.scaler, acc.device)
        if acc._win_scale is not None and saved_scale is not None:
            acc._win_scale.fill_(saved_scale)
    acc._k = int(k)
    acc._win = Window(micro=int(micro), items_given=state_dict["items_given"] if micro > 0 else None,
                      items_host=state_dict["items_host"],
                      items_dev=None if items_dev is None else items_dev.to(acc.device, torch.float64).reshape(()))


def _steps_changes(saved) -> "list | None":
    if saved is None:
        return None
    try:
        return [StepsChange(**c) for c in saved]
    except TypeError:
        raise ValueError(f"steps_changes in the state dict must be a list of StepsChange fields, got {saved!r}") from None


def _param_shapes(acc) -> list:
    return [[list(p.shape) for p in b.params] for b in acc.buckets]


def _check_param_shapes(acc, saved) -> None:
    """The same parameters in the same order: equal element counts per bucket are not enough (a
    model with its layers swapped has them too, and its sums would load into the wrong places)."""
    ours = [tuple(s) for b in _param_shapes(acc) for s in b]
    try:
        theirs = [tuple(s) for b in saved for s in b]
    except TypeError:
        raise ValueError(f"param_shapes in the state dict must be a list of lists of shapes, got {saved!r}") from None
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            raise ValueError(f"the state dict's parameter {i} has shape {a}, this GradAccumulator's parameter {i} "
                             f"{b}: it was saved for other parameters, or in another order")
    if len(theirs) != len(ours):
        raise ValueError(f"the state dict holds {len(theirs)} parameters, this GradAccumulator {len(ours)}")
