"""How NumPy's ways of making the same small products compare: the numpy backend's choice.

The numpy backend computes ``X @ W + b`` as ``X.dot(W)`` plus an in-place add, and the backward
as ``ndarray.dot`` products and ``np.add.reduce`` row sums: the same BLAS gemm and the same
pairwise sums as ``@`` and ``.sum(0)``, without the matmul ufunc's dispatch, ``np.dot``'s
array-function dispatch or the ``sum`` method's Python wrapper. This script times each way at
one small shape, interleaved, in thread CPU time with the BLAS on one thread.

    python benchmarks/numpy_kernel_calls.py [--shape 32 64 64] [--rounds 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits


def contenders(N: int, D: int, M: int) -> dict:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D), dtype=np.float32)
    W = rng.standard_normal((D, M), dtype=np.float32)
    b = rng.standard_normal(M, dtype=np.float32)
    dY = rng.standard_normal((N, M), dtype=np.float32)
    dot, reduce = np.dot, np.add.reduce

    def forward_method():
        Y = X.dot(W)
        Y += b
        return Y

    def forward_np_dot():
        Y = dot(X, W, None)
        Y += b
        return Y

    def forward_matmul_in_place():
        Y = X @ W
        Y += b
        return Y

    return {
        "forward  X @ W + b (the plain expression)": lambda: X @ W + b,
        "forward  X @ W; Y += b": forward_matmul_in_place,
        "forward  np.dot(X, W); Y += b": forward_np_dot,
        "forward  X.dot(W); Y += b (the backend)": forward_method,
        "backward dY @ W.T, X.T @ dY, dY.sum(0) (plain)": lambda: (dY @ W.T, X.T @ dY, dY.sum(0)),
        "backward np.dot x2, dY.sum(0)": lambda: (dot(dY, W.T, None), dot(X.T, dY, None),
                                                  dY.sum(0)),
        "backward ndarray.dot x2, np.add.reduce (the backend)": lambda: (
            dY.dot(W.T), X.T.dot(dY), reduce(dY, 0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=500)
    options = parser.parse_args()
    cases = contenders(*options.shape)
    times: dict[str, list[float]] = {name: [] for name in cases}
    with threadpool_limits(1, user_api="blas"):
        for _ in range(options.rounds):
            for name, call in cases.items():
                start = time.thread_time()
                for _ in range(options.calls):
                    call()
                times[name].append((time.thread_time() - start) / options.calls * 1e6)
    print(f"# {platform.processor() or platform.machine()}, NumPy {np.__version__}, "
          f"load {os.getloadavg()[0]:.1f}, shape {tuple(options.shape)} float32, "
          f"{options.rounds} interleaved rounds of {options.calls} calls, BLAS on one thread")
    print(f"{'way':54} {'median us':>10} {'min us':>8}")
    for name, values in times.items():
        print(f"{name:54} {statistics.median(values):10.2f} {min(values):8.2f}")


if __name__ == "__main__":
    main()
