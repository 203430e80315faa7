"""The NumPy reference backend: the textbook math, the oracle every other backend is tested against.

The forward pass fills ``Y`` by ``matmul`` and adds the bias and the activation in place; the
backward pass writes straight into the caller's buffers. Accumulation precision is that of the
BLAS NumPy links (float32 sums in float32).
"""

import numpy as np

from fastlinear import activations

NAME = "numpy"
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)


def unavailable_reason():
    """NumPy is a hard dependency: the reference backend is always available."""
    return None


def forward(X, W, b, out, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    # np.dot, the classic notebook's product: the same BLAS gemm as ``@``, without the matmul
    # ufunc's dispatch, which costs about 0.5 us a call (a third of a 32x64x64 float32 product)
    Y = np.dot(X, W, out)
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
    dX = np.dot(G, W.T, dX) if need_dX else None  # np.dot: see forward
    if accumulate:
        dW += np.dot(X.T, G)
    else:
        dW = np.dot(X.T, G, dW)
    if not has_bias:
        return dX, dW, None
    if accumulate:
        db += G.sum(0)
    else:
        db = G.sum(0) if db is None else G.sum(0, out=db)
    return dX, dW, db
