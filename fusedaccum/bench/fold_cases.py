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

# Bytes per element of each optimizer's fused step alone, fp32: AdamW reads p, g, m, v and writes
# p, m, v; SGD with momentum reads p, g, m and writes p, m.
OPTIMIZER_BYTES = {"AdamW": 28, "SGD": 20}
_MAKE = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-6, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-6, momentum=0.9, fused=True),
}


def fold_group(n, device, opt_name: str):
    """Three rows on one set of data (params in GPT-2-small proportions, 148 tensors, whose
    ``.grad`` are views of a ``GradBuckets`` bucket; one optimizer with its state): the step as
    ``GradAccumulator.step`` runs it, with the fold and with the apply pass, and the optimizer
    step alone. Each call is the norm pass, the finalize and the optimizer (plus the apply pass);
    the window's bookkeeping (host-side, constant) is left out. max_norm=1: the first call clips,
    later ones scale by ~1, so repeats do not drift the data."""
    from .cases import FUSED, Group, Spec

    op = f"window step + {opt_name}(fused) fp32"
    g = Group(op, n)
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)

    def setup():
        def make():
            params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in sizes]
            buckets = fusedaccum.GradBuckets(params)
            accum = buckets.buckets[0].accum
            accum.copy_(_randn(n, torch.float32, device))
            opt = _MAKE[opt_name](params)
            opt.step()  # the state exists: the skip is decided on the device, as in a running job
            return params, accum, opt, _optim.Fold(params, device), buckets
        return g.get("setup", make)

    def step(fold: bool):
        def build():
            _, accum, opt, can_fold, _ = setup()
            assert can_fold(opt)
            never = lambda _opt: False  # noqa: E731

            def run():
                stats, owed = _unscale_clip_stats([accum], 1.0, MAX_NORM, 2.0, CLIP_EPS, apply=False)
                _optim.window_step(opt, stats, owed, can_fold if fold else never, lambda: None)
                return stats
            return run
        return build

    def alone():
        _, _, opt, _, _ = setup()
        return opt.step

    b = OPTIMIZER_BYTES[opt_name]
    g.specs += [
        Spec(op, FUSED + " (fold)", "gpt2-148", len(sizes), n, "fp32", 4 + b + 4,
             f"norm 4 + optimizer {b} + its write-back of the divided grad 4", step(True), True),
        Spec(op, FUSED + " (apply pass)", "gpt2-148", len(sizes), n, "fp32", 4 + 8 + b,
             f"norm 4 + apply 8 + optimizer {b}", step(False)),
        Spec(op, f"torch {opt_name}(fused=True).step() alone", "gpt2-148", len(sizes), n, "fp32", b,
             f"optimizer {b}", alone),
    ]
    return g
