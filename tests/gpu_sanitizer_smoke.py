"""A smoke run of every cupy kernel, for ``compute-sanitizer`` (memcheck, racecheck).

Run by tests/test_cupy_backend.py::test_kernels_are_clean_under_compute_sanitizer on a GPU
machine, or by hand::

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu_sanitizer_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/gpu_sanitizer_smoke.py

Every forward path, every activation, float16/32/64, a row-split column sum, odd shapes (edge
tiles); small enough to finish in a minute under the sanitizer. Prints "smoke ok".
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

import fastlinear  # noqa: E402
from fastlinear import activations  # noqa: E402
from fastlinear.backends import cupy as cupy_backend  # noqa: E402
from fastlinear.backends import cupy_launch  # noqa: E402


def main():
    rng = np.random.default_rng(0)
    cupy_launch.COLSUM_MIN_ROWS_PER_SPLIT = 4  # several row splits on small inputs
    for dtype in (np.float16, np.float32, np.float64):
        for N, D, M in ((3, 65, 33), (70, 17, 65)):
            X = cp.asarray(rng.standard_normal((N, D)).astype(dtype))
            W = cp.asarray(rng.standard_normal((D, M)).astype(dtype))
            b = cp.asarray(rng.standard_normal(M).astype(dtype))
            dY = cp.asarray(rng.standard_normal((N, M)).astype(dtype))
            for activation in (None, *activations.ACTIVATIONS):
                for path in cupy_launch.FORWARD_PATHS:
                    with cupy_backend.forced_forward_path(path):
                        Y, saved = fastlinear.linear_forward(
                            X, W, b, activation=activation, backend="cupy", return_saved=True)
                dW, db = cp.zeros((D, M), dtype), cp.zeros(M, dtype)
                fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                           backend="cupy", accumulate=True, dW=dW, db=db)
    cp.cuda.runtime.deviceSynchronize()
    print("smoke ok")


if __name__ == "__main__":
    main()
