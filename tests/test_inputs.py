"""Inputs as users hold them: NumPy's type promotion, single samples, scalar biases, DLPack arrays.

Each case runs the notebook's class (``tests.test_layer.NotebookLinear``, plain NumPy) beside
``fastlinear.Linear`` and asks for the same dtype, shape and values.
"""

import sys

import numpy as np
import pytest

import fastlinear
from fastlinear import _arrays, _dispatch
from tests.helpers import SMALL, assert_close, backward_small, forward_small, to_numpy
from tests.test_layer import NotebookLinear

D, M, N = 5, 3, 4

X, W, b, dY = SMALL
forward, backward = forward_small, backward_small



def backend_dtypes(backend):
    return _dispatch.load_backend(backend).DTYPES


def pair(dtype=np.float64, seed=3):
    """The notebook's layer and fastlinear's, with the same weights."""
    np.random.seed(seed)  # noqa: NPY002 (the notebook class uses the global RNG)
    notebook = NotebookLinear(D, M)
    layer = fastlinear.Linear(D, M, dtype=dtype)
    layer.W = notebook.W.astype(dtype)
    layer.b = (notebook.b + 0.25).astype(dtype)
    notebook.W, notebook.b = layer.W.copy(), layer.b.copy()
    return notebook, layer


def assert_same(actual, expected):
    assert type(actual) is type(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape
    assert_close(actual, expected, expected.dtype, D + 1, 4.0)


X_DTYPES = [np.uint8, np.int32, np.int64, np.bool_, np.float16, np.float32, np.float64, ">f8"]


@pytest.mark.parametrize("x_dtype", X_DTYPES)
@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
def test_forward_promotes_as_numpy(backend, x_dtype, layer_dtype):
    notebook, layer = pair(layer_dtype)
    layer.backend = backend
    X = (np.random.default_rng(0).standard_normal((N, D)) * 3).astype(x_dtype)
    assert_same(layer.forward(X), notebook.forward(X))


@pytest.mark.parametrize("dy_dtype", [np.float32, np.float64, np.int64])
@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
def test_backward_promotes_in_one_dtype(backend, dy_dtype, layer_dtype):
    """dX, dW and db in the result dtype of dY, X and W (NumPy's dtype of dY @ W.T)."""
    notebook, layer = pair(layer_dtype)
    layer.backend = backend
    X = np.random.default_rng(1).standard_normal((N, D)).astype(layer_dtype)
    dY = (np.random.default_rng(2).standard_normal((N, M)) * 4).astype(dy_dtype)
    notebook.forward(X)
    layer.forward(X)
    expected_dX = notebook.backward(dY)
    assert_same(layer.backward(dY), expected_dX)
    assert layer.dW.dtype == layer.db.dtype == expected_dX.dtype
    assert_close(layer.dW, notebook.dW, expected_dX.dtype, N, 4.0)
    # the notebook sums dY in dY's own dtype, fastlinear in the call's (never less precise)
    assert_close(layer.db, notebook.db, np.result_type(notebook.db, np.float32), N, 4.0)


@pytest.mark.parametrize("W_value,b_value", [
    (np.arange(D * M, dtype=np.float32).reshape(D, M) / 10, np.ones(M, np.float32)),
    (np.arange(D * M).reshape(D, M), np.arange(M)),
    (np.ones((D, M)), 0.0),
    (np.ones((D, M)), 2),
    (np.ones((D, M)), np.array([0.5])),
    (np.ones((D, M)), np.float32(0.5)),
])
def test_assigned_parameters_of_any_dtype(backend, W_value, b_value):
    notebook, layer = pair()
    layer.backend = backend
    notebook.W = layer.W = W_value
    notebook.b = layer.b = b_value
    X = np.random.default_rng(3).standard_normal((N, D)).astype(np.float32)
    assert_same(layer.forward(X), notebook.forward(X))
    dY = np.ones((N, M), dtype=np.float32)
    assert_same(layer.backward(dY), notebook.backward(dY).astype(layer.backward(dY).dtype))
    assert layer.db.shape == (M,)


def test_uint8_pixels_through_an_mlp(backend):
    """A 3-layer MLP fed raw uint8 pixels, as a notebook user would."""
    pixels = np.random.default_rng(4).integers(0, 256, size=(8, 16), dtype=np.uint8)
    with fastlinear.use_backend(backend):
        layers = [fastlinear.Linear(16, 12, rng=1), fastlinear.Linear(12, 6, rng=2),
                  fastlinear.Linear(6, 2, rng=3)]
    h, expected = pixels, pixels.astype(np.float64)
    for layer in layers:
        h = np.maximum(layer.forward(h), 0)
        expected = np.maximum(expected @ layer.W + layer.b, 0)
    assert h.dtype == np.float64
    np.testing.assert_allclose(h, expected, rtol=1e-12)


def test_casting_no_per_layer_call(backend):
    layer = fastlinear.Linear(D, M, backend=backend, rng=0)
    X32 = np.ones((N, D), dtype=np.float32)
    assert layer.forward(X32).dtype == np.float64
    with pytest.raises(TypeError, match="casting='no'"):
        fastlinear.linear_forward(X32, layer.W, layer.b, backend=backend, casting="no")


# --- one sample, scalar bias ----------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_single_sample(backend, activation):
    layer = fastlinear.Linear(D, M, backend=backend, rng=5, activation=activation)
    layer.b = np.linspace(-0.5, 0.5, M)
    x = np.random.default_rng(6).standard_normal(D)
    y = layer.forward(x)
    assert y.shape == (M,)
    batched = fastlinear.Linear(D, M, backend=backend, activation=activation)
    batched.W, batched.b = layer.W, layer.b
    np.testing.assert_allclose(y, batched.forward(x[None])[0], rtol=1e-12)
    dy = np.random.default_rng(7).standard_normal(M)
    dx = layer.backward(dy)
    assert dx.shape == (D,) and layer.dW.shape == (D, M) and layer.db.shape == (M,)
    np.testing.assert_allclose(dx, batched.backward(dy[None])[0], rtol=1e-12)
    np.testing.assert_allclose(layer.dW, batched.dW, rtol=1e-12)
    np.testing.assert_allclose(layer.db, batched.db, rtol=1e-12)


def test_single_sample_matches_the_notebook(backend):
    notebook, layer = pair()
    layer.backend = backend
    x = np.arange(D, dtype=np.float64)
    assert_same(layer.forward(x), notebook.forward(x))


# --- DLPack: any array library in, the same out --------------------------------------------------

def test_array_api_strict_arrays_in_and_out(backend):
    xps = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(8)
    X, W, b = rng.standard_normal((N, D)), rng.standard_normal((D, M)), rng.standard_normal(M)
    Y = fastlinear.linear_forward(xps.asarray(X), W, b, backend=backend, activation="tanh")
    assert type(Y) is type(xps.asarray(X))
    np.testing.assert_allclose(np.from_dlpack(Y), np.tanh(X @ W + b), rtol=1e-12)
    dY = rng.standard_normal((N, M))
    dX, dW, db = fastlinear.linear_backward(xps.asarray(dY), xps.asarray(X), W,
                                            activation="tanh", saved=Y, backend=backend)
    assert type(dX) is type(Y) and type(dW) is np.ndarray
    G = dY * (1 - np.tanh(X @ W + b) ** 2)
    np.testing.assert_allclose(np.from_dlpack(dX), G @ W.T, rtol=1e-12)
    np.testing.assert_allclose(dW, X.T @ G, rtol=1e-12)


def test_torch_tensors_in_and_out(backend):
    torch = pytest.importorskip("torch")
    X = torch.randn(2, N, D, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    layer = fastlinear.Linear(D, M, dtype=np.float32, backend=backend, rng=9, activation="relu")
    Y = layer.forward(X)
    assert isinstance(Y, torch.Tensor) and Y.dtype == torch.float32 and Y.shape == (2, N, M)
    reference = torch.relu(X @ torch.from_numpy(layer.W) + torch.from_numpy(layer.b))
    torch.testing.assert_close(Y, reference)
    dX = layer.backward(torch.ones_like(Y))
    assert isinstance(dX, torch.Tensor) and dX.shape == X.shape
    assert isinstance(layer.dW, np.ndarray)  # gradients follow W's library


def test_torch_weights_give_torch_gradients(backend):
    torch = pytest.importorskip("torch")
    X, W = torch.randn(N, D, dtype=torch.float64), torch.randn(D, M, dtype=torch.float64)
    dX, dW, db = fastlinear.linear_backward(torch.ones(N, M, dtype=torch.float64), X, W,
                                            backend=backend)
    assert all(isinstance(t, torch.Tensor) for t in (dX, dW, db))
    torch.testing.assert_close(dW, X.T @ torch.ones(N, M, dtype=torch.float64))


def test_torch_output_buffer_is_written_in_place(backend):
    torch = pytest.importorskip("torch")
    X, W = torch.randn(N, D), torch.randn(D, M)
    out = torch.empty(N, M)
    result = fastlinear.linear_forward(X, W, backend=backend, out=out)
    assert result is out
    torch.testing.assert_close(out, X @ W)


def test_torch_tensor_that_requires_grad(backend):
    torch = pytest.importorskip("torch")
    X = torch.randn(N, D, requires_grad=True)
    with pytest.raises(TypeError, match=r"X .*could not be read through DLPack.*X.detach\(\)"):
        fastlinear.linear_forward(X, np.ones((D, M), np.float32), backend=backend)


def test_torch_dtype_numpy_cannot_hold(backend):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"X \(torch.Tensor, dtype torch.bfloat16\) could not"):
        fastlinear.linear_forward(torch.ones(N, D, dtype=torch.bfloat16), np.ones((D, M)),
                                  backend=backend)


def test_dlpack_conversions_share_memory():
    torch = pytest.importorskip("torch")
    from fastlinear import _arrays

    X = torch.randn(N, D, dtype=torch.float64)
    native, back = _arrays.to_native(X, "X")
    assert type(native) is np.ndarray and np.shares_memory(native, X.numpy())
    result = np.ones((N, M))
    tensor = back(result)
    assert isinstance(tensor, torch.Tensor) and np.shares_memory(tensor.numpy(), result)
    buffer = np.empty((N, M))
    fastlinear.linear_forward(X, np.eye(D, M), out=torch.from_dlpack(buffer), backend="numpy")
    np.testing.assert_allclose(buffer, X.numpy() @ np.eye(D, M), rtol=1e-12)


# --- dtypes NumPy's promotion cannot compute in -----------------------------------------------

@pytest.mark.parametrize("name", ["X", "b"])
@pytest.mark.parametrize("dtype", [np.complex128, object, "U3"])
def test_complex_object_and_string_data_are_type_errors(backend, name, dtype):
    value = {"X": X, "b": b}[name].astype(dtype)
    with pytest.raises(TypeError, match=f"{name} has dtype .*; fastlinear computes in floating"):
        forward(backend, **{name: value})

@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_only_operands_are_type_errors(dtype):
    with pytest.raises(TypeError, match=f"X {np.dtype(dtype)}, W {np.dtype(dtype)} promote to "
                                        f"{np.dtype(dtype)}, but fastlinear computes in floating"):
        fastlinear.linear_forward(X.astype(dtype), W.astype(dtype))

def test_float16_on_a_cpu_backend_names_the_backend_dtypes(backend):
    with pytest.raises(TypeError, match=rf"computes in float16 .*the '{backend}' backend computes "
                                        r"in float32, float64"):
        fastlinear.linear_forward(X.astype(np.float16), W.astype(np.float16), backend=backend)

def test_casting_no_keeps_the_refusal(backend):
    with pytest.raises(TypeError, match="dY has dtype float32 but the call computes in float64, "
                                        "and casting='no' forbids"):
        fastlinear.linear_backward(dY.astype(np.float32), X, W, backend=backend, casting="no")
    with pytest.raises(TypeError, match="X has dtype int64 .* casting='no'"):
        fastlinear.linear_forward(X.astype(np.int64), W, backend=backend, casting="no")
    with pytest.raises(ValueError, match="casting must be one of"):
        fastlinear.linear_forward(X, W, backend=backend, casting="never")


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

def test_non_native_byte_order_is_read_correctly(backend):
    swapped = np.dtype(np.float64).newbyteorder()
    Y = forward(backend, X=X.astype(swapped), W=W.astype(swapped))
    assert Y.dtype == np.float64 and Y.dtype.isnative
    np.testing.assert_allclose(Y, X @ W + b, rtol=1e-12)
    with pytest.raises(TypeError, match=rf"X has dtype {swapped.str} .*casting='no'"):
        fastlinear.linear_forward(X.astype(swapped), W, b, backend=backend, casting="no")
    fastlinear.linear_forward(X.astype(swapped), W, b, backend=backend, casting="equiv")


# --- lists and objects that are not arrays -----------------------------------------------------

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
    ([["a", "b", "c"]], TypeError, r"X has dtype <U1; fastlinear computes in floating"),
])
def test_bad_lists(backend, value, error, match):
    with pytest.raises(error, match=match):
        forward(backend, X=value)


@pytest.mark.parametrize("value", [{"a": 1}, "abc", 3.0, None, memoryview(b"abc")])
def test_non_array_input(backend, value):
    with pytest.raises(TypeError, match=r"X must be an array \(NumPy, CuPy, or any object with "
                                        r"__dlpack__"):
        fastlinear.linear_forward(value, W, backend=backend)

def test_non_array_weight():
    with pytest.raises(TypeError, match="W must be an array"):
        fastlinear.linear_forward(X, "W")

def test_masked_arrays_are_refused(backend):
    with pytest.raises(TypeError, match="masked array"):
        forward(backend, X=np.ma.masked_array(X, mask=X > 0))


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
    module = _dispatch.load_backend(backend)
    if "cupy" in module.ARRAY_LIBRARIES:
        pytest.skip(f"the {backend} backend takes CuPy arrays")
    with pytest.raises(TypeError, match=rf"the '{backend}' backend takes numpy arrays, "
                                        rf"got {name} as a cupy._core.core.ndarray"):
        forward(backend, **{name: fake_array("cupy._core.core")})

def test_real_cupy_array_given_to_a_cpu_backend(backend):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    if "cupy" in _dispatch.load_backend(backend).ARRAY_LIBRARIES:
        pytest.skip(f"the {backend} backend takes CuPy arrays")
    with pytest.raises(TypeError, match=rf"the '{backend}' backend takes numpy arrays"):
        forward(backend, X=cupy.asarray(X))


class DeviceArray:
    """An object that says its memory is on a DLPack device (reading it would need that device)."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, **kwargs):
        raise AssertionError("fastlinear must decide from __dlpack_device__ before reading")

    def __dlpack_device__(self):
        return (self.device_type, 0)


def test_cuda_memory_without_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(TypeError, match=r"X \(.*DeviceArray\) is in CUDA memory, which needs "
                                        r"CuPy: pip install \"fastlinear\[cuda\]\""):
        fastlinear.linear_forward(DeviceArray(2), np.ones((3, 2)))


class PinnedArray:
    """Host memory that says it is CUDA pinned host memory (DLPack device type 3, kDLCUDAHost),
    as some GPU libraries label page-locked buffers; its data is a NumPy array's."""

    def __init__(self, host):
        self.host = host

    def __dlpack__(self, **kwargs):
        return self.host.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (3, 0)

    def __array_namespace__(self):
        return np


def test_pinned_host_memory_is_read_through_numpy(monkeypatch):
    """cupy.from_dlpack refuses kDLCUDAHost; NumPy reads it in place (issue 19)."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # CuPy must not be needed
    X = np.arange(6.0).reshape(2, 3)
    native, _ = _arrays.to_native(PinnedArray(X), "X")
    assert type(native) is np.ndarray and np.shares_memory(native, X)
    Y = fastlinear.linear_forward(PinnedArray(X), np.ones((3, 2)), backend="numpy")
    np.testing.assert_allclose(Y, X @ np.ones((3, 2)))


def test_memory_on_another_kind_of_device_is_refused():
    with pytest.raises(TypeError, match=r"X \(.*DeviceArray\) lives on DLPack device type 14; "
                                        r"fastlinear takes host memory"):
        fastlinear.linear_forward(DeviceArray(14), np.ones((3, 2)))


def test_single_sample_with_buffers(backend):
    """One sample into given buffers: the backends receive them as one row."""
    x, W, b = np.arange(3.0), np.ones((3, 4)), np.linspace(0, 1, 4)
    out = np.empty(4)
    assert fastlinear.linear_forward(x, W, b, out=out, backend=backend) is out
    np.testing.assert_allclose(out, x @ W + b, rtol=1e-12)
    dX, dW, db = np.empty(3), np.empty((3, 4)), np.empty(4)
    dy = np.array([0.5, 1.0, 2.0, 3.0])
    result = fastlinear.linear_backward(dy, x, W, dX=dX, dW=dW, db=db, backend=backend)
    assert result[0] is dX and result[1] is dW and result[2] is db
    np.testing.assert_allclose(dX, dy @ W.T, rtol=1e-12)
    np.testing.assert_allclose(dW, np.outer(x, dy), rtol=1e-12)
    np.testing.assert_allclose(db, dy, rtol=1e-12)
