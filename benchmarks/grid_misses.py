"""The tune table's remaining misses (issue 20: numba >= 0.97x plain NumPy at every grid cell),
systematic or noise: the numba backend against the plain NumPy expression, with an A-A control.

Per cell, ``--rounds`` interleaved rounds (the order turning each round) of three contenders:
the numba backend's function, the plain NumPy expression, and the same plain expression again
(a second closure: the A-A control). ``numpy/numba`` is the figure the tune table reports;
``numpy/numpy`` shows what identical work reads as in the same rounds (the noise floor). Also,
for the gemv cells, the parts of the plain expression (``X @ W`` alone) and numba's forward with
``out`` given (no allocation). Medians and minimums of per-call times; ratios above 1: the first
named faster.

    flock /work/bench.lock python benchmarks/grid_misses.py [--rounds 41]
"""

import argparse
import os
import statistics
import time

import numpy as np

from fastlinear import _dispatch
from fastlinear.tune import _inputs

CELLS = (((1, 4096, 4096), "float64", "forward"), ((1, 4096, 4096), "float32", "forward"),
         ((64, 256, 256), "float64", "backward"), ((64, 256, 256), "float32", "backward"))
BLOCK_SECONDS = 0.03


def contenders(module, shape, dtype, pass_name):
    a = _inputs(shape, dtype)
    X, W, b, dY = a["X"], a["W"], a["b"], a["dY"]
    if pass_name == "forward":
        out = np.empty((shape[0], shape[2]), dtype)
        return {"numba": lambda: module.forward(X, W, b, None),
                "numpy": lambda: X @ W + b,
                "numpy again": lambda: X @ W + b,
                "numba out=": lambda: module.forward(X, W, b, out),
                "numpy X@W only": lambda: X @ W}
    return {"numba": lambda: module.backward(dY, X, W, True, True, False, None, None, None),
            "numpy": lambda: (dY @ W.T, X.T @ dY, dY.sum(0)),
            "numpy again": lambda: (dY @ W.T, X.T @ dY, dY.sum(0))}


def measure(calls, rounds):
    """Per-call seconds of each contender in each of ``rounds`` interleaved blocks."""
    names = list(calls)
    counts = {}
    for name in names:
        calls[name]()
        start = time.perf_counter()
        calls[name]()
        counts[name] = max(1, int(BLOCK_SECONDS / max(time.perf_counter() - start, 1e-7)))
    samples = {name: [] for name in names}
    for round_index in range(rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        if round_index % 2:
            order.reverse()
        for name in order:
            call, count = calls[name], counts[name]
            start = time.perf_counter()
            for _ in range(count):
                call()
            samples[name].append((time.perf_counter() - start) / count)
        time.sleep(0.02)
    return samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    options = parser.parse_args()
    module = _dispatch.load_backend("numba")
    print(f"load at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{options.rounds} rounds; BLAS_THREADS_MIN_WORK "
          f"{module._numba_blas.BLAS_THREADS_MIN_WORK}, numba threads "
          f"{module.numba.get_num_threads()}")
    for shape, dtype, pass_name in CELLS:
        samples = measure(contenders(module, shape, dtype, pass_name), options.rounds)
        base = samples["numpy"]
        print(f"{'x'.join(map(str, shape))} {dtype} {pass_name}")
        for name, seconds in samples.items():
            print(f"  {name:16} median {statistics.median(seconds) * 1e3:9.4f} ms  min "
                  f"{min(seconds) * 1e3:9.4f} ms   numpy/this median "
                  f"{statistics.median(base) / statistics.median(seconds):6.3f}  min "
                  f"{min(base) / min(seconds):6.3f}", flush=True)
    print(f"load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
