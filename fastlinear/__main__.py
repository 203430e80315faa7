"""Command line: python -m fastlinear {info,check,demo,bench} (--help on each)."""

import sys

from fastlinear import _cli

DESCRIPTION = """\
fastlinear's command line:

  info   what this machine offers: backends (available or why not), which one calls use now,
         versions, thread pools, GPUs; paste it into a bug report
  check  run every available backend against the NumPy reference (after installing an extra)
  demo   train a small MLP on scikit-learn's digits (the main job)
  bench  time every backend side by side and plot it

FASTLINEAR_BACKEND=numpy|numba|cupy|auto picks the backend of every call (default auto)."""


def main(argv=None):
    parser = _cli.Parser(prog="python -m fastlinear", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("info", help="backends, their availability, versions, threads, devices",
                        add_help=False)
    commands.add_parser("check", help="every available backend against the NumPy reference",
                        add_help=False)
    commands.add_parser("demo", help="train a small MLP on scikit-learn's digits", add_help=False)
    commands.add_parser("bench", help="side-by-side benchmark of every backend", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        from fastlinear.info import main as command
    elif args.command == "check":
        from fastlinear.check import main as command
    elif args.command == "demo":
        from fastlinear.demo import main as command
    else:
        from fastlinear.bench import main as command
    return _cli.run(f"python -m fastlinear {args.command}", command, rest)


if __name__ == "__main__":
    sys.exit(main())
