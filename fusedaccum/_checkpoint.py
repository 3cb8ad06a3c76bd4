"""``GradAccumulator.state_dict`` / ``load_state_dict``: the partial window and the scaler."""

import dataclasses
import numbers
import warnings

import torch

from .parallel import Window
from .scaler import window_scale
from .signals import StepsChange

__all__ = ["load_state", "save_state"]

# 2 adds "param_shapes"; 3 adds "unsynced" (and the signal sums carried across a resume are
# saved again when the window is saved again). Versions 1 and 2 still load.
_STATE_VERSION = 3
_VERSIONS = (1, 2, _STATE_VERSION)


def save_state(acc) -> dict:
    if acc._processed is not None:
        raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                           "step(optimizer) again to finish the window before saving")
    win = acc._win
    acc._engine.check_saveable(win)
    # Everything the window is comes from Window.state_dict (one object, so no field is forgotten);
    # its signal sums keep their version-2 place.
    window = win.state_dict(lambda: acc._signals.local_sums(acc.device), [b.accum for b in acc.buckets])
    sums = window.pop("sums")
    acc._guard.saved()  # a window left open after this is not lost: no OpenWindowWarning
    return {
        "version": _STATE_VERSION,
        "accumulation_steps": acc.accumulation_steps,
        **window,
        "bucket_layout": [(str(b.dtype), b.numel) for b in acc.buckets],
        "param_shapes": _param_shapes(acc),
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        "signals": {"sums": sums, "noise": acc._signals.state_dict()},
        "used_params": acc._usage.state_dict() if win.micro > 0 else None,  # which got a gradient so far
        "steps_changes": [dataclasses.asdict(c) for c in acc.accumulation_steps_changes],
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
    if state_dict["version"] not in _VERSIONS:
        raise ValueError(f"GradAccumulator state dict version {state_dict['version']!r}; "
                         f"this fusedaccum reads versions {', '.join(map(str, _VERSIONS))}")
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
    signals = state_dict.get("signals")  # absent in state dicts saved before the signals existed
    if signals is not None and (not isinstance(signals, dict) or set(signals) != {"sums", "noise"}):
        raise ValueError("the state dict's signals must be a dict with a 4-element 'sums' tensor (or None) "
                         "and 'noise'")
    window = {key: state_dict[key] for key in ("micro_batches", "items_given", "items_host", "items_device",
                                               "buckets")}
    window["unsynced"] = state_dict.get("unsynced", False)  # version < 3: not recorded
    window["sums"] = None if signals is None else signals["sums"]
    window["window_scale"] = state_dict.get("window_scale")  # version < 3: not recorded
    Window.check_state(window, k, [b.numel for b in acc.buckets], check_host_items)
    if signals is not None and tracker is not None and signals["noise"] is not None:
        type(tracker).check_state(signals["noise"])
    if (state_dict["scaler"] is None) != (acc.scaler is None):
        raise ValueError("the state dict was saved " + ("with" if acc.scaler is None else "without") +
                         " a scaler but this GradAccumulator has " + ("none" if acc.scaler is None else "one"))
    acc._usage.check_state(state_dict.get("used_params"))
    saved_k = state_dict.get("accumulation_steps", acc.accumulation_steps)
    if micro > 0 and saved_k != k:
        warnings.warn(f"the state dict was saved with accumulation_steps={saved_k} and holds {micro} micro-batch(es); "
                      f"this GradAccumulator closes the window at {acc.accumulation_steps}: the window is normalized "
                      "by the micro-batches (or items) it really holds, so the step is exact, only the window is "
                      "longer or shorter", UserWarning, stacklevel=3)
    elif saved_k != k:
        warnings.warn(f"the state dict was saved with accumulation_steps={saved_k}; this GradAccumulator keeps its "
                      f"own accumulation_steps={k} (set acc.accumulation_steps to change it)", UserWarning, stacklevel=3)
    changes = _steps_changes(state_dict.get("steps_changes"))

    if acc.scaler is not None:
        acc.scaler.load_state_dict(state_dict["scaler"])  # validates before it changes anything
    acc._reset_window()
    with torch.no_grad():
        if micro > 0:
            for t, b in zip(window["buckets"], acc.buckets):
                b.accum.copy_(t)
                if b.landing is not None:
                    b.landing.zero_()
    acc._signals.load_state_dict(None if signals is None else signals["noise"], micro > 0, acc.device)
    acc._usage.load_state_dict(state_dict.get("used_params") if micro > 0 else None)
    if changes is not None and tracker is not None:
        tracker.changes = changes
    acc._k = int(k)
    acc._win = Window.from_state(window, acc.device, window_scale(acc.scaler, acc.device))


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
