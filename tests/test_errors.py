"""Shapes and output buffers the API refuses, and outputs too large for memory.

Each error names what was expected and what came; nothing is written before the checks pass.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastlinear
from fastlinear import _plan
from tests.helpers import SMALL, backward_small, forward_small, to_numpy

rng = np.random.default_rng(6)
X, W, b, dY = SMALL
forward, backward = forward_small, backward_small



# --- shapes ------------------------------------------------------------------------------------

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
def test_more_forward_shape_errors(backend, kwargs, match):
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
def test_more_backward_shape_errors(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        backward(backend, **kwargs)


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


# --- output buffers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dW", "db", "dX"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int64])
def test_buffers_must_have_the_result_dtype(backend, name, dtype):
    shape = {"dW": W.shape, "db": b.shape, "dX": X.shape}[name]
    with pytest.raises(TypeError, match=rf"{name} must have dtype float64, got"):
        backward(backend, **{name: np.empty(shape, dtype=dtype)})


def test_out_of_the_wrong_dtype(backend):
    with pytest.raises(TypeError, match="out must have dtype float64, got float32"):
        forward(backend, out=np.empty((4, 2), dtype=np.float32))

def test_read_only_out_buffer(backend):
    out = np.empty((4, 2))
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        forward(backend, out=out)


@pytest.mark.parametrize("out", [np.empty((4, 2)).tolist(), "out"])
def test_out_that_is_not_an_array(backend, out):
    with pytest.raises(TypeError, match=r"out must be an array .*got builtins"):
        forward(backend, out=out)


def test_out_buffer_overlapping_an_input(backend):
    square_X, square_W = np.ones((3, 3)), np.ones((3, 3))
    with pytest.raises(ValueError, match="out overlaps the input X"):
        fastlinear.linear_forward(square_X, square_W, backend=backend, out=square_X)
    with pytest.raises(ValueError, match="dW overlaps the input W"):
        fastlinear.linear_backward(square_X, square_X, square_W, dW=square_W, backend=backend)


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
    monkeypatch.setattr(_plan, "HOST_MEMORY_BYTES", 8 * 8)  # room for 8 float64
    monkeypatch.setattr(_plan, "PLAIN_MAX_ELEMENTS", 8 * 8 // 16)  # derived from it at import
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
        "from fastlinear import _plan\n"
        "assert _plan.HOST_MEMORY_BYTES == np.iinfo(np.intp).max\n"
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
