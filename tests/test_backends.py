"""Every registered backend against the NumPy reference (and float64 math): shapes, dtypes, layouts.

The ``backend`` fixture runs each test on every backend; unavailable ones skip with the reason.
NumPy arrays go in everywhere (the cupy backend moves them to the device and back).
"""

import numpy as np
import pytest

import fastlinear
from tests.helpers import (
    CPU_DTYPES,
    assert_matches_reference,
    make_inputs,
    reference64,
    to_numpy,
)

SHAPES = [
    (1, 1, 1), (1, 7, 5), (2, 3, 4), (0, 5, 3), (4, 0, 3), (3, 5, 0), (13, 17, 19),
    (31, 64, 33), (64, 65, 63), (128, 129, 127), (1, 257, 129), (257, 33, 1),
]


def layouts(a, kind):
    """``a`` in the memory layout ``kind``: C-order, F-order, or a strided (sliced) view."""
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    padded = np.zeros((a.shape[0] * 2, a.shape[1] * 3), dtype=a.dtype)
    padded[::2, ::3] = a
    return padded[::2, ::3]


def check_against_reference(backend, X, W, b, dY, dtype):
    ref = reference64(X, W, b, dY)
    Y = fastlinear.linear_forward(X, W, b, backend=backend)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, has_bias=b is not None, backend=backend)
    results = {"Y": Y, "dX": dX, "dW": dW}
    if b is None:
        assert db is None
    else:
        results["db"] = db
    for name, value in results.items():
        assert isinstance(value, np.ndarray) and value.dtype == dtype, name
    assert_matches_reference(results, ref, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N,D,M", SHAPES)
def test_matches_reference_on_shapes(backend, rng, N, D, M, dtype):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    check_against_reference(backend, X, W, b, dY, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("x_layout", ["C", "F", "strided"])
@pytest.mark.parametrize("w_layout", ["C", "F", "strided"])
def test_matches_reference_on_layouts(backend, rng, x_layout, w_layout, dtype):
    X, W, b, dY = make_inputs(rng, 37, 29, 23, dtype)
    X, dY = layouts(X, x_layout), layouts(dY, x_layout)
    W = layouts(W, w_layout)
    check_against_reference(backend, X, W, b, dY, dtype)


def test_transposed_views(backend, rng):
    X, W, b, dY = make_inputs(rng, 9, 8, 7, np.float64)
    check_against_reference(backend, np.ascontiguousarray(X.T).T, np.asfortranarray(W.T).T,
                             b, dY, np.float64)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_without_bias(backend, rng, dtype):
    X, W, _, dY = make_inputs(rng, 11, 6, 5, dtype, bias=False)
    check_against_reference(backend, X, W, None, dY, dtype)


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 2), (0, 3)])
def test_leading_batch_dims(backend, rng, lead):
    D, M = 6, 5
    X = rng.standard_normal((*lead, D))
    W = rng.standard_normal((D, M))
    b = rng.standard_normal(M)
    dY = rng.standard_normal((*lead, M))
    Y = fastlinear.linear_forward(X, W, b, backend=backend)
    assert Y.shape == (*lead, M)
    np.testing.assert_allclose(Y, X @ W + b, rtol=1e-12, atol=1e-12)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, backend=backend)
    assert dX.shape == X.shape
    np.testing.assert_allclose(dX, dY @ W.T, rtol=1e-12, atol=1e-12)
    X2, dY2 = X.reshape(-1, D), dY.reshape(-1, M)
    np.testing.assert_allclose(dW, X2.T @ dY2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dY2.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_out_buffers_are_filled_and_returned(backend, rng, dtype):
    X, W, b, dY = make_inputs(rng, 10, 7, 4, dtype)
    out = np.full((10, 4), np.nan, dtype=dtype)
    Y = fastlinear.linear_forward(X, W, b, backend=backend, out=out)
    assert Y is out
    np.testing.assert_allclose(out, X.astype(float) @ W + b, rtol=1e-5)
    dX = np.full((10, 7), np.nan, dtype=dtype)
    dW = np.full((7, 4), np.nan, dtype=dtype)
    db = np.full(4, np.nan, dtype=dtype)
    rdX, rdW, rdb = fastlinear.linear_backward(dY, X, W, backend=backend, dX=dX, dW=dW, db=db)
    assert rdX is dX and rdW is dW and rdb is db
    np.testing.assert_allclose(dX, dY.astype(float) @ W.T, rtol=1e-4)
    np.testing.assert_allclose(dW, X.T.astype(float) @ dY, rtol=1e-4)
    np.testing.assert_allclose(db, dY.sum(0, dtype=float), rtol=1e-4)


@pytest.mark.parametrize("has_bias", [True, False])
def test_accumulate_adds_into_buffers(backend, rng, has_bias):
    X, W, b, dY = make_inputs(rng, 12, 5, 6, np.float64)
    dW0, db0 = rng.standard_normal((5, 6)), rng.standard_normal(6)
    dW, db = dW0.copy(), db0.copy()
    dX, rdW, rdb = fastlinear.linear_backward(dY, X, W, has_bias=has_bias, need_dX=False,
                                              accumulate=True, dW=dW, db=db, backend=backend)
    assert dX is None and rdW is dW
    np.testing.assert_allclose(dW, dW0 + X.T @ dY, rtol=1e-12)
    if has_bias:
        assert rdb is db
        np.testing.assert_allclose(db, db0 + dY.sum(0), rtol=1e-12)
    else:
        assert rdb is None
        np.testing.assert_array_equal(db, db0)


def test_need_dX_false_returns_none(backend, rng):
    X, W, b, dY = make_inputs(rng, 3, 4, 5, np.float32)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, need_dX=False, backend=backend)
    assert dX is None and dW.shape == (4, 5) and db.shape == (5,)


def test_inputs_are_not_modified(backend, rng):
    X, W, b, dY = make_inputs(rng, 8, 6, 5, np.float64)
    copies = [a.copy() for a in (X, W, b, dY)]
    fastlinear.linear_forward(X, W, b, backend=backend)
    fastlinear.linear_backward(dY, X, W, backend=backend)
    for before, after in zip(copies, (X, W, b, dY), strict=True):
        np.testing.assert_array_equal(before, after)


def test_nan_and_inf_propagate_like_numpy(backend, rng):
    X, W, b, dY = make_inputs(rng, 4, 3, 2, np.float64)
    X[1, 2] = np.nan
    W[0, 1] = np.inf
    Y = fastlinear.linear_forward(X, W, b, backend=backend)
    with np.errstate(invalid="ignore"):
        expected = X @ W + b
    np.testing.assert_array_equal(np.isnan(Y), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(Y), np.isinf(expected))
    np.testing.assert_allclose(Y[np.isfinite(expected)], expected[np.isfinite(expected)])


def test_nan_and_inf_propagate_in_backward(backend):
    X, W, _, dY = make_inputs(np.random.default_rng(6), 4, 3, 2, np.float64)
    dY_bad = dY.copy()
    dY_bad[1, 0] = np.nan
    dY_bad[2, 1] = np.inf
    with np.errstate(invalid="ignore"):
        grads = fastlinear.linear_backward(dY_bad, X, W, backend=backend)
        dX, dW, db = (to_numpy(a) for a in grads)
    # dX = dY @ W.T: row 1 NaN, row 2 +-inf (W has no zeros); dW = X.T @ dY; db = sum(dY)
    assert np.isnan(dX[1]).all() and np.isinf(dX[2]).all()
    assert np.isnan(dW[:, 0]).all() and np.isinf(dW[:, 1]).all()
    assert np.isnan(db[0]) and db[1] == np.inf
    np.testing.assert_array_equal(np.sign(dW[:, 1]), np.sign(X[2]))
    finite = np.isfinite(dX)
    np.testing.assert_allclose(dX[finite], (dY_bad @ W.T)[finite], rtol=1e-12)

@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_special_values_complete(backend, fill, dtype):
    """Arrays full of NaN or inf neither crash nor hang; NaN stays NaN, inf stays non-finite."""
    X_bad = np.full((33, 17), fill, dtype=dtype)
    W_bad = np.full((17, 9), fill, dtype=dtype)
    with np.errstate(all="ignore"):
        Y = to_numpy(fastlinear.linear_forward(X_bad, W_bad, backend=backend))
        grads = fastlinear.linear_backward(np.ones((33, 9), dtype), X_bad, W_bad,
                                           backend=backend)
    assert Y.shape == (33, 9) and not np.isfinite(Y).any()
    if np.isnan(fill):
        assert np.isnan(Y).all()
    else:
        np.testing.assert_array_equal(Y, np.inf)  # (+-inf)(+-inf) = +inf, summed
    dX, dW, db = (to_numpy(g) for g in grads)
    for grad in (dX, dW):  # sums of fill * 1: all NaN, or all inf of the fill's sign
        np.testing.assert_array_equal(grad, np.full_like(grad, fill))
    np.testing.assert_array_equal(db, 33.0)  # db = sum of the ones
