"""``python -m fusedaccum bench``: throughput of the fused ops against the memory-bandwidth
ceiling (a copy of the same bytes) and against PyTorch's own path, side by side in one run.

What is measured (each row: median time, bytes by the accounting below, GB/s, fraction of
the copy bandwidth, speed-up, host syncs per step):

- ``accumulate_`` of bf16 and fp32 gradients into an fp32 bucket (also with ``zero_grad``),
  against ``add_`` on the flat tensor, ``_foreach_add_`` on parameter lists, ``torch.compile``;
- the read pass of ``unscale_clip_`` alone (partial norms + inf check), against
  ``get_total_norm(foreach=True)``;
- ``unscale_clip_`` (norm + inf check + clip, in place), against PyTorch's chain
  ``_amp_foreach_non_finite_check_and_unscale_`` + ``clip_grad_norm_(foreach=True)`` on the
  same data as one flat tensor, as a GPT-2-small-shaped list (148 tensors) and a 496-tensor
  list, and ``torch.compile`` of the equivalent expression;
- the exact GPT-2-small parameter list (124,439,808 elements, 148 tensors): ``unscale_clip_``
  on its ``GradBuckets`` bucket and ``fusedaccum.clip_grad_norm_`` against PyTorch's;
- one whole window of ``GradAccumulator`` (K micro-batch backwards + step) against the loop a
  PyTorch user writes.

Bytes per element (B/el) are counted as the minimal DRAM traffic of the implementation's
passes: every tensor read once per pass, written once per pass, in its dtype. The copy
baseline is ``dst.copy_(src)`` of uint8 buffers of half that many bytes (read + write =
the row's bytes), so ``fraction of copy = copy time / row time``. See bench/README.md.

Timing: on CUDA ``triton.testing.do_bench`` (device events, L2 flushed, median and
quantiles); elsewhere wall clock (``time.perf_counter``) around each call after warm-up,
median of the repeats. On a CPU the fused ops run the pure-PyTorch reference path.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import fusedaccum
from fusedaccum import _backend

MAX_NORM = 1.0
WINDOW_K = 4  # micro-batches per window in the window rows
QUANTILES = (0.2, 0.5, 0.8)
FULL_SIZES = (10**6, 10**7, 10**8)
GPU_BIG_SIZE = 10**9
# The largest group at N=1e9 holds about 24 GB at once (the window rows: two parameter sets,
# the injected gradients, a bucket and torch's gradients, 4 GB each; or the 20-B/el copy:
# two 10 GB buffers); ask for twice that free before adding it.
GPU_BIG_MIN_FREE = 48 * 10**9
QUICK_SIZES = (10**4, 10**5)
DISTURBED_PCT = 10.0  # CPU: a group during which other processes used more than this is timed again
FUSED = "fusedaccum"


# --------------------------------------------------------------------------- layouts
def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list:
    """Parameter shapes of GPT-2 in ``GPT2LMHeadModel.parameters()`` order (lm_head is tied
    to wte): wte, wpe, per layer ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    (Conv1D weights are in x out, each with a bias), then ln_f. 4 + 12 * layers tensors;
    the defaults are GPT-2 small: 148 tensors, 124,439,808 elements."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


GPT2_SMALL = gpt2_shapes()
GPT2_TINY = gpt2_shapes(layers=2, d=64, vocab=512, ctx=64)  # the --quick stand-in
# The parameter-list layouts of the size sweep: the GPT-2-small proportions (148 tensors)
# and a deeper GPT-2 (41 layers: 496 tensors), scaled to N elements.
LIST_LAYOUTS = {"gpt2-148": GPT2_SMALL, "list-496": gpt2_shapes(layers=41)}


def split_sizes(shapes: list, n: int) -> list:
    """Sizes (each >= 1) of len(shapes) tensors in the proportions of ``shapes``, summing to n."""
    weights = [math.prod(s) for s in shapes]
    total = sum(weights)
    sizes = [max(1, w * n // total) for w in weights]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    sizes[big] += n - sum(sizes)
    if sizes[big] < 1:
        raise ValueError(f"{n} elements are too few for {len(shapes)} tensors")
    return sizes


# --------------------------------------------------------------------------- timing
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


# --------------------------------------------------------------------------- the cases
@dataclass
class Spec:
    """One row to measure. ``build`` allocates what the row needs and returns the step."""

    op: str
    impl: str
    layout: str
    tensors: int
    n: int
    dtype: str
    bytes_per_elem: float
    bytes_note: str
    build: Callable[[], Callable[[], object]]
    ours: bool = False


@dataclass
class Group:
    """Rows that do the same job on the same data: the fused op first, then its baselines.
    ``cache`` holds the group's tensors; it is cleared when the group is done."""

    op: str
    n: int
    specs: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    def get(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")


def _randn(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(n, device=device).mul_(1e-2).to(dtype)


def _holders(grads: list, device: torch.device) -> list:
    """Parameters whose ``.grad`` are ``grads``, for torch's clip_grad_norm_ (which takes
    parameters). Their data is a zero-stride expand of one element: no memory."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty(1, device=device).expand(g.shape))
        p.grad = g
        params.append(p)
    return params


def _compiled(fn: Callable) -> Callable:
    # A fresh dynamo cache per compiled row: the same function compiled for every N and dtype
    # would otherwise pass dynamo's recompile limit (8) and silently run eagerly.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _acc_expr(acc, grad):
    acc.add_(grad)


def _unscale_clip_expr(g, inv, max_norm: float):
    # unscale_clip_ written as one expression for torch.compile: read pass (norm, inf check),
    # then one read-write pass.
    norm = torch.linalg.vector_norm(g, dtype=torch.float32) * inv.abs()
    found_inf = ~torch.isfinite(norm)
    coef = inv * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    g.mul_(torch.where(found_inf, torch.ones_like(coef), coef))
    return norm, found_inf


def _norm_expr(g):
    return torch.linalg.vector_norm(g, dtype=torch.float32)


def torch_chain(grads: list, params: list, inv: torch.Tensor) -> Callable:
    """The step preprocessing a PyTorch user runs today: GradScaler.unscale_'s kernel, then
    clip_grad_norm_(foreach=True). found_inf is a fresh tensor per step, as in GradScaler."""
    def step():
        found_inf = torch.zeros(1, device=inv.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
        return torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True), found_inf
    return step


def _total_norm(grads: list) -> torch.Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)


def norm_pass(bucket: torch.Tensor, inv: torch.Tensor):
    """The read pass of ``unscale_clip_`` alone (its first phase, ``norm_partials``), on the
    backend the bucket's device gets: partial norms and non-finite codes, no finalize, no
    apply. Returns ``(run, total_norm)``: ``total_norm()`` folds what the last ``run()``
    left into the 2-norm of the bucket, for the tests (not timed)."""
    impl = _backend.implementation(bucket.device)
    last = []

    def run():
        last[:] = [impl.norm_partials([bucket], inv, 2.0)]
        return last[0]

    def total_norm():
        return impl.finalize(last[0], inv, None, 2.0, 0.0)[0].double()
    return run, total_norm


class _InjectGrads(torch.autograd.Function):
    """A loss whose backward hands every parameter a fixed gradient: the window rows then time
    the gradient landing, the accumulation and the step, not a model. (The gradient of the
    loss is ignored; the values only need to stay finite.)"""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *ctx.grads)


class NullOptimizer(torch.optim.Optimizer):
    """An optimizer whose step does nothing, so the window rows time gradient handling, not
    an update. It declares PyTorch's fused-AMP contract (``found_inf`` handed over as a device
    tensor, as ``AdamW(fused=True)`` does), so ``GradAccumulator.step`` has no host sync. Its
    state is filled from the start, as a fused optimizer's is after its first step (before
    it, ``GradAccumulator`` takes the synchronous path)."""

    _step_supports_amp_scaling = True

    def __init__(self, params):
        super().__init__(params, {})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["initialized"] = True

    def step(self, closure=None):
        return None


# --------------------------------------------------------------------------- groups
def _layout_views(flat: torch.Tensor, layout: str) -> list:
    if layout == "flat":
        return [flat]
    return list(flat.split(split_sizes(LIST_LAYOUTS[layout], flat.numel())))


def _ntensors(layout: str) -> int:
    return 1 if layout == "flat" else len(LIST_LAYOUTS[layout])


def accumulate_group(n, device, grad_dtype, *, zero_grad=False, compile_=True) -> Group:
    gd = _dt(grad_dtype)
    op = f"accumulate_ {gd}->fp32" + (" zero_grad" if zero_grad else "")
    g = Group(op, n)
    acc = lambda: g.get("acc", lambda: _randn(n, torch.float32, device))  # noqa: E731
    grad = lambda: g.get("grad", lambda: _randn(n, grad_dtype, device))  # noqa: E731
    e = grad_dtype.itemsize
    b = e + 4 + 4 + (e if zero_grad else 0)
    note = f"read grad {e} + read acc 4 + write acc 4" + (f" + write zeros to grad {e}" if zero_grad else "")

    def spec(impl, layout, build, ours=False, note_=note):
        g.specs.append(Spec(op, impl, layout, _ntensors(layout), n, f"{gd}->fp32", b, note_, build, ours))

    def ours():
        a, x = acc(), grad()
        return lambda: fusedaccum.accumulate_(a, x, 1.0, zero_grad=zero_grad)

    def add_flat():
        a, x = acc(), grad()
        if zero_grad:
            def step():
                a.add_(x)
                x.zero_()
            return step
        return lambda: a.add_(x)

    def foreach(layout):
        def build():
            accs, grads = _layout_views(acc(), layout), _layout_views(grad(), layout)
            if zero_grad:
                def step():
                    torch._foreach_add_(accs, grads)
                    torch._foreach_zero_(grads)
                return step
            return lambda: torch._foreach_add_(accs, grads)
        return build

    def compiled():
        a, x = acc(), grad()
        f = _compiled(_acc_expr)
        return lambda: f(a, x)

    spec(FUSED, "flat", ours, ours=True, note_=note + " (one pass)")
    spec("torch add_" + (" + zero_" if zero_grad else ""), "flat", add_flat)
    spec("torch _foreach_add_" + (" + _foreach_zero_" if zero_grad else ""), "gpt2-148", foreach("gpt2-148"))
    if not zero_grad:
        spec("torch _foreach_add_", "list-496", foreach("list-496"))
        if compile_:
            spec("torch.compile(acc.add_(grad))", "flat", compiled)
    return g


def norm_group(n, device, *, compile_=True) -> Group:
    op = "norm pass fp32"
    g = Group(op, n)
    bucket = lambda: g.get("bucket", lambda: _randn(n, torch.float32, device))  # noqa: E731
    inv = lambda: g.get("inv", lambda: torch.ones((), device=device))  # noqa: E731
    note = "read 4"

    def spec(impl, layout, build, ours=False, note_=note):
        g.specs.append(Spec(op, impl, layout, _ntensors(layout), n, "fp32", 4, note_, build, ours))

    def ours():
        return norm_pass(bucket(), inv())[0]

    def total_norm(layout):
        def build():
            grads = _layout_views(bucket(), layout)
            return lambda: _total_norm(grads)
        return build

    def compiled():
        x, f = bucket(), _compiled(_norm_expr)
        return lambda: f(x)

    spec(FUSED, "flat", ours, ours=True,
         note_="read 4 (unscale_clip_'s read pass alone: partial norms + inf check, no finalize)")
    spec("torch get_total_norm(foreach)", "flat", total_norm("flat"))
    spec("torch get_total_norm(foreach)", "gpt2-148", total_norm("gpt2-148"))
    if compile_:
        spec("torch.compile(vector_norm)", "flat", compiled)
    return g


def unscale_clip_group(n, device, *, compile_=True) -> Group:
    op = "unscale_clip_ fp32"
    g = Group(op, n)
    # inv_scale = 1 as a device tensor: the GradScaler code path, and in-place repeats do not
    # drift the data (max_norm=1 clips the first call; later calls scale by ~1).
    bucket = lambda: g.get("bucket", lambda: _randn(n, torch.float32, device))  # noqa: E731
    inv = lambda: g.get("inv", lambda: torch.ones((), device=device))  # noqa: E731

    def ours():
        x, s = bucket(), inv()
        return lambda: fusedaccum.unscale_clip_(x, s, MAX_NORM)

    def chain(layout):
        def build():
            grads = _layout_views(bucket(), layout)
            return torch_chain(grads, _holders(grads, device), inv())
        return build

    def compiled():
        x, s, f = bucket(), inv(), _compiled(_unscale_clip_expr)
        return lambda: f(x, s, MAX_NORM)

    g.specs.append(Spec(op, FUSED, "flat", 1, n, "fp32", 12, "norm pass: read 4; apply: read 4 + write 4",
                        ours, True))
    for layout in ("flat", "gpt2-148", "list-496"):
        g.specs.append(Spec(op, "torch unscale+clip chain", layout, _ntensors(layout), n, "fp32", 20,
                            "unscale: read 4 + write 4; norm: read 4; clip: read 4 + write 4", chain(layout)))
    if compile_:
        g.specs.append(Spec(op, "torch.compile(unscale+clip)", "flat", 1, n, "fp32", 12,
                            "if inductor makes one reduction pass (read 4) and one pointwise pass (8)",
                            compiled))
    return g


def gpt2_groups(device, shapes, name) -> list:
    """unscale_clip_ and clip_grad_norm_ on a real GPT-2 parameter list, gradients in a
    GradBuckets bucket (param.grad are views of it): the same data for every row."""
    n = sum(math.prod(s) for s in shapes)
    listed, flat = f"{name} list", f"{name} bucket"
    uc_note = "unscale: read 4 + write 4; norm: read 4; clip: read 4 + write 4"

    def make_group(op):
        g = Group(op, n)

        def model():
            def make():
                params = [torch.nn.Parameter(torch.empty(s, device=device)) for s in shapes]
                buckets = fusedaccum.GradBuckets(params)
                buckets.buckets[0].accum.copy_(_randn(n, torch.float32, device))
                return params, buckets.buckets[0].accum, buckets
            return g.get("model", make)

        def ours_uc():
            _, x, _ = model()
            s = torch.ones((), device=device)
            return lambda: fusedaccum.unscale_clip_(x, s, MAX_NORM)

        def chain_list():
            params, _, _ = model()
            return torch_chain([p.grad for p in params], params, torch.ones((), device=device))

        def chain_flat():
            _, x, _ = model()
            return torch_chain([x], _holders([x], device), torch.ones((), device=device))

        def ours_clip():
            params, _, _ = model()
            return lambda: fusedaccum.clip_grad_norm_(params, MAX_NORM)

        def torch_clip():
            params, _, _ = model()
            return lambda: torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)

        if op.startswith("unscale_clip_"):
            g.specs += [
                Spec(op, FUSED, flat, 1, n, "fp32", 12, "norm pass: read 4; apply: read 4 + write 4", ours_uc, True),
                Spec(op, "torch unscale+clip chain", listed, len(shapes), n, "fp32", 20, uc_note, chain_list),
                Spec(op, "torch unscale+clip chain", flat, 1, n, "fp32", 20, uc_note, chain_flat),
            ]
        else:
            g.specs += [
                Spec(op, "fusedaccum.clip_grad_norm_", listed, len(shapes), n, "fp32", 12,
                     "norm: read 4; clip: read 4 + write 4 (fused over the bucket)", ours_clip, True),
                Spec(op, "torch clip_grad_norm_(foreach)", listed, len(shapes), n, "fp32", 12,
                     "norm: read 4; clip: read 4 + write 4", torch_clip),
            ]
        return g

    return [make_group("unscale_clip_ fp32"), make_group("clip_grad_norm_ fp32")]


def window_group(n, device, k=WINDOW_K) -> Group:
    """One optimizer step's window: k backwards that land fixed fp32 gradients into the
    parameters' .grad, then the step (no-op optimizer). GPT-2-small proportions, 148 tensors."""
    op = f"window step fp32 params (K={k})"
    g = Group(op, n)
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    grads = lambda: g.get("grads", lambda: list(_randn(n, torch.float32, device).split(sizes)))  # noqa: E731

    def params():
        return [torch.nn.Parameter(torch.empty(s, device=device)) for s in sizes]

    def ours():
        gs, ps = grads(), params()
        acc = fusedaccum.GradAccumulator(ps, k, max_norm=MAX_NORM)
        opt = NullOptimizer(ps)

        def window():
            for _ in range(k):
                acc.backward(_InjectGrads.apply(gs, *ps))
            return acc.step(opt)
        return window

    def baseline():
        gs, ps = grads(), params()
        opt = NullOptimizer(ps)

        def window():
            for _ in range(k):
                (_InjectGrads.apply(gs, *ps) / k).backward()
            norm = torch.nn.utils.clip_grad_norm_(ps, MAX_NORM, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return norm
        return window

    g.specs += [
        Spec(op, "fusedaccum.GradAccumulator", "gpt2-148", len(sizes), n, "fp32", 12 * k + 16,
             f"zero bucket 4 + {k} x autograd in-place add 12 + step (norm 4 + apply 8)", ours, True),
        Spec(op, "torch backward loop + clip_grad_norm_(foreach)", "gpt2-148", len(sizes), n, "fp32",
             12 * k + 8, f"first backward copies 8 + {k - 1} x in-place add 12 + clip (norm 4 + mul 8); "
             "zero_grad(set_to_none) 0", baseline),
    ]
    return g


def build_plan(sizes, device, *, compile_=True, quick=False) -> list:
    groups = []
    window = hasattr(fusedaccum, "GradAccumulator")
    for n in sizes:
        groups += [
            accumulate_group(n, device, torch.bfloat16, compile_=compile_),
            accumulate_group(n, device, torch.bfloat16, zero_grad=True),
            accumulate_group(n, device, torch.float32, compile_=compile_),
            norm_group(n, device, compile_=compile_),
            unscale_clip_group(n, device, compile_=compile_),
        ]
        if window:
            groups.append(window_group(n, device))
    groups += gpt2_groups(device, GPT2_TINY if quick else GPT2_SMALL, "gpt2-tiny" if quick else "gpt2-small")
    return groups


# --------------------------------------------------------------------------- device info
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "cpu"


def slugify(name: str, device: torch.device) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", name.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"
    if device.type != "cuda" and not s.startswith("cpu"):
        s = "cpu-" + s
    return s


def _versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - not installed / not importable on this platform
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fusedaccum": fusedaccum.__version__,
            "python": platform.python_version()}


def default_out_dir() -> Path:
    """bench/results of the source checkout this package runs from, else ./bench-results."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "bench").is_dir() and (repo / "pyproject.toml").is_file():
        return repo / "bench" / "results"
    return Path.cwd() / "bench-results"


def _loadavg():
    """1/5/15-minute load averages (other processes on a small CPU disturb the timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


class OtherLoad:
    """CPU time used by other processes while a stretch of the bench ran, as a percentage of
    all cores (Linux /proc/stat; None elsewhere). Other work on a small machine slows the
    CPU rows, so every CPU row records it: a clean run shows a few percent at most."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        import resource

        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        me = resource.getrusage(resource.RUSAGE_SELF)
        return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime, time.perf_counter()

    def percent(self) -> "float | None":
        end = self._sample()
        if end is None or self._start is None:
            return None
        busy, mine, wall = (e - s for e, s in zip(end, self._start))
        cores = os.cpu_count() or 1
        return round(max(0.0, 100.0 * (busy - mine) / (wall * cores)), 1) if wall > 0 else None


def wait_quiet(max_wait_s: float, window_s: float = 1.0) -> "float | None":
    """Wait (up to ``max_wait_s``) for a ``window_s`` stretch in which other processes use at
    most DISTURBED_PCT of the CPU; returns their last share (None where it cannot be read)."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        load = OtherLoad()
        time.sleep(window_s)
        others = load.percent()
        if others is None or others <= DISTURBED_PCT or time.perf_counter() >= deadline:
            return others


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- running
def _fmt_n(n: int) -> str:
    if n > 0 and 10 ** round(math.log10(n)) == n:
        return f"1e{round(math.log10(n))}"
    return f"{n:,}"


def _fmt_t(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _line(r: dict) -> str:
    if r.get("error"):
        return f"{r['op']:<30} N={_fmt_n(r['size']):<11} {r['layout']:<18} {r['impl']:<40} ERROR {r['error']}"
    if r["op"] == "copy":
        extra = ""
    elif r.get("speedups"):
        extra = "  " + ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedups"].items())
    elif r.get("fusedaccum_speedup") is not None:
        extra = f"  fusedaccum speed-up {r['fusedaccum_speedup']:.2f}x"
    else:
        extra = ""
    frac = "" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:4.0f}% copy"
    return (f"{r['op']:<30} N={_fmt_n(r['size']):<11} {r['layout']:<18} {r['impl']:<40} "
            f"{_fmt_t(r['median_s']):>11} {r['bytes_per_elem']:>5g} B/el {r['gbps']:7.2f} GB/s {frac:>9} "
            f"syncs {r['syncs']}{extra}")


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = _backend.name_for(device)
    if device.type != "cuda" and backend == "triton":
        raise SystemExit("fusedaccum bench: FUSEDACCUM_BACKEND=triton on the CPU runs the Triton interpreter, "
                         "far too slow to benchmark; unset it (the CPU bench measures the torch reference)")
    sizes = args.sizes
    if sizes is None:
        sizes = list(QUICK_SIZES if args.quick else FULL_SIZES)
        if device.type == "cuda" and not args.quick:
            free, _ = torch.cuda.mem_get_info(device)
            if free >= GPU_BIG_MIN_FREE:
                sizes.append(GPU_BIG_SIZE)
            else:
                print(f"skipping N=1e9: {free / 1e9:.0f} GB free, {GPU_BIG_MIN_FREE / 1e9:.0f} GB wanted")
    compile_ = not args.quick if args.compile is None else args.compile
    torch.manual_seed(0)
    timer = Timer(device, args.quick, args.min_repeats, args.budget)
    name = device_name(device)
    meta = {
        "device": {"type": device.type, "name": name, "slug": slugify(name, device),
                   "threads": torch.get_num_threads(), "backend": backend,
                   "cpu_count": os.cpu_count()},
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m fusedaccum bench"] + args.argv),
        "quick": bool(args.quick),
        "timing": timer.describe(),
        "sizes": list(sizes),
        "max_norm": MAX_NORM,
        "window_k": WINDOW_K,
        "grad_accumulator": hasattr(fusedaccum, "GradAccumulator"),
        "compile_baselines": compile_,
        "loadavg_start": _loadavg(),
    }
    if device.type == "cuda":
        meta["device"]["memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 1e9, 1)
    what = ("the Triton kernels" if backend == "triton" else
            "the pure-PyTorch reference path (backend 'torch'), not the Triton kernels")
    print(f"fusedaccum bench on {name} ({device.type}, {meta['device']['threads']} threads): measuring {what}")
    print(f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}; timing: {meta['timing']}")
    if not meta["grad_accumulator"]:
        print("fusedaccum.GradAccumulator not found: no window-step rows")

    groups = build_plan(sizes, device, compile_=compile_, quick=args.quick)
    # Every group times its own copies (same bytes as its rows, same conditions: interleaved
    # with them on a CPU), so a disturbed group never lends its copy time to another.
    total = sum(len(g.specs) + len({s.bytes_per_elem for s in g.specs}) for g in groups)
    rows = []
    done, t_start, run_load = 0, time.perf_counter(), OtherLoad()

    def emit(r):
        nonlocal done
        done += 1
        rows.append(r)
        print(f"[{done:>3}/{total} {time.perf_counter() - t_start:6.0f}s] {_line(r)}", flush=True)

    def copy_entry(n, bpe, op):
        nbytes = int(round(n * bpe))
        r = {"op": "copy", "for_op": op, "impl": "dst.copy_(src) uint8", "layout": "flat", "tensors": 1, "size": n,
             "dtype": "uint8", "bytes": nbytes, "bytes_per_elem": bpe, "ours": False,
             "bytes_note": f"read B/2 + write B/2 bytes, B = {bpe:g} x N: the bytes of the rows it is compared with"}

        def build():
            src = torch.ones(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)
        return r, build

    def spec_entry(s):
        r = {"op": s.op, "impl": s.impl, "layout": s.layout, "tensors": s.tensors, "size": s.n,
             "dtype": s.dtype, "bytes": int(round(s.n * s.bytes_per_elem)),
             "bytes_per_elem": s.bytes_per_elem, "bytes_note": s.bytes_note, "ours": s.ours}
        return r, s.build

    def failed(r, exc):
        r.update(median_s=None, quantiles=None, syncs=None, error=f"{type(exc).__name__}: {exc}"[:300])

    for group in groups:
        new_copies = sorted({s.bytes_per_elem for s in group.specs})
        entries = [copy_entry(group.n, bpe, group.op) for bpe in new_copies] + [spec_entry(s) for s in group.specs]
        if device.type == "cuda":
            # One row at a time, its memory freed before the next (N=1e9 fills a GPU quickly).
            for r, build in entries:
                try:
                    fn = build()
                    r.update(timer(fn))
                    r["syncs"] = count_syncs(fn, device)
                    del fn
                except Exception as exc:  # noqa: BLE001 - e.g. torch.compile unavailable: recorded, run goes on
                    failed(r, exc)
                _free_memory(device)
        else:
            print(f"  ... timing {len(entries)} rows of '{group.op}' at N={_fmt_n(group.n)} interleaved", flush=True)
            fns = []
            for r, build in entries:
                try:
                    fns.append(build())
                except Exception as exc:  # noqa: BLE001
                    failed(r, exc)
                    fns.append(None)
            idx = [i for i, f in enumerate(fns) if f is not None]
            live = [fns[i] for i in idx]
            warm_errors = timer.warm(live)
            for attempt in range(1 + max(0, args.retries)):
                if args.wait > 0:
                    before = wait_quiet(args.wait)
                    if before is not None and before > DISTURBED_PCT:
                        print(f"  !! other processes still use {before}% of the CPU after {args.wait:g} s", flush=True)
                load = OtherLoad()  # after the warm-up: torch.compile's worker processes are not "others"
                got, errors = timer.interleaved(live, warm_errors)
                others = load.percent()
                if others is None or others <= DISTURBED_PCT:
                    break
                print(f"  !! other processes used {others}% of the CPU while this group ran"
                      + (": timing it again" if attempt < args.retries else ": its times are disturbed"), flush=True)
            for r, _ in entries:
                r["other_procs_cpu_pct"] = others
                r["timing_attempts"] = attempt + 1
            for j, i in enumerate(idx):
                if j in got:
                    entries[i][0].update(got[j], syncs=count_syncs(None, device))
                else:
                    failed(entries[i][0], errors[j])
            del fns
        copies = {r["bytes_per_elem"]: r for r, _ in entries[:len(new_copies)]}
        group_rows = [r for r, _ in entries[len(new_copies):]]
        ours = next((r for r in group_rows if r["ours"] and r.get("median_s")), None)
        for r, _ in entries:
            t = r.get("median_s")
            r["gbps"] = r["bytes"] / t / 1e9 if t else 0.0
            c = copies.get(r["bytes_per_elem"], {}).get("median_s")
            r["copy_median_s"] = c
            r["frac_copy"] = c / t if (c and t) else None
            if r["ours"] and t:
                r["speedups"] = {f"{b['impl']} [{b['layout']}]": b["median_s"] / t
                                 for b in group_rows if not b["ours"] and b.get("median_s")}
            elif ours and t and r["op"] != "copy":
                r["fusedaccum_speedup"] = t / ours["median_s"]
            emit(r)
        del entries, group_rows, ours
        group.cache.clear()
        group.specs.clear()
        _free_memory(device)
    results = {"meta": meta, "rows": rows}
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    results["meta"]["loadavg_end"] = _loadavg()
    results["meta"]["other_procs_cpu_pct"] = run_load.percent()
    return results


# --------------------------------------------------------------------------- targets
def _find(rows, op, impl, layout=None, size=None):
    for r in rows:
        if (r["op"] == op and r["impl"] == impl and (layout is None or r["layout"] == layout)
                and (size is None or r["size"] == size) and r.get("median_s")):
            return r
    return None


def targets(results: dict) -> list:
    """The issue's targets that this run can check, each with the measured value."""
    rows, dev = results["rows"], results["meta"]["device"]["type"]
    out = []
    if dev != "cuda":
        for r in rows:
            # The target is on GPT-2 small; --quick's gpt2-tiny stand-in is no measure of it.
            if r["op"] == "unscale_clip_ fp32" and r.get("ours") and r["layout"] == "gpt2-small bucket" \
                    and r.get("median_s"):
                name = "gpt2-small"
                base = _find(rows, "unscale_clip_ fp32", "torch unscale+clip chain", f"{name} list", r["size"])
                if base:
                    x = base["median_s"] / r["median_s"]
                    out.append({"target": f"CPU: unscale_clip_ (reference) >= 1.8x faster than PyTorch's chain "
                                          f"on the {name} parameter list ({r['size']:,} elements)",
                                "value": f"{x:.2f}x ({_fmt_t(r['median_s'])} vs {_fmt_t(base['median_s'])})",
                                "met": x >= 1.8})
        return out
    big = [r for r in rows if r["size"] >= 10**8 and r.get("median_s") and r.get("ours")]
    for r in big:
        if r["op"].startswith("accumulate_") or r["op"] == "norm pass fp32":
            f = r.get("frac_copy")
            out.append({"target": f"GPU: {r['op']} >= 90% of copy bandwidth at N={_fmt_n(r['size'])}",
                        "value": "n/a" if f is None else f"{100 * f:.0f}%", "met": f is not None and f >= 0.9})
        if r["op"] == "unscale_clip_ fp32" and r["layout"] == "flat":
            out.append({"target": f"GPU: unscale_clip_ moves <= 12 B/el at N={_fmt_n(r['size'])}",
                        "value": f"{r['bytes_per_elem']:g} B/el (accounting)", "met": r["bytes_per_elem"] <= 12})
            base = _find(rows, r["op"], "torch unscale+clip chain", "flat", r["size"])
            if base:
                x = base["median_s"] / r["median_s"]
                out.append({"target": f"GPU: unscale_clip_ >= 1.6x faster than PyTorch's chain on flat data, "
                                      f"N={_fmt_n(r['size'])}", "value": f"{x:.2f}x", "met": x >= 1.6})
    ours = [r for r in rows if r.get("ours") and r.get("median_s")]
    syncs = [r["syncs"] for r in ours if isinstance(r.get("syncs"), int)]
    if syncs:
        out.append({"target": "GPU: zero host syncs per step (every fusedaccum row)",
                    "value": f"max {max(syncs)}", "met": max(syncs) == 0})
    return out


# --------------------------------------------------------------------------- outputs
def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1) + "\n")


def markdown(results: dict) -> str:
    m = results["meta"]
    d = m["device"]
    lines = [f"# fusedaccum bench: {d['name']}", "",
             f"- device: {d['type']} `{d['name']}`, {d['threads']} torch threads"
             + (f", {d['memory_gb']} GB" if d.get("memory_gb") else ""),
             f"- fused ops ran on backend `{d['backend']}`"
             + (" (the pure-PyTorch reference path; the Triton kernels run only on CUDA)"
                if d["backend"] == "torch" else " (Triton kernels)"),
             f"- torch {m['versions']['torch']}, triton {m['versions']['triton']}, "
             f"fusedaccum {m['versions']['fusedaccum']}, python {m['versions']['python']}",
             f"- date {m['date']}; command `{m['command']}`; {m.get('wall_s', '?')} s; "
             f"load average at start {m.get('loadavg_start')}, end {m.get('loadavg_end')}; other processes "
             f"used {m.get('other_procs_cpu_pct')}% of the CPU during the run (per group: JSON "
             "`other_procs_cpu_pct`)",
             f"- timing: {m['timing']}",
             "- B/el: bytes per element by the accounting in bench/README.md; GB/s = B/el x N / median; "
             "% copy = time of `dst.copy_(src)` moving the same bytes / row time; "
             "speed-up = baseline time / fusedaccum time (same op, same N, same data)"
             + ("; others' CPU = CPU time other processes used while the group was timed (% of all cores)"
                if d["type"] != "cuda" else ""),
             ""]
    if d["type"] != "cuda":
        lines += ["GPU rows: none. This file holds CPU measurements only; no GPU number is estimated.", ""]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]]
        lines.append("")
    ours_rows = [r for r in results["rows"] if r.get("ours") and r.get("median_s")]
    if ours_rows:
        lines += ["## Summary: fusedaccum rows", "",
                  "| op | N | layout | fusedaccum median | B/el | GB/s | % copy | speed-up over each baseline |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ours_rows:
            sp = "; ".join(f"{k}: {v:.2f}x" for k, v in (r.get("speedups") or {}).items())
            frac = "" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.0f}%"
            lines.append(f"| {r['op']} | {_fmt_n(r['size'])} | {r['layout']} | {_fmt_t(r['median_s'])} | "
                         f"{r['bytes_per_elem']:g} | {r['gbps']:.2f} | {frac} | {sp} |")
        lines.append("")
    ops = [op for op in dict.fromkeys(r["op"] for r in results["rows"]) if op != "copy"]
    for op in ops:
        cpu = d["type"] != "cuda"
        lines += [f"## {op}", "",
                  "| N | layout (tensors) | implementation | median (p20-p80) | B/el | GB/s | % copy "
                  "| fusedaccum speed-up | syncs |" + (" others' CPU |" if cpu else ""),
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu else "")]
        for r in results["rows"]:
            if r["op"] != op and r.get("for_op") != op:  # a group's own copies come first
                continue
            if r.get("error"):
                lines.append(f"| {_fmt_n(r['size'])} | {r['layout']} ({r['tensors']}) | {r['impl']} | "
                             f"error: {r['error'][:120]} | | | | | |" + (" |" if cpu else ""))
                continue
            q = r.get("quantiles") or {}
            spread = (f" ({_fmt_t(q.get('p20'))}-{_fmt_t(q.get('p80'))})" if q.get("p20") is not None else "")
            if r.get("ours"):
                sp = "(this)"
            elif r.get("fusedaccum_speedup") is not None:
                sp = f"{r['fusedaccum_speedup']:.2f}x"
            else:
                sp = ""
            frac = "" if r.get("frac_copy") is None else f"{100 * r['frac_copy']:.0f}%"
            impl = f"**{r['impl']}**" if r.get("ours") else r["impl"]
            if r["op"] == "copy":
                impl = f"copy: {r['impl']}"
            lines.append(f"| {_fmt_n(r['size'])} | {r['layout']} ({r['tensors']}) | {impl} | "
                         f"{_fmt_t(r['median_s'])}{spread} | {r['bytes_per_elem']:g} | {r['gbps']:.2f} | {frac} | "
                         f"{sp} | {r['syncs']} |" + (f" {r.get('other_procs_cpu_pct')}% |" if cpu else ""))
        notes = {"copy: dst.copy_(src) uint8": "read B/2 + write B/2 bytes, B = (B/el) x N: the bytes of the rows "
                                               "it is compared with"}
        notes.update({r["impl"]: r["bytes_note"] for r in results["rows"] if r["op"] == op})
        lines += [""] + [f"- {impl}: {note}" for impl, note in notes.items()] + [""]
    return "\n".join(lines)


def write_plot(results: dict, path: Path) -> bool:
    """GB/s against N for the size-sweep rows, one panel per op, the copy ceiling drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    rows = [r for r in results["rows"] if r.get("median_s")]
    sweep = set(results["meta"]["sizes"])
    ops = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "copy"
           and any(r["op"] == op and r["size"] in sweep for r in rows)]
    cols = 3
    nrows = max(1, math.ceil(len(ops) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        ceiling = {}  # the best of this group's copies at each N
        for r in rows:
            if r["op"] == "copy" and r.get("for_op") == op and r["size"] in sweep:
                ceiling[r["size"]] = max(ceiling.get(r["size"], 0.0), r["gbps"])
        xs = sorted(ceiling)
        series = {}
        for r in rows:
            if r["op"] == op and r["size"] in sweep:
                series.setdefault((r["impl"], r["layout"], r.get("ours")), []).append((r["size"], r["gbps"]))
        for (impl, layout, ours), pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=2.5 if ours else 1.2,
                    label=f"{impl} [{layout}]")
        if xs:
            ax.plot(xs, [ceiling[x] for x in xs], "k--", lw=1.5, label="copy (dst.copy_ of the same bytes)")
        ax.set_xscale("log")
        ax.set_title(op, fontsize=10)
        ax.set_xlabel("N (elements)")
        ax.set_ylabel("GB/s (accounted bytes / median)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    d = results["meta"]["device"]
    fig.suptitle(f"fusedaccum bench: {d['name']} ({d['type']}, backend {d['backend']}, {d['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(results: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    slug = results["meta"]["device"]["slug"]
    paths = {"json": out / f"{slug}.json", "md": out / f"{slug}.md", "png": out / f"{slug}.png"}
    write_json(results, paths["json"])
    paths["md"].write_text(markdown(results))
    if not write_plot(results, paths["png"]):
        del paths["png"]
    return paths


# --------------------------------------------------------------------------- profile
def profile_window(device: torch.device, n: int, k: int = WINDOW_K, row_limit: int = 25, wait_s: float = 0.0) -> str:
    """torch.profiler tables (launch counts and times per kernel/op) of one window step:
    GradAccumulator with fp32 and bf16 parameters, and the PyTorch loop, GPT-2-small layout."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
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


# --------------------------------------------------------------------------- CLI
def _size(s: str) -> int:
    v = float(s)
    if not (v >= 1 and v == int(v)):
        raise argparse.ArgumentTypeError(f"not a positive integer: {s}")
    return int(v)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fusedaccum bench",
        description="Throughput of fusedaccum's ops against a copy of the same bytes and against PyTorch's path.")
    p.add_argument("--quick", action="store_true", help="a run of a few seconds (small sizes, no torch.compile)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: bench/results of the checkout; with --quick a temp folder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", type=lambda s: [_size(x) for x in s.split(",")], default=None,
                   help="comma-separated N, e.g. 1e6,1e7 (default 1e6,1e7,1e8; +1e9 on a GPU with room)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include the torch.compile baselines (default unless --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--min-repeats", type=int, default=None, help="CPU: timed calls per row at least")
    p.add_argument("--budget", type=float, default=None, help="CPU: seconds of timed calls per row (soft)")
    p.add_argument("--wait", type=float, default=None,
                   help=f"CPU: before timing a group, wait up to this many seconds for other processes to use "
                        f"<= {DISTURBED_PCT:g}%% of the CPU (default 30; 0 with --quick)")
    p.add_argument("--retries", type=int, default=None,
                   help=f"CPU: time a group again up to this often while other processes used > {DISTURBED_PCT:g}%% "
                        "of the CPU meanwhile (default 3; 0 with --quick)")
    p.add_argument("--profile", action="store_true",
                   help="only print torch.profiler tables of one window step (and write <slug>-profile.txt)")
    p.add_argument("--profile-size", type=_size, default=None, help="N for --profile (default 1e7; GPU 1e8)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    if args.wait is None:
        args.wait = 0.0 if args.quick else 30.0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.profile:
        n = args.profile_size or (10**8 if device.type == "cuda" else 10**7)
        if args.threads:
            torch.set_num_threads(args.threads)
        text = profile_window(device, n, wait_s=args.wait)
        print(text)
        out = args.out or default_out_dir()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{slugify(device_name(device), device)}-profile.txt"
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    results = run(args)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fusedaccum-bench-quick-")) if args.quick else default_out_dir())
    paths = write_outputs(results, out)
    for t in results["targets"]:
        print(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
