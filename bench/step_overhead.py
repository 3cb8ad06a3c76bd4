"""The fixed cost of the window step: the window row of the bench (``window_group``: K = 4
backwards + ``acc.step``, GPT-2-small's 148 tensors scaled to N, ``NullOptimizer``) against the
PyTorch loop, both built by ``fusedaccum/bench/cases.py`` and timed interleaved in one process,
round after round (for a shared machine): docs/benchmarks.md, "The fold, and the fixed cost".

    python bench/step_overhead.py 1e4,1e6,1e7 200    # sizes, rounds (fewer at large N: 1e7 takes ~40 ms a window)

THREADS (default 1) sets torch's threads. Prints each row's median and the loop / ours ratio, by the
wall clock and by this thread's CPU time (``time.thread_time``: with 1 thread, the time other processes
take the core away is left out, so it varies less on a loaded machine).
"""

import os
import statistics
import sys
import time

import torch

from fusedaccum.bench.cases import window_group


def measure(n: int, rounds: int) -> dict:
    g = window_group(n, torch.device("cpu"))
    fns = {s.impl: s.build() for s in g.specs}
    for f in fns.values():
        f(), f()  # warm-up: allocator, first-step state
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    items = list(fns.items())
    for r in range(rounds):
        for name, f in items[r % 2:] + items[:r % 2]:
            t, c = time.perf_counter(), time.thread_time()
            f()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.thread_time() - c)
    g.cache.clear()
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def main(argv) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    sizes = [int(float(s)) for s in argv[0].split(",")]
    rounds = int(argv[1]) if len(argv) > 1 else 200
    print(f"loadavg {os.getloadavg()[0]:.2f}, threads {torch.get_num_threads()}, {rounds} rounds")
    for n in sizes:
        med = measure(n, rounds if n < 10**7 else max(rounds // 5, 11))
        (ours, (o, oc)), (loop, (lo, lc)) = med.items()
        print(f"N={n:.0e}  {ours}: {o * 1e3:8.3f} ms (cpu {oc * 1e3:8.3f})   {loop}: {lo * 1e3:8.3f} ms "
              f"(cpu {lc * 1e3:8.3f})   loop / ours = {lo / o:.3f} (cpu {lc / oc:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
