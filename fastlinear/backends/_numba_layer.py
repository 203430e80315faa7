"""The linear layer's compiled functions for the numba backend, and their Numba signatures.

Each function is compiled for one explicit signature per dtype and present/absent optional
array: inputs typed as read-only arrays of any layout (``'A'``: C- and F-order arrays convert to
it at the call, no copy), outputs as C-contiguous. So a dtype costs a handful of compilations
whatever layouts come, instead of one per layout mix. ``cache=True``: a new process loads them
from Numba's cache.
"""

import threading

import numba
from numba import njit, prange, types

from fastlinear.backends._numba_blas import (
    assume_contiguous,
    is_contiguous,
    matmul_into,
    row_times_matrix,
)

__all__ = ["compiled"]


@njit(cache=True)
def _fill_rows(Y, row):
    """Every row of ``Y`` (C-contiguous) = ``row``."""
    for i in range(Y.shape[0]):
        target = Y[i]
        for j in range(Y.shape[1]):
            target[j] = row[j]


@njit(cache=True)
def _add_rows(total, A):
    """``total += A.sum(0)``, row by row: each step a contiguous, vectorised add."""
    for i in range(A.shape[0]):
        if is_contiguous(A[i]):
            row = assume_contiguous(A[i])
            for j in range(A.shape[1]):
                total[j] += row[j]
        else:
            for j in range(A.shape[1]):
                total[j] += A[i, j]


def _forward(gemm, gemv, int_bits, X, W, b, Y):
    """``Y = X @ W + b``: bias rows written first, then BLAS adds the product (beta=1).

    One row (N = 1) is a matrix-vector product: gemv streams W at memory speed, where gemm with
    one column does not.
    """
    rows, cols = Y.shape
    beta = 0.0
    if b is not None:
        beta = 1.0
        if is_contiguous(b):
            _fill_rows(Y, assume_contiguous(b))
        else:
            _fill_rows(Y, b)
    if rows == 1 and cols > 0 and X.shape[1] > 0:
        row_times_matrix(gemv, int_bits, X[0], W, Y[0], beta)
    else:
        matmul_into(gemm, int_bits, X, W, Y, beta)


def _backward(gemm, int_bits, dY, X, W, dX, dW, db, accumulate):
    """dX = dY @ W.T (if dX given), db (+)= dY.sum(0) (if db given), dW (+)= X.T @ dY."""
    if dX is not None:
        matmul_into(gemm, int_bits, dY, W.T, dX, 0.0)
    if db is not None:
        if not accumulate:
            db[:] = 0.0
        _add_rows(db, dY)
    matmul_into(gemm, int_bits, X.T, dY, dW, 1.0 if accumulate else 0.0)


def _skinny_backward(dY, X, W, dX, dW, db, accumulate):
    """Backward for few rows N, one sweep over the rows of W and dW (rows of W and dY contiguous).

    BLAS would zero dW, update it and read W in a separate gemv; here each parallel task owns
    one row d of W (length M) and the same row of dW: it reduces ``dX[n, d] = dY[n, :] . W[d, :]``
    and writes ``dW[d, :] (+)= sum_n X[n, d] * dY[n, :]``. W and dW are streamed once each; dY
    (N x M) stays in cache.
    """
    rows, cols = dY.shape
    depth = W.shape[0]
    for d in prange(depth):
        weights = assume_contiguous(W[d])
        grads = dW[d]
        if dX is not None:
            for n in range(rows):
                upstream = assume_contiguous(dY[n])
                total = weights.dtype.type(0.0)
                for j in range(cols):
                    total += upstream[j] * weights[j]
                dX[n, d] = total
        scale = X[0, d]
        upstream = assume_contiguous(dY[0])
        if accumulate:
            for j in range(cols):
                grads[j] += scale * upstream[j]
        else:
            for j in range(cols):
                grads[j] = scale * upstream[j]
        for n in range(1, rows):
            scale = X[n, d]
            upstream = assume_contiguous(dY[n])
            for j in range(cols):
                grads[j] += scale * upstream[j]
    if db is not None:
        if not accumulate:
            db[:] = 0.0
        _add_rows(db, dY)


# "reassoc" lets LLVM split the skinny dot products over SIMD lanes (a strict left-to-right sum
# is latency-bound); any summation order keeps the k * eps error bound. No other fast-math flag:
# NaN and inf still propagate.
_FUNCTIONS = {
    "forward": (_forward, {}),
    "backward": (_backward, {}),
    "skinny_backward": (_skinny_backward, {"parallel": True, "fastmath": {"reassoc", "contract"}}),
}


def _signature(name, dtype, present):
    """Numba signature of function ``name`` for ``dtype``; ``present`` flags the optional arrays."""
    scalar = numba.from_dtype(dtype)
    matrix_in = types.Array(scalar, 2, "A", readonly=True, aligned=False)
    vector_in = types.Array(scalar, 1, "A", readonly=True, aligned=False)
    matrix_out = types.Array(scalar, 2, "C", aligned=False)
    vector_out = types.Array(scalar, 1, "C", aligned=False)
    address = types.int64

    def optional(array_type, is_present):
        return array_type if is_present else types.none

    if name == "forward":
        (has_bias,) = present
        return types.void(address, address, address, matrix_in, matrix_in,
                          optional(vector_in, has_bias), matrix_out)
    has_dX, has_bias = present
    arrays = (matrix_in, matrix_in, matrix_in, optional(matrix_out, has_dX), matrix_out,
              optional(vector_out, has_bias), types.boolean)
    if name == "backward":
        return types.void(address, address, *arrays)
    return types.void(*arrays)


_compiled = {}  # (name, dtype, *which optional arrays are present) -> Numba dispatcher
_compile_lock = threading.Lock()


def compiled(key):
    """The compiled function for ``key`` = ``(name, dtype, *present)``: compiled (or loaded from
    Numba's cache) once per process."""
    function = _compiled.get(key)
    if function is not None:
        return function
    with _compile_lock:
        if key not in _compiled:
            name, dtype, *present = key
            python_function, options = _FUNCTIONS[name]
            _compiled[key] = njit(_signature(name, dtype, present), cache=True,
                                  **options)(python_function)
    return _compiled[key]
