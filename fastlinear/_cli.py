"""What every ``python -m fastlinear`` command shares: one-line errors and their exit status.

A user's mistake (an unknown option or backend name, a bogus ``FASTLINEAR_BACKEND``) ends in one
line on stderr saying what is wrong and what to do, with exit status 2; a command that cannot run
here (a backend that is not available, a missing optional library) in one such line with exit
status 1. Tracebacks are for fastlinear's own bugs. A closed stdout (``info | head -2``) ends the
command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from fastlinear import _dispatch

USAGE = 2  # exit status: the command line or the environment asks for something invalid
CANNOT_RUN = 1  # exit status: valid, but this machine cannot do it


class UsageError(Exception):
    """An invalid option value found after parsing (exit status 2)."""


def plain(text: str | None) -> str:
    """A docstring for ``--help``: reST's double backticks dropped."""
    return (text or "").replace("``", "")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...; see prog --help``), exit status 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def backend_name(text: str) -> str:
    """argparse type of a ``--backend`` option: a canonical backend name (or ``auto``)."""
    try:
        return _dispatch.normalize_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"unknown backend {text!r}: expected one of {', '.join(_dispatch.VALID_NAMES)}"
        ) from None


def check_environment() -> None:
    """Raise UsageError when ``FASTLINEAR_BACKEND`` names no backend or ``FASTLINEAR_AUTO_LOAD``
    no mode (calls would fail), checked by the same code that reads them for the calls."""
    from fastlinear import _warmup

    raw = os.environ.get(_dispatch.ENV_VAR, "")
    if raw.strip():
        try:
            _dispatch.registry.normalize(raw, f"{_dispatch.ENV_VAR} value")
        except ValueError:
            raise UsageError(f"{_dispatch.ENV_VAR}={raw!r} is not a backend: set it to one of "
                             f"{', '.join(_dispatch.registry.valid_names)}, or unset it") from None
    try:
        _warmup.mode()
    except ValueError:
        raise UsageError(f"{_warmup.ENV_VAR}={os.environ.get(_warmup.ENV_VAR)!r} is not a mode: "
                         f"set it to {' or '.join(_warmup.MODES)}, or unset it") from None


def run(prog: str, command: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """Run ``command(argv)``: the exit status, or one line on stderr and 2 or 1 for a user's
    error or a backend that cannot run."""
    try:
        check_environment()
        status = command(argv)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
        return status
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return USAGE
    except _dispatch.BackendUnavailableError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return CANNOT_RUN
    except BrokenPipeError:
        # The reader left (``| head``): send the rest of the output nowhere, quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return CANNOT_RUN
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
