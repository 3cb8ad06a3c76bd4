"""A/B timings of the window step, interleaved in one process (for a shared machine, where the
stored benchmark's rows are too noisy): docs/benchmarks.md, "The fold, and the fixed cost".

    python bench/step_ab.py fold 1e8 11 AdamW,SGD   # window step + fused optimizer: fold, apply pass, alone
    python bench/step_ab.py split 1e6 60            # the K=4 window's backwards and step vs the torch loop

THREADS (default 1) sets torch's threads: with 2 threads on a loaded 2-core machine the times swing.
"""

import os
import statistics
import sys
import time

import torch

import fusedaccum
from fusedaccum.bench.fold_cases import fold_group
from fusedaccum.bench.layouts import LIST_LAYOUTS, split_sizes
from fusedaccum.bench.workloads import NullOptimizer, _InjectGrads, _randn


def interleaved(fns: dict, rounds: int) -> dict:
    for f in fns.values():
        f()
        f()
    times = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(rounds):
        for name, f in items[r % len(items):] + items[:r % len(items)]:
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def fold(n: int, rounds: int, names: str) -> None:
    for opt in names.split(","):
        g = fold_group(n, torch.device("cpu"), opt)
        med = interleaved({s.impl: s.build() for s in g.specs}, rounds)
        alone = med[g.specs[2].impl]
        for s in g.specs:
            print(f"{opt} N={n:.0e} {s.impl:42s} {med[s.impl]:9.2f} ms  {s.bytes_per_elem:g} B/el  "
                  f"{med[s.impl] / alone:.2f}x alone")
        g.cache.clear()


def split(n: int, rounds: int, k: int = 4) -> None:
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    gs = list(_randn(n, torch.float32, torch.device("cpu")).split(sizes))
    ps = [torch.nn.Parameter(torch.empty(s)) for s in sizes]
    qs = [torch.nn.Parameter(torch.empty(s)) for s in sizes]
    acc, opt, opt2 = fusedaccum.GradAccumulator(ps, k, max_norm=1.0), NullOptimizer(ps), NullOptimizer(qs)

    def ours_backwards():
        for _ in range(k):
            acc.backward(_InjectGrads.apply(gs, *ps))

    def loop_backwards():
        for _ in range(k):
            (_InjectGrads.apply(gs, *qs) / k).backward()

    def loop_step():
        torch.nn.utils.clip_grad_norm_(qs, 1.0, foreach=True)
        opt2.step()
        opt2.zero_grad(set_to_none=True)

    # A window's phases in order (its backwards, then its step), the two windows interleaved.
    phases = {"ours backwards": ours_backwards, "ours step": lambda: acc.step(opt),
              "loop backwards": loop_backwards, "loop step": loop_step}
    times = {name: [] for name in phases}
    for r in range(rounds + 2):
        for name, f in phases.items():
            t = time.perf_counter()
            f()
            if r >= 2:  # warm-up
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    for name, ms in med.items():
        print(f"N={n:.0e} {name:16s} {ms:8.3f} ms")
    ours, loop = med["ours backwards"] + med["ours step"], med["loop backwards"] + med["loop step"]
    print(f"window (sum of the phases' medians): ours {ours:.3f} ms, loop {loop:.3f} ms, loop / ours = {loop / ours:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    what, n, rounds = sys.argv[1], int(float(sys.argv[2])), int(sys.argv[3])
    fold(n, rounds, sys.argv[4] if len(sys.argv) > 4 else "AdamW,SGD") if what == "fold" else split(n, rounds)
