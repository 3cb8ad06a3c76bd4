"""Why the bf16 direct path (Tensor.grad_dtype) is no faster than the landing bucket on a CPU.

Autograd accumulates a bf16 gradient into an fp32 ``.grad`` with one mixed-dtype in-place add.
On the CPU that add converts the whole bf16 operand to fp32 first (a temporary as large as the
fp32 bucket), so it moves more bytes than the landing path's same-dtype add plus the reference's
cache-sized accumulate pieces. Prints the median of each, in ms.

    python bench/mixed_add_cpu.py [N]      (default 1e8)
"""

import sys
import time

import torch


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(n: int) -> None:
    acc, g, g2 = torch.zeros(n), torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
    landing = torch.zeros(n, dtype=torch.bfloat16)
    piece = 1 << 18

    def pieces():
        for i in range(0, n, piece):
            acc[i:i + piece].add_(g[i:i + piece])

    direct = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    direct.grad_dtype = torch.float32
    direct.grad = torch.zeros(n)
    plain = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
    plain.grad = torch.zeros(n, dtype=torch.bfloat16)
    print(f"N = {n:,}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"fp32.add_(bf16), one call:               {median_ms(lambda: acc.add_(g)):8.1f} ms")
    print(f"fp32.add_(bf16), {piece}-element pieces: {median_ms(pieces):8.1f} ms")
    print(f"bf16.add_(bf16):                         {median_ms(lambda: landing.add_(g2)):8.1f} ms")
    print(f"backward into a grad_dtype=fp32 .grad:   {median_ms(lambda: (direct * 1).backward(g), 3):8.1f} ms")
    print(f"backward into a bf16 .grad:              {median_ms(lambda: (plain * 1).backward(g), 3):8.1f} ms")


if __name__ == "__main__":
    main(int(float(sys.argv[1])) if len(sys.argv) > 1 else 10**8)
