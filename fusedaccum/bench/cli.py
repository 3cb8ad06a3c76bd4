"""The command line of ``python -m fusedaccum bench`` (``--help`` lists the options)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .machine import DISTURBED_PCT, device_name, slugify
from .profiling import profile_window
from .report import write_outputs
from .runner import run


def default_out_dir() -> Path:
    """./bench-results (git ignores the name). Not the checkout's bench/results: those files are
    tracked and docs/benchmarks.md shows tables generated from them, so a run there would change
    the documented numbers (or, on this machine's name, make the docs test fail). Store a result
    with --out bench/results on purpose, and regenerate the document's table."""
    return Path.cwd() / "bench-results"


def _size(s: str) -> int:
    v = float(s)
    if not (v >= 1 and v == int(v)):
        raise argparse.ArgumentTypeError(f"not a positive integer: {s}")
    return int(v)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fusedaccum bench",
        description="Throughput of fusedaccum's ops against a copy of the same bytes and against PyTorch's path.")
    p.add_argument("--quick", action="store_true", help="a run of a few seconds (small sizes, no torch.compile)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: ./bench-results; with --quick a temp folder)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", type=lambda s: [_size(x) for x in s.split(",")], default=None,
                   help="comma-separated N, e.g. 1e6,1e7 (default 1e6,1e7,1e8; +1e9 on a GPU with room)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include the torch.compile baselines (default unless --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--min-repeats", type=int, default=None, help="CPU: timed calls per row at least")
    p.add_argument("--budget", type=float, default=None, help="CPU: seconds of timed calls per row (soft)")
    p.add_argument("--wait", type=float, default=None,
                   help=f"CPU: before timing a group, wait up to this many seconds for other processes to use "
                        f"<= {DISTURBED_PCT:g}%% of the CPU (default 30; 0 with --quick)")
    p.add_argument("--retries", type=int, default=None,
                   help=f"CPU: time a group again up to this often while other processes used > {DISTURBED_PCT:g}%% "
                        "of the CPU meanwhile (default 3; 0 with --quick)")
    p.add_argument("--profile", action="store_true",
                   help="only print torch.profiler tables of one window step (and write <slug>-profile.txt)")
    p.add_argument("--profile-size", type=_size, default=None, help="N for --profile (default 1e7; GPU 1e8)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    if args.wait is None:
        args.wait = 0.0 if args.quick else 30.0
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.profile:
        n = args.profile_size or (10**8 if device.type == "cuda" else 10**7)
        if args.threads:
            torch.set_num_threads(args.threads)
        text = profile_window(device, n, wait_s=args.wait)
        print(text)
        out = args.out or default_out_dir()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{slugify(device_name(device), device)}-profile.txt"
        path.write_text(text)
        print(f"wrote {path}")
        return 0
    results = run(args)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fusedaccum-bench-quick-")) if args.quick else default_out_dir())
    paths = write_outputs(results, out)
    for t in results["targets"]:
        print(f"target: {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
