"""What a post-accumulate-grad hook costs autograd per parameter and backward, by how the
parameters were ever hooked (docs/benchmarks.md, "Why the hooks stay"): the 148 tensors of the
window rows, their .grad attached (an in-place add, as into GradAccumulator's buckets), the four
sets timed interleaved.

    python bench/hook_cost.py 1e3 300      # N (elements over the 148 tensors), rounds
    python bench/hook_cost.py window 1e6   # the window rows at N, and ours with no hook ever registered

The second form is an upper bound, not a design: its GradAccumulator is built with hook
registration stubbed out and counts every parameter as reached, so its guards are off. It times
the three windows interleaved (the bench's CPU timer), three times. THREADS (default 1 for the
first form; the second keeps torch's default, as the stored bench does) sets torch's threads."""

import os
import statistics
import sys
import time
import types
from unittest import mock

import torch

import fusedaccum
from fusedaccum.bench.cases import WINDOW_K, window_group
from fusedaccum.bench.layouts import LIST_LAYOUTS, split_sizes
from fusedaccum.bench.timing import Timer
from fusedaccum.bench.workloads import MAX_NORM, NullOptimizer, _InjectGrads, _randn


def main(n: int, rounds: int) -> None:
    sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
    grads = list(_randn(n, torch.float32, torch.device("cpu")).split(sizes))
    touched: list = []

    def params():
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in sizes]
        for p in ps:
            p.grad = torch.zeros_like(p)
        return ps

    sets = {"no hook": params(), "hook removed": params(), "list.append hook": params(),
            "+ pre-hook removed": params()}
    for p in sets["hook removed"]:
        p.register_post_accumulate_grad_hook(touched.append).remove()
    for p in sets["list.append hook"]:
        p.register_post_accumulate_grad_hook(touched.append)
    for p in sets["+ pre-hook removed"]:
        p.register_post_accumulate_grad_hook(touched.append)
        p.register_hook(touched.append).remove()
    times: dict = {name: [] for name in sets}
    for r in range(rounds + 10):
        for name, ps in sets.items():
            t = time.perf_counter()
            _InjectGrads.apply(grads, *ps).backward()
            if r >= 10:  # warm-up
                times[name].append(time.perf_counter() - t)
            touched.clear()
    base = statistics.median(times["no hook"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"N={n:.0e} {name:20s} {med * 1e6:8.0f} us per backward  "
              f"{(med - base) / len(sizes) * 1e6:+.2f} us per parameter")


class _NoHandle:
    def remove(self) -> None:
        pass


def _settle_all_reached(buckets, mark) -> None:
    # With no hook nothing records the parameters: count each as reached once per backward.
    if mark is not None:
        buckets._reattach.touched.extend(p for p, _ in buckets._reattach.pairs)
        buckets._reattach.fold()


def unhooked_window(grads: list, sizes: list):
    """The window row's GradAccumulator window over new parameters, built with hook registration
    stubbed out (guards off). Returns (window, parameters)."""
    ps = [torch.nn.Parameter(torch.empty(s)) for s in sizes]
    with mock.patch.object(torch.nn.Parameter, "register_post_accumulate_grad_hook",
                           lambda self, hook: _NoHandle()):
        acc = fusedaccum.GradAccumulator(ps, WINDOW_K, max_norm=MAX_NORM)
    acc.buckets.settle = types.MethodType(_settle_all_reached, acc.buckets)
    opt = NullOptimizer(ps)

    def run():
        for _ in range(WINDOW_K):
            acc.backward(_InjectGrads.apply(grads, *ps))
        return acc.step(opt)

    return run, ps


def window(n: int) -> None:
    g = window_group(n, torch.device("cpu"))
    ours, loop = (s.build() for s in g.specs)
    unhooked, _ = unhooked_window(g.cache["grads"], split_sizes(LIST_LAYOUTS["gpt2-148"], n))
    timer = Timer(torch.device("cpu"), False, budget_s=3.0)
    for _ in range(3):
        med = {i: r["median_s"] * 1e3 for i, r in timer.interleaved([ours, loop, unhooked])[0].items()}
        print(f"N={n:.0e} ours {med[0]:.3f} ms, loop {med[1]:.3f} ms, ours without hooks {med[2]:.3f} ms; "
              f"loop / ours {med[1] / med[0]:.3f}, loop / ours without hooks {med[1] / med[2]:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "window":
        window(int(float(sys.argv[2])))
    else:
        torch.set_num_threads(int(os.environ.get("THREADS", "1")))
        main(int(float(sys.argv[1])), int(sys.argv[2]))
