"""What a post-accumulate-grad hook costs autograd per parameter and backward, by how the
parameters were ever hooked (docs/benchmarks.md, "Why the hooks stay"): the 148 tensors of the
window rows, their .grad attached (an in-place add, as into GradAccumulator's buckets), the four
sets timed interleaved.

    python bench/hook_cost.py 1e3 300      # N (elements over the 148 tensors), rounds

THREADS (default 1) sets torch's threads."""

import os
import statistics
import sys
import time

import torch

from fusedaccum.bench.layouts import LIST_LAYOUTS, split_sizes
from fusedaccum.bench.workloads import _InjectGrads, _randn


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


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    main(int(float(sys.argv[1])), int(sys.argv[2]))
