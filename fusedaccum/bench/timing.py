"""How a row is timed: ``triton.testing.do_bench`` on CUDA, an interleaved wall clock on a CPU;
and how host syncs are counted."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable

import torch

QUANTILES = (0.2, 0.5, 0.8)


class Timer:
    """Median (and quantiles) of one call, in seconds.

    CUDA: ``triton.testing.do_bench`` per row. CPU: wall clock; the rows of a group are
    timed interleaved (round-robin, the order rotated each round), so that other processes
    on a small machine slow every row of a comparison alike instead of whichever row they
    happen to overlap."""

    def __init__(self, device: torch.device, quick: bool, min_repeats: "int | None" = None,
                 budget_s: "float | None" = None):
        self.device = device
        self.quick = quick
        self.warmup = 1 if quick else 2
        self.min_repeats = min_repeats or (3 if quick else 7)
        self.max_repeats = 20 if quick else 200
        self.budget_s = budget_s if budget_s is not None else (0.03 if quick else 2.0)

    def describe(self) -> str:
        if self.device.type == "cuda":
            return ("triton.testing.do_bench: CUDA events around each call, L2 flushed between calls, "
                    "median and 20/80% quantiles")
        return (f"wall clock (time.perf_counter) around each call, {self.warmup} warm-up call(s), then the rows "
                f"of a group interleaved round-robin: median of >= {self.min_repeats} calls per row (more while "
                f"under {self.budget_s:g} s per row); 20/80% quantiles")

    def __call__(self, fn: Callable) -> dict:
        """One row on its own."""
        if self.device.type == "cuda":
            return self._cuda(fn)
        got, err = self.interleaved([fn])
        if 0 in err:
            raise err[0]
        return got[0]

    def warm(self, fns: list) -> dict:
        """Warm-up calls (torch.compile compiles here); returns {index: exception} for the
        functions that raised."""
        errors = {}
        for i, fn in enumerate(fns):
            try:
                for _ in range(self.warmup):
                    fn()
            except Exception as exc:  # noqa: BLE001 - reported in the row
                errors[i] = exc
        return errors

    def interleaved(self, fns: list, errors: "dict | None" = None) -> "tuple[dict, dict]":
        """Time ``fns`` round-robin (CPU), warmed up first unless ``errors`` (the result of
        ``warm``) is given. Returns ({index: timing}, {index: exception}): the functions that
        ran and those that raised."""
        if errors is None:
            errors = self.warm(fns)
        live = [i for i in range(len(fns)) if i not in errors]
        times = {i: [] for i in live}
        start, rnd = time.perf_counter(), 0
        while live and rnd < self.max_repeats and (
                rnd < self.min_repeats or time.perf_counter() - start < self.budget_s * len(live)):
            k = rnd % len(live)
            for i in live[k:] + live[:k]:
                t0 = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - t0)
            rnd += 1
        out = {}
        for i in live:
            q = _quantiles(times[i])
            out[i] = {"median_s": q["p50"], "quantiles": q, "repeats": len(times[i])}
        return out, errors

    def _cuda(self, fn: Callable) -> dict:
        from triton.testing import do_bench

        warmup_ms, rep_ms = (5, 20) if self.quick else (25, 500)
        try:  # every triton 3.x takes quantiles (a list in, a list out, in milliseconds)
            p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
            q = {"p20": p20 / 1e3, "p50": p50 / 1e3, "p80": p80 / 1e3}
        except TypeError:  # a triton without quantiles: the median alone
            p50 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            q = {"p20": None, "p50": p50 / 1e3, "p80": None}
        return {"median_s": q["p50"], "quantiles": q, "repeats": None}


def _quantiles(times: list) -> dict:
    s = sorted(times)

    def at(f):  # linear interpolation, as numpy's default
        x = f * (len(s) - 1)
        lo = math.floor(x)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"p20": at(QUANTILES[0]), "p50": statistics.median(s), "p80": at(QUANTILES[2])}


def count_syncs(fn: Callable, device: torch.device):
    """Host synchronisations during one call of ``fn`` (already warmed up), counted by
    PyTorch's sync debug mode; "n/a (cpu)" off CUDA, where there is nothing to wait for."""
    if device.type != "cuda":
        return "n/a (cpu)"
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


