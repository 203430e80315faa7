"""The NumPy reference backend: the textbook math, the oracle every other backend is tested against.

It avoids needless temporaries where NumPy allows: the forward pass fills ``Y`` with the bias and
adds the product into it in place, and the backward pass writes straight into the caller's
buffers. Accumulation precision is that of the BLAS NumPy links (float32 sums in float32).
"""

import numpy as np

NAME = "numpy"
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)


def unavailable_reason():
    """NumPy is a hard dependency: the reference backend is always available."""
    return None


def forward(X, W, b, out):
    """``Y = X @ W + b`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    if b is None:
        return np.matmul(X, W, out=out)
    if out is None:
        Y = np.matmul(X, W)
    else:
        Y = np.matmul(X, W, out=out)
    # One in-place pass for the bias; NumPy's matmul has no beta=1 (accumulate) form.
    Y += b
    return Y


def backward(dY, X, W, *, has_bias, need_dX, accumulate, dX, dW, db):
    """``dX = dY @ W.T``, ``dW = X.T @ dY``, ``db = dY.sum(0)``; see ``fastlinear.backends``."""
    if need_dX:
        dX = np.matmul(dY, W.T, out=dX)
    else:
        dX = None
    if accumulate:
        dW += X.T @ dY
        if has_bias:
            db += dY.sum(axis=0)
    else:
        dW = np.matmul(X.T, dY, out=dW)
        if has_bias:
            db = np.sum(dY, axis=0, out=db)
    if not has_bias:
        db = None
    return dX, dW, db
