"""``python -m fusedaccum demo|selfcheck|bench``."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedaccum")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job: a short check of every fused op on this machine")
    selfcheck = sub.add_parser("selfcheck", help="run every fused op against float64 and print a table")
    selfcheck.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args, rest = parser.parse_known_args(argv)
    if args.command in ("demo", "selfcheck"):
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from .selfcheck import run

        return 0 if run(getattr(args, "device", None)) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
