"""The window step with a real fused optimizer against the optimizer alone: what the step adds
on top of the optimizer's own bytes, with the multiplier folded into the optimizer (the fold,
``fusedaccum._optim.Fold``) and with the apply pass (every other optimizer's path)."""

from __future__ import annotations

import torch

import fusedaccum
from fusedaccum import _optim
from fusedaccum.ops import CLIP_EPS, _unscale_clip_stats

from .layouts import LIST_LAYOUTS, split_sizes
from .workloads import MAX_NORM, _randn

# Bytes per element of each optimizer's fused step alone, per byte of the parameter dtype (its
# state and gradient in the same dtype): AdamW reads p, g, m, v and writes p, m, v (7 tensors);
# SGD with momentum reads p, g, m and writes p, m (5). fp32: 28 and 20; bf16: 14 and 10.
OPTIMIZER_TENSORS = {"AdamW": 7, "SGD": 5}
OPTIMIZER_BYTES = {name: 4 * t for name, t in OPTIMIZER_TENSORS.items()}  # fp32


def step_prep_bytes(param_dtype, *, fold: bool = False, norm_in_last_pass: bool = False) -> "tuple[int, str]":
    """B/el the step adds to the optimizer's own bytes (docs/kernels.md), and how: the norm read
    pass 4, then either the apply pass (read 4 + write the parameter dtype's e, into the
    gradient the optimizer reads) or, with the fold, the optimizer's write-back of the divided
    gradient 4. ``norm_in_last_pass``: bf16/fp16 on the landing path in one process, where the
    window's last ``accumulate_`` produces the norm's partials (issue 18, item 3) and the step
    has no read pass of its own: 10 -> 6 B/el. No row measures that path yet; the rows here run
    the direct bucket, which has no accumulate pass to carry the norm."""
    e = param_dtype.itemsize
    norm, norm_note = (0, "norm from the last accumulate pass 0") if norm_in_last_pass else (4, "norm 4")
    if fold:
        return norm + 4, f"{norm_note} + the optimizer's write-back of the divided grad 4"
    return norm + 4 + e, f"{norm_note} + apply (read 4 + write {e})"


_MAKE = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-6, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-6, momentum=0.9, fused=True),
}


def fold_group(n, device, opt_name: str, param_dtype=torch.float32):
    """Rows on one set of data (params in GPT-2-small proportions, 148 tensors, whose ``.grad``
    are views of a ``GradBuckets`` bucket; one optimizer with its state): the step as
    ``GradAccumulator.step`` runs it, and the optimizer step alone. Each call is the norm pass,
    the finalize and the optimizer (plus the apply pass); the window's bookkeeping (host-side,
    constant) is left out. fp32: with the fold and with the apply pass. bf16: the apply pass
    only (the fold needs fp32 parameters, ``_optim.Fold``), rounding into the step buffer of a
    direct bucket (``GradBuckets.step_outputs``; the landing path's apply writes the same bytes
    into its landing bucket). max_norm=1: the first call clips, later ones scale by ~1, so
    repeats do not drift the data."""
    from .cases import FUSED, Group, Spec
    from .workloads import _dt

    pd = _dt(param_dtype)
    op = f"window step + {opt_name}(fused) {pd}"
    g = Group(op, n)
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    fp32 = param_dtype == torch.float32

    def setup():
        def make():
            params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=param_dtype)) for s in sizes]
            buckets = fusedaccum.GradBuckets(params, direct=None if fp32 else True)
            accum = buckets.buckets[0].accum
            accum.copy_(_randn(n, torch.float32, device))
            out = buckets.step_outputs()  # bf16: param.grad are views of the step buffer now
            if out is not None:
                out[0].copy_(accum)
            opt = _MAKE[opt_name](params)
            opt.step()  # the state exists: the skip is decided on the device, as in a running job
            return params, accum, out, opt, _optim.Fold(params, device), buckets
        return g.get("setup", make)

    def step(fold: bool):
        def build():
            _, accum, out, opt, can_fold, _ = setup()
            assert can_fold(opt) == fp32  # the fold needs fp32 parameters
            never = lambda _opt: False  # noqa: E731

            def run():
                stats, owed = _unscale_clip_stats([accum], 1.0, MAX_NORM, 2.0, CLIP_EPS, out=out, apply=False)
                _optim.window_step(opt, stats, owed, can_fold if fold else never, lambda: None)
                return stats
            return run
        return build

    def alone():
        opt = setup()[3]
        return opt.step

    e = param_dtype.itemsize
    b = OPTIMIZER_TENSORS[opt_name] * e
    if fp32:
        prep, how = step_prep_bytes(param_dtype, fold=True)
        g.specs.append(Spec(op, FUSED + " (fold)", "gpt2-148", len(sizes), n, pd, prep + b,
                            f"{how} + optimizer {b}", step(True), True))
    prep, how = step_prep_bytes(param_dtype)
    g.specs += [
        Spec(op, FUSED + " (apply pass)", "gpt2-148", len(sizes), n, pd, prep + b, f"{how} + optimizer {b}",
             step(False), not fp32),
        Spec(op, f"torch {opt_name}(fused=True).step() alone", "gpt2-148", len(sizes), n, pd, b,
             f"optimizer {b} (read p, g, {'m, v' if opt_name == 'AdamW' else 'm'}; write p, "
             f"{'m, v' if opt_name == 'AdamW' else 'm'}; {e} B each)", alone),
    ]
    return g


def micro_batch_group(n, device, k=4):
    """bf16 parameters, K micro-batches in the middle of a window (the window never closes: the
    accumulator's ``accumulation_steps`` is out of reach, so every call is K backwards in the
    steady state), gradients injected (no model): direct where torch has ``Tensor.grad_dtype``
    (autograd adds the bf16 gradient into the fp32 bucket view; on the CPU a large parameter's
    hook adds it, ``_fold_hook``) against the landing bucket (today's path where
    torch lacks ``grad_dtype``; forced here with ``grad_dtype_supported`` patched for the
    construction)."""
    from .cases import FUSED, Group, Spec
    from .grad_memory import _landing_only
    from .workloads import _InjectGrads

    op = f"micro-batch accumulation bf16 (K={k})"
    g = Group(op, n)
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    grads = lambda: g.get("grads", lambda: list(_randn(n, torch.bfloat16, device).split(sizes)))  # noqa: E731

    def window(landing: bool):
        def build():
            gs = grads()
            ps = [torch.nn.Parameter(torch.empty(s, device=device, dtype=torch.bfloat16)) for s in sizes]
            with _landing_only(landing):
                acc = fusedaccum.GradAccumulator(ps, 10**9)
            assert acc.buckets.direct != landing

            def run():
                for _ in range(k):
                    acc.backward(_InjectGrads.apply(gs, *ps))
            # the runner calls these when the group is done: the open window is dropped on purpose
            g.cache.setdefault("close", []).extend([acc.discard_window, acc.release])
            return run
        return build

    g.specs += [
        Spec(op, FUSED + " direct", "gpt2-148", len(sizes), n, "bf16->fp32", 10 * k,
             f"{k} x the bf16 gradient added into the fp32 sum (by autograd into an fp32 view; on the CPU a "
             "parameter of more than 2^18 elements by its fold hook, in pieces): read grad 2 + read 4 + write 4 "
             "(per window also: zero the bucket 4)", window(False), True),
        Spec(op, FUSED + " landing bucket", "gpt2-148", len(sizes), n, "bf16->fp32", 18 * k,
             f"{k} x (autograd's add into the bf16 landing 6 + accumulate_ zero_grad 12) (per window also: "
             "zero the landing 2; the first accumulate_ overwrites, 8)", window(True)),
    ]
    return g
