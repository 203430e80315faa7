"""Bad input, failed calls, huge sizes: a clear error naming what was expected, no wrong result.

Fills the gaps of ``test_errors.py`` and ``test_dispatch.py`` (which stay the place for the basic
cases): batch dimensions, every argument's dtype and library, buffers that overlap through views
or overlap each other, layer-level errors and the state a failing call leaves, NaN/inf in the
backward pass, and outputs too large for memory.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch, functional
from tests.conftest import make_inputs, to_numpy

rng = np.random.default_rng(6)
X, W, b, dY = make_inputs(rng, 4, 3, 2, np.float64)


def forward(backend, **kwargs):
    args = {"X": X, "W": W, "b": b, "out": None, **kwargs}
    return fastlinear.linear_forward(args["X"], args["W"], args["b"], out=args["out"],
                                     backend=backend)


def backward(backend, **kwargs):
    args = {"dY": dY, "X": X, "W": W, **kwargs}
    options = {k: v for k, v in args.items() if k not in ("dY", "X", "W")}
    return fastlinear.linear_backward(args["dY"], args["X"], args["W"], backend=backend,
                                      **options)


def backend_dtypes(backend):
    return _dispatch._load(backend).DTYPES


# --- shapes the API refuses -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"X": np.ones((2, 2, 5))}, r"X has 5 features but 3 were expected \(shape \(2, 2, 5\)\)"),
    ({"X": np.ones((0, 5))}, r"X has 5 features but 3 were expected"),
    ({"W": np.array(1.0)}, r"W must be 2-D \(in_features, out_features\), got shape \(\)"),
    ({"W": np.ones((1, 3, 2))}, r"W must be 2-D .*got shape \(1, 3, 2\)"),
    ({"W": np.ones((4, 2))}, r"X has 3 features but 4 were expected"),
    ({"W": np.ones((2, 3))}, r"X has 3 features but 2 were expected"),
    ({"b": np.ones((1, 1, 2))}, r"b must broadcast to \(2,\) .*got shape \(1, 1, 2\)"),
    ({"b": np.ones(3)}, r"b must broadcast to \(2,\)"),
    ({"X": np.ones((2, 2, 3)), "out": np.empty((4, 2))},
     r"out must have shape \(2, 2, 2\), got \(4, 2\)"),
    ({"out": np.empty((4, 2, 1))}, r"out must have shape \(4, 2\), got \(4, 2, 1\)"),
    ({"out": np.empty(8)}, r"out must have shape \(4, 2\), got \(8,\)"),
])
def test_forward_shape_gaps(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward(backend, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    # batch dimensions must match exactly: no implicit flattening or transposition of dY
    ({"X": np.ones((2, 2, 3)), "dY": np.ones((4, 2))},
     r"dY must have the shape of the forward output \(2, 2, 2\) \(X has shape \(2, 2, 3\)"),
    ({"X": np.ones((2, 3, 3)), "dY": np.ones((3, 2, 2))},
     r"dY must have the shape of the forward output \(2, 3, 2\)"),
    ({"dY": np.ones((1, 4, 2))}, r"dY must have the shape of the forward output \(4, 2\)"),
    ({"dY": np.array(1.0)}, r"dY must have the shape"),
    ({"X": np.ones(3)}, r"dY must have the shape of the forward output \(2,\)"),
    ({"W": np.ones((3, 2, 1))}, r"W must be 2-D"),
    ({"X": np.ones((2, 2, 3)), "dY": np.ones((2, 2, 2)), "dX": np.empty((4, 3))},
     r"dX must have shape \(2, 2, 3\), got \(4, 3\)"),
    ({"dW": np.empty(6)}, r"dW must have shape \(3, 2\), got \(6,\)"),
    ({"db": np.empty((1, 2))}, r"db must have shape \(2,\), got \(1, 2\)"),
    ({"dW": np.empty((2, 3)).T}, r"dW must be C-contiguous"),
    ({"db": np.empty(4)[::2]}, r"db must be C-contiguous"),
    ({"dX": np.empty((4, 6))[:, ::2]}, r"dX must be C-contiguous"),
    ({"accumulate": True, "dW": np.zeros((3, 2))}, r"pass the dW buffer \(and db when has_bias\)"),
])
def test_backward_shape_gaps(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        backward(backend, **kwargs)


# --- dtypes: NumPy's promotion, what cannot be computed -------------------------------------------

NON_FLOAT = [np.complex64, np.complex128, object]


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, *NON_FLOAT, np.float16, np.longdouble])
def test_weight_dtypes_outside_the_backend_are_refused(backend, dtype):
    if np.dtype(dtype) in backend_dtypes(backend):
        pytest.skip(f"{backend} computes in {np.dtype(dtype)}")
    with pytest.raises(TypeError, match=rf"{np.dtype(dtype)}"):
        forward(backend, X=X.astype(dtype), W=W.astype(dtype), b=b.astype(dtype))


@pytest.mark.parametrize("name", ["X", "dY"])
@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_backward_data_that_is_not_real_is_refused(backend, name, dtype):
    value = {"X": X, "dY": dY}[name].astype(dtype)
    with pytest.raises(TypeError, match=rf"{name} has dtype {np.dtype(dtype)}"):
        backward(backend, **{name: value})


@pytest.mark.parametrize("name", ["dW", "db", "dX"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_buffers_must_have_the_result_dtype(backend, name, dtype):
    shape = {"dW": W.shape, "db": b.shape, "dX": X.shape}[name]
    with pytest.raises(TypeError, match=rf"{name} must have dtype float64, got"):
        backward(backend, **{name: np.empty(shape, dtype=dtype)})


def test_non_native_byte_order_is_read_correctly(backend):
    swapped = np.dtype(np.float64).newbyteorder()
    Y = forward(backend, X=X.astype(swapped), W=W.astype(swapped))
    assert Y.dtype == np.float64 and Y.dtype.isnative
    np.testing.assert_allclose(Y, X @ W + b, rtol=1e-12)
    with pytest.raises(TypeError, match=rf"X has dtype {swapped.str} .*casting='no'"):
        fastlinear.linear_forward(X.astype(swapped), W, b, backend=backend, casting="no")
    fastlinear.linear_forward(X.astype(swapped), W, b, backend=backend, casting="equiv")


# --- Python lists and other non-arrays ----------------------------------------------------------

def test_lists_promote_as_numpy_makes_them(backend):
    """Lists become arrays of their own dtype (float lists: float64), then NumPy promotion."""
    W32 = W.astype(np.float32)
    Y = fastlinear.linear_forward(X.tolist(), W32, tuple(b.tolist()), backend=backend)
    assert Y.dtype == (np.asarray(X.tolist()) @ W32).dtype == np.float64
    np.testing.assert_allclose(to_numpy(Y), X @ W32.astype(np.float64) + b, rtol=1e-12)
    dX, dW, db = fastlinear.linear_backward(dY.tolist(), X.tolist(), W.tolist(), backend=backend)
    assert dX.dtype == dW.dtype == db.dtype == np.float64
    np.testing.assert_allclose(to_numpy(dW), X.T @ dY, rtol=1e-12)


def test_weight_as_a_list(backend):
    Y = fastlinear.linear_forward(X, W.tolist(), b, backend=backend)
    np.testing.assert_allclose(to_numpy(Y), X @ W + b, rtol=1e-12)
    Y = fastlinear.linear_forward(X, [[1, 2], [3, 4], [5, 6]], backend=backend)
    np.testing.assert_allclose(Y, X @ np.array([[1, 2], [3, 4], [5, 6]]), rtol=1e-12)


@pytest.mark.parametrize("value,error,match", [
    ([[1.0, 2.0], [3.0]], TypeError, r"X could not be converted to an array"),
    ([[1.0, 2.0]], ValueError, r"X has 2 features but 3 were expected"),
    ([1.0, 2.0], ValueError, r"X has 2 features but 3 were expected"),
    ([], ValueError, r"X has 0 features but 3 were expected"),
    ([[1.0, 2.0, 1j]], TypeError, r"X has dtype complex128"),
])
def test_bad_lists(backend, value, error, match):
    with pytest.raises(error, match=match):
        forward(backend, X=value)


class ArrayLike:
    """Has ``__array__`` (as pandas, xarray, torch do), but fastlinear converts only lists."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


def fake_array(module, name="ndarray"):
    """An instance of a class that claims to come from ``module`` (an array library we lack)."""
    cls = type(name, (), {"__module__": module, "shape": X.shape, "dtype": X.dtype,
                          "ndim": 2})
    return cls()


@pytest.mark.parametrize("make,match", [
    (lambda: ArrayLike(X), r"X must be an array \(NumPy, CuPy, or any object with __dlpack__ "
                           r".*got .*ArrayLike"),
    (lambda: memoryview(X), r"got builtins.memoryview"),
    (lambda: fake_array("torch", "Tensor"), r"got torch.Tensor"),
    (lambda: fake_array("jax.numpy", "Array"), r"got jax.numpy.Array"),
    (lambda: {"X": X}, r"got builtins.dict"),
])
def test_foreign_array_types_are_type_errors(backend, make, match):
    with pytest.raises(TypeError, match=match):
        forward(backend, X=make())


@pytest.mark.parametrize("name", ["X", "W", "b"])
def test_cupy_array_given_to_a_cpu_backend(backend, name):
    """A (fake) CuPy array for a NumPy-only backend is a TypeError naming both sides."""
    module = _dispatch._load(backend)
    if "cupy" in module.ARRAY_LIBRARIES:
        pytest.skip(f"the {backend} backend takes CuPy arrays")
    with pytest.raises(TypeError, match=rf"the '{backend}' backend takes numpy arrays, "
                                        rf"got {name} as a cupy._core.core.ndarray"):
        forward(backend, **{name: fake_array("cupy._core.core")})


def test_real_cupy_array_given_to_a_cpu_backend(backend):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if "cupy" in _dispatch._load(backend).ARRAY_LIBRARIES:
        pytest.skip(f"the {backend} backend takes CuPy arrays")
    with pytest.raises(TypeError, match=rf"the '{backend}' backend takes numpy arrays"):
        forward(backend, X=cupy.asarray(X))


@pytest.mark.parametrize("out", [np.empty((4, 2)).tolist(), "out"])
def test_out_that_is_not_an_array(backend, out):
    with pytest.raises(TypeError, match=r"out must be an array .*got builtins"):
        forward(backend, out=out)


# --- buffers that overlap inputs or each other --------------------------------------------------

def overlapping_pair(first_shape, second_shape, shift):
    """Two C-contiguous views of one buffer, the second starting ``shift`` elements in."""
    first_size, second_size = int(np.prod(first_shape)), int(np.prod(second_shape))
    base = np.zeros(max(first_size, shift + second_size))
    first = base[:first_size].reshape(first_shape)
    second = base[shift:shift + second_size].reshape(second_shape)
    return first, second


def test_out_partly_overlapping_an_input_through_views(backend):
    X_view, out = overlapping_pair((4, 3), (4, 2), shift=11)  # one element in common
    X_view[...] = X
    with pytest.raises(ValueError, match="out overlaps the input X"):
        forward(backend, X=X_view, out=out)
    W_view, out = overlapping_pair((3, 2), (4, 2), shift=5)
    W_view[...] = W
    with pytest.raises(ValueError, match="out overlaps the input W"):
        forward(backend, W=W_view, out=out)
    out, b_view = overlapping_pair((4, 2), (2,), shift=7)
    b_view[...] = b
    with pytest.raises(ValueError, match="out overlaps the input b"):
        forward(backend, b=b_view, out=out)


@pytest.mark.parametrize("output,other", [("dX", "dY"), ("dX", "X"), ("dW", "X"), ("dW", "dY"),
                                          ("db", "dY"), ("db", "W")])
def test_gradient_buffer_overlapping_an_input(backend, output, other):
    shapes = {"dX": X.shape, "dW": W.shape, "db": b.shape, "dY": dY.shape, "X": X.shape,
              "W": W.shape}
    values = {"dY": dY, "X": X, "W": W}
    view, buffer = overlapping_pair(shapes[other], shapes[output], shift=1)
    view[...] = values[other]
    with pytest.raises(ValueError, match=f"{output} overlaps the input {other}"):
        backward(backend, **{other: view, output: buffer})


@pytest.mark.parametrize("first,second", [("dX", "dW"), ("dX", "db"), ("dW", "db")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gradient_buffers_overlapping_each_other(backend, first, second, accumulate):
    """Found by this test: overlapping output buffers silently gave wrong gradients."""
    shapes = {"dX": X.shape, "dW": W.shape, "db": b.shape}
    buffers = {"dW": np.zeros(W.shape), "db": np.zeros(b.shape)}
    buffers[first], buffers[second] = overlapping_pair(shapes[first], shapes[second], shift=3)
    before = {name: buf.copy() for name, buf in buffers.items()}
    with pytest.raises(ValueError, match=f"{second} overlaps the output {first}"):
        backward(backend, accumulate=accumulate, **buffers)
    for name, buf in buffers.items():
        np.testing.assert_array_equal(buf, before[name])


def test_need_dX_false_ignores_an_overlapping_dX(backend):
    """A dX buffer that is not written (need_dX=False) cannot overlap anything."""
    dW, dX = overlapping_pair(W.shape, X.shape, shift=0)
    result = backward(backend, need_dX=False, dX=dX, dW=dW)
    assert result[0] is None and result[1] is dW
    np.testing.assert_allclose(dW, X.T @ dY, rtol=1e-12)


def test_buffers_with_batch_dims_are_returned_as_given(backend):
    """Found by this test: with batch dims the returned arrays were reshaped views, not out/dX."""
    X3, dY3 = X.reshape(2, 2, 3), dY.reshape(2, 2, 2)
    out = np.full((2, 2, 2), np.nan)
    assert forward(backend, X=X3, out=out) is out
    np.testing.assert_allclose(out, X3 @ W + b, rtol=1e-12)
    dX = np.full((2, 2, 3), np.nan)
    assert backward(backend, X=X3, dY=dY3, dX=dX)[0] is dX
    np.testing.assert_allclose(dX, dY3 @ W.T, rtol=1e-12)


@pytest.mark.parametrize("D,M", [(0, 4), (5, 0), (0, 0)])
def test_batch_dims_with_an_empty_feature_axis(backend, D, M):
    """Found by the property tests: X (2, 3, 0) crashed in reshape(-1, 0) with NumPy's error."""
    X3 = rng.standard_normal((2, 3, D))
    W0 = rng.standard_normal((D, M))
    b0 = rng.standard_normal(M)
    Y = to_numpy(fastlinear.linear_forward(X3, W0, b0, backend=backend))
    np.testing.assert_array_equal(Y, np.broadcast_to(b0, (2, 3, M)) if D == 0 else X3 @ W0 + b0)
    dY3 = rng.standard_normal((2, 3, M))
    dX, dW, db = (to_numpy(a) for a in fastlinear.linear_backward(dY3, X3, W0, backend=backend))
    assert dX.shape == (2, 3, D) and dW.shape == (D, M) and db.shape == (M,)
    np.testing.assert_allclose(dX, dY3 @ W0.T, atol=1e-12)
    np.testing.assert_allclose(db, dY3.sum((0, 1)), rtol=1e-12)


# --- NaN and inf: propagate as NumPy does, in both passes ---------------------------------------

def test_nan_and_inf_propagate_in_backward(backend):
    dY_bad = dY.copy()
    dY_bad[1, 0] = np.nan
    dY_bad[2, 1] = np.inf
    with np.errstate(invalid="ignore"):
        dX, dW, db = (to_numpy(a) for a in backward(backend, dY=dY_bad))
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


# --- backends by name: unavailable ones from every source ---------------------------------------

def unavailable_backends():
    return [name for name, reason in fastlinear.available_backends().items() if reason]


SPELLINGS = {"plain": str, "spaces": lambda n: f" {n} ", "tab": lambda n: f"{n}\t",
             "upper": str.upper, "title": str.title}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_unavailable_backend_from_every_source(monkeypatch, spelling):
    names = unavailable_backends()
    if not names:
        pytest.skip("every registered backend is available here")
    for name in names:
        raw = SPELLINGS[spelling](name)
        match = rf"backend '{name}' (is not available|failed to import)"
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.linear_forward(X, W, backend=raw)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            with fastlinear.use_backend(raw):
                pass
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.Linear(3, 2, backend=raw)
        monkeypatch.setenv(fastlinear.ENV_VAR, raw)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.linear_forward(X, W)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.Linear(3, 2).forward(X)
        monkeypatch.delenv(fastlinear.ENV_VAR)


@pytest.mark.parametrize("bad", ["", " ", "numpy2", "cuda", "NUM PY"])
def test_layer_with_unknown_backend_name(bad):
    with pytest.raises(ValueError, match=r"unknown backend .*expected one of 'numpy', 'numba'"):
        fastlinear.Linear(3, 2, backend=bad)


def test_bad_environment_value_fails_the_layer_call_not_silently(monkeypatch):
    layer = fastlinear.Linear(3, 2, rng=0)
    monkeypatch.setenv(fastlinear.ENV_VAR, "Tensorflow ")
    with pytest.raises(ValueError, match=r"unknown FASTLINEAR_BACKEND value 'Tensorflow '"):
        layer.forward(X)
    assert layer.X is None


# --- the layer's state after a failing call -----------------------------------------------------

def trained_layer(backend, batch_shape=(4,)):
    layer = fastlinear.Linear(3, 2, backend=backend, rng=7)
    inputs = rng.standard_normal((*batch_shape, 3))
    layer.forward(inputs)
    layer.backward(rng.standard_normal((*batch_shape, 2)))
    return layer, inputs


def snapshot(layer):
    return [to_numpy(a).copy() for a in (layer.W, layer.b, layer.dW, layer.db)]


def assert_unchanged(layer, before):
    for saved, now in zip(before, snapshot(layer), strict=True):
        np.testing.assert_array_equal(now, saved)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("bad_dY,error", [
    (np.ones((4, 2), dtype=np.complex64), TypeError),
    (np.ones((4, 2), dtype=object), TypeError),
    (np.ones((2, 2, 2)), ValueError),  # the 8 rows of the last forward, wrongly batched
    (np.ones((8, 2)), ValueError),  # flattened: refused too, as dY must match Y exactly
    (np.ones((2, 4, 3)), ValueError),
    ("dY", TypeError),
])
def test_failed_backward_with_batch_dims_keeps_gradients(backend, accumulate, bad_dY, error):
    layer, inputs = trained_layer(backend, batch_shape=(4, 2))
    before = snapshot(layer)
    with pytest.raises(error):
        layer.backward(bad_dY, accumulate=accumulate)
    assert_unchanged(layer, before)
    assert layer.X is inputs


def test_failed_forward_keeps_the_cached_input(backend):
    layer, inputs = trained_layer(backend)
    for bad in (np.ones((4, 5)), np.ones((4, 3), dtype=np.complex64), "X", np.ones(4)):
        with pytest.raises((TypeError, ValueError)):
            layer.forward(bad)
        assert layer.X is inputs
    before = snapshot(layer)
    upstream = rng.standard_normal((4, 2))
    layer.backward(upstream)  # still pairs with the last successful forward
    np.testing.assert_allclose(to_numpy(layer.dW), inputs.T @ upstream, rtol=1e-12)
    assert not np.array_equal(snapshot(layer)[2], before[2])


def test_accumulate_adds_exactly_once_per_call(backend):
    layer = fastlinear.Linear(5, 3, backend=backend, rng=8)
    batches = [make_inputs(rng, 6, 5, 3, np.float64) for _ in range(3)]
    layer.zero_grad()
    expected_dW, expected_db = np.zeros((5, 3)), np.zeros(3)
    for inputs, _, _, upstream in batches:
        layer.forward(inputs)
        dX = layer.backward(upstream, accumulate=True)
        expected_dW += inputs.T @ upstream
        expected_db += upstream.sum(0)
        np.testing.assert_allclose(to_numpy(dX), upstream @ to_numpy(layer.W).T, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(layer.dW), expected_dW, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(layer.db), expected_db, rtol=1e-12, atol=1e-14)
    inputs, _, _, upstream = batches[0]
    layer.forward(inputs)
    layer.backward(upstream)  # no accumulate: replaces
    np.testing.assert_allclose(to_numpy(layer.dW), inputs.T @ upstream, rtol=1e-12)


def test_accumulate_into_a_gradient_of_a_stale_shape_is_refused(backend):
    """After assigning a W of a new shape, accumulating into the old dW is an error, not a mix."""
    layer, _ = trained_layer(backend)
    old_dW = to_numpy(layer.dW).copy()
    layer.W = layer.W[:, :1].copy()
    layer.b = None
    layer.forward(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"dW must have shape \(3, 1\), got \(3, 2\)"):
        layer.backward(np.ones((4, 1)), accumulate=True)
    np.testing.assert_array_equal(to_numpy(layer.dW), old_dW)


# --- outputs too large for memory: refused before anything is allocated -------------------------

def huge(shape, dtype=np.float64):
    """A read-only zero-stride view of ``shape``: any size, no memory."""
    return np.broadcast_to(np.ones((), dtype=dtype), shape)


@pytest.mark.parametrize("N,D,M", [(2**24, 2, 2**24), (2**40, 1, 2**40), (2**59, 1, 2)])
def test_forward_output_larger_than_memory(backend, N, D, M):
    with pytest.raises(MemoryError, match=r"the float64 outputs Y \(\d+, \d+\) would need .* GiB, "
                                          r"more than the .* GiB this machine can hold"):
        fastlinear.linear_forward(huge((N, D)), huge((D, M)), backend=backend)


def test_forward_output_larger_than_memory_with_batch_dims(backend):
    with pytest.raises(MemoryError, match=r"Y \(4096, 4096, 4096, 4096\) would need"):
        fastlinear.linear_forward(huge((4096, 4096, 4096, 2)), huge((2, 4096)), backend=backend)


@pytest.mark.parametrize("N,D,M,need_dX,match", [
    (2**25, 2**25, 1, True, r"dX \(33554432, 33554432\), dW \(33554432, 1\), db \(1,\)"),
    (1, 2**25, 2**25, False, r"dW \(33554432, 33554432\), db \(33554432,\) would need"),
])
def test_backward_outputs_larger_than_memory(backend, N, D, M, need_dX, match):
    with pytest.raises(MemoryError, match=match):
        fastlinear.linear_backward(huge((N, M)), huge((N, D)), huge((D, M)), need_dX=need_dX,
                                   backend=backend)


def test_only_outputs_fastlinear_allocates_are_counted(backend, monkeypatch):
    """Given buffers, and gradients not asked for, do not count against the memory limit."""
    monkeypatch.setattr(functional, "HOST_MEMORY_BYTES", 8 * 8)  # room for 8 float64
    with pytest.raises(MemoryError, match=r"Y \(5, 2\) would need 7.451e-08 GiB, more than "
                                          r"the 5.96e-08 GiB"):
        forward(backend, X=np.ones((5, 3)))
    forward(backend)  # Y (4, 2): fits exactly
    with pytest.raises(MemoryError, match=r"outputs dX \(4, 3\), dW \(3, 2\), db \(2,\)"):
        backward(backend)
    out = np.empty((4, 2))
    assert forward(backend, out=out) is out
    dX, dW, db = backward(backend, need_dX=False)  # 6 + 2 elements: fits exactly
    assert dX is None
    np.testing.assert_allclose(dW, X.T @ dY, rtol=1e-12)
    dX = np.empty((4, 3))
    assert backward(backend, dX=dX, has_bias=False)[0] is dX


def test_zero_stride_inputs_are_computed_correctly(backend):
    """Broadcast (read-only, zero-stride) inputs are valid inputs."""
    Xb = np.broadcast_to(np.arange(3.0), (5, 3))
    Wb = np.broadcast_to(np.arange(2.0), (3, 2))
    Y = to_numpy(fastlinear.linear_forward(Xb, Wb, np.broadcast_to(1.0, (2,)), backend=backend))
    np.testing.assert_allclose(Y, np.asarray(Xb) @ np.asarray(Wb) + 1.0, rtol=1e-12)
    dX, dW, db = (to_numpy(a) for a in fastlinear.linear_backward(
        np.broadcast_to(np.arange(2.0), (5, 2)), Xb, Wb, backend=backend))
    np.testing.assert_allclose(dW, np.asarray(Xb).T @ np.broadcast_to(np.arange(2.0), (5, 2)))


HUGE_TESTS = os.environ.get("FASTLINEAR_TEST_HUGE", "").strip() == "1"


def available_memory():
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.skipif(not HUGE_TESTS, reason="needs ~9 GB of memory and a minute: set "
                                           "FASTLINEAR_TEST_HUGE=1 to run")
def test_outputs_past_int32_indexing(backend):
    """N*M > 2**31 elements: a kernel indexing with int32 would write the wrong places."""
    rows, M = 2**15 + 3, 2**16
    needed = rows * M * 4
    if available_memory() < 1.5 * needed:
        pytest.skip(f"needs {1.5 * needed / 2**30:.1f} GiB of available memory")
    W_row = np.linspace(-1, 1, M, dtype=np.float32).reshape(1, M)
    bias = np.arange(M, dtype=np.float32) / M
    Y = fastlinear.linear_forward(np.broadcast_to(np.float32(2), (rows, 1)), W_row, bias,
                                  backend=backend)
    expected_row = 2 * W_row[0] + bias
    for i in (0, 2**15 - 1, 2**15, rows - 1):
        np.testing.assert_allclose(to_numpy(Y[i]), expected_row, rtol=1e-6, atol=1e-6)
    del Y
    # dX = dY @ W.T has rows x M elements too; X and dY take no memory
    dX, _, _ = fastlinear.linear_backward(np.broadcast_to(np.float32(3), (rows, 1)),
                                          np.broadcast_to(np.float32(0), (rows, M)),
                                          W_row.T.copy(), has_bias=False, backend=backend)
    for i in (0, 2**15, rows - 1):
        np.testing.assert_allclose(to_numpy(dX[i]), 3 * W_row[0], rtol=1e-6, atol=1e-6)


def test_size_check_runs_in_a_subprocess_without_sysconf():
    """Where the OS gives no memory size, only the addressable limit applies (NumPy's own)."""
    code = (
        "import os, numpy as np\n"
        "del os.sysconf\n"
        "import fastlinear\n"
        "from fastlinear import functional\n"
        "assert functional.HOST_MEMORY_BYTES == np.iinfo(np.intp).max\n"
        "x = np.broadcast_to(1.0, (2**59, 1))\n"
        "try:\n"
        "    fastlinear.linear_forward(x, np.ones((1, 2)), backend='numpy')\n"
        "except MemoryError as e:\n"
        "    print(e)\n"
    )
    root = str(pathlib.Path(fastlinear.__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr
    assert "would need" in result.stdout
