"""The cupy backend's kernels and launch plumbing, run on the CPU (no GPU needed).

kernels/*.cu is compiled with g++ against ``kernel_host_emulation.cpp`` (every block's threads
run as CPU threads meeting at real barriers), NumPy stands in for CuPy, and cuBLAS is replaced by
an emulator that checks its argument rules. What runs is the backend's own code from the path
choice to the kernel arguments: ``_forward_device``, ``_backward_device``, ``_launch``, and
every activation on every path against ``fastlinear.activations``' NumPy reference. Not
covered here: CuPy and cuBLAS themselves, NVRTC, and blocks running concurrently.
"""

import functools
import importlib
import types

import numpy as np
import pytest

from fastlinear import activations
from fastlinear.backends import cupy as cupy_backend
from fastlinear.backends import cupy_launch
from tests.gpu_emulation import (
    HostKernel,
    activation_reference,
    assert_backward_matches,
    assert_matches,
    assert_within,
    backend_gemm_call,
    build_host_kernels,
    make_layout,
)
from tests.helpers import install_registry, make_inputs, reference64

DTYPES = (np.float16, np.float32, np.float64)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    host = build_host_kernels(tmp_path_factory.mktemp("host_kernels"))
    if host is None:
        pytest.skip("g++ is not on PATH: cannot run the CUDA kernels on the CPU")
    return host


class NumpyAsCupy:
    """NumPy under the name of CuPy: the few functions the backend calls, ``asnumpy`` included,
    and one current stream."""

    cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0))

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(array, out=None):
        if out is None:
            return array.copy()
        out[...] = array
        return out


def _emulate(monkeypatch, host):
    """Make the cupy backend compute on NumPy arrays: CPU kernels, emulated cuBLAS, 4 SMs."""
    monkeypatch.setattr(cupy_backend, "_cupy", NumpyAsCupy)
    monkeypatch.setattr(cupy_backend, "_kernel", lambda name, device_id: HostKernel(host, name))
    monkeypatch.setattr(cupy_backend, "_device_id", lambda: 0)
    monkeypatch.setattr(cupy_backend, "_sm_count", lambda device_id: 4)
    monkeypatch.setattr(cupy_backend, "_gemm_call", backend_gemm_call)
    monkeypatch.setattr(cupy_backend, "_devices", {})  # fresh kernels, SM count and counters
    monkeypatch.setattr(cupy_launch, "COLSUM_MIN_ROWS_PER_SPLIT", 4)  # split small inputs
    monkeypatch.setattr(cupy_backend, "_launch_shape",  # planned with that value, then dropped
                        functools.lru_cache(maxsize=1024)(cupy_backend._launch_shape.__wrapped__))
    return cupy_backend


@pytest.fixture
def backend(host_kernels, monkeypatch):
    """The cupy backend computing on NumPy arrays: CPU kernels, emulated cuBLAS, 4 SMs."""
    return _emulate(monkeypatch, host_kernels)


@pytest.mark.parametrize("N, D, M", [(1, 1, 1), (3, 300, 31), (9, 17, 65), (65, 15, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", (None, *cupy_launch.FORWARD_PATHS))
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("x_layout, w_layout", [("C", "C"), ("every_other_col", "reversed")])
def test_forward(backend, rng, N, D, M, dtype, path, has_bias, x_layout, w_layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype, bias=has_bias)
    reference = reference64(X, W, b, dY)
    if b is not None:  # a strided bias
        b = np.repeat(b, 2)[::2]
    with backend.forced_forward_path(path):
        Y = backend._forward_device(make_layout(np, X, x_layout), make_layout(np, W, w_layout),
                                    b, None)
    assert Y.shape == (N, M) and Y.flags.c_contiguous
    assert_matches(Y, "Y", reference, dtype, f"Y via {path or 'the shape rule'}")


def test_forward_writes_into_out(backend, rng):
    X, W, b, dY = make_inputs(rng, 5, 7, 3, np.float32)
    out = np.full((5, 3), np.nan, np.float32)
    assert backend._forward_device(X, W, b, out) is out
    assert_matches(out, "Y", reference64(X, W, b, dY), np.float32, "Y")


@pytest.mark.parametrize("N, D, M", [(5, 3, 2), (70, 33, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("need_dX", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout", ["C", "every_other_col"])
def test_backward(backend, rng, N, D, M, dtype, has_bias, need_dX, accumulate, layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference = reference64(X, W, b, dY)
    dW0 = rng.standard_normal((D, M)).astype(dtype) if accumulate else None
    db0 = rng.standard_normal(M).astype(dtype) if accumulate and has_bias else None
    dX, dW, db = backend._backward_device(
        make_layout(np, dY, layout), make_layout(np, X, layout), make_layout(np, W, layout),
        has_bias, need_dX, accumulate, None,
        None if dW0 is None else dW0.copy(), None if db0 is None else db0.copy())
    assert_backward_matches((dX, dW, db), reference, dtype, need_dX, has_bias, dW0, db0)


def test_column_sums_splits_rows_when_asked(backend, rng):
    grid, _, rows_per_split = cupy_launch.column_sum_launch(70, 40, 4)
    assert grid == (2, 8, 1) and rows_per_split == 9
    dY = rng.standard_normal((70, 40))
    db = np.empty(40)
    backend._gradient_column_sums(dY, None, None, None, db, accumulate=False)
    np.testing.assert_allclose(db, dY.sum(0), rtol=1e-13)


def test_public_functions_round_trip_host_arrays(backend, rng):
    """forward/backward with NumPy arrays: moved 'to the device' and back into the buffers."""
    X, W, b, dY = make_inputs(rng, 12, 9, 20, np.float32)
    reference = reference64(X, W, b, dY)
    out = np.full((12, 20), np.nan, np.float32)
    assert backend.forward(X, W, b, out) is out
    assert_matches(out, "Y", reference, np.float32, "Y")
    dW0 = rng.standard_normal((9, 20)).astype(np.float32)
    db0 = rng.standard_normal(20).astype(np.float32)
    dX_buffer, dW, db = np.empty((12, 9), np.float32), dW0.copy(), db0.copy()
    dX, dW_out, db_out = backend.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=True,
                                          dX=dX_buffer, dW=dW, db=db)
    assert dX is dX_buffer and dW_out is dW and db_out is db
    assert_matches(dX, "dX", reference, np.float32, "dX")
    assert_matches(dW, "dW", reference, np.float32, "dW", previous=dW0)
    assert_matches(db, "db", reference, np.float32, "db", previous=db0)


@pytest.mark.parametrize("M", [1, 2, 3, 5, 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_outputs_put_the_spare_threads_on_rows(backend, rng, M, dtype):
    """M < 32 (issue 19): the row passes and the column sums take blocks of fewer column lanes
    and more row lanes; every element is still written once and every row summed once (with
    row splits: COLSUM_MIN_ROWS_PER_SPLIT is 4 here)."""
    N, D = 70, 9
    grid, block = cupy_launch.rows_launch(N, M, 4)
    assert block[0] < cupy_launch.BIAS_THREADS and block[0] * block[1] == 256
    grid, block, _ = cupy_launch.column_sum_launch(N, M, 4)
    assert block[0] < 32 and block[1] > 8 and grid[1] > 1
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference = reference64(X, W, b, dY)
    with backend.forced_forward_path("cublas"):  # fill_rows_with_bias, then the GEMM
        Y = backend._forward_device(X, W, b, None)
    assert_matches(Y, "Y", reference, dtype, f"Y, M={M}")
    act_reference, saved = activation_reference(X, W, b, dY, "tanh", dtype)
    Z = np.full((N, M), np.nan, dtype)
    with backend.forced_forward_path("cublas"):  # bias_activation_epilogue
        Y = backend._forward_device(X, W, b, None, "relu", Z)
    assert_within(Z, *act_reference["Z"], f"Z, M={M}")
    db0 = rng.standard_normal(M).astype(dtype)
    results = backend._backward_device(dY, X, W, True, True, True, None,
                                       np.zeros((D, M), dtype), db0.copy())
    assert_matches(results[2], "db", reference, dtype, f"db, M={M}", previous=db0)
    dX, dW, db = backend._backward_device(dY, X, W, True, True, False, None, None, None, "tanh",
                                          saved)
    for name, value in (("dX", dX), ("dW", dW), ("db", db)):
        assert_within(value, *act_reference[name], f"tanh {name}, M={M}")


def test_tile_counters_are_one_zeroed_buffer_per_stream(backend, rng):
    """The last block of each column tile sets its counter back to 0, so split column sums
    reuse one buffer (no fresh zeros per call); it grows when a launch needs more tiles."""
    state = backend._device_state()
    buffers = []
    for cols in (40, 40, 33, 200):
        dY = rng.standard_normal((70, cols))
        db = np.empty(cols)
        backend._gradient_column_sums(dY, None, None, None, db, accumulate=False)
        np.testing.assert_allclose(db, dY.sum(0), rtol=1e-13)
        (counters,) = state.counters.values()  # one stream
        assert counters.dtype == np.uint32 and not counters.any()
        assert counters.size >= cupy_launch.column_sum_launch(70, cols, 4)[0][0]
        buffers.append(counters)
    assert buffers[0] is buffers[1] is buffers[2]  # 2 tiles, then 2 again
    assert buffers[3] is not buffers[0] and buffers[3].size >= 7  # 200 columns: 7 tiles


def test_tile_counters_keep_a_few_streams(backend, rng, monkeypatch):
    """One counter buffer per stream, the oldest forgotten past _MAX_COUNTER_STREAMS (a loop
    that makes a stream per step must not grow the dict without end)."""
    monkeypatch.setattr(backend, "_MAX_COUNTER_STREAMS", 2)
    current = types.SimpleNamespace(ptr=0)
    monkeypatch.setattr(NumpyAsCupy, "cuda",
                        types.SimpleNamespace(get_current_stream=lambda: current))
    state = backend._device_state()
    dY = rng.standard_normal((70, 40))
    for stream in (11, 22, 33, 22):
        current.ptr = stream
        db = np.empty(40)
        backend._gradient_column_sums(dY, None, None, None, db, accumulate=False)
        np.testing.assert_allclose(db, dY.sum(0), rtol=1e-13)
    assert list(state.counters) == [22, 33]


def test_tile_counters_of_the_per_thread_stream_are_kept_per_thread(backend, rng, monkeypatch):
    """The per-thread default stream has one handle (ptr 2) but is a stream per host thread:
    two threads must not share its counters (the last block of one launch resets them while
    the other's launch may still be counting)."""
    import threading

    current = types.SimpleNamespace(ptr=backend._PER_THREAD_STREAM)
    monkeypatch.setattr(NumpyAsCupy, "cuda",
                        types.SimpleNamespace(get_current_stream=lambda: current))
    state = backend._device_state()
    dY = rng.standard_normal((70, 40))
    buffers, both_alive, one_launch = {}, threading.Barrier(2, timeout=30), threading.Lock()

    def run(wait=both_alive.wait):
        db = np.empty(40)
        with one_launch:  # the host emulation of the kernels runs one launch at a time
            backend._gradient_column_sums(dY, None, None, None, db, accumulate=False)
        np.testing.assert_allclose(db, dY.sum(0), rtol=1e-13)
        buffers[threading.get_ident()] = state.tile_counters(1)
        wait()  # both threads alive at once: their ids differ

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run(wait=lambda: None)  # and this thread
    assert sorted(state.counters) == sorted((2, ident) for ident in buffers)
    assert len({id(buffer) for buffer in buffers.values()}) == len(buffers) == 3
    current.ptr = 7  # an ordinary stream: one buffer, whichever thread launches
    backend._gradient_column_sums(dY, None, None, None, np.empty(40), accumulate=False)
    assert 7 in state.counters


def test_kernels_are_looked_up_once_per_device_name_and_dtype(backend, rng, monkeypatch):
    looked_up = []
    kernel = backend._kernel
    monkeypatch.setattr(backend, "_kernel",
                        lambda name, device: looked_up.append(name) or kernel(name, device))
    for dtype in (np.float32, np.float32, np.float64):
        X, W, b, dY = make_inputs(rng, 9, 17, 65, dtype)
        with backend.forced_forward_path("tiled"):
            backend._forward_device(X, W, b, None)
    assert looked_up == ["linear_forward_tiled_f32", "linear_forward_tiled_f64"]


# --- fused activations -------------------------------------------------------------------------

@pytest.mark.parametrize("N, D, M", [(3, 40, 33), (70, 17, 65)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", cupy_launch.FORWARD_PATHS)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("with_z", [True, False])
def test_forward_activation(backend, rng, N, D, M, dtype, path, activation, with_z):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference, _ = activation_reference(X, W, b, dY, activation, dtype)
    Z = np.full((N, M), np.nan, dtype) if with_z else None
    with backend.forced_forward_path(path):
        Y = backend._forward_device(X, make_layout(np, W, "rows_padded"), b, None, activation, Z)
    assert Y.dtype == np.dtype(dtype)
    assert_within(Y, *reference["Y"], f"{activation} Y via {path}")
    if with_z:
        assert_within(Z, *reference["Z"], f"{activation} Z via {path}")


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("need_dX", [True, False])
def test_backward_activation(backend, rng, activation, dtype, has_bias, need_dX):
    N, D, M = 70, 33, 40  # several row splits of the column sums (COLSUM_MIN_ROWS_PER_SPLIT 4)
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference, saved = activation_reference(X, W, b, dY, activation, dtype)
    dW0 = rng.standard_normal((D, M)).astype(dtype)
    db0 = rng.standard_normal(M).astype(dtype) if has_bias else None
    dY_strided = make_layout(np, dY, "every_other_col")
    dX, dW, db = backend._backward_device(
        dY_strided, X, W, has_bias, need_dX, True, None, dW0.copy(),
        None if db0 is None else db0.copy(), activation, make_layout(np, saved, "F"))
    np.testing.assert_array_equal(dY_strided, dY)  # G went elsewhere
    assert (dX is None) == (not need_dX) and (db is None) == (not has_bias)
    if need_dX:
        assert_within(dX, *reference["dX"], f"{activation} dX")
    assert_within(dW, *reference["dW"], f"{activation} dW", previous=dW0)
    if has_bias:
        assert_within(db, *reference["db"], f"{activation} db", previous=db0)


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_backward_activation_without_bias_or_accumulate(backend, rng, activation):
    X, W, b, dY = make_inputs(rng, 5, 3, 2, np.float32)
    reference, saved = activation_reference(X, W, b, dY, activation, np.float32)
    dX, dW, db = backend._backward_device(dY, X, W, False, True, False, None, None, None,
                                          activation, saved)
    assert db is None
    assert_within(dX, *reference["dX"], f"{activation} dX")
    assert_within(dW, *reference["dW"], f"{activation} dW")


SPECIAL_VALUES = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, 0.5, -3.0, 30.0,
                  -30.0, 2e3, -2e3, 5e4, -5e4]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", cupy_launch.FORWARD_PATHS)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_forward_special_values_as_the_reference(backend, dtype, path, activation):
    """Z = 1 * w exactly (one inner term, no bias), so the activations meet NaN, infinities,
    signed zeros and saturated values as they are; NaN and inf come out where the reference
    puts them."""
    values = np.array(SPECIAL_VALUES, dtype=dtype)
    N = 3
    X = np.ones((N, 1), dtype)
    W = np.tile(values, (1, 1))
    with backend.forced_forward_path(path):
        Y = backend._forward_device(X, W, None, None, activation, None)
    with np.errstate(all="ignore"):
        expected = activations.apply(activation, np.tile(values.astype(np.float64), (N, 1)))
    eps_c = np.finfo(np.float32 if dtype == np.float16 else dtype).eps
    bound = 8 * eps_c * (np.abs(expected) + 1) + np.finfo(dtype).eps * np.abs(expected)
    assert_within(Y, expected, np.nan_to_num(bound, posinf=0), f"{activation} via {path}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_gradient_special_values_as_the_reference(backend, rng, dtype, activation):
    values = np.array(SPECIAL_VALUES, dtype=dtype)
    rows = 9
    saved = np.tile(values, (rows, 1))
    dY = rng.standard_normal(saved.shape).astype(dtype)
    dY[0, 3] = np.nan  # a NaN gradient where ReLU is off: NaN * 0 as in the reference
    dY[1, 4] = np.inf
    G = np.empty_like(dY)
    db = np.empty(values.size, dtype)
    backend._gradient_column_sums(dY, saved, activation, G, db, accumulate=False)
    with np.errstate(all="ignore"):  # G and db are stored in dtype: beyond its range, inf
        expected = activations.grad(activation, dY.astype(np.float64), saved.astype(np.float64))
        expected_db = expected.sum(0).astype(dtype).astype(np.float64)
        expected = expected.astype(dtype).astype(np.float64)
    eps_c = np.finfo(np.float32 if dtype == np.float16 else dtype).eps
    scale = np.nan_to_num(np.abs(dY.astype(np.float64)) * (1 + np.abs(saved.astype(np.float64))),
                          posinf=0, nan=0)
    bound = 16 * eps_c * scale + np.finfo(dtype).eps * np.nan_to_num(np.abs(expected), posinf=0)
    assert_within(G, expected, bound + np.finfo(dtype).tiny, f"{activation} G")
    assert_within(db, expected_db, bound.sum(0) * rows + np.finfo(dtype).tiny, f"{activation} db")


def test_gemm_splits_dimensions_beyond_a_c_int(backend, rng, monkeypatch):
    """With the C-int limit lowered to 5, rows and the inner dimension come in pieces."""
    monkeypatch.setattr(cupy_launch, "GEMM_MAX_DIM", 5)
    X, W, b, dY = make_inputs(rng, 13, 5, 4, np.float64)
    reference = reference64(X, W, b, dY)
    with backend.forced_forward_path("cublas"):
        Y = backend._forward_device(X, W, b, None)
    assert_matches(Y, "Y", reference, np.float64, "Y")
    dW0 = rng.standard_normal((5, 4))
    results = backend._backward_device(dY, X, W, True, True, True, None, dW0.copy(),
                                       np.zeros(4))
    assert_backward_matches(results, reference, np.float64, True, True, dW0, np.zeros(4))
    with pytest.raises(ValueError, match="6 columns is beyond cuBLAS's limit of 5"):
        backend._gemm(X[:, :4], np.ones((4, 6)), np.empty((13, 6)), 0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_public_functions_with_an_activation_round_trip_host_arrays(backend, rng, activation):
    """NumPy buffers for Y and the pre-activation come back filled; saved feeds backward."""
    X, W, b, dY = make_inputs(rng, 12, 9, 20, np.float32)
    reference, _ = activation_reference(X, W, b, dY, activation, np.float32)
    out, Z = np.full((12, 20), np.nan, np.float32), np.full((12, 20), np.nan, np.float32)
    assert backend.forward(X, W, b, out, activation=activation, preactivation=Z) is out
    assert_within(out, *reference["Y"], "Y")
    assert_within(Z, *reference["Z"], "Z")
    _, saved = activation_reference(X, W, b, dY, activation, np.float32)
    dX, dW, db = backend.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False,
                                  dX=None, dW=None, db=None, activation=activation, saved=saved)
    assert type(dX) is np.ndarray
    for name, value in (("dX", dX), ("dW", dW), ("db", db)):
        assert_within(value, *reference[name], name)


@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("N, D, M", [(4, 0, 3), (0, 5, 3), (4, 5, 0)])
def test_empty_dimensions_with_an_activation(backend, rng, activation, N, D, M):
    X, W, b, dY = make_inputs(rng, N, D, M, np.float64)
    Z = np.full((N, M), np.nan)
    Y = backend._forward_device(X, W, b, None, activation, Z)
    expected_Z = np.broadcast_to(b, (N, M))  # X @ W is zeros
    np.testing.assert_allclose(Z, expected_Z, rtol=1e-15)
    np.testing.assert_allclose(Y, activations.apply(activation, expected_Z.copy()), rtol=1e-14)
    saved = Z if activations.saved_for_backward(activation) == "preactivation" else Y
    dX, dW, db = backend._backward_device(dY, X, W, True, True, False, None, None, None,
                                          activation, saved)
    G = activations.grad(activation, dY, saved)
    np.testing.assert_allclose(dX, G @ W.T, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(dW, np.zeros((D, M)))
    np.testing.assert_allclose(db, G.sum(0), rtol=1e-13, atol=1e-13)


SMALL_BLOCK_SHAPES = {"BIAS_THREADS": 64, "COLSUM_LANES": 16, "COLSUM_ROW_LANES": 4,
                      "SMALL_BATCH_ROWS": 4, "SMALL_BATCH_COLS": 16, "SMALL_BATCH_SLICES": 4,
                      "TILE_ROWS": 32, "TILE_COLS": 32, "TILE_THREADS": 8}


def test_block_shapes_are_set_in_python_alone(rng, monkeypatch, tmp_path):
    """Other block shapes in cupy_launch reach the kernels through the -D defines: rebuilt with
    them, every path still computes the layer (edge tiles on small inputs, stumpy-style)."""
    for name, value in SMALL_BLOCK_SHAPES.items():
        monkeypatch.setitem(cupy_launch.BLOCK_SHAPES, name, value)
        monkeypatch.setattr(cupy_launch, name, value)
    host = build_host_kernels(tmp_path)
    if host is None:
        pytest.skip("g++ is not on PATH: cannot run the CUDA kernels on the CPU")
    _emulate(monkeypatch, host)
    X, W, b, dY = make_inputs(rng, 37, 21, 35, np.float32)
    reference, saved = activation_reference(X, W, b, dY, "gelu", np.float32)
    for path in cupy_launch.FORWARD_PATHS:
        if path == "small_batch":
            X_path = X[:3]
            path_reference, _ = activation_reference(X_path, W, b, dY[:3], "gelu", np.float32)
        else:
            X_path, path_reference = X, reference
        Z = np.empty((X_path.shape[0], 35), np.float32)
        with cupy_backend.forced_forward_path(path):
            Y = cupy_backend._forward_device(X_path, W, b, None, "gelu", Z)
        assert_within(Y, *path_reference["Y"], f"Y via {path}")
        assert_within(Z, *path_reference["Z"], f"Z via {path}")
    dX, dW, db = cupy_backend._backward_device(dY, X, W, True, True, False, None, None, None,
                                               "gelu", saved)
    for name, value in (("dX", dX), ("dW", dW), ("db", db)):
        assert_within(value, *reference[name], name)


def test_check_command_passes_the_emulated_kernels_in_float16(backend, monkeypatch, capsys):
    """``python -m fastlinear check`` on the cupy backend's own kernels: its float16 bounds
    (which no CPU backend exercises) hold for them, so a failure on the GPU means a fault."""
    from fastlinear import _dispatch, check

    monkeypatch.setattr(backend, "unavailable_reason", lambda: None)  # it runs, emulated
    install_registry(monkeypatch, import_module=lambda path: (
        backend if path == _dispatch.BACKENDS["cupy"] else importlib.import_module(path)))
    monkeypatch.setattr(check, "_array_module", lambda name: (backend, np))
    monkeypatch.setattr(check, "_device", lambda name: "emulated")
    monkeypatch.setattr(check, "SHAPES", check.SHAPES[:2])  # small_batch and tiled, not cuBLAS
    monkeypatch.setattr(backend, "DTYPES", (np.dtype(np.float16),))
    status = check.run(["cupy"])
    out = capsys.readouterr().out
    assert status == 0 and "cupy     emulated                 float16" in out, out


def test_sanitizer_smoke_script_runs_on_the_emulated_kernels(backend, rng, monkeypatch):
    """tests/gpu_sanitizer_smoke.py's two parts, on NumPy: every launcher call it makes is valid
    (argument types checked by HostKernel), so a sanitizer run on a GPU fails only on a fault."""
    from fastlinear import _dispatch
    from tests import gpu_sanitizer_smoke as smoke

    monkeypatch.setattr(smoke, "DTYPES", (np.float16,))  # a few cases only: CPU time
    monkeypatch.setattr(smoke, "SHAPES", smoke.SHAPES[1:])
    monkeypatch.setattr(smoke, "ACTIVATION_NAMES", (None, "gelu"))
    assert smoke.own_kernel_launches(np, rng) == 1 * 2 * 2 * 5
    monkeypatch.setattr(backend, "unavailable_reason", lambda: None)  # it runs, emulated
    install_registry(monkeypatch, import_module=lambda path: (
        backend if path == _dispatch.BACKENDS["cupy"] else importlib.import_module(path)))
    assert smoke.public_calls(np, rng) > 0
