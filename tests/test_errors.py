"""Bad input gets a clear TypeError/ValueError naming what was expected and what came."""

import numpy as np
import pytest

import fastlinear

rng = np.random.default_rng(1)
X = rng.standard_normal((4, 3))
W = rng.standard_normal((3, 2))
b = rng.standard_normal(2)
dY = rng.standard_normal((4, 2))


def forward(backend, **kwargs):
    args = {"X": X, "W": W, "b": b, **kwargs}
    return fastlinear.linear_forward(args["X"], args["W"], args["b"], backend=backend,
                                     out=args.get("out"))


def backward(backend, **kwargs):
    args = {"dY": dY, "X": X, "W": W, **kwargs}
    buffers = {k: v for k, v in args.items() if k in ("dX", "dW", "db", "accumulate")}
    return fastlinear.linear_backward(args["dY"], args["X"], args["W"], backend=backend,
                                      **buffers)


@pytest.mark.parametrize("kwargs,match", [
    ({"X": np.ones((4, 5))}, r"X has 5 features but 3 were expected \(shape \(4, 5\)\)"),
    ({"X": np.ones(4)}, r"X has 4 features but 3 were expected \(shape \(4,\)\)"),
    ({"X": np.array(1.0)}, r"X must be \(N, 3\), \(\*, 3\) or one sample \(3,\), got a 0-d"),
    ({"W": np.ones(3)}, r"W must be 2-D \(in_features, out_features\), got shape \(3,\)"),
    ({"W": np.ones((3, 2, 1))}, r"W must be 2-D"),
    ({"b": np.ones(3)}, r"b must broadcast to \(2,\) to match W's 2 columns .* got shape \(3,\)"),
    ({"b": np.ones((2, 2))}, r"b must broadcast to \(2,\)"),
    ({"b": np.ones((2, 1))}, r"b must broadcast to"),
    ({"b": np.ones((1, 1, 2))}, r"b must broadcast to"),
    ({"out": np.empty((4, 3))}, r"out must have shape \(4, 2\), got \(4, 3\)"),
    ({"out": np.empty((2, 4)).T}, r"out must be C-contiguous"),
])
def test_forward_shape_errors(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        forward(backend, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"dY": np.ones((4, 3))}, r"dY must have the shape of the forward output \(4, 2\)"),
    ({"dY": np.ones((5, 2))}, r"dY must have the shape of the forward output"),
    ({"dY": np.ones(2)}, r"dY must have the shape"),
    ({"X": np.ones((4, 4))}, r"X has 4 features but 3 were expected"),
    ({"dW": np.empty((2, 3))}, r"dW must have shape \(3, 2\), got \(2, 3\)"),
    ({"dX": np.empty((4, 2))}, r"dX must have shape \(4, 3\)"),
    ({"db": np.empty(3)}, r"db must have shape \(2,\)"),
    ({"accumulate": True}, r"accumulate=True adds into existing gradients"),
])
def test_backward_shape_errors(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        backward(backend, **kwargs)


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


def test_buffer_of_another_dtype_than_the_result(backend):
    with pytest.raises(TypeError, match="dW must have dtype float64, got float32"):
        backward(backend, dW=np.empty((3, 2), dtype=np.float32))


@pytest.mark.parametrize("value", [{"a": 1}, "abc", 3.0, None, memoryview(b"abc")])
def test_non_array_input(backend, value):
    with pytest.raises(TypeError, match=r"X must be an array \(NumPy, CuPy, or any object with "
                                        r"__dlpack__"):
        fastlinear.linear_forward(value, W, backend=backend)


def test_non_array_weight():
    with pytest.raises(TypeError, match="W must be an array"):
        fastlinear.linear_forward(X, "W")


def test_bad_lists(backend):
    with pytest.raises(TypeError, match="has dtype <U1; fastlinear computes in floating"):
        fastlinear.linear_forward([["a", "b", "c"]], W, backend=backend)
    with pytest.raises(TypeError, match="X could not be converted to an array"):
        fastlinear.linear_forward([[1.0, 2.0], [3.0]], W, backend=backend)


def test_masked_arrays_are_refused(backend):
    with pytest.raises(TypeError, match="masked array"):
        forward(backend, X=np.ma.masked_array(X, mask=X > 0))


def test_out_buffer_overlapping_an_input(backend):
    square_X, square_W = np.ones((3, 3)), np.ones((3, 3))
    with pytest.raises(ValueError, match="out overlaps the input X"):
        fastlinear.linear_forward(square_X, square_W, backend=backend, out=square_X)
    with pytest.raises(ValueError, match="dW overlaps the input W"):
        fastlinear.linear_backward(square_X, square_X, square_W, dW=square_W, backend=backend)


def test_read_only_out_buffer(backend):
    out = np.empty((4, 2))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        forward(backend, out=out)


def test_out_of_the_wrong_dtype(backend):
    with pytest.raises(TypeError, match="out must have dtype float64, got float32"):
        forward(backend, out=np.empty((4, 2), dtype=np.float32))


def test_failed_call_leaves_buffers_untouched(backend):
    dW = np.full((3, 2), 7.0)
    with pytest.raises(ValueError):
        backward(backend, dY=np.ones((5, 2)), dW=dW, db=np.zeros(2), accumulate=True)
    np.testing.assert_array_equal(dW, 7.0)
