"""bf16 micro-batch accumulation with and without ``Tensor.grad_dtype`` (issue 18, item 2):
the time of K backwards into a ``GradAccumulator`` (the gradients injected, no model), and
the gradient memory per parameter between micro-batches, on both paths, in one run.

    python -m fusedaccum.bench.grad_dtype --n 1e8 --k 4 --repeats 5

Bytes per element per micro-batch (docs/kernels.md): landing = autograd's add into the bf16
landing 6 + accumulate_ with zero_grad 12 (first: overwrite 8) = 18; direct = autograd's
mixed add into the fp32 view 10 (2 + 4 + 4), plus one zeroing of the fp32 bucket per window 4.
"""

import argparse
import statistics
import time

import torch

import fusedaccum
import fusedaccum.buckets

from .layouts import LIST_LAYOUTS, split_sizes
from .workloads import _InjectGrads, _randn


def _grad_bytes(acc) -> int:
    return sum(b.accum.nbytes + (0 if b.landing is None else b.landing.nbytes) for b in acc.buckets)


def measure(n: int, k: int, repeats: int, direct: bool, device="cpu", dtype=torch.bfloat16) -> dict:
    real = fusedaccum.buckets.grad_dtype_supported
    if not direct:
        fusedaccum.buckets.grad_dtype_supported = lambda: False
    try:
        sizes = split_sizes(LIST_LAYOUTS["gpt2-148"], n)
        gs = list(_randn(n, dtype, device).split(sizes))
        ps = [torch.nn.Parameter(torch.empty(s, device=device, dtype=dtype)) for s in sizes]
        acc = fusedaccum.GradAccumulator(ps, k)
    finally:
        fusedaccum.buckets.grad_dtype_supported = real
    times = []
    for _ in range(repeats + 1):  # the first window warms up
        t0 = time.perf_counter()
        for _ in range(k):
            acc.backward(_InjectGrads.apply(gs, *ps))
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        memory = _grad_bytes(acc) / n
        acc.discard_window()
    acc.release()
    med = statistics.median(times[1:])
    return {"path": "direct (grad_dtype)" if acc.buckets.direct else "landing", "n": n, "k": k,
            "ms_per_micro_batch": 1e3 * med / k, "grad_bytes_per_param": memory,
            "bytes_per_elem_per_micro_batch": (10 + 4 / k) if acc.buckets.direct else (18 - 4 / k)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    rows = [measure(int(args.n), args.k, args.repeats, d, args.device) for d in (False, True)]
    for r in rows:
        print(f"{r['path']:>20}  n={r['n']:.0e} K={r['k']}  {r['ms_per_micro_batch']:8.2f} ms/micro-batch  "
              f"{r['bytes_per_elem_per_micro_batch']:.1f} B/el  {r['grad_bytes_per_param']:.2f} B/param")
    print(f"direct / landing time: {rows[1]['ms_per_micro_batch'] / rows[0]['ms_per_micro_batch']:.2f}")


if __name__ == "__main__":
    main()
