"""``python -m fusedaccum bench --profile``: torch.profiler tables of one window step."""

from __future__ import annotations

import torch

import fusedaccum
from fusedaccum import _backend

from .cases import WINDOW_K
from .layouts import LIST_LAYOUTS, split_sizes
from .machine import device_name, wait_quiet
from .workloads import MAX_NORM, NullOptimizer, _dt, _InjectGrads, _randn


def window_cases(device: torch.device, n: int, k: int) -> "tuple[list, list]":
    """(sizes, [(title, one window step)]): GradAccumulator with fp32 and bf16 parameters (or
    the primitives, where there is no GradAccumulator), and the PyTorch loop, GPT-2-small layout."""
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    grads = list(_randn(n, torch.float32, device).split(sizes))
    cases = []
    if hasattr(fusedaccum, "GradAccumulator"):
        for dtype in (torch.float32, torch.bfloat16):
            ps = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in sizes]
            gs = grads if dtype == torch.float32 else [g.to(dtype) for g in grads]
            acc = fusedaccum.GradAccumulator(ps, k, max_norm=MAX_NORM)
            opt = NullOptimizer(ps)

            def window(acc=acc, opt=opt, gs=gs, ps=ps):
                for _ in range(k):
                    acc.backward(_InjectGrads.apply(gs, *ps))
                acc.step(opt)
            cases.append((f"fusedaccum.GradAccumulator, {_dt(dtype)} params", window))
    else:
        acc_b = torch.zeros(n, device=device)
        landing = _randn(n, torch.bfloat16, device)

        def primitives():
            for i in range(k):
                fusedaccum.accumulate_(acc_b, landing, 1.0, zero_grad=True, overwrite=i == 0)
            fusedaccum.unscale_clip_(acc_b, 1.0 / k, MAX_NORM)
        cases.append(("fusedaccum primitives (GradAccumulator not found): k x accumulate_ bf16 + "
                      "unscale_clip_", primitives))
    ps_t = [torch.nn.Parameter(torch.empty(s, device=device)) for s in sizes]
    opt_t = NullOptimizer(ps_t)

    def torch_window():
        for _ in range(k):
            (_InjectGrads.apply(grads, *ps_t) / k).backward()
        torch.nn.utils.clip_grad_norm_(ps_t, MAX_NORM, foreach=True)
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
    cases.append(("torch: backward loop + clip_grad_norm_(foreach=True), fp32 params", torch_window))
    return sizes, cases


def profile_window(device: torch.device, n: int, k: int = WINDOW_K, row_limit: int = 25, wait_s: float = 0.0) -> str:
    """torch.profiler tables (launch counts and times per kernel/op) of one window step:
    GradAccumulator with fp32 and bf16 parameters, and the PyTorch loop, GPT-2-small layout."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    sizes, cases = window_cases(device, n, k)
    text = [f"# torch.profiler: one window step (K={k} micro-batches + step), N={n:,} elements in "
            f"{len(sizes)} tensors (GPT-2-small proportions), device {device_name(device)}, "
            f"backend {_backend.name_for(device)}", ""]
    for title, fn in cases:
        for _ in range(2):  # warm-up: Triton compilation, allocator
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif wait_s > 0:
            wait_quiet(wait_s)  # other processes on a small CPU distort the profile
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=row_limit)
        except (KeyError, AttributeError, ValueError):  # torch < 2.4 names it self_cuda_time_total
            table = prof.key_averages().table(sort_by=sort.replace("device", "cuda"), row_limit=row_limit)
        text += [f"## {title}", "", table, ""]
    return "\n".join(text)
