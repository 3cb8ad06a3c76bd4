"""What the noise-scale statistics cost per window step: the bench's window rows with and
without ``noise_scale=True`` (fusedaccum.bench.cases.signals_window_group), timed
interleaved in one run, fp32 and bf16 parameters.

    ./dev python bench/signals_cost.py [--sizes 1e6,1e7] [--device cpu|cuda]
"""

import argparse

import torch

from fusedaccum.bench.cases import signals_window_group
from fusedaccum.bench.timing import Timer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1) if device.type == "cpu" else None
    timer = Timer(device, quick=False, budget_s=1.0)
    print(f"device {device}, torch {torch.__version__}; {timer.describe()}")
    print(f"{'op':<46} {'impl':<34} {'N':>9} {'B/el':>5} {'median ms':>10} {'vs off':>7}")
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        for dtype in (torch.float32, torch.bfloat16):
            group = signals_window_group(n, device, dtype)
            fns = [spec.build() for spec in group.specs]
            got, errors = timer.interleaved(fns) if device.type == "cpu" else (
                {i: timer(fn) for i, fn in enumerate(fns)}, {})
            assert not errors, errors
            off = got[1]["median_s"]
            for i, spec in enumerate(group.specs):
                t = got[i]["median_s"]
                print(f"{spec.op:<46} {spec.impl:<34} {n:>9} {spec.bytes_per_elem:>5g} {1e3 * t:>10.3f} "
                      f"{t / off:>6.2f}x")
            group.cache.clear()


if __name__ == "__main__":
    main()
