"""The overhead table's rows counted in machine instructions, before and after: a figure that a
busy machine does not move.

``bench --overhead`` times the call paths; on a shared machine its microseconds drift with the
load. Here the same calls (32x64x64 float32, numpy backend, BLAS on one thread; the default
path before ``auto``'s switch) run under ``valgrind --tool=callgrind``, which counts the
instructions each executes. A marker call (``os.getppid``) between the rows makes callgrind
write one count per row; the instructions per call over the plain NumPy expression follow.
(The numba rows are left out: compiling under valgrind takes many minutes.) Instructions are
not time; on the machine this was written on, one instruction of these paths took about
0.27 ns on a quiet machine.

Run: ``python benchmarks/overhead_instructions.py --before main`` (about two minutes per
version; valgrind must be installed).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The rows: name -> the call; "plain ..." are the baselines.
_CALLS = """
import os, sys
import numpy as np
import fastlinear
from fastlinear import _dispatch
from threadpoolctl import threadpool_limits

rng = np.random.default_rng(0)
X, W, dY = (rng.standard_normal(s).astype(np.float32) for s in ((32, 64), (64, 64), (32, 64)))
b = rng.standard_normal(64).astype(np.float32)
_dispatch.registry.load_after_calls = 1 << 62  # the default path stays before auto's switch
layer = fastlinear.Linear(64, 64, dtype=np.float32, backend="numpy", rng=0)
default_layer = fastlinear.Linear(64, 64, dtype=np.float32, rng=0)
layer.forward(X), default_layer.forward(X)


def minimal(X, W, b=None, *, backend=None):
    if type(X) is not np.ndarray or type(W) is not np.ndarray or X.ndim != 2 \\
            or X.shape[1] != W.shape[0]:
        raise TypeError("X and W must be NumPy matrices of matching shapes")
    return X @ W + b


def minimal_backward(dY, X, W, *, backend=None):
    if type(X) is not np.ndarray or type(W) is not np.ndarray or X.ndim != 2 \\
            or X.shape[1] != W.shape[0] or dY.shape != (X.shape[0], W.shape[1]):
        raise TypeError("dY, X and W must be NumPy matrices of matching shapes")
    return dY @ W.T, X.T @ dY, dY.sum(0)


ROWS = {
    "plain forward": lambda: X @ W + b,
    "minimal wrapper forward": lambda: minimal(X, W, b, backend="numpy"),
    "functional forward": lambda: fastlinear.linear_forward(X, W, b, backend="numpy"),
    "Linear forward": lambda: layer.forward(X),
    "default before switch forward": lambda: fastlinear.linear_forward(X, W, b),
    "Linear default forward": lambda: default_layer.forward(X),
    "plain backward": lambda: (dY @ W.T, X.T @ dY, dY.sum(0)),
    "minimal wrapper backward": lambda: minimal_backward(dY, X, W, backend="numpy"),
    "functional backward": lambda: fastlinear.linear_backward(dY, X, W, backend="numpy"),
    "Linear backward": lambda: layer.backward(dY),
    "default before switch backward": lambda: fastlinear.linear_backward(dY, X, W),
    "Linear default backward": lambda: default_layer.backward(dY),
}
CALLS = int(sys.argv[1])
with threadpool_limits(limits=1, user_api="blas"):
    for call in ROWS.values():  # warm up
        for _ in range(200):
            call()
    for call in ROWS.values():
        os.getppid()  # callgrind writes the count so far here
        for _ in range(CALLS):
            call()
    os.getppid()
"""


def _export(revision: str, into: Path) -> Path:
    archive = into / "before.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", revision, "fastlinear"],
                       stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    return into / "before"


def count(tree: Path, calls: int) -> dict[str, float]:
    """Instructions per call of every row, with ``tree`` first on the path."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "calls.py"
        script.write_text(_CALLS, encoding="utf-8")
        out = Path(folder) / "callgrind.out"
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", "--dump-before=getppid",
             f"--callgrind-out-file={out}", sys.executable, str(script), str(calls)],
            env={**os.environ, "PYTHONPATH": str(tree)}, cwd=folder, capture_output=True,
            text=True)
        if done.returncode:
            raise SystemExit(f"valgrind failed for {tree}:\n{done.stderr[-2000:]}")
        totals = []
        for dump in sorted(glob.glob(f"{out}.*"), key=lambda f: int(f.rsplit(".", 1)[1])):
            with open(dump, encoding="utf-8") as lines:
                totals += [int(line.split()[1]) for line in lines
                           if line.startswith(("summary:", "totals:"))][:1]
    per_call = [total / calls for total in totals[1:]]  # totals[0]: start-up and warm-up
    return dict(zip(_rows(), per_call, strict=True))


def _rows() -> list[str]:
    body = _CALLS.split("ROWS = {")[1].split("}")[0]
    return [line.split('"')[1] for line in body.splitlines() if line.strip().startswith('"')]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git revision to compare against")
    parser.add_argument("--calls", type=int, default=1000, help="calls per row")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        before = count(_export(options.before, Path(folder)), options.calls)
    after = count(ROOT, options.calls)
    print(f"instructions per call over the plain NumPy expression (callgrind, 32x64x64 float32, "
          f"numpy backend; before: {options.before}, after: this tree)")
    print(f"{'call':32} {'before':>8} {'after':>8}")
    for name in _rows():
        if name.startswith("plain"):
            continue
        plain = "plain " + name.rsplit(" ", 1)[1]
        print(f"{name:32} {before[name] - before[plain]:8.0f} {after[name] - after[plain]:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
