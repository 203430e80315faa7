"""The cupy backend: GPU results against the reference, and the checks that need no GPU.

Without CuPy or a CUDA device the GPU tests skip with the reason; the rest still runs: the
availability messages, the dispatcher's refusal of ``FASTLINEAR_BACKEND=cupy``, and the pure
helpers that decide cuBLAS arguments, forward paths and launch shapes (the cuBLAS arguments are
checked by an emulation of cuBLAS's column-major GEMM on NumPy buffers).
"""

import ctypes
import dataclasses
import functools
import importlib
import math
import pathlib
import sys
import threading
import types
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastlinear
from fastlinear import _dispatch, activations
from fastlinear.backends import cupy as cupy_backend
from fastlinear.backends import cupy_launch
from tests.gpu_emulation import (
    LAYOUTS,
    activation_reference,
    assert_backward_matches,
    assert_matches,
    assert_within,
    emulated_gemm,
    flat_from_first_element,
    make_layout,
)
from tests.helpers import assert_close, install_registry, make_inputs, reference64

GPU_REASON = _dispatch.unavailable_reason("cupy")
requires_gpu = pytest.mark.skipif(GPU_REASON is not None,
                                  reason=f"needs CuPy and a CUDA device: {GPU_REASON}")
GPU_DTYPES = (np.float16, np.float32, np.float64)


# --- availability and dispatch (no GPU needed) -------------------------------------------------

def test_module_imports_and_declares_its_interface_without_cupy():
    assert cupy_backend.NAME == "cupy"
    assert cupy_backend.ARRAY_LIBRARIES[0] == "cupy"
    assert set(cupy_backend.DTYPES) == {np.dtype(d) for d in GPU_DTYPES}
    assert set(cupy_launch.DTYPE_SUFFIXES) == set(cupy_backend.DTYPES)


def test_reason_names_the_extra_when_cupy_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    reason = cupy_backend._probe()
    assert 'pip install "fastlinear[cuda]"' in reason


def _fake_cupy(get_device_count, raw_module=None, get_cublas_handle=None):
    """A stand-in for the parts of CuPy the probe calls; by default everything works."""
    class RawModule:
        def __init__(self, code, options=()):
            self.code = code

        def get_function(self, name):
            return name

    fake = types.ModuleType("cupy")
    fake.RawModule = raw_module or RawModule
    fake.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=get_device_count),
        device=types.SimpleNamespace(get_cublas_handle=get_cublas_handle or (lambda: 1)))
    return fake


def test_probe_passes_when_cupy_compiles_and_opens_cublas(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 1))
    assert cupy_backend._probe() is None


def test_probe_names_the_ctk_extra_when_cupy_cannot_compile(monkeypatch):
    """CuPy 14 without CUDA's headers raises at the first RawModule compile; the probe turns
    that into the backend's reason instead of an error at the first call."""
    class CompileException(Exception):
        pass

    class HeaderlessRawModule:
        def __init__(self, code, options=()):
            pass

        def get_function(self, name):
            raise CompileException("Failed to find CUDA headers")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 1, HeaderlessRawModule))
    reason = cupy_backend._probe()
    assert "cannot compile" in reason and "Failed to find CUDA headers" in reason
    assert "ctk" in reason and 'pip install "fastlinear[cuda]"' in reason


def test_probe_names_cublas_when_it_cannot_be_opened(monkeypatch):
    def no_cublas():
        raise OSError("libcublas.so.13: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(lambda: 1, None, no_cublas))
    reason = cupy_backend._probe()
    assert reason.startswith("cuBLAS cannot be opened") and "libcublas.so.13" in reason


class _DeviceArray:
    """Just enough of a cupy.ndarray for the device check: its memory's ``data.device_id``."""

    def __init__(self, device_id):
        self.data = types.SimpleNamespace(device_id=device_id)


def test_call_runs_on_the_device_of_its_arrays():
    names = ("X", "W", "b", "out")
    arrays = (_DeviceArray(1), _DeviceArray(1), None, np.empty(2))
    assert cupy_backend._call_device(names, arrays) == (1, True)
    assert cupy_backend._call_device(names[:2], arrays[:2]) == (1, False)
    assert cupy_backend._call_device(("X", "W"), (np.empty(2), None)) == (None, True)


def test_arrays_on_two_devices_are_refused_naming_each():
    with pytest.raises(ValueError, match="X on device 0, W on device 1, out on device 1"):
        cupy_backend._call_device(("X", "W", "b", "out"),
                                  (_DeviceArray(0), _DeviceArray(1), None, _DeviceArray(1)))


@pytest.mark.parametrize("array_device", [0, 1])
def test_device_is_switched_only_for_arrays_on_another_device(monkeypatch, array_device):
    """With device 0 current: arrays on device 0 run without ``cupy.cuda.Device`` (its
    ``__exit__`` sets the device again even when unchanged: host work for nothing); arrays on
    device 1 run inside ``Device(1)``, with device 1's state, and device 0 comes back after."""
    current, entered = [0], []

    class Device:
        def __init__(self, device_id):
            self.id = device_id

        def __enter__(self):
            entered.append(self.id)
            self.previous, current[0] = current[0], self.id

        def __exit__(self, *exc):
            current[0] = self.previous

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setattr(cupy_backend, "_cupy", lambda: fake)
    monkeypatch.setattr(cupy_backend, "_device_id", lambda: current[0])
    monkeypatch.setattr(cupy_backend, "_sm_count", lambda device_id: 4)
    monkeypatch.setattr(cupy_backend, "_devices", {})
    seen = []  # (current device, the state's device) inside each call; the state is last
    monkeypatch.setattr(cupy_backend, "_forward_device",
                        lambda *args: seen.append((current[0], args[-1].id)) or "Y")
    monkeypatch.setattr(cupy_backend, "_backward_device",
                        lambda *args: seen.append((current[0], args[-1].id)) or "grads")
    X = _DeviceArray(array_device)
    assert cupy_backend.forward(X, X, None, None) == "Y"
    assert cupy_backend.backward(X, X, X, True, True, False, None, None, None) == "grads"
    assert seen == [(array_device, array_device)] * 2
    assert entered == [1, 1] * (array_device == 1) and current == [0]


def fresh_launch_cache(monkeypatch):
    """A fresh, empty launch-shape cache for one test (the process's own comes back after):
    for a test that patches the constants the plans read."""
    monkeypatch.setattr(cupy_backend, "_launch_shape",
                        functools.lru_cache(maxsize=1024)(cupy_backend._launch_shape.__wrapped__))


def test_launch_shapes_are_planned_once_per_shape_and_sm_count(monkeypatch):
    fresh_launch_cache(monkeypatch)
    planned = []

    def plan(rows, cols, sm_count):
        planned.append((rows, cols, sm_count))
        return (rows, cols)

    launch = cupy_backend._launch_shape
    assert launch(plan, 5, 6, 4) == launch(plan, 5, 6, 4) == (5, 6)
    assert launch(plan, 5, 6, 8) == (5, 6)  # a device with another SM count: its own plan
    assert planned == [(5, 6, 4), (5, 6, 8)]
    for plan_of_shape in (cupy_launch.column_sum_launch, cupy_launch.rows_launch):
        assert launch(plan_of_shape, 70, 40, 4) == plan_of_shape(70, 40, 4)
    assert launch.cache_info().maxsize == 1024  # bounded


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
    install_registry(monkeypatch)


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
        _dispatch.registry.resolve("auto", "cupy")


# --- pure helpers (no GPU needed) --------------------------------------------------------------

def _blas_ready(a):
    """What the backend hands cuBLAS: ``a`` itself when it can, else a C-ordered copy."""
    layout = cupy_launch.blas_layout(a.shape, a.strides, a.itemsize)
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
    transa, transb, m_, n_, k_, lda, ldb, ldc = cupy_launch.gemm_arguments(p_blas, q_blas,
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
    assert cupy_launch.blas_layout(a.shape, a.strides, a.itemsize) == expected


@pytest.fixture
def default_thresholds():
    """The path rule's default thresholds, restored after the test whatever it applied."""
    previous = cupy_launch.current_thresholds()
    cupy_launch.apply_thresholds(None)
    yield cupy_launch.DEFAULT_THRESHOLDS
    cupy_launch.apply_thresholds(previous)


def test_forward_path_rule(default_thresholds):
    small = default_thresholds.small_batch_max_rows
    rule = cupy_launch.forward_path
    assert rule(1, 8192, 8192, True, 132) == "small_batch"  # a GEMV filling the GPU
    assert rule(small, 4096, 4096, True, 132) == "small_batch"
    assert rule(small, 64, 32, True, 132) == "small_batch"  # one block, short D
    assert rule(1, 8192, 8192, False, 132) == "cublas"
    assert rule(small + 1, 64, 64, True, 132) == "tiled"
    assert rule(32, 64, 128, True, 132) == "tiled"  # the demo's layer: few blocks, short D
    assert rule(4096, 4096, 4096, True, 132) == "cublas"
    assert rule(16384, 1024, 1024, True, 132) == "cublas"
    with pytest.raises(ValueError, match="unknown forward path"):
        with cupy_backend.forced_forward_path("fastest"):
            pass


@pytest.mark.parametrize("n, d, m", [(16, 2048, 128), (32, 2048, 64), (8, 2048, 32),
                                     (64, 512, 64), (1, 2**18, 1), (8, 2**16, 32),
                                     (9, 2**18, 1), (64, 2**12 + 1, 8)])
def test_forward_path_sends_long_inner_dimensions_to_cublas(default_thresholds, n, d, m):
    """Neither kernel splits D or prefetches along it: a few blocks walking a long D wait a
    global round trip per step (issue 19's cliff, ~40-100 us at D = 2048), so such shapes go to
    cuBLAS, which splits D."""
    assert d > default_thresholds.own_kernel_max_inner
    assert cupy_launch.forward_path(n, d, m, True, 132) == "cublas"


@pytest.mark.parametrize("n, d, m", [(1, 64, 64), (8, 256, 32), (32, 64, 128), (256, 128, 64)])
def test_forward_path_sends_column_major_weights_to_cublas(default_thresholds, n, d, m):
    """Both kernels read rows of W with adjacent threads: a column-major W would be read
    uncoalesced, so only cuBLAS (which transposes in its loads) takes it."""
    assert cupy_launch.forward_path(n, d, m, True, 132) != "cublas"
    assert cupy_launch.forward_path(n, d, m, False, 132) == "cublas"


def test_thresholds_move_the_rule_and_restore(default_thresholds):
    rule = cupy_launch.forward_path
    assert rule(16, 2048, 128, True, 132) == "cublas"
    applied = cupy_launch.apply_thresholds({"own_kernel_max_inner": 4096})
    assert applied == {**dataclasses.asdict(default_thresholds), "own_kernel_max_inner": 4096}
    assert cupy_launch.current_thresholds() == applied
    assert rule(16, 2048, 128, True, 132) == "tiled"
    cupy_launch.apply_thresholds({"small_batch_max_rows": 16, "tiled_max_work": 1})
    assert cupy_launch.current_thresholds()["own_kernel_max_inner"] == 256  # back to default
    assert rule(16, 64, 64, True, 132) == "small_batch"
    assert rule(17, 64, 64, True, 132) == "cublas"
    assert cupy_launch.apply_thresholds(None) == dataclasses.asdict(default_thresholds)


@pytest.mark.parametrize("values, match", [
    ({"own_kernel_max_inner": 0}, "must be a positive int, got 0"),
    ({"tiled_max_work": 2.5}, "must be a positive int, got 2.5"),
    ({"small_batch_max_rows": True}, "must be a positive int, got True"),
    ({"own_kernel_max_inner": 64, "tile_rows": 32}, r"unknown cupy path threshold\(s\) "
                                                    r"\['tile_rows'\]")])
def test_bad_thresholds_are_refused_and_change_nothing(default_thresholds, values, match):
    cupy_launch.apply_thresholds({"tiled_max_work": 1000})
    before = cupy_launch.current_thresholds()
    with pytest.raises(ValueError, match=match):
        cupy_launch.apply_thresholds(values)
    assert cupy_launch.current_thresholds() == before


def test_gemm_chunks_cover_each_dimension_within_a_c_int():
    assert cupy_launch.gemm_chunks(0) == []
    assert cupy_launch.gemm_chunks(7, 3) == [(0, 3), (3, 6), (6, 7)]
    limit = cupy_launch.GEMM_MAX_DIM
    assert cupy_launch.gemm_chunks(limit) == [(0, limit)]
    assert cupy_launch.gemm_chunks(2**32) == [(0, limit), (limit, 2 * limit),
                                              (2 * limit, 2**32)]


def test_compile_options_carry_every_shape_and_activation_once():
    options = cupy_launch.compile_options()
    names = [option[2:].partition("=")[0] for option in options]
    assert len(names) == len(set(names))
    assert set(cupy_launch.BLOCK_SHAPES) <= set(names)
    assert {f"FASTLINEAR_ACT_{a.upper()}" for a in activations.ACTIVATIONS} <= set(names)
    assert f"-DFASTLINEAR_GELU_CLAMP={activations.GELU_CLAMP!r}" in options
    codes = cupy_launch.ACTIVATION_CODES
    assert codes[None] == 0 and sorted(codes.values()) == list(range(len(codes)))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**7), m=st.integers(1, 10**6))
def test_forward_launch_covers_the_output(n, m):
    for path in ("small_batch", "tiled"):
        try:
            grid, block = cupy_launch.forward_launch(path, n, m)
        except ValueError:
            rows_per_block = {"small_batch": cupy_launch.SMALL_BATCH_ROWS,
                              "tiled": cupy_launch.TILE_ROWS}[path]
            assert math.ceil(n / rows_per_block) > cupy_launch.MAX_GRID_Y
            continue
        assert block[0] * block[1] == 256
        cols_per_block = block[0] if path == "small_batch" else cupy_launch.TILE_COLS
        rows_per_block = (cupy_launch.SMALL_BATCH_ROWS if path == "small_batch"
                          else cupy_launch.TILE_ROWS)
        assert (grid[0] - 1) * cols_per_block < m <= grid[0] * cols_per_block
        assert (grid[1] - 1) * rows_per_block < n <= grid[1] * rows_per_block


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 10**7), cols=st.integers(1, 10**6), sm_count=st.integers(1, 200))
def test_column_sum_launch_splits_rows_without_gaps(rows, cols, sm_count):
    grid, block, rows_per_split = cupy_launch.column_sum_launch(rows, cols, sm_count)
    lanes = min(32, 1 << (cols - 1).bit_length())  # narrow dY: the other threads take rows
    assert block == (lanes, 256 // lanes, 1)
    assert (grid[0] - 1) * lanes < cols <= grid[0] * lanes
    splits = grid[1]
    assert 1 <= splits <= cupy_launch.MAX_GRID_Y
    assert (splits - 1) * rows_per_split < rows <= splits * rows_per_split  # none empty, all rows
    if splits > 1:
        assert rows_per_split >= cupy_launch.COLSUM_MIN_ROWS_PER_SPLIT


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 10**7), cols=st.integers(1, 10**6), sm_count=st.integers(1, 200))
def test_rows_launch_covers_the_columns(rows, cols, sm_count):
    grid, block = cupy_launch.rows_launch(rows, cols, sm_count)
    assert block[0] * block[1] == cupy_launch.BIAS_THREADS and block[2] == 1
    assert block[0] == min(cupy_launch.BIAS_THREADS, 1 << (cols - 1).bit_length())
    assert (grid[0] - 1) * block[0] < cols <= grid[0] * block[0]
    assert 1 <= grid[1] <= min(math.ceil(rows / block[1]), cupy_launch.MAX_GRID_Y)


def test_kernel_source_prefixes_each_file_with_its_line_directive(tmp_path):
    first, second = tmp_path / "a.cu", tmp_path / 'odd "name".cu'
    first.write_text("int a;\n")
    second.write_text("int b;")
    source = cupy_launch.kernel_source([first, second])
    assert source.splitlines() == [f'#line 1 "{first}"', "int a;",
                                   f'#line 1 "{tmp_path}/odd \\"name\\".cu"', "int b;"]
    assert cupy_launch.kernel_source().startswith('#line 1 "')
    assert cupy_launch.kernel_source().rstrip().endswith("FASTLINEAR_KERNELS(f64, double)")


# --- allocations on the device of the call's arrays (issue 19: no GPU needed) ------------------

class _OnDevice(np.ndarray):
    """A NumPy array posing as a CuPy array on one of two devices (its library is "cupy")."""

    __module__ = "cupy._core.core"

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", _TwoDeviceCupy.current)

    @property
    def device(self):
        return _TwoDeviceCupy.Device(self.device_id)


class _TwoDeviceCupy(types.ModuleType):
    """The allocation functions of CuPy on a machine of two devices: new arrays land on the
    current device, which ``Device(i)`` sets inside a ``with`` block."""

    current = 0

    class Device:
        def __init__(self, device_id):
            self.id = device_id

        def __enter__(self):
            self.previous, _TwoDeviceCupy.current = _TwoDeviceCupy.current, self.id
            return self

        def __exit__(self, *exc):
            _TwoDeviceCupy.current = self.previous
            return False

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype).view(_OnDevice)

    @staticmethod
    def full(shape, value, dtype):
        return np.full(shape, np.asarray(value), dtype).view(_OnDevice)


@pytest.fixture
def two_devices(monkeypatch):
    """CuPy with device 0 current; ``on(i, array)`` puts a copy of ``array`` on device i."""
    monkeypatch.setitem(sys.modules, "cupy", _TwoDeviceCupy("cupy"))
    monkeypatch.setattr(_TwoDeviceCupy, "current", 0)

    def on(device_id, array):
        with _TwoDeviceCupy.Device(device_id):
            return np.asarray(array).copy().view(_OnDevice)
    return on


def test_helpers_allocate_on_the_device_of_the_array(two_devices):
    from fastlinear import _arrays

    X = two_devices(1, np.ones((2, 3)))
    assert X.device_id == 1 and _TwoDeviceCupy.current == 0
    assert _arrays.empty_like_device(X, (2, 4), np.dtype(np.float32)).device_id == 1
    for b in (np.float32(2.0).reshape(1), np.float32(2.0).reshape(())):
        bias = _arrays.as_bias(two_devices(1, b), 4, np.dtype(np.float32))
        assert bias.device_id == 1 and bias.shape == (4,) and np.all(np.asarray(bias) == 2)
    assert _TwoDeviceCupy.current == 0
    assert type(_arrays.empty_like_device(np.ones(2), (3,), np.dtype(np.float64))) is np.ndarray


def test_gelu_forward_saving_z_on_another_device(two_devices, monkeypatch):
    """With GELU and return_saved the pre-activation buffer and a (1,) bias broadcast are made
    by fastlinear before the backend runs: on X's device (1), not the current one (0), so the
    backend's one-device check passes (issue 19's multi-GPU crash)."""
    from fastlinear import _dispatch

    seen = {}

    def forward(X, W, b, out, activation=None, preactivation=None):
        seen.update(X=X.device_id, b=b.device_id, Z=preactivation.device_id)
        preactivation[...] = 0.5
        return _TwoDeviceCupy.full((X.shape[0], W.shape[1]), 1.0, X.dtype)

    fake = types.SimpleNamespace(NAME="cupy", DTYPES=cupy_backend.DTYPES,
                                 ARRAY_LIBRARIES=("cupy",), forward=forward,
                                 unavailable_reason=lambda: None)
    install_registry(monkeypatch, import_module=lambda path: (
        fake if path == _dispatch.BACKENDS["cupy"] else importlib.import_module(path)))
    X, W = two_devices(1, np.ones((2, 3), np.float32)), two_devices(1, np.ones((3, 4), np.float32))
    b = two_devices(1, np.float32(0.5).reshape(1))
    Y, Z = fastlinear.linear_forward(X, W, b, activation="gelu", backend="cupy",
                                     return_saved=True)
    assert seen == {"X": 1, "b": 1, "Z": 1} and Z.device_id == 1
    assert np.all(np.asarray(Z) == 0.5) and Y.shape == (2, 4)


# --- cuBLAS handle modes around a GEMM (no GPU needed) ------------------------------------------

class _RecordingCublas:
    """CuPy's cublas module as _gemm_call uses it: the handle's modes, and what gemmEx saw."""

    CUBLAS_POINTER_MODE_HOST, CUBLAS_POINTER_MODE_DEVICE = 0, 1

    def __init__(self, pointer_mode, math_mode, fail=False):
        self.pointer_mode, self.math_mode, self.fail = pointer_mode, math_mode, fail
        self.calls, self.gemms = [], []

    def getPointerMode(self, handle):
        self.calls.append("getPointerMode")
        return self.pointer_mode

    def setPointerMode(self, handle, mode):
        self.calls.append("setPointerMode")
        self.pointer_mode = mode

    def getMathMode(self, handle):
        self.calls.append("getMathMode")
        return self.math_mode

    def setMathMode(self, handle, mode):
        self.calls.append("setMathMode")
        self.math_mode = mode

    def gemmEx(self, *args):
        self.calls.append("gemmEx")
        self.gemms.append((self.pointer_mode, self.math_mode, args))
        if self.fail:
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")


class _DeviceMatrix:
    """A cupy.ndarray as _gemm_call reads it: shape, strides, dtype and a device pointer."""

    def __init__(self, shape, dtype, order="C", ptr=0x1000):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.itemsize = self.dtype.itemsize
        steps = (shape[1], 1) if order == "C" else (1, shape[0])  # as NumPy's, no allocation
        self.strides = tuple(step * self.itemsize for step in steps)
        self.data = types.SimpleNamespace(ptr=ptr)


def _host_scalar(pointer, dtype):
    return np.frombuffer((ctypes.c_char * np.dtype(dtype).itemsize).from_address(pointer),
                         dtype)[0]


@pytest.fixture
def recording_cublas(monkeypatch):
    def install(pointer_mode, math_mode, fail=False):
        cublas = _RecordingCublas(pointer_mode, math_mode, fail)
        fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
            device=types.SimpleNamespace(get_cublas_handle=lambda: 7)))
        monkeypatch.setattr(cupy_backend, "_cublas", lambda: cublas)
        monkeypatch.setattr(cupy_backend, "_cupy", lambda: fake_cupy)
        return cublas
    return install


NO_REDUCTION = cupy_launch.CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("pointer_mode", [0, 1])
@pytest.mark.parametrize("math_mode", [0, 1, NO_REDUCTION, NO_REDUCTION | 1])
@pytest.mark.parametrize("beta", [0, 1])
def test_gemm_sets_the_modes_it_needs_and_restores_them(recording_cublas, dtype, pointer_mode,
                                                        math_mode, beta):
    """Host pointer mode for the host alpha/beta; for float16 (only) the math mode gains
    CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION, so split-K sums stay float32 (issue 19);
    both come back as they were, and a handle already right is not touched."""
    cublas = recording_cublas(pointer_mode, math_mode)
    P, Q, C = (_DeviceMatrix(shape, dtype) for shape in ((5, 3), (3, 4), (5, 4)))
    cupy_backend._gemm_call(P, Q, C, beta)
    ((pointer_during, math_during, args),) = cublas.gemms
    assert pointer_during == 0
    if np.dtype(dtype) == np.float16:
        assert math_during == math_mode | NO_REDUCTION
    else:
        assert math_during == math_mode and "getMathMode" not in cublas.calls
    assert (cublas.pointer_mode, cublas.math_mode) == (pointer_mode, math_mode)
    touched = [call for call in cublas.calls if call.startswith("set")]
    expected = 2 * (pointer_mode != 0) + 2 * (np.dtype(dtype) == np.float16
                                              and not math_mode & NO_REDUCTION)
    assert len(touched) == expected, cublas.calls
    scalar = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    data_type, compute_type, _ = cupy_launch.GEMM_TYPES[np.dtype(dtype)]
    assert args[0] == 7 and args[3:6] == (4, 5, 3)  # handle; cuBLAS's m, n, k of C.T = Q.T P.T
    assert _host_scalar(args[6], scalar) == 1 and _host_scalar(args[13], scalar) == beta
    assert (args[8], args[11], args[15], args[17]) == (data_type,) * 3 + (compute_type,)


def test_gemm_restores_the_modes_when_cublas_fails(recording_cublas):
    cublas = recording_cublas(1, 0, fail=True)
    P, Q, C = (_DeviceMatrix(shape, np.float16) for shape in ((5, 3), (3, 4), (5, 4)))
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        cupy_backend._gemm_call(P, Q, C, 0)
    assert (cublas.pointer_mode, cublas.math_mode) == (1, 0)


def test_gemm_plans_are_cached_by_layout(recording_cublas, monkeypatch):
    """The second GEMM of the same operand layouts reuses the plan: same cuBLAS arguments."""
    monkeypatch.setattr(cupy_backend, "_gemm_plans", {})
    cublas = recording_cublas(0, 0)
    P, Q, C = _DeviceMatrix((6, 3), np.float32, "F"), _DeviceMatrix((3, 4), np.float32), \
        _DeviceMatrix((6, 4), np.float32)
    cupy_backend._gemm_call(P, Q, C, 0)
    cupy_backend._gemm_call(P, Q, C, 1)
    assert len(cupy_backend._gemm_plans) == 1
    first, second = (args for _, _, args in cublas.gemms)
    assert first[:6] == second[:6] == (7, cupy_launch.CUBLAS_OP_N, cupy_launch.CUBLAS_OP_T,
                                       4, 6, 3)
    assert (first[9], first[12], first[16]) == (4, 6, 4)  # lda, ldb, ldc


# The GPU test's layer whose outputs have more than 2**31 elements: (N, D, M).
FLOAT16_BEYOND_2_31 = (70000, 4, 32769)


def test_gemm_beyond_2_31_output_elements_passes_c_int_arguments(recording_cublas,
                                                                  monkeypatch):
    """The cublas path of ``test_float16_beyond_2_31_elements_uses_64_bit_indexing``: one
    gemmEx (CuPy 14.2 wraps the 32-bit cublasGemmEx: m, n, k and the leading dimensions are C
    ints), every one of them in range; only cuBLAS's own addressing of C goes past 2**31
    elements (ldc * n), which is what that GPU test checks."""
    monkeypatch.setattr(cupy_backend, "_gemm_plans", {})
    cublas = recording_cublas(0, 0)
    N, D, M = FLOAT16_BEYOND_2_31
    X, W, Y = (_DeviceMatrix(shape, np.float16) for shape in ((N, D), (D, M), (N, M)))
    cupy_backend._gemm(X, W, Y, 0)
    ((_, math_mode, args),) = cublas.gemms
    m, n, k, lda, ldb, ldc = (args[i] for i in (3, 4, 5, 9, 12, 16))
    assert (m, n, k, lda, ldb, ldc) == (M, N, D, M, D, M)
    assert all(type(value) is int and 0 < value <= 2**31 - 1
               for value in (m, n, k, lda, ldb, ldc))
    assert ldc * n > 2**31 and math_mode & NO_REDUCTION


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
@pytest.mark.parametrize("path", (None, *cupy_launch.FORWARD_PATHS))
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
    monkeypatch.setattr(cupy_launch, "COLSUM_MIN_ROWS_PER_SPLIT", 1)
    fresh_launch_cache(monkeypatch)  # launch shapes planned with the new value
    dY = rng.standard_normal((1000, 33)).astype(dtype)
    grid, _, _ = cupy_launch.column_sum_launch(1000, 33, cupy_backend._sm_count(0))
    assert grid[1] > 1
    reference = reference64(np.zeros((1000, 1), dtype), np.zeros((1, 33), dtype), None, dY)
    for _ in range(2):  # a second launch gets fresh tile counters
        db0 = cp.asarray(rng.standard_normal(33).astype(dtype))
        db = db0.copy()
        cupy_backend._gradient_column_sums(cp.asarray(dY), None, None, None, db, accumulate)
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
    inputs = make_inputs(rng, 17, 19, 23, np.float64)
    reference = reference64(*inputs)
    X, W, b, dY = (cp.asarray(a) for a in inputs)
    out = cp.empty((17, 23))
    assert fastlinear.linear_forward(X, W, b, backend="cupy", out=out) is out
    dX, dW, db = cp.empty((17, 19)), cp.empty((19, 23)), cp.empty(23)
    result = fastlinear.linear_backward(dY, X, W, backend="cupy", dX=dX, dW=dW, db=db)
    assert result[0] is dX and result[1] is dW and result[2] is db
    assert_matches(out, "Y", reference, np.float64, "Y")
    assert_backward_matches(result, reference, np.float64, True, True, None, None)


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
    dY = rng.standard_normal((5, 4))
    reference = reference64(X, cp.asnumpy(layer.W), cp.asnumpy(layer.b), dY)
    Y = layer.forward(X)
    assert type(Y) is np.ndarray
    assert_matches(Y, "Y", reference, np.float64, "Y")
    dX = layer.backward(dY)
    assert type(dX) is np.ndarray
    assert isinstance(layer.dW, cp.ndarray) and isinstance(layer.db, cp.ndarray)
    assert_backward_matches((dX, layer.dW, layer.db), reference, np.float64, True, True, None,
                            None)
    db_once = cp.asnumpy(layer.db)
    layer.backward(dY, accumulate=True)
    assert_matches(layer.db, "db", reference, np.float64, "db", previous=db_once)


# --- the dispatcher's overlap check on CuPy arrays (no GPU needed) ------------------------------

class _FakeCupyArray:
    """A cupy.ndarray as the overlap check sees it (pointer, shape, strides), made from a NumPy
    view; any use of CuPy itself (e.g. cupy.shares_memory, which syncs the device) would fail."""

    __module__ = "cupy._core.core"

    def __init__(self, view):
        self.data = types.SimpleNamespace(ptr=view.__array_interface__["data"][0])
        self.shape, self.strides = view.shape, view.strides
        self.itemsize, self.size = view.itemsize, view.size


def _views(base):
    return {"rows 0-3": base[:4], "rows 4-9": base[4:], "rows 3-5": base[3:6],
            "reversed": base[::-1], "column 0": base[:, 0], "column 5 reversed": base[::-1, 5],
            "every other row": base[::2], "empty": base[:0], "F view": base.T,
            "last element": base[-1, -1:], "other array": np.zeros((3, 4))}


def test_overlap_check_on_cupy_arrays_is_numpys_bounds_check(monkeypatch):
    from fastlinear import _plan

    monkeypatch.setitem(sys.modules, "cupy", None)  # the check must not import CuPy
    views = _views(np.zeros((10, 6)))
    for name_a, a in views.items():
        for name_b, b in views.items():
            expected = np.may_share_memory(a, b)
            got = _plan._shares_memory(_FakeCupyArray(a), _FakeCupyArray(b))
            assert got == expected, (name_a, name_b)


# --- on the GPU: fused activations, issue 12's checks -------------------------------------------

ACTIVATION_SHAPES = [(1, 1, 1), (3, 300, 31), (9, 17, 65), (65, 129, 70), (130, 70, 200)]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N, D, M", ACTIVATION_SHAPES)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("path", cupy_launch.FORWARD_PATHS)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
def test_forward_activation_matches_reference(cp, rng, N, D, M, dtype, path, activation):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference, _ = activation_reference(X, W, b, dY, activation, dtype)
    with cupy_backend.forced_forward_path(path):
        Y, saved = fastlinear.linear_forward(cp.asarray(X), cp.asarray(W), cp.asarray(b),
                                             activation=activation, backend="cupy",
                                             return_saved=True)
    assert_within(Y, *reference["Y"], f"{activation} Y via {path}")
    if activations.saved_for_backward(activation) == "preactivation":
        assert_within(saved, *reference["Z"], f"{activation} Z via {path}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("N, D, M", [(5, 3, 2), (1000, 33, 40), (129, 70, 200)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("activation", activations.ACTIVATIONS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_backward_activation_matches_reference(cp, rng, N, D, M, dtype, activation, has_bias):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference, saved = activation_reference(X, W, b, dY, activation, dtype)
    dX, dW, db = fastlinear.linear_backward(
        cp.asarray(dY), cp.asarray(X), cp.asarray(W), activation=activation,
        saved=cp.asarray(saved), has_bias=has_bias, backend="cupy")
    for name, value in (("dX", dX), ("dW", dW), ("db", db)):
        if name == "db" and not has_bias:
            assert db is None
            continue
        assert_within(value, *reference[name], f"{activation} {name}")


@requires_gpu
@pytest.mark.gpu
def test_column_sums_are_bitwise_reproducible(cp, rng):
    """Many row splits finished by the last block in split order: the same bits every run."""
    dY = cp.asarray(rng.standard_normal((2**20, 33)).astype(np.float32))
    first = None
    for _ in range(100):
        db = cp.empty(33, np.float32)
        cupy_backend._gradient_column_sums(dY, None, None, None, db, accumulate=False)
        if first is None:
            first = db.get()
        else:
            assert np.array_equal(db.get().view(np.uint32), first.view(np.uint32))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", cupy_launch.FORWARD_PATHS)
def test_forward_and_backward_in_a_non_blocking_stream(cp, rng, path):
    X, W, b, dY = make_inputs(rng, 300, 200, 100, np.float32)
    reference, saved = activation_reference(X, W, b, dY, "gelu", np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        args = [cp.asarray(a) for a in (X, W, b, dY, saved)]
        with cupy_backend.forced_forward_path(path):
            Y = fastlinear.linear_forward(*args[:3], activation="gelu", backend="cupy")
        grads = fastlinear.linear_backward(args[3], args[0], args[1], activation="gelu",
                                           saved=args[4], backend="cupy")
        results = [a.get(stream=stream) for a in (Y, *grads)]
    stream.synchronize()
    for name, value in zip(("Y", "dX", "dW", "db"), results, strict=True):
        assert_within(value, *reference[name], name)


@requires_gpu
@pytest.mark.gpu
def test_two_threads_on_the_per_thread_default_stream(cp, rng):
    """Inside ``Stream.ptds`` each host thread runs on its own stream under one handle: the
    split column sums of db (1000 rows: several row splits) must not share tile counters."""
    X, W, b, dY = make_inputs(rng, 1000, 33, 40, np.float32)
    reference = reference64(X, W, b, dY)
    grid, _, _ = cupy_launch.column_sum_launch(1000, 40, cupy_backend._sm_count(0))
    assert grid[1] > 1
    start, results = threading.Barrier(2, timeout=60), {}

    def run(index):
        with cp.cuda.Stream.ptds:
            args = [cp.asarray(a) for a in (dY, X, W)]
            start.wait()
            dbs = [fastlinear.linear_backward(*args, has_bias=True, backend="cupy")[2]
                   for _ in range(50)]
            results[index] = [db.get() for db in dbs]

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [0, 1]
    for index, dbs in results.items():
        for call, db in enumerate(dbs):
            assert_matches(db, "db", reference, np.float32, f"db of thread {index}, call {call}")


@requires_gpu
@pytest.mark.gpu
def test_cublas_pointer_mode_is_restored(cp, rng):
    from cupy_backends.cuda.libs import cublas

    handle = cp.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_DEVICE)
    try:
        X, W, b, dY = (cp.asarray(a) for a in make_inputs(rng, 70, 60, 50, np.float32))
        with cupy_backend.forced_forward_path("cublas"):
            fastlinear.linear_forward(X, W, b, backend="cupy")
        fastlinear.linear_backward(dY, X, W, backend="cupy")
        assert cublas.getPointerMode(handle) == cublas.CUBLAS_POINTER_MODE_DEVICE
    finally:
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", cupy_launch.FORWARD_PATHS)
def test_float16_beyond_2_31_elements_uses_64_bit_indexing(cp, rng, path):
    """Y, Z and G of 70000 x 32769 float16 elements (N * M > 2**31): the last rows are right."""
    free, _ = cp.cuda.runtime.memGetInfo()
    N, D, M = FLOAT16_BEYOND_2_31
    if free < 6 * N * M * 2:
        pytest.skip(f"needs {6 * N * M * 2 / 2**30:.0f} GiB of free device memory")
    X = rng.standard_normal((N, D)).astype(np.float16)  # no (N, M) array on the host
    W = rng.standard_normal((D, M)).astype(np.float16)
    b = rng.standard_normal(M).astype(np.float16)
    X_gpu, W_gpu, b_gpu = cp.asarray(X), cp.asarray(W), cp.asarray(b)
    with cupy_backend.forced_forward_path(path):
        Y, Z = fastlinear.linear_forward(X_gpu, W_gpu, b_gpu, activation="gelu",
                                         backend="cupy", return_saved=True)
    tail = slice(N - 3, N)
    dY_tail = rng.standard_normal((3, M)).astype(np.float16)
    reference, _ = activation_reference(X[tail], W, b, dY_tail, "gelu", np.float16)
    assert_within(Y[tail], *reference["Y"], f"last rows of Y via {path}")
    assert_within(Z[tail], *reference["Z"], f"last rows of Z via {path}")
    del Y
    dY = cp.zeros((N, M), np.float16)  # zero except the last rows: G and db come from those
    dY[tail] = cp.asarray(dY_tail)
    G, db = cp.empty((N, M), np.float16), cp.empty(M, np.float16)
    cupy_backend._gradient_column_sums(dY, Z, "gelu", G, db, accumulate=False)
    dY64, Z64 = dY_tail.astype(np.float64), Z[tail].get().astype(np.float64)
    expected = activations.grad("gelu", dY64, Z64)
    bound = (16 * np.finfo(np.float32).eps * np.abs(dY64) * (1 + np.abs(Z64))
             + np.finfo(np.float16).eps * np.abs(expected) + np.finfo(np.float16).tiny)
    assert_within(G[tail], expected, bound, "last rows of G")
    assert not cp.any(G[:N - 3])
    assert_within(db, expected.sum(0), bound.sum(0) + np.finfo(np.float16).eps
                  * np.abs(expected).sum(0), "db")


@requires_gpu
@pytest.mark.gpu
def test_call_runs_on_the_device_of_its_arrays_on_the_gpu(cp, rng):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    X, W, b, dY = make_inputs(rng, 20, 30, 10, np.float32)
    reference = reference64(X, W, b, dY)
    with cp.cuda.Device(1):
        X1, W1, b1 = cp.asarray(X), cp.asarray(W), cp.asarray(b)
    with cp.cuda.Device(0):
        Y = fastlinear.linear_forward(X1, W1, b1, backend="cupy")
        assert Y.device.id == 1
        with pytest.raises(ValueError, match="X on device 0, W on device 1"):
            fastlinear.linear_forward(cp.asarray(X), W1, backend="cupy")
    assert_matches(Y, "Y", reference, np.float32, "Y")


def exact_float32_subnormal_layer(X, W, b):
    """``X @ W + b`` as an IEEE float32 layer computes it when every value is subnormal: each
    product rounded once to float32 (exact in float64 first), then sums on the uniform subnormal
    grid, which are exact. None of these steps flushes."""
    products = (X.astype(np.float64)[:, :, None] * W.astype(np.float64)[None]).astype(np.float32)
    return (products.astype(np.float64).sum(axis=1) + b.astype(np.float64)).astype(np.float32)


SUBNORMAL_LAYER = (np.full((4, 8), 1e-20, np.float32), np.full((8, 3), 1e-20, np.float32),
                   np.full(3, 1e-39, np.float32))  # products ~1e-40, a subnormal bias


def test_subnormal_layer_is_below_float32s_smallest_normal():
    """What the GPU test below relies on: every product, the bias and the result are subnormal
    and nonzero, and the product does not fall on a rounding tie (where order could matter)."""
    X, W, b = SUBNORMAL_LAYER
    exact = exact_float32_subnormal_layer(X, W, b)
    tiny, grid = np.finfo(np.float32).tiny, 2.0**-149
    product = np.float64(X[0, 0]) * np.float64(W[0, 0])
    assert 0 < product < tiny and 0 < b[0] < tiny and np.all((exact > 0) & (exact < tiny))
    assert (product / grid) % 1 not in (0.0, 0.5)
    assert np.all(exact == np.float32(8 * np.float32(product) + np.float64(b[0])))


@requires_gpu
@pytest.mark.gpu
def test_own_kernels_keep_float32_subnormals_under_cupys_ftz(cp):
    """CuPy compiles our kernels with -ftz=true (cupy/cuda/compiler.py appends it), which
    flushes float32 subnormals in plain arithmetic. The layer's multiply-adds and the bias add
    use __fmaf_ieee_rn, which the CUDA Math API documents as ignoring that flag: so both of our
    kernels give exactly the IEEE result. Whether cuBLAS's SGEMM keeps subnormals is not
    documented: the cublas path is held only to the usual bound (whose absolute slack, float32's
    smallest normal, admits flushing), and a warning says so when it flushed."""
    X, W, b = SUBNORMAL_LAYER
    exact = exact_float32_subnormal_layer(X, W, b)
    reference = reference64(X, W, b, np.zeros((4, 3), np.float32))
    results = {}
    for path in cupy_launch.FORWARD_PATHS:
        with cupy_backend.forced_forward_path(path):
            results[path] = fastlinear.linear_forward(cp.asarray(X), cp.asarray(W),
                                                      cp.asarray(b), backend="cupy").get()
        assert_matches(results[path], "Y", reference, np.float32, f"Y via {path}")
    for path in ("small_batch", "tiled"):
        assert np.array_equal(results[path], exact), (path, results[path], exact)
    if not np.array_equal(results["cublas"], exact):
        message = (f"cuBLAS SGEMM flushed float32 subnormals here (got "
                   f"{results['cublas'][0].tolist()}, IEEE {exact[0].tolist()}): the cublas "
                   f"path differs from our kernels below float32's smallest normal")
        print(message, file=sys.__stderr__, flush=True)  # in the log at once, should a run stop
        warnings.warn(message, stacklevel=1)


# compute-sanitizer's tools and the smoke run each gets: racecheck instruments every kernel it
# sees, so it runs fastlinear's kernels alone (no cuBLAS); memcheck runs every path.
SANITIZER_RUNS = {"memcheck": (), "racecheck": ("--own-kernels-only",)}
SANITIZER_TIMEOUT_S = 120  # each; a GPU session has 600 s per command and 15 min in all


def sanitizer_command(tool, sanitizer="compute-sanitizer", python=sys.executable):
    """The command line of one sanitizer run of tests/gpu_sanitizer_smoke.py."""
    script = pathlib.Path(__file__).with_name("gpu_sanitizer_smoke.py")
    return [sanitizer, "--tool", tool, "--error-exitcode", "1", python, str(script),
            *SANITIZER_RUNS[tool]]


def test_sanitizer_runs_fit_a_gpu_session():
    assert 2 * SANITIZER_TIMEOUT_S <= 300
    assert "--own-kernels-only" in sanitizer_command("racecheck")
    assert "--own-kernels-only" not in sanitizer_command("memcheck")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tool", sorted(SANITIZER_RUNS))
def test_kernels_are_clean_under_compute_sanitizer(tool):
    import shutil
    import subprocess

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not on PATH")
    result = subprocess.run(sanitizer_command(tool, sanitizer), capture_output=True, text=True,
                            timeout=SANITIZER_TIMEOUT_S)
    assert result.returncode == 0 and "smoke ok" in result.stdout, (
        result.stdout[-4000:] + result.stderr[-4000:])
