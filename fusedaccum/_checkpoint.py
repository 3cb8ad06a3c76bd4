"""``GradAccumulator.state_dict`` / ``load_state_dict``: the partial window and the scaler."""

import numbers

import torch

from .parallel import Window

__all__ = ["load_state", "save_state"]

_STATE_VERSION = 1


def save_state(acc) -> dict:
    if acc._processed is not None:
        raise RuntimeError("step() processed this window's gradient but optimizer.step() raised: call "
                           "step(optimizer) again to finish the window before saving")
    win = acc._win
    mid_window = win.micro > 0
    return {
        "version": _STATE_VERSION,
        "accumulation_steps": acc.accumulation_steps,
        "micro_batches": win.micro,
        "items_given": win.items_given,
        "items_host": win.items_host,
        "items_device": None if win.items_dev is None else win.items_dev.clone(),
        "bucket_layout": [(str(b.dtype), b.numel) for b in acc.buckets],
        # Mid-window the fp32 sums are the whole state (landing buffers are zero then);
        # between windows the buckets are reset before the next window accumulates.
        "buckets": [b.accum.clone() for b in acc.buckets] if mid_window else None,
        "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
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
    if state_dict["version"] != _STATE_VERSION:
        raise ValueError(f"GradAccumulator state dict version {state_dict['version']!r}; "
                         f"this fusedaccum reads version {_STATE_VERSION}")
    layout = [(str(b.dtype), b.numel) for b in acc.buckets]
    saved_layout = [tuple(x) for x in state_dict["bucket_layout"]]
    if saved_layout != layout:
        raise ValueError(f"the state dict's buckets {saved_layout} do not match this GradAccumulator's "
                         f"{layout} (different parameters?)")
    micro = state_dict["micro_batches"]
    if (isinstance(micro, bool) or not isinstance(micro, numbers.Integral)
            or not 0 <= micro <= acc.accumulation_steps):
        raise ValueError(f"micro_batches={micro!r} in the state dict; expected 0..{acc.accumulation_steps}")
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

    if acc.scaler is not None:
        acc.scaler.load_state_dict(state_dict["scaler"])  # validates before it changes anything
    acc._reset_window()
    with torch.no_grad():
        if micro > 0:
            for t, b in zip(buckets, acc.buckets):
                b.accum.copy_(t)
                if b.landing is not None:
                    b.landing.zero_()
    acc._win = Window(micro=int(micro), items_given=state_dict["items_given"] if micro > 0 else None,
                      items_host=state_dict["items_host"],
                      items_dev=None if items_dev is None else items_dev.to(acc.device, torch.float64).reshape(()))
