"""Why the reference norm is folded from 1024-element rows: error and time against one
``torch.linalg.vector_norm`` over the whole bucket, on the CPU.

    python bench/norm_accuracy.py            # N = 1e6 and the GPT-2-small bucket (124,439,808)

Relative error against a float64 norm of the same fp32 data; time is the median of 5 calls."""

import statistics
import sys
import time

import torch

from fusedaccum import reference


def _median_s(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _exact_norm(x: torch.Tensor) -> float:
    # float64 piece by piece: a whole float64 copy would double the memory.
    return sum(float(x[i:i + (1 << 22)].double().square().sum()) for i in range(0, x.numel(), 1 << 22)) ** 0.5


def main(sizes) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'N':>13}  {'whole vector_norm: rel err':>27} {'time':>9}  {'rows folded in fp64: rel err':>29} {'time':>9}")
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        exact = _exact_norm(x)
        whole = float(torch.linalg.vector_norm(x))
        rows = float(reference._fold_rows(reference._row_norms(x)).sqrt())  # the reference's CPU fast path
        t_whole = _median_s(lambda: torch.linalg.vector_norm(x))
        t_rows = _median_s(lambda: reference._fold_rows(reference._row_norms(x)))
        print(f"{n:>13,}  {abs(whole - exact) / exact:>27.1e} {t_whole * 1e3:>6.1f} ms  "
              f"{abs(rows - exact) / exact:>29.1e} {t_rows * 1e3:>6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(float(s)) for s in sys.argv[1:]] or [10**6, 124_439_808]))
