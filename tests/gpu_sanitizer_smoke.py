"""A smoke run of every cupy kernel, for ``compute-sanitizer`` (memcheck, racecheck).

Run by tests/test_cupy_backend.py::test_kernels_are_clean_under_compute_sanitizer and by
benchmarks/gpu_first_contact.sh on a GPU machine, or by hand (about a minute each)::

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu_sanitizer_smoke.py
    compute-sanitizer --tool racecheck --error-exitcode 1 \
        python tests/gpu_sanitizer_smoke.py --own-kernels-only

Every forward path, every activation, float16/32/64, row-split column sums, odd shapes (edge
tiles) and narrow outputs (fewer column lanes than a warp). CuPy's memory pool is switched off
(``cupy.cuda.set_allocator(None)``): the pool rounds allocations up to 512 bytes and reuses
blocks, so memcheck would not see a small overrun past an array; with the pool off each array is
its own cudaMalloc. ``--own-kernels-only`` launches fastlinear's kernels alone, never cuBLAS
(racecheck instruments every kernel it sees, and cuBLAS's are many and slow under it); inputs are
made on the host and copied, so no CuPy kernel runs either. Prints "smoke ok".
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import fastlinear  # noqa: E402
from fastlinear import activations  # noqa: E402
from fastlinear.backends import cupy as cupy_backend  # noqa: E402
from fastlinear.backends import cupy_launch  # noqa: E402

DTYPES = (np.float16, np.float32, np.float64)
# (N, D, M): edge tiles of both forward kernels, row splits of the column sums, a narrow output
SHAPES = ((3, 65, 33), (70, 17, 65), (70, 9, 3))
ACTIVATION_NAMES = (None, *activations.ACTIVATIONS)


def _inputs(xp, rng, N, D, M, dtype):
    """X, W, b, dY made on the host (no device kernel) and copied with ``xp.asarray``."""
    arrays = (rng.standard_normal(shape).astype(dtype) for shape in ((N, D), (D, M), (M,),
                                                                     (N, M)))
    return tuple(xp.asarray(a) for a in arrays)


def own_kernel_launches(xp, rng):
    """Every kernel of kernels/linear.cu through the backend's launchers, cuBLAS never called."""
    state = cupy_backend._device_state()
    launches = 0
    for dtype in DTYPES:
        for N, D, M in SHAPES:
            X, W, b, dY = _inputs(xp, rng, N, D, M, dtype)
            for activation in ACTIVATION_NAMES:
                Z = xp.asarray(np.empty((N, M), dtype))
                for path in ("small_batch", "tiled"):
                    with cupy_backend.forced_forward_path(path):
                        Y = cupy_backend._forward_device(X, W, b, None, activation, Z, state)
                    launches += 1
                if activation is not None:
                    cupy_backend._bias_activation_epilogue(Y, b, activation, Z, state)
                    G = xp.asarray(np.empty((N, M), dtype))
                else:
                    cupy_backend._fill_rows_with_bias(state, Y, b)
                    G = None
                for accumulate in (False, True):
                    db = xp.asarray(np.zeros(M, dtype))
                    cupy_backend._gradient_column_sums(dY, Z, activation, G, db, accumulate,
                                                       state)
                launches += 3
    return launches


def public_calls(xp, rng):
    """Every path of the public API, cuBLAS included (for memcheck)."""
    calls = 0
    for dtype in DTYPES:
        for N, D, M in SHAPES:
            X, W, b, dY = _inputs(xp, rng, N, D, M, dtype)
            for activation in ACTIVATION_NAMES:
                for path in cupy_launch.FORWARD_PATHS:
                    with cupy_backend.forced_forward_path(path):
                        Y, saved = fastlinear.linear_forward(
                            X, W, b, activation=activation, backend="cupy", return_saved=True)
                dW, db = xp.asarray(np.zeros((D, M), dtype)), xp.asarray(np.zeros(M, dtype))
                fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                           backend="cupy", accumulate=True, dW=dW, db=db)
                calls += len(cupy_launch.FORWARD_PATHS) + 1
    return calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--own-kernels-only", action="store_true",
                        help="launch fastlinear's kernels alone (for racecheck): no cuBLAS")
    args = parser.parse_args(argv)
    import cupy as cp

    cp.cuda.set_allocator(None)  # exact cudaMalloc per array: memcheck sees small overruns
    cupy_launch.COLSUM_MIN_ROWS_PER_SPLIT = 4  # several row splits on small inputs
    cupy_backend._launch_shape.cache_clear()  # no plan made with the old value is kept
    rng = np.random.default_rng(0)
    count = own_kernel_launches(cp, rng)
    if not args.own_kernels_only:
        count += public_calls(cp, rng)
    cp.cuda.runtime.deviceSynchronize()
    print(f"smoke ok ({count} launches and calls)")


if __name__ == "__main__":
    main()
