"""The demo's memory column: persistent training state plus the transient peak of one window,
measured (CUDA's allocator statistics; on the CPU the profiler's allocation events)."""

import copy
import os
import warnings

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _persistent_bytes(trainer):
    """Bytes of parameters, gradients, optimizer state and accumulation buckets (each storage once)."""
    tensors = []
    for p in trainer.model.parameters():
        tensors += [p, p.grad]
    for state in trainer.opt.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    acc = getattr(trainer, "acc", None)
    if acc is not None:
        for b in acc.buckets:
            tensors += [b.accum, b.landing]
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _transient_peak_bytes(fn, device):
    """Peak bytes allocated above the starting point while fn() runs (None if unmeasurable)."""
    if device.type == "cuda":
        _sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    # CPU: the profiler records every allocation and free; fold them in time order.
    from torch.profiler import ProfilerActivity, profile

    saved_fd = os.dup(2)  # kineto prints its start/stop lines on the C-level stderr
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # noqa: BLE001 - a profiler that cannot run leaves the column empty
        return None
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def _peak_memory(method, init, x, y, schedule, k, device):
    """Persistent state plus the transient peak of one window (the third, after warm-up)."""
    trainer = method(copy.deepcopy(init), k)
    windows = schedule[0]
    warm = min(2, len(windows) - 1)
    trainer.epoch(x, y, windows[:warm], [])  # optimizer state now exists
    transient = _transient_peak_bytes(lambda: trainer.epoch(x, y, windows[warm:warm + 1], []), device)
    if transient is None:
        return None
    return _persistent_bytes(trainer) + transient
