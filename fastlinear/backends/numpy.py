"""The NumPy reference backend: the textbook math, the oracle every other backend is tested against.

The forward pass fills ``Y`` by ``matmul`` and adds the bias and the activation in place; the
backward pass writes straight into the caller's buffers. Accumulation precision is that of the
BLAS NumPy links (float32 sums in float32).
"""

import numpy as np

from fastlinear import activations

NAME = "numpy"
_sum_rows = np.add.reduce
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)


def unavailable_reason():
    """NumPy is a hard dependency: the reference backend is always available."""
    return None


def forward(X, W, b, out, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    # ndarray.dot, the classic notebook's product: the same BLAS gemm as ``@``, without the
    # matmul ufunc's dispatch nor np.dot's array-function dispatch: 1.0 and 0.3 us less a call
    # at 32x64x64 float32 (benchmarks/results/numpy_kernel_calls_2026-11-29.txt)
    Y = X.dot(W, out)
    if b is not None:
        Y += b  # NumPy's matmul has no beta=1 (accumulate) form
    if activation is not None:
        if preactivation is not None:
            preactivation[...] = Y
        activations.apply(activation, Y, out=Y)
    return Y


def backward(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
             saved=None):
    """Gradients from ``dY``, through the activation; see ``fastlinear.backends``."""
    G = dY if activation is None else activations.grad(activation, dY, saved)
    dX = G.dot(W.T, dX) if need_dX else None  # ndarray.dot: see forward
    if accumulate:
        dW += X.T.dot(G)
    else:
        dW = X.T.dot(G, dW)
    if not has_bias:
        return dX, dW, None
    # np.add.reduce is what G.sum(0) runs (the same pairwise sums), without its Python wrapper
    if accumulate:
        db += _sum_rows(G, 0)
    else:
        db = _sum_rows(G, 0, None, db)
    return dX, dW, db
