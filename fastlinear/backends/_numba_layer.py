"""The linear layer's compiled functions for the numba backend, and their Numba signatures.

Each function is compiled for one explicit signature per dtype and present/absent optional
array: inputs typed as read-only arrays of any layout (``'A'``: C- and F-order arrays convert to
it at the call, no copy), outputs as C-contiguous. So a dtype costs a handful of compilations
whatever layouts come, instead of one per layout mix. ``cache=True``: a new process loads them
from Numba's cache.
"""

import numba
import numpy as np
from numba import njit, prange, types

from fastlinear.backends._numba_activations import NONE, activate, activation_grad
from fastlinear.backends._numba_blas import (
    assume_contiguous,
    is_contiguous,
    matmul_into,
    row_times_matrix,
)

__all__ = ["compile_function"]


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


def _forward(gemm, gemv, int_bits, X, W, b, Y, code, Z):
    """``Y = act(X @ W + b)``, ``Z = X @ W + b`` (if given): bias rows written first, then BLAS
    adds the product (beta=1), then each row, still in cache, is copied to Z and activated.

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
    if code != NONE or Z is not None:
        for i in range(rows):
            if Z is not None:
                _copy_row(Y[i], Z[i])
            activate(code, Y[i])


@njit(cache=True)
def _copy_row(source, target):
    for j in range(source.shape[0]):
        target[j] = source[j]


@njit(cache=True)
def _through_activation(code, dY, saved, db, accumulate):
    """``G = dY * act'(saved)`` (a new C-contiguous array) and ``db (+)= G.sum(0)`` (if ``db``
    is given), in one pass over the rows; ``dY`` is not written."""
    G = np.empty(dY.shape, dY.dtype)
    if db is not None and not accumulate:
        db[:] = 0.0
    for i in range(dY.shape[0]):
        upstream, kept, grads = dY[i], saved[i], G[i]
        if is_contiguous(upstream) and is_contiguous(kept):
            activation_grad(code, assume_contiguous(upstream), assume_contiguous(kept), grads)
        else:
            activation_grad(code, upstream, kept, grads)
        if db is not None:
            for j in range(grads.shape[0]):
                db[j] += grads[j]
    return G


@njit(cache=True)
def _dot(a, b):
    total = a.dtype.type(0.0)
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


# "reassoc" lets LLVM split the dot products over SIMD lanes (a strict left-to-right sum is
# latency-bound); any summation order keeps the k * eps error bound. No other fast-math flag:
# NaN and inf still propagate.
@njit(cache=True, fastmath={"reassoc", "contract"})
def _rows_dot_rows(G, W, dX):
    """``dX = G @ W.T`` for ``G`` (N, M) and ``W`` (D, M) with contiguous rows (unchecked).

    Register-blocked: a 4 x 4 block of dX is 16 dot products over M, summed together in one
    loop, so each element of the 4 rows of G and of W loaded feeds 4 multiply-adds. Edge rows and
    columns are single dot products.
    """
    N, D = dX.shape
    zero = dX.dtype.type(0.0)
    for n in range(0, N - 3, 4):
        g0, g1 = assume_contiguous(G[n]), assume_contiguous(G[n + 1])
        g2, g3 = assume_contiguous(G[n + 2]), assume_contiguous(G[n + 3])
        for d in range(0, D - 3, 4):
            w0, w1 = assume_contiguous(W[d]), assume_contiguous(W[d + 1])
            w2, w3 = assume_contiguous(W[d + 2]), assume_contiguous(W[d + 3])
            s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
            s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
            for m in range(G.shape[1]):
                a0, a1, a2, a3 = g0[m], g1[m], g2[m], g3[m]
                b0, b1, b2, b3 = w0[m], w1[m], w2[m], w3[m]
                s00 += a0 * b0
                s01 += a0 * b1
                s02 += a0 * b2
                s03 += a0 * b3
                s10 += a1 * b0
                s11 += a1 * b1
                s12 += a1 * b2
                s13 += a1 * b3
                s20 += a2 * b0
                s21 += a2 * b1
                s22 += a2 * b2
                s23 += a2 * b3
                s30 += a3 * b0
                s31 += a3 * b1
                s32 += a3 * b2
                s33 += a3 * b3
            dX[n, d], dX[n, d + 1], dX[n, d + 2], dX[n, d + 3] = s00, s01, s02, s03
            dX[n + 1, d], dX[n + 1, d + 1], dX[n + 1, d + 2], dX[n + 1, d + 3] = s10, s11, s12, s13
            dX[n + 2, d], dX[n + 2, d + 1], dX[n + 2, d + 2], dX[n + 2, d + 3] = s20, s21, s22, s23
            dX[n + 3, d], dX[n + 3, d + 1], dX[n + 3, d + 2], dX[n + 3, d + 3] = s30, s31, s32, s33
    for n in range(N):  # the edges: the last D % 4 columns of every row, the last N % 4 rows
        first = D - D % 4 if n < N - N % 4 else 0
        for d in range(first, D):
            dX[n, d] = _dot(assume_contiguous(G[n]), assume_contiguous(W[d]))


@njit(cache=True)
def _blas_gradients(gemm, int_bits, G, X, W, dX, dW, db, accumulate, dX_by_rows):
    """dX = G @ W.T (if dX given; by ``_rows_dot_rows`` if ``dX_by_rows``), db (+)= G.sum(0)
    (if db given), dW (+)= X.T @ G."""
    if dX is not None:
        if dX_by_rows:
            _rows_dot_rows(G, W, dX)
        else:
            matmul_into(gemm, int_bits, G, W.T, dX, 0.0)
    if db is not None:
        if not accumulate:
            db[:] = 0.0
        _add_rows(db, G)
    matmul_into(gemm, int_bits, X.T, G, dW, 1.0 if accumulate else 0.0)


def _backward(gemm, int_bits, dY, X, W, dX, dW, db, accumulate, code, saved, dX_by_rows):
    """Gradients through BLAS; with an activation (``saved`` given) of ``G = dY * act'``."""
    if saved is None:
        _blas_gradients(gemm, int_bits, dY, X, W, dX, dW, db, accumulate, dX_by_rows)
    else:
        G = _through_activation(code, dY, saved, db, accumulate)
        _blas_gradients(gemm, int_bits, G, X, W, dX, dW, None, accumulate, dX_by_rows)


def _skinny_backward(dY, X, W, dX, dW, db, accumulate, code, saved):
    """Backward for few rows N, one sweep over the rows of W and dW (rows of W contiguous).

    ``G = dY * act'(saved)`` (a copy of dY without an activation) and db come first, in one
    pass; G (N x M) then stays in cache. BLAS would zero dW, update it and read W in a separate
    gemv; here each parallel task owns one row d of W (length M) and the same row of dW: it
    reduces ``dX[n, d] = G[n, :] . W[d, :]`` and writes ``dW[d, :] (+)= sum_n X[n, d] * G[n, :]``.
    W and dW are streamed once each.
    """
    kept = dY
    if saved is not None:
        kept = saved
    G = _through_activation(code, dY, kept, db, accumulate)
    rows, cols = G.shape
    for d in prange(W.shape[0]):
        weights = assume_contiguous(W[d])
        grads = dW[d]
        if dX is not None:
            for n in range(rows):
                upstream = G[n]
                total = weights.dtype.type(0.0)
                for j in range(cols):
                    total += upstream[j] * weights[j]
                dX[n, d] = total
        scale = X[0, d]
        upstream = G[0]
        if accumulate:
            for j in range(cols):
                grads[j] += scale * upstream[j]
        else:
            for j in range(cols):
                grads[j] = scale * upstream[j]
        for n in range(1, rows):
            scale = X[n, d]
            upstream = G[n]
            for j in range(cols):
                grads[j] += scale * upstream[j]


# "reassoc": as for _rows_dot_rows.
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

    code = types.int64
    if name == "forward":
        has_bias, has_preactivation = present
        return types.void(address, address, address, matrix_in, matrix_in,
                          optional(vector_in, has_bias), matrix_out, code,
                          optional(matrix_out, has_preactivation))
    has_dX, has_bias, has_saved = present
    arrays = (matrix_in, matrix_in, matrix_in, optional(matrix_out, has_dX), matrix_out,
              optional(vector_out, has_bias), types.boolean, code,
              optional(matrix_in, has_saved))
    if name == "backward":
        return types.void(address, address, *arrays, types.boolean)
    return types.void(*arrays)


def compile_function(key):
    """A new compiled function for ``key`` = ``(name, dtype, *present)`` (``present`` flags the
    optional arrays), compiled or loaded from Numba's cache; the backend keeps it."""
    name, dtype, *present = key
    python_function, options = _FUNCTIONS[name]
    return njit(_signature(name, dtype, present), cache=True, **options)(python_function)
