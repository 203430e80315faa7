"""Command line: ``python -m fastlinear info | check | demo | bench | tune`` (``--help``: each)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastlinear", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends, their availability, versions, threads, devices",
                        add_help=False)
    commands.add_parser("check", help="every available backend against the NumPy reference",
                        add_help=False)
    commands.add_parser("demo", help="train a small MLP on scikit-learn's digits", add_help=False)
    commands.add_parser("bench", help="side-by-side benchmark of every backend", add_help=False)
    commands.add_parser("tune", help="measure this machine's thresholds and store its profile",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from fastlinear.info import main as command
    elif args.command == "check":
        from fastlinear.check import main as command
    elif args.command == "demo":
        from fastlinear.demo import main as command
    elif args.command == "tune":
        from fastlinear.tune import main as command
    else:
        from fastlinear.bench import main as command
    return command(rest)


if __name__ == "__main__":
    sys.exit(main())
