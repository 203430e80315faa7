"""The tune table's large misses, side by side (issue 20, item 3): the numba backend's forward
against the plain NumPy expression at the shapes where they make the same BLAS call.

Per shape: ``--rounds`` interleaved blocks (A B B A ...) of ``--calls`` calls each, after a warm
up; medians and minimums of the per-call times, and their ratios (numpy / numba, above 1: numba
faster).

    flock /work/bench.lock python benchmarks/large_forward_ab.py
"""

import argparse
import os
import statistics
import time

import numpy as np

from fastlinear import _dispatch

SHAPES = ((256, 1024, 1024, "float64"), (1, 4096, 4096, "float64"),
          (1024, 1024, 1024, "float32"), (256, 1024, 1024, "float32"))


def block(call, calls):
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=3)
    options = parser.parse_args()
    module = _dispatch.load_backend("numba")
    rng = np.random.default_rng(0)
    print(f"load at start {os.getloadavg()[0]:.2f}")
    print(f"{'shape':22} {'numba med/min ms':>18} {'numpy med/min ms':>18}  ratio med  min")
    for N, D, M, dtype in SHAPES:
        X, W, b = (rng.standard_normal(s).astype(dtype) for s in ((N, D), (D, M), (M,)))
        calls = {"numba": lambda X=X, W=W, b=b: module.forward(X, W, b, None),
                 "numpy": lambda X=X, W=W, b=b: X @ W + b}
        times = {name: [] for name in calls}
        for call in calls.values():
            block(call, 2)
        for round_index in range(options.rounds):
            for name in (("numba", "numpy") if round_index % 2 else ("numpy", "numba")):
                times[name].append(block(calls[name], options.calls))
        mine, plain = times["numba"], times["numpy"]
        print(f"{f'{N}x{D}x{M} {dtype}':22} {statistics.median(mine) * 1e3:8.3f} "
              f"{min(mine) * 1e3:8.3f}  {statistics.median(plain) * 1e3:8.3f} "
              f"{min(plain) * 1e3:8.3f}  {statistics.median(plain) / statistics.median(mine):6.3f}"
              f" {min(plain) / min(mine):6.3f}", flush=True)
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
