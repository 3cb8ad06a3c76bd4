"""The norm in the window's last accumulate pass, on the CPU (the reference): a bf16 landing
bucket's last ``accumulate_`` and the step's preprocessing (norm, finalize, apply into the
landing bucket), without and with the last-pass norm (``accumulate_(norm_out=...)``, then
``_unscale_clip_stats(partials=...)``: no norm pass at the step).

    python bench/last_pass_norm.py            # N = 1e7 and 1e8
    python bench/last_pass_norm.py 1e6 3e7    # other sizes

Bytes per element: last pass 12 (read bf16 grad 2, read + write fp32 sum 8, zero the grad 2) either
way; step 10 (norm read 4, apply read 4 + write 2) without, 6 with. Times are medians of 7
alternating runs (A, B, A, B, ...), so that a change of the machine's load hits both alike."""

import statistics
import sys
import time

import torch

from fusedaccum.ops import CLIP_EPS, _unscale_clip_stats, accumulate_, sq_slots


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(sizes, repeats: int = 7) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; reference backend (CPU)")
    print(f"{'N':>12} {'mode':>10} {'last pass':>10} {'step':>9} {'both':>9}   step B/el")
    for n in sizes:
        gen = torch.Generator().manual_seed(0)
        start = torch.randn(n, generator=gen)
        grad = torch.randn(n, generator=gen).to(torch.bfloat16)
        acc, landing = start.clone(), grad.clone()
        inv = 1.0 / 8
        times = {"norm pass": ([], []), "last pass": ([], [])}
        for _ in range(repeats):
            for mode in times:
                acc.copy_(start)
                landing.copy_(grad)
                norm = mode == "last pass"
                out = torch.empty(5, sq_slots(acc)) if norm else None
                extra = dict(norm_out=out, inv_scale=inv, norm_type=2.0, norm_dtype=torch.bfloat16) if norm else {}
                t_last = _timed(lambda: accumulate_(acc, landing, 1.0, zero_grad=True, **extra))
                t_step = _timed(lambda: _unscale_clip_stats([acc], inv, 1.0, 2.0, CLIP_EPS, out=[landing],
                                                            partials=[out] if norm else None))
                times[mode][0].append(t_last)
                times[mode][1].append(t_step)
        for mode, (last, step) in times.items():
            both = [a + b for a, b in zip(last, step)]
            print(f"{n:>12,} {mode:>10} {statistics.median(last) * 1e3:>7.1f} ms {statistics.median(step) * 1e3:>6.1f} ms "
                  f"{statistics.median(both) * 1e3:>6.1f} ms   {6 if mode == 'last pass' else 10}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(float(s)) for s in sys.argv[1:]] or [10**7, 10**8]))
