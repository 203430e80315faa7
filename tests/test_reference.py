"""The NumPy reference against plain float64 math: per-element sums and finite differences."""

import numpy as np
import pytest

from fastlinear.backends import numpy as ref
from tests.helpers import assert_close, make_inputs

SHAPES = [(1, 1, 1), (2, 3, 4), (5, 7, 3), (17, 13, 11), (0, 4, 3), (3, 0, 2), (33, 65, 31)]


def elementwise_forward(X, W, b):
    """y_ik = sum_j x_ij w_jk + b_k with explicit Python loops in float64."""
    N, D = X.shape
    M = W.shape[1]
    Y = np.empty((N, M))
    for i in range(N):
        for k in range(M):
            Y[i, k] = sum(float(X[i, j]) * float(W[j, k]) for j in range(D)) + float(b[k])
    return Y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,D,M", SHAPES)
def test_forward_matches_elementwise_sums(rng, N, D, M, dtype):
    X, W, b, _ = make_inputs(rng, N, D, M, dtype)
    Y = ref.forward(X, W, b, None)
    assert Y.dtype == dtype
    magnitude = np.abs(X.astype(float)) @ np.abs(W.astype(float)) + np.abs(b.astype(float))
    assert_close(Y, elementwise_forward(X, W, b), dtype, D + 1, magnitude, "Y")


@pytest.mark.parametrize("N,D,M", SHAPES)
def test_backward_matches_elementwise_sums(rng, N, D, M):
    X, W, b, dY = make_inputs(rng, N, D, M, np.float64)
    dX, dW, db = ref.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False,
                              dX=None, dW=None, db=None)
    expect_dX = np.array([[sum(dY[i, k] * W[j, k] for k in range(M)) for j in range(D)]
                          for i in range(N)]).reshape(N, D)
    expect_dW = np.array([[sum(X[i, j] * dY[i, k] for i in range(N)) for k in range(M)]
                          for j in range(D)]).reshape(D, M)
    expect_db = np.array([sum(dY[i, k] for i in range(N)) for k in range(M)]).reshape(M)
    np.testing.assert_allclose(dX, expect_dX, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dW, expect_dW, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, expect_db, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("N,D,M", [(1, 1, 1), (4, 3, 5), (6, 8, 2)])
def test_backward_matches_central_finite_differences(rng, N, D, M):
    """Gradients of the scalar loss L = sum(dY * Y) equal its central differences."""
    X, W, b, dY = make_inputs(rng, N, D, M, np.float64)

    def loss(X, W, b):
        return float(np.sum(dY * ref.forward(X, W, b, None)))

    dX, dW, db = ref.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False,
                              dX=None, dW=None, db=None)
    h = 1e-6
    for analytic, arrays, which in ((dX, [X, W, b], 0), (dW, [X, W, b], 1), (db, [X, W, b], 2)):
        numeric = np.empty_like(analytic)
        for index in np.ndindex(analytic.shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[which][index] += h
            minus[which][index] -= h
            numeric[index] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_accumulate_adds_exactly_once(rng):
    X, W, b, dY = make_inputs(rng, 6, 4, 3, np.float64)
    dW0 = rng.standard_normal((4, 3))
    db0 = rng.standard_normal(3)
    dW, db = dW0.copy(), db0.copy()
    _, dW_out, db_out = ref.backward(dY, X, W, has_bias=True, need_dX=False, accumulate=True,
                                     dX=None, dW=dW, db=db)
    assert dW_out is dW and db_out is db
    np.testing.assert_allclose(dW, dW0 + X.T @ dY, rtol=1e-13)
    np.testing.assert_allclose(db, db0 + dY.sum(0), rtol=1e-13)
