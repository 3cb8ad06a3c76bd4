"""``python -m fusedaccum demo|selfcheck|bench``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedaccum")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: large batch vs GradAccumulator vs the naive loop on real data")
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    selfcheck = sub.add_parser("selfcheck", help="run every fused op against float64 and print a table")
    selfcheck.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    # bench parses its own options (python -m fusedaccum bench --help): everything after it is forwarded.
    sub.add_parser("bench", help="throughput against the copy ceiling and PyTorch's path", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import cli as bench_cli

        return bench_cli.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        from .demo import run_from_args

        return run_from_args(args)
    if args.command == "selfcheck":
        from .selfcheck import run

        return 0 if run(getattr(args, "device", None)) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
