"""The cases: groups of rows that do one job on one set of data, the fused op first, then its
baselines (what each group measures is tabled in bench/README.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import fusedaccum

from .fold_cases import fold_group, micro_batch_group
from .layouts import GPT2_SMALL, GPT2_TINY, LIST_LAYOUTS, _layout_views, _ntensors, split_sizes
from .workloads import (MAX_NORM, NullOptimizer, _acc_expr, _compiled, _dt, _holders, _InjectGrads, _norm_expr,
                        _randn, _total_norm, _unscale_clip_expr, norm_pass, torch_chain)

WINDOW_K = 4  # micro-batches per window in the window rows
FUSED = "fusedaccum"
# The optimizer-step and micro-batch groups (fold_cases.py) skip N = 1e7 on a CPU: their targets
# are at 1e6 and 1e8, and the five groups take about a minute per size on a 2-core machine, which
# would bring the full run past 8 minutes there.
CPU_SKIP_STEP_SIZES = (10**7,)


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


def signals_window_group(n, device, param_dtype, k=WINDOW_K) -> Group:
    """The window step of ``window_group`` with and without ``noise_scale=True`` (and the
    window's loss, always on), in one run: what the statistics cost. fp32 parameters: one
    more read of the bucket after the first backward; bf16: none (Σg² in the accumulate pass)."""
    pd = _dt(param_dtype)
    op = f"window step {pd} params (K={k}), noise scale"
    g = Group(op, n)
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    grads = lambda: g.get("grads", lambda: list(_randn(n, param_dtype, device).split(sizes)))  # noqa: E731

    def window_of(noise):
        def build():
            gs = grads()
            ps = [torch.nn.Parameter(torch.empty(s, device=device, dtype=param_dtype)) for s in sizes]
            acc = fusedaccum.GradAccumulator(ps, k, max_norm=MAX_NORM, noise_scale=noise)
            opt = NullOptimizer(ps)

            def window():
                for _ in range(k):
                    acc.backward(_InjectGrads.apply(gs, *ps))
                return acc.step(opt)
            return window
        return build

    # bf16 landing (e = 2 bytes), fp32 sums. One process, full windows: the last accumulate pass
    # also writes the norm partials, so the step only applies (docs/kernels.md).
    landing_bytes = 2 + 6 * k + 8 + 12 * (k - 1) + 6
    landing_note = (f"zero landing 2 + {k} x autograd in-place add 6 + accumulate (first 8, then 12; the last "
                    "also gives the norm) + step (apply 6)")
    if param_dtype == torch.float32:
        base, note = 12 * k + 16, f"zero bucket 4 + {k} x autograd in-place add 12 + step (norm 4 + apply 8)"
        stats, stats_note = base + 4, note + " + first micro-batch's norm read 4"
    else:
        # noise_scale=True keeps the landing bucket (its accumulate pass gives every micro-batch's
        # Σg² at no cost); without statistics the bf16 gradients go straight into fp32 where torch
        # has Tensor.grad_dtype (docs/kernels.md): the two rows then differ in path as well.
        stats, stats_note = landing_bytes, landing_note + " + Σg² in the accumulate pass 0"
        if fusedaccum.buckets.grad_dtype_supported():
            base = 4 + 10 * k + 10
            note = (f"direct: zero bucket 4 + {k} x the bf16 gradient added into the fp32 sum (autograd's "
                    "mixed add into the view; the CPU's fold hooks for large parameters) 10 + step (norm 4 + apply 6)")
        else:
            base, note = landing_bytes, landing_note
    g.specs += [
        Spec(op, "GradAccumulator(noise_scale=True)", "gpt2-148", len(sizes), n, pd, stats, stats_note,
             window_of(True), True),
        Spec(op, "GradAccumulator (no statistics)", "gpt2-148", len(sizes), n, pd, base, note, window_of(False)),
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
        if hasattr(fusedaccum, "NoiseScaleSettings"):
            groups += [signals_window_group(n, device, torch.float32), signals_window_group(n, device, torch.bfloat16)]
        if device.type == "cuda" or n not in CPU_SKIP_STEP_SIZES:
            groups += [fold_group(n, device, opt, dtype) for dtype in (torch.float32, torch.bfloat16)
                       for opt in ("AdamW", "SGD")]
            groups.append(micro_batch_group(n, device))
    groups += gpt2_groups(device, GPT2_TINY if quick else GPT2_SMALL, "gpt2-tiny" if quick else "gpt2-small")
    return groups

