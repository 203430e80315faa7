"""The cupy backend: GPU results against the reference, and the checks that need no GPU.

Without CuPy or a CUDA device the GPU tests skip with the reason; the rest still runs: the
availability messages, the dispatcher's refusal of ``FASTLINEAR_BACKEND=cupy``, and the pure
helpers that decide cuBLAS arguments, forward paths and launch shapes (the cuBLAS arguments are
checked by an emulation of cuBLAS's column-major GEMM on NumPy buffers).
"""

import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlinear
from fastlinear import _dispatch
from fastlinear.backends import cupy as cupy_backend
from tests.gpu_emulation import (
    LAYOUTS,
    assert_backward_matches,
    assert_matches,
    emulated_gemm,
    flat_from_first_element,
    make_layout,
)
from tests.helpers import assert_close, make_inputs, reference64

GPU_REASON = _dispatch.unavailable_reason("cupy")
requires_gpu = pytest.mark.skipif(GPU_REASON is not None,
                                  reason=f"needs CuPy and a CUDA device: {GPU_REASON}")
GPU_DTYPES = (np.float16, np.float32, np.float64)


# --- availability and dispatch (no GPU needed) -------------------------------------------------

def test_module_imports_and_declares_its_interface_without_cupy():
    assert cupy_backend.NAME == "cupy"
    assert cupy_backend.ARRAY_LIBRARIES[0] == "cupy"
    assert set(cupy_backend.DTYPES) == {np.dtype(d) for d in GPU_DTYPES}
    assert set(cupy_backend.DTYPE_SUFFIXES) == set(cupy_backend.DTYPES)


def test_reason_names_the_extra_when_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    reason = cupy_backend._probe()
    assert 'pip install "fastlinear[cuda]"' in reason


def _fake_cupy(get_device_count):
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(
        getDeviceCount=get_device_count))
    return fake


def test_reason_says_no_cuda_device(monkeypatch):
    class CUDARuntimeError(RuntimeError):
        pass

    def no_device():
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(no_device))
    assert cupy_backend._probe().startswith("no CUDA device: CUDARuntimeError")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 0))
    assert cupy_backend._probe().startswith("no CUDA device")


@pytest.fixture
def cupy_unavailable(monkeypatch):
    """Make the cupy backend report no device, on any machine."""
    monkeypatch.setattr(cupy_backend, "unavailable_reason", lambda: "no CUDA device: (test)")
    for cache in ("_modules", "_unavailable", "_auto_choice"):
        monkeypatch.setattr(_dispatch, cache, {})


def test_env_var_cupy_without_device_raises(cupy_unavailable, monkeypatch):
    monkeypatch.setenv(fastlinear.ENV_VAR, "cupy")
    with pytest.raises(fastlinear.BackendUnavailableError, match="no CUDA device"):
        fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)))


def test_layer_with_cupy_backend_without_device_raises(cupy_unavailable):
    with pytest.raises(fastlinear.BackendUnavailableError, match="no CUDA device"):
        fastlinear.Linear(3, 4, backend="cupy")


@pytest.mark.skipif(GPU_REASON is None, reason="this machine has CuPy and a CUDA device")
def test_real_reason_names_the_extra_or_the_device(monkeypatch):
    assert 'pip install "fastlinear[cuda]"' in GPU_REASON or "no CUDA device" in GPU_REASON
    monkeypatch.setenv(fastlinear.ENV_VAR, "cupy")
    with pytest.raises(fastlinear.BackendUnavailableError,
                       match=r'fastlinear\[cuda\]|no CUDA device'):
        fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)))


def test_auto_never_picks_cupy_for_numpy_arrays():
    assert "cupy" not in _dispatch.AUTO_ORDER["numpy"]
    assert fastlinear.current_backend("numpy") != "cupy"
    Y = fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)), backend="auto")
    assert type(Y) is np.ndarray


def test_auto_without_device_has_no_backend_for_cupy_arrays(cupy_unavailable):
    with pytest.raises(fastlinear.BackendUnavailableError, match="cupy arrays"):
        _dispatch.resolve("auto", "cupy")


# --- pure helpers (no GPU needed) --------------------------------------------------------------

def _blas_ready(a):
    """What the backend hands cuBLAS: ``a`` itself when it can, else a C-ordered copy."""
    layout = cupy_backend.blas_layout(a.shape, a.strides, a.itemsize)
    if layout is None:
        a = np.ascontiguousarray(a)
        layout = (True, max(a.shape[1], 1))
    return a, layout


@pytest.mark.parametrize("n, k, m", [(1, 1, 1), (1, 5, 3), (4, 1, 6), (5, 7, 1), (6, 4, 9)])
@pytest.mark.parametrize("p_layout", LAYOUTS)
@pytest.mark.parametrize("q_layout", LAYOUTS)
def test_gemm_arguments_compute_the_row_major_product(n, k, m, p_layout, q_layout, rng):
    P = make_layout(np, rng.standard_normal((n, k)), p_layout)
    Q = make_layout(np, rng.standard_normal((k, m)), q_layout)
    P_ready, p_blas = _blas_ready(P)
    Q_ready, q_blas = _blas_ready(Q)
    in_place = ("C", "F", "rows_padded", "cols_padded")
    assert (P_ready is P) >= (p_layout in in_place), "copied an operand cuBLAS can read"
    assert (Q_ready is Q) >= (q_layout in in_place), "copied an operand cuBLAS can read"
    transa, transb, m_, n_, k_, lda, ldb, ldc = cupy_backend.gemm_arguments(p_blas, q_blas,
                                                                            n, m, k)
    C = np.full((n, m), np.nan)
    emulated_gemm(transa, transb, m_, n_, k_, flat_from_first_element(Q_ready), lda,
                  flat_from_first_element(P_ready), ldb, C.reshape(-1), ldc)
    np.testing.assert_allclose(C, P @ Q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout, expected", [
    ("C", (True, 5)), ("F", (False, 4)), ("rows_padded", (True, 8)), ("cols_padded", (False, 7)),
    ("every_other_col", None), ("reversed", None)])
def test_blas_layout(layout, expected):
    a = make_layout(np, np.arange(20.0).reshape(4, 5), layout)
    assert cupy_backend.blas_layout(a.shape, a.strides, a.itemsize) == expected


def test_forward_path_rule():
    small = cupy_backend.SMALL_BATCH_MAX_ROWS
    assert cupy_backend.forward_path(1, 8192, 8192, True) == "small_batch"
    assert cupy_backend.forward_path(small, 4096, 4096, True) == "small_batch"
    assert cupy_backend.forward_path(1, 8192, 8192, False) == "cublas_beta"
    assert cupy_backend.forward_path(small + 1, 64, 64, True) == "tiled"
    assert cupy_backend.forward_path(4096, 4096, 4096, True) == "cublas_beta"
    assert cupy_backend.forward_path(16384, 1024, 1024, True) == "cublas_beta"
    with pytest.raises(ValueError, match="unknown forward path"):
        with cupy_backend.forced_forward_path("fastest"):
            pass


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**7), m=st.integers(1, 10**6))
def test_forward_launch_covers_the_output(n, m):
    for path in ("small_batch", "tiled"):
        try:
            grid, block = cupy_backend.forward_launch(path, n, m)
        except ValueError:
            rows_per_block = {"small_batch": cupy_backend.SMALL_BATCH_ROWS,
                              "tiled": cupy_backend.TILE_ROWS}[path]
            assert math.ceil(n / rows_per_block) > cupy_backend.MAX_GRID_Y
            continue
        assert block[0] * block[1] == 256
        cols_per_block = block[0] if path == "small_batch" else cupy_backend.TILE_COLS
        rows_per_block = (cupy_backend.SMALL_BATCH_ROWS if path == "small_batch"
                          else cupy_backend.TILE_ROWS)
        assert (grid[0] - 1) * cols_per_block < m <= grid[0] * cols_per_block
        assert (grid[1] - 1) * rows_per_block < n <= grid[1] * rows_per_block


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 10**7), cols=st.integers(1, 10**6), sm_count=st.integers(1, 200))
def test_column_sum_launch_splits_rows_without_gaps(rows, cols, sm_count):
    grid, block, rows_per_split = cupy_backend.column_sum_launch(rows, cols, sm_count)
    assert block == (32, 8, 1)
    assert (grid[0] - 1) * 32 < cols <= grid[0] * 32
    splits = grid[1]
    assert 1 <= splits <= cupy_backend.MAX_GRID_Y
    assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split  # none empty, all rows
    if splits > 1:
        assert rows_per_split >= cupy_backend.COLSUM_MIN_ROWS_PER_SPLIT


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 10**7), cols=st.integers(1, 10**6), sm_count=st.integers(1, 200))
def test_bias_launch_covers_the_columns(rows, cols, sm_count):
    grid, block = cupy_backend.bias_launch(rows, cols, sm_count)
    assert (grid[0] - 1) * block[0] < cols <= grid[0] * block[0]
    assert 1 <= grid[1] <= min(rows, cupy_backend.MAX_GRID_Y)


def test_kernel_source_prefixes_each_file_with_its_line_directive(tmp_path):
    first, second = tmp_path / "a.cu", tmp_path / 'odd "name".cu'
    first.write_text("int a;\n")
    second.write_text("int b;")
    source = cupy_backend.kernel_source([first, second])
    assert source.splitlines() == [f'#line 1 "{first}"', "int a;",
                                   f'#line 1 "{tmp_path}/odd \\"name\\".cu"', "int b;"]
    assert cupy_backend.kernel_source().startswith('#line 1 "')
    assert cupy_backend.kernel_source().rstrip().endswith("FASTLINEAR_KERNELS(f64, double)")


# --- on the GPU --------------------------------------------------------------------------------

@pytest.fixture
def cp():
    import cupy

    return cupy


FORWARD_SHAPES = [(1, 1, 1), (1, 257, 33), (3, 300, 31), (8, 256, 32), (9, 17, 65),
                  (33, 513, 7), (63, 16, 64), (64, 64, 64), (65, 15, 129), (130, 70, 200)]
FORWARD_LAYOUTS = [("C", "C"), ("F", "F"), ("every_other_col", "reversed"),
                   ("rows_padded", "cols_padded")]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N, D, M", FORWARD_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("path", (None, *cupy_backend.FORWARD_PATHS))
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("x_layout, w_layout", FORWARD_LAYOUTS)
def test_forward_matches_reference(cp, rng, N, D, M, dtype, path, has_bias, x_layout, w_layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype, bias=has_bias)
    reference = reference64(X, W, b, dY)
    X_gpu = make_layout(cp, cp.asarray(X), x_layout)
    W_gpu = make_layout(cp, cp.asarray(W), w_layout)
    b_gpu = None if b is None else cp.asarray(b)
    with cupy_backend.forced_forward_path(path):
        Y = fastlinear.linear_forward(X_gpu, W_gpu, b_gpu, backend="cupy")
    assert isinstance(Y, cp.ndarray) and Y.shape == (N, M)
    assert_matches(Y, "Y", reference, dtype, f"Y via {path or 'shape rule'}")


BACKWARD_SHAPES = [(1, 1, 1), (5, 3, 2), (33, 65, 31), (64, 64, 64), (129, 70, 200),
                   (1000, 33, 40)]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N, D, M", BACKWARD_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("need_dX", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout", ["C", "F", "every_other_col"])
def test_backward_matches_reference(cp, rng, N, D, M, dtype, has_bias, need_dX, accumulate,
                                    layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference = reference64(X, W, b, dY)
    X_gpu, W_gpu, dY_gpu = (make_layout(cp, cp.asarray(a), layout) for a in (X, W, dY))
    dW0 = cp.asarray(rng.standard_normal((D, M)).astype(dtype)) if accumulate else None
    db0 = cp.asarray(rng.standard_normal(M).astype(dtype)) if accumulate else None
    dW = None if dW0 is None else dW0.copy()
    db = None if db0 is None or not has_bias else db0.copy()
    dX, dW, db = fastlinear.linear_backward(dY_gpu, X_gpu, W_gpu, has_bias=has_bias,
                                            need_dX=need_dX, accumulate=accumulate,
                                            dW=dW, db=db, backend="cupy")
    assert_backward_matches((dX, dW, db), reference, dtype, need_dX, has_bias, dW0, db0)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_column_sums_split_over_many_blocks(cp, rng, monkeypatch, dtype, accumulate):
    monkeypatch.setattr(cupy_backend, "COLSUM_MIN_ROWS_PER_SPLIT", 1)
    dY = rng.standard_normal((1000, 33)).astype(dtype)
    grid, _, _ = cupy_backend.column_sum_launch(1000, 33, cupy_backend._sm_count(0))
    assert grid[1] > 1
    reference = reference64(np.zeros((1000, 1), dtype), np.zeros((1, 33), dtype), None, dY)
    for _ in range(2):  # a second launch sees the tile counters reset
        db0 = cp.asarray(rng.standard_normal(33).astype(dtype))
        db = db0.copy()
        cupy_backend._column_sums(cp.asarray(dY), db, accumulate)
        assert_matches(db, "db", reference, dtype, "db",
                       previous=db0 if accumulate else None)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_the_numpy_backend(cp, rng, dtype):
    X, W, b, dY = make_inputs(rng, 70, 90, 50, dtype)
    reference = {"Y": fastlinear.linear_forward(X, W, b, backend="numpy")}
    reference.update(zip(("dX", "dW", "db"),
                         fastlinear.linear_backward(dY, X, W, backend="numpy"), strict=True))
    magnitudes = reference64(X, W, b, dY)
    got = {"Y": fastlinear.linear_forward(cp.asarray(X), cp.asarray(W), cp.asarray(b),
                                          backend="cupy")}
    got.update(zip(("dX", "dW", "db"), fastlinear.linear_backward(
        cp.asarray(dY), cp.asarray(X), cp.asarray(W), backend="cupy"), strict=True))
    for key, value in got.items():
        _, magnitude, terms = magnitudes[key]
        assert_close(cp.asnumpy(value), reference[key], dtype, terms, magnitude, key)


@requires_gpu
@pytest.mark.gpu
def test_numpy_arrays_go_to_the_device_and_back(rng):
    X, W, b, dY = make_inputs(rng, 20, 30, 10, np.float32)
    reference = reference64(X, W, b, dY)
    out = np.empty((20, 10), np.float32)
    Y = fastlinear.linear_forward(X, W, b, backend="cupy", out=out)
    assert Y is out
    assert_matches(Y, "Y", reference, np.float32, "Y")
    dW = rng.standard_normal((30, 10)).astype(np.float32)
    db = rng.standard_normal(10).astype(np.float32)
    dW0, db0 = dW.copy(), db.copy()
    dX, dW_out, db_out = fastlinear.linear_backward(dY, X, W, backend="cupy", accumulate=True,
                                                    dW=dW, db=db)
    assert type(dX) is np.ndarray and dW_out is dW and db_out is db
    assert_matches(dX, "dX", reference, np.float32, "dX")
    assert_matches(dW, "dW", reference, np.float32, "dW", previous=dW0)
    assert_matches(db, "db", reference, np.float32, "db", previous=db0)


@requires_gpu
@pytest.mark.gpu
def test_out_buffers_are_written_in_place(cp, rng):
    X, W, b, dY = (cp.asarray(a) for a in make_inputs(rng, 17, 19, 23, np.float64))
    out = cp.empty((17, 23))
    assert fastlinear.linear_forward(X, W, b, backend="cupy", out=out) is out
    dX, dW, db = cp.empty((17, 19)), cp.empty((19, 23)), cp.empty(23)
    result = fastlinear.linear_backward(dY, X, W, backend="cupy", dX=dX, dW=dW, db=db)
    assert result[0] is dX and result[1] is dW and result[2] is db
    cp.testing.assert_allclose(out, X @ W + b, rtol=1e-12)
    cp.testing.assert_allclose(dX, dY @ W.T, rtol=1e-12)
    cp.testing.assert_allclose(dW, X.T @ dY, rtol=1e-12)
    cp.testing.assert_allclose(db, dY.sum(0), rtol=1e-12)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N, D, M", [(0, 3, 4), (3, 0, 4), (3, 4, 0), (0, 0, 0)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_empty_dimensions(cp, N, D, M, accumulate):
    X, W, b, dY = cp.ones((N, D)), cp.ones((D, M)), cp.full(M, 2.0), cp.ones((N, M))
    Y = fastlinear.linear_forward(X, W, b, backend="cupy")
    cp.testing.assert_array_equal(Y, X @ W + b)
    dW, db = cp.full((D, M), 5.0), cp.full(M, 5.0)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, backend="cupy", accumulate=accumulate,
                                            dW=dW, db=db)
    base = 5.0 if accumulate else 0.0
    cp.testing.assert_array_equal(dX, dY @ W.T)
    cp.testing.assert_array_equal(dW, X.T @ dY + base)
    cp.testing.assert_array_equal(db, dY.sum(0) + base)


@requires_gpu
@pytest.mark.gpu
def test_layer_keeps_parameters_on_the_device(cp, rng):
    layer = fastlinear.Linear(30, 20, dtype=np.float32, backend="cupy", rng=1)
    assert all(isinstance(a, cp.ndarray) for pair in layer.parameters() for a in pair)
    X = cp.asarray(rng.standard_normal((5, 4, 30)).astype(np.float32))
    Y = layer.forward(X)
    assert isinstance(Y, cp.ndarray) and Y.shape == (5, 4, 20)
    dX = layer.backward(cp.ones_like(Y))
    assert isinstance(dX, cp.ndarray) and dX.shape == X.shape
    cp.testing.assert_allclose(layer.db, cp.full(20, 20.0, dtype=np.float32))


@requires_gpu
@pytest.mark.gpu
def test_auto_picks_cupy_for_cupy_arrays(cp):
    assert fastlinear.current_backend("cupy") == "cupy"
    Y = fastlinear.linear_forward(cp.ones((2, 3)), cp.ones((3, 4)))
    assert isinstance(Y, cp.ndarray)


@requires_gpu
@pytest.mark.gpu
def test_device_layer_takes_host_data(cp, rng):
    """NumPy data into a layer whose parameters live on the GPU: Y and dX come back as NumPy,
    dW and db stay on the device with the parameters."""
    layer = fastlinear.Linear(6, 4, backend="cupy", rng=2)
    X = rng.standard_normal((5, 6))
    Y = layer.forward(X)
    assert type(Y) is np.ndarray
    np.testing.assert_allclose(Y, X @ cp.asnumpy(layer.W) + cp.asnumpy(layer.b), rtol=1e-12)
    dY = rng.standard_normal((5, 4))
    dX = layer.backward(dY)
    assert type(dX) is np.ndarray
    assert isinstance(layer.dW, cp.ndarray) and isinstance(layer.db, cp.ndarray)
    np.testing.assert_allclose(dX, dY @ cp.asnumpy(layer.W).T, rtol=1e-12)
    np.testing.assert_allclose(cp.asnumpy(layer.dW), X.T @ dY, rtol=1e-12)
    layer.backward(dY, accumulate=True)
    np.testing.assert_allclose(cp.asnumpy(layer.db), 2 * dY.sum(0), rtol=1e-12)
