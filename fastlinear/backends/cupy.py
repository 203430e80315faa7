"""The cupy backend: the linear layer on an NVIDIA GPU, by cuBLAS GEMMs and fastlinear's kernels.

Install with ``pip install "fastlinear[cuda]"`` (CuPy with its ``ctk`` extra: CUDA's headers,
NVRTC, cuBLAS). Imports without CuPy; the backend is available once CuPy has compiled a kernel
and opened cuBLAS on the current device.

Arrays
    CuPy in, CuPy out. NumPy arrays are copied to the device and the results back (``Y`` and
    ``dX`` in the library of ``X``/``dY``, ``dW`` and ``db`` in that of ``W``): a training loop
    keeps its arrays on the device (``Linear(..., backend="cupy")``). A call runs on the device
    of its CuPy arrays; arrays on two devices are refused.
Precision
    float64 in float64; float32 in float32 (CUBLAS_COMPUTE_32F, no TF32 under CuPy's default
    math mode); float16 with float32 sums, rounded once per element (twice on the cuBLAS path
    with an activation: the product, then act(product + b)). CuPy compiles our kernels with
    ``-ftz=true``; their products and sums still keep float32 subnormals (IEEE fused
    multiply-adds, which ignore the flag). Only the activation functions' own float32
    arithmetic flushes subnormals. Whether cuBLAS's SGEMM keeps them is not documented: below
    float32's smallest normal the cublas path may differ from ours.
Forward ``Y = act(X @ W + b)``, one path of ``cupy_launch.FORWARD_PATHS`` (``forward_path``)
    ``small_batch`` and ``tiled``: one launch of our kernel, bias, activation and pre-activation
    store in its epilogue. ``cublas`` without an activation: ``fill_rows_with_bias``, then a
    beta = 1 GEMM (2 launches, one rounding). With an activation: a beta = 0 GEMM, then
    ``bias_activation_epilogue`` in one read and write of Y (2 launches, where a bias fill, a
    beta = 1 GEMM and an activation pass would take 3 and a second pass over Y).
Backward
    ``gradient_column_sums`` reads dY once: ``G = dY * act'(saved)`` for the GEMMs (with an
    activation) and ``db`` (with a bias) in the same launch; ``dX = G @ W.T`` and
    ``dW = X.T @ G`` by cuBLAS, split where a dimension exceeds a C int.
Kernels
    ``kernels/*.cu`` through ``cupy.RawModule``, once per process and device (CuPy caches the
    binary on disk), with ``#line`` prefixes and the ``cupy_launch`` defines.
"""

import contextlib
import contextvars
import functools
import sys
import threading

import numpy as np

from fastlinear import _profile
from fastlinear.backends import cupy_launch
from fastlinear.backends.cupy_launch import (
    ACCUMULATOR_DTYPES,
    ACTIVATION_CODES,
    DTYPE_SUFFIXES,
    FORWARD_PATHS,
    GEMM_TYPES,
    column_sum_launch,
    forward_launch,
    forward_path,
    gemm_arguments,
    matrix_steps,
    rows_launch,
)

NAME = "cupy"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("cupy", "numpy")
INSTALL_HINT = 'pip install "fastlinear[cuda]"'

_forced_forward_path = contextvars.ContextVar("fastlinear_cupy_forward_path", default=None)


# --- availability ------------------------------------------------------------------------------

_PROBE_KERNEL = 'extern "C" __global__ void fastlinear_probe(float* out) { out[0] = 1.0f; }'


def _probe():
    """Why the backend cannot run here (uncached), or None.

    Counting devices is not enough: CuPy finds CUDA's headers, NVRTC and cuBLAS only at the
    first compile and the first GEMM. So the probe compiles a trivial kernel and opens a cuBLAS
    handle on the current device, and names what failed.
    """
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed or failed to import ({exc}); {INSTALL_HINT}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError (no driver, no device), or a library load error
        return f"no CUDA device: {type(exc).__name__}: {exc}"
    if count < 1:
        return "no CUDA device: the CUDA runtime reports 0 devices"
    try:
        cupy.RawModule(code=_PROBE_KERNEL).get_function("fastlinear_probe")
    except Exception as exc:  # CompileException, "Failed to find CUDA headers", no NVRTC
        return (f"CuPy cannot compile CUDA kernels here ({type(exc).__name__}: {exc}); CuPy "
                f"needs CUDA's headers and NVRTC, which its ctk extra installs: {INSTALL_HINT}")
    try:
        cupy.cuda.device.get_cublas_handle()
    except Exception as exc:  # cuBLAS library missing or failing to initialise
        return (f"cuBLAS cannot be opened ({type(exc).__name__}: {exc}); it comes with CuPy's "
                f"ctk extra: {INSTALL_HINT}")
    return None


@functools.cache
def unavailable_reason():
    """None when CuPy compiles a kernel and opens cuBLAS on a CUDA device, else the reason
    (cached after one call). Where it can run, this machine's tuning profile (the forward path
    thresholds ``python -m fastlinear tune`` measured on this GPU) is put in force."""
    reason = _probe()
    if reason is None:
        _profile.apply_section(NAME, profile_key, PROFILE_SCHEMA, cupy_launch.apply_thresholds)
    return reason


# The tuning profile's cupy section: the forward path rule's thresholds (cupy_launch).
PROFILE_SCHEMA = dict.fromkeys(cupy_launch.current_thresholds(), _profile.int_at_least(1))


def profile_key():
    """What the thresholds depend on: the GPU, CUDA and library versions."""
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.runtime.getDevice())["name"]
    return {"gpu": name.decode() if isinstance(name, bytes) else name,
            "cuda": cupy.cuda.runtime.runtimeGetVersion(), "cupy": cupy.__version__,
            "fastlinear": _profile.library_version("fastlinear")}


@contextlib.contextmanager
def forced_forward_path(path):
    """Use forward path ``path`` (one of ``FORWARD_PATHS``) inside the block, whatever the shape.

    For tests and benchmarks that compare the paths; ``None`` restores the shape rule.
    """
    if path is not None and path not in FORWARD_PATHS:
        raise ValueError(f"unknown forward path {path!r}: expected one of {FORWARD_PATHS}")
    token = _forced_forward_path.set(path)
    try:
        yield path
    finally:
        _forced_forward_path.reset(token)


# --- CuPy plumbing -----------------------------------------------------------------------------
#
# Host work per call is kept small (benchmarks/gpu_host_overhead.py measures it with CuPy stubbed
# out): kernels are looked up per (device, name, dtype) in a dict, scalar kernel arguments go to
# CuPy as Python ints (CuPy passes those as 64-bit ints, the "i64" of KERNEL_SIGNATURES) or as
# the cached np.int32 of _I32 ("i32"), strides are read once per array, and cuBLAS's alpha/beta
# are host constants made once.

def _cupy():
    """The cupy module (from ``sys.modules`` once imported: an import statement per use costs
    more than the rest of a small call's host work)."""
    module = sys.modules.get("cupy")
    if module is None:
        import cupy as module
    return module


@functools.cache
def _cublas():
    """CuPy's cuBLAS wrapper (imported once; CuPy 14 loads libcublas at this import)."""
    from cupy_backends.cuda.libs import cublas

    return cublas


@functools.cache
def _module():
    """The RawModule of all kernels (compiled lazily by CuPy, once per device)."""
    return _cupy().RawModule(code=cupy_launch.kernel_source(),
                             options=cupy_launch.compile_options())


def _kernel(name, device_id):
    """The compiled kernel ``name`` (e.g. ``linear_forward_tiled_f32``) on the current device."""
    return _module().get_function(name)


def _sm_count(device_id):
    return int(_cupy().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def _device_id():
    return _cupy().cuda.runtime.getDevice()


@functools.lru_cache(maxsize=1024)
def _launch_shape(plan, rows, cols, sm_count):
    """``plan(rows, cols, sm_count)`` (``rows_launch`` or ``column_sum_launch``), cached: a layer
    launches the same few shapes again and again. The plans also read ``cupy_launch``'s module
    constants (``COLSUM_MIN_ROWS_PER_SPLIT``, ``COLSUM_BLOCKS_PER_SM``): whoever changes one
    clears this cache (``_launch_shape.cache_clear()``) or patches in a fresh one."""
    return plan(rows, cols, sm_count)


class _Device:
    """What the backend keeps per CUDA device: its SM count, its kernels by (name, dtype), and
    per stream the zeroed tile counters of ``gradient_column_sums`` (its last block per column
    tile sets its counter back to zero, so one buffer serves every launch on that stream)."""

    __slots__ = ("id", "sm_count", "kernels", "counters")

    def __init__(self, device_id):
        self.id = device_id
        self.sm_count = _sm_count(device_id)
        self.kernels = {}
        self.counters = {}

    def kernel(self, name, dtype):
        function = self.kernels.get((name, dtype))
        if function is None:
            function = _kernel(f"{name}_{DTYPE_SUFFIXES[np.dtype(dtype)]}", self.id)
            self.kernels[(name, dtype)] = function
        return function

    def tile_counters(self, count):
        """``count`` zeroed uint32 counters for a launch on the current stream.

        The per-thread default stream (``cupy.cuda.Stream.ptds``, or every default stream under
        ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``) has one handle but is a different stream in
        each host thread: its counters are kept per thread, else two threads' launches would
        share counters out of order (as CuPy's memory pool keys its free blocks).
        """
        cupy = _cupy()
        stream = cupy.cuda.get_current_stream().ptr
        if stream == _PER_THREAD_STREAM:
            stream = (stream, threading.get_ident())
        buffer = self.counters.get(stream)
        if buffer is None or buffer.size < count:
            if buffer is None and len(self.counters) >= _MAX_COUNTER_STREAMS:
                # streams made and dropped in a loop: forget the oldest (CuPy's pool hands a
                # freed block only to later work on the stream it was used on)
                del self.counters[next(iter(self.counters))]
            size = count if buffer is None else max(count, 2 * buffer.size)
            buffer = self.counters[stream] = cupy.zeros(size, dtype=np.uint32)
        return buffer


_devices: dict[int, _Device] = {}
_MAX_COUNTER_STREAMS = 16
_PER_THREAD_STREAM = 2  # cudaStreamPerThread (driver_types.h; CuPy's runtime.streamPerThread)


def _device_state(device_id=None):
    """The ``_Device`` of ``device_id`` (default: the current device), made at first use."""
    if device_id is None:
        device_id = _device_id()
    state = _devices.get(device_id)
    if state is None:
        state = _devices[device_id] = _Device(device_id)
    return state


def _is_host(array):
    return isinstance(array, np.ndarray)


def _call_device(names, arrays):
    """``(device id, any_host)``: the device of the call's CuPy arrays (None when there is none)
    and whether any of ``arrays`` is a NumPy array (None entries are skipped).

    Raises ValueError, naming each array's device, when the CuPy arrays are on different
    devices.
    """
    device = None
    any_host = False
    for array in arrays:
        if array is None:
            continue
        if isinstance(array, np.ndarray):
            any_host = True
            continue
        this = array.data.device_id  # array.device would make a cupy.cuda.Device per access
        if device is None:
            device = this
        elif this != device:
            where = ", ".join(f"{name} on device {array.data.device_id}"
                              for name, array in zip(names, arrays, strict=True)
                              if array is not None and not _is_host(array))
            raise ValueError(f"the CuPy arrays of one call must be on one device, got {where}; "
                             f"copy them to one device first (cupy.asarray inside "
                             f"`with cupy.cuda.Device(i):`)")
    return device, any_host


# np.int32 arguments ("i32"): flags and activation codes, boxed once.
_I32 = tuple(np.int32(value) for value in range(max(2, max(ACTIVATION_CODES.values()) + 1)))
_ACTIVATION_ARGS = {name: _I32[code] for name, code in ACTIVATION_CODES.items()}


def _launch(state, kernel, dtype, grid, block, args):
    """Launch ``kernel`` (a name of ``KERNEL_SIGNATURES``) for ``dtype`` on ``state``'s device.

    ``args`` are already of the kernel's types: CuPy arrays ("ptr"), Python ints ("i64") and
    ``np.int32`` ("i32"); tests/test_kernels_emulated.py holds every call to the signatures.
    """
    state.kernel(kernel, dtype)(grid, block, args)


def _strided(array):
    """``(array, row_step, col_step)`` for a kernel; copies if a stride is not whole elements."""
    steps = matrix_steps(array)
    if steps is None:
        array = _cupy().ascontiguousarray(array)
        steps = matrix_steps(array)
    return array, steps[0], steps[1]


def _gemm(P, Q, C, beta):
    """``C = P @ Q + beta * C`` (beta 0 or 1); C is C-contiguous, no dimension is zero.

    cuBLAS takes C ints: rows of P and C beyond ``GEMM_MAX_DIM`` are split over several GEMMs,
    and so is the inner dimension (the later pieces add into C with beta = 1).
    """
    n, k = P.shape
    m = Q.shape[1]
    limit = cupy_launch.GEMM_MAX_DIM
    if n <= limit and k <= limit and m <= limit:
        _gemm_call(P, Q, C, beta)
        return
    if m > limit:
        raise ValueError(f"a GEMM output of {m} columns is beyond cuBLAS's limit of {limit} "
                         f"(C int); shape {P.shape} @ {Q.shape}")
    for row_start, row_stop in cupy_launch.gemm_chunks(n):
        for index, (k_start, k_stop) in enumerate(cupy_launch.gemm_chunks(k)):
            _gemm_call(P[row_start:row_stop, k_start:k_stop], Q[k_start:k_stop],
                       C[row_start:row_stop], beta if index == 0 else 1)


def _host_scalars():
    """``{dtype: (cuBLAS data type, compute type, {alpha/beta value: host pointer})}``.

    cuBLAS reads alpha and beta through host pointers during the call (host pointer mode); the
    arrays behind them are made once and kept here for the life of the process.
    """
    plans = {}
    for dtype, (data_type, compute_type, scalar_type) in GEMM_TYPES.items():
        holders = {value: np.full((), value, dtype=scalar_type) for value in (0, 1)}
        _SCALAR_HOLDERS.extend(holders.values())
        plans[dtype] = (data_type, compute_type,
                        {value: holder.ctypes.data for value, holder in holders.items()})
    return plans


_SCALAR_HOLDERS: list[np.ndarray] = []
_HOST_SCALARS = _host_scalars()
_FLOAT16 = np.dtype(np.float16)
_POINTER_MODE_HOST = 0  # CUBLAS_POINTER_MODE_HOST (cublas_api.h)
_NO_REDUCTION = cupy_launch.CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION
_GEMM_ALGORITHM = cupy_launch.CUBLAS_GEMM_DEFAULT


def _gemm_plan(P, Q):
    """``(copy_p, copy_q, cuBLAS arguments)`` of ``C = P @ Q``: which operand must be copied to
    C order first (one cuBLAS cannot read in place), and ``gemm_arguments`` for what it reads."""
    p_layout = cupy_launch.blas_layout(P.shape, P.strides, P.itemsize)
    q_layout = cupy_launch.blas_layout(Q.shape, Q.strides, Q.itemsize)
    n, k = P.shape
    m = Q.shape[1]
    arguments = gemm_arguments(p_layout or (True, max(k, 1)), q_layout or (True, max(m, 1)),
                               n, m, k)
    return p_layout is None, q_layout is None, arguments


# GEMM plans by the operands' shapes, strides and itemsize: a layer calls the same few shapes
# again and again. Cleared when it grows past _GEMM_PLANS_MAX entries.
_gemm_plans: dict[tuple, tuple] = {}
_GEMM_PLANS_MAX = 1024


def _gemm_call(P, Q, C, beta):
    """One cuBLAS gemmEx, ``C = P @ Q + beta * C``, every dimension within a C int.

    The handle is CuPy's, shared with the caller: its pointer mode is set to host only when it
    is not, and for float16 ``CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`` is ORed into its
    math mode (else split-K partial sums may be reduced in float16); both are restored after.
    """
    key = (P.shape, P.strides, Q.shape, Q.strides, P.itemsize)
    plan = _gemm_plans.get(key)
    if plan is None:
        if len(_gemm_plans) >= _GEMM_PLANS_MAX:
            _gemm_plans.clear()
        plan = _gemm_plans[key] = _gemm_plan(P, Q)
    copy_p, copy_q, (transa, transb, m, n, k, lda, ldb, ldc) = plan
    if copy_p:
        P = _cupy().ascontiguousarray(P)
    if copy_q:
        Q = _cupy().ascontiguousarray(Q)
    data_type, compute_type, scalars = _HOST_SCALARS[C.dtype]
    cublas = _cublas()
    handle = _cupy().cuda.device.get_cublas_handle()
    pointer_mode = cublas.getPointerMode(handle)
    if pointer_mode != _POINTER_MODE_HOST:
        cublas.setPointerMode(handle, _POINTER_MODE_HOST)
    math_mode = cublas.getMathMode(handle) if C.dtype == _FLOAT16 else _NO_REDUCTION
    if not math_mode & _NO_REDUCTION:
        cublas.setMathMode(handle, math_mode | _NO_REDUCTION)
    try:
        cublas.gemmEx(handle, transa, transb, m, n, k, scalars[1], Q.data.ptr, data_type, lda,
                      P.data.ptr, data_type, ldb, scalars[beta], C.data.ptr, data_type, ldc,
                      compute_type, _GEMM_ALGORITHM)
    finally:
        if not math_mode & _NO_REDUCTION:
            cublas.setMathMode(handle, math_mode)
        if pointer_mode != _POINTER_MODE_HOST:
            cublas.setPointerMode(handle, pointer_mode)


def _vector(array):
    """``(array, step)`` of a 1-D array for a kernel; copies if its stride is not whole elements."""
    (stride,) = array.strides
    if stride % array.itemsize:
        return _cupy().ascontiguousarray(array), 1
    return array, stride // array.itemsize


def _bias_argument(b, Y):
    """``(bias, step, has_bias)`` kernel arguments; without a bias, any valid pointer (Y)."""
    if b is None:
        return Y, 0, _I32[0]
    bias, b_step = _vector(b)
    return bias, b_step, _I32[1]


def _fill_rows_with_bias(state, Y, b):
    rows, cols = Y.shape
    grid, block = _launch_shape(rows_launch, rows, cols, state.sm_count)
    b, b_step = _vector(b)
    _launch(state, "fill_rows_with_bias", Y.dtype, grid, block, (Y, b, b_step, rows, cols))


def _bias_activation_epilogue(Y, b, activation, Z, state=None):
    """``Z = Y + b`` (when Z is given), ``Y = act(Y + b)`` in one pass over Y."""
    state = state or _device_state()
    rows, cols = Y.shape
    grid, block = _launch_shape(rows_launch, rows, cols, state.sm_count)
    bias, b_step, has_bias = _bias_argument(b, Y)
    _launch(state, "bias_activation_epilogue", Y.dtype, grid, block,
            (Y, bias, b_step, has_bias, _ACTIVATION_ARGS[activation], Y if Z is None else Z,
             _I32[Z is not None], rows, cols))


_FORWARD_KERNELS = {"small_batch": "linear_forward_small_batch",
                    "tiled": "linear_forward_tiled"}


def _forward_kernel(state, path, X, W, w_steps, b, Y, activation, Z):
    n, d = X.shape
    m = W.shape[1]
    grid, block = forward_launch(path, n, m)
    X, x_row, x_col = _strided(X)
    if w_steps is None:
        W = _cupy().ascontiguousarray(W)
        w_steps = matrix_steps(W)
    bias, b_step, has_bias = _bias_argument(b, Y)
    _launch(state, _FORWARD_KERNELS[path], Y.dtype, grid, block,
            (X, x_row, x_col, W, w_steps[0], w_steps[1], bias, b_step, has_bias, Y, n, d, m,
             _ACTIVATION_ARGS[activation], Y if Z is None else Z, _I32[Z is not None]))


def _forward_device(X, W, b, out, activation=None, Z=None, state=None):
    """``Y = act(X @ W + b)`` (and ``Z = X @ W + b`` when Z is given) on device arrays."""
    n, d = X.shape
    m = W.shape[1]
    Y = _cupy().empty((n, m), dtype=W.dtype) if out is None else out
    if n == 0 or m == 0:
        return Y
    state = state or _device_state()
    if d == 0:
        if activation is None:
            Y[...] = 0 if b is None else b
        else:
            Y.fill(0)
            _bias_activation_epilogue(Y, b, activation, Z, state)
        return Y
    w_steps = matrix_steps(W)
    path = _forced_forward_path.get()
    if path is None:
        w_rows_contiguous = w_steps is not None and (m == 1 or w_steps[1] == 1)
        path = forward_path(n, d, m, w_rows_contiguous, state.sm_count)
    if path != "cublas":
        _forward_kernel(state, path, X, W, w_steps, b, Y, activation, Z)
    elif activation is not None:
        _gemm(X, W, Y, beta=0)
        _bias_activation_epilogue(Y, b, activation, Z, state)
    elif b is None:
        _gemm(X, W, Y, beta=0)
    else:
        _fill_rows_with_bias(state, Y, b)
        _gemm(X, W, Y, beta=1)
    return Y


def _gradient_column_sums(dY, saved, activation, G, db, accumulate, state=None):
    """One pass over dY: ``G = dY * act'(saved)`` when there is an activation, and
    ``db (+)= G.sum(0)`` when db is given; dY has rows and columns."""
    state = state or _device_state()
    rows, cols = dY.shape
    grid, block, rows_per_split = _launch_shape(column_sum_launch, rows, cols, state.sm_count)
    dY, row_step, col_step = _strided(dY)
    if activation is None:
        saved, saved_row, saved_col, G = dY, 0, 0, db  # valid pointers, never read or written
    else:
        saved, saved_row, saved_col = _strided(saved)
    if db is not None and grid[1] > 1:
        partials = _cupy().empty((grid[1], cols), dtype=ACCUMULATOR_DTYPES[db.dtype])
        tile_counters = state.tile_counters(grid[0])
    else:
        partials = tile_counters = G if db is None else db  # never read with one split
    _launch(state, "gradient_column_sums", dY.dtype, grid, block,
            (dY, row_step, col_step, saved, saved_row, saved_col, _ACTIVATION_ARGS[activation],
             G, rows, cols, rows_per_split, G if db is None else db, _I32[db is not None],
             _I32[bool(accumulate)], partials, tile_counters))


def _upstream_gradient(dY, saved, activation, db, accumulate, state=None):
    """``G = dY * act'(saved)`` (``dY`` itself without an activation) and ``db (+)= G.sum(0)``,
    in one launch of ``gradient_column_sums``."""
    n, m = dY.shape
    G = dY
    if n and m:
        if activation is not None:
            G = _cupy().empty((n, m), dtype=dY.dtype)
        if activation is not None or db is not None:
            _gradient_column_sums(dY, saved, activation, G, db, accumulate, state)
    elif db is not None and m and not accumulate:
        db.fill(0)
    return G


def _product(P, Q, C, accumulate):
    """``C (+)= P @ Q`` by cuBLAS, also when a dimension is empty."""
    rows, cols = C.shape
    if rows and cols:
        if P.shape[1]:
            _gemm(P, Q, C, beta=1 if accumulate else 0)
        elif not accumulate:
            C.fill(0)
    return C


def _backward_device(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
                     saved=None, state=None):
    cupy = _cupy()
    n, d = X.shape
    m = W.shape[1]
    if has_bias and db is None:
        db = cupy.empty(m, dtype=W.dtype)
    G = _upstream_gradient(dY, saved, activation, db if has_bias else None, accumulate, state)
    if need_dX:
        dX = _product(G, W.T, cupy.empty((n, d), dtype=W.dtype) if dX is None else dX, False)
    else:
        dX = None
    dW = _product(X.T, G, cupy.empty((d, m), dtype=W.dtype) if dW is None else dW, accumulate)
    return dX, dW, (db if has_bias else None)


def _to_device(array):
    return _cupy().asarray(array) if isinstance(array, np.ndarray) else array


def _device_buffer(buffer, accumulate):
    """The device buffer a result is computed into.

    A device buffer is used as it is; a host buffer gets a device copy when the result is added
    into its values (``accumulate``), else the result is computed into a new device array.
    """
    if buffer is None or not _is_host(buffer):
        return buffer
    return _to_device(buffer) if accumulate else None


def _to_host(device_array, host_buffer):
    """Copy a device result to the host: into ``host_buffer`` when given, else a new array."""
    if device_array is None:
        return None
    if host_buffer is None:
        return _cupy().asnumpy(device_array)
    _cupy().asnumpy(device_array, out=host_buffer)
    return host_buffer


def _result(device_array, on_host, buffer):
    """A result in the library asked for: on the device, or copied to the host (into buffer)."""
    return _to_host(device_array, buffer) if on_host else device_array


# --- the backend interface ---------------------------------------------------------------------

_FORWARD_NAMES = ("X", "W", "b", "out", "preactivation")
_BACKWARD_NAMES = ("dY", "X", "W", "saved", "dX", "dW", "db")


def forward(X, W, b, out, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` on the GPU; see ``fastlinear.backends`` and this module's docstring.

    NumPy inputs are copied to the device; ``Y`` (and ``preactivation``) come back in the
    library of ``X``. The call runs on the device of its CuPy arrays.
    """
    device, any_host = _call_device(_FORWARD_NAMES, (X, W, b, out, preactivation))
    current = _device_id()
    if device is None or device == current:
        return _forward_on(_device_state(current), any_host, X, W, b, out, activation,
                           preactivation)
    with _cupy().cuda.Device(device):  # only here: its __exit__ sets the device even unchanged
        return _forward_on(_device_state(device), any_host, X, W, b, out, activation,
                           preactivation)


def _forward_on(state, any_host, X, W, b, out, activation, preactivation):
    """``forward`` on ``state``'s device, the current one."""
    if not any_host:
        return _forward_device(X, W, b, out, activation, preactivation, state)
    Z = None
    if preactivation is not None:
        Z = _device_buffer(preactivation, False)
        if Z is None:
            Z = _cupy().empty(preactivation.shape, dtype=preactivation.dtype)
    Y = _forward_device(_to_device(X), _to_device(W), _to_device(b), _device_buffer(out, False),
                        activation, Z, state)
    if preactivation is not None and _is_host(preactivation):
        _to_host(Z, preactivation)
    return _result(Y, _is_host(X), out)


def backward(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
             saved=None):
    """Gradients through ``act`` on the GPU: ``G = dY * act'(saved)``, ``dX = G @ W.T``,
    ``dW = X.T @ G``, ``db = G.sum(0)``; see ``fastlinear.backends`` and the module doc.

    NumPy inputs are copied to the device; ``dX`` comes back in the library of ``dY``, ``dW`` and
    ``db`` in the library of ``W`` (a layer's gradients stay where its parameters are). The call
    runs on the device of its CuPy arrays.
    """
    args = (dY, X, W, has_bias, need_dX, accumulate, dX, dW, db, activation, saved)
    device, any_host = _call_device(_BACKWARD_NAMES, (dY, X, W, saved, dX, dW, db))
    current = _device_id()
    if device is None or device == current:
        return _backward_on(_device_state(current), any_host, *args)
    with _cupy().cuda.Device(device):  # only here: its __exit__ sets the device even unchanged
        return _backward_on(_device_state(device), any_host, *args)


def _backward_on(state, any_host, dY, X, W, has_bias, need_dX, accumulate, dX, dW, db,
                 activation, saved):
    """``backward`` on ``state``'s device, the current one."""
    if not any_host:
        return _backward_device(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db,
                                activation, saved, state)
    dX_device, dW_device, db_device = _backward_device(
        _to_device(dY), _to_device(X), _to_device(W), has_bias, need_dX, accumulate,
        _device_buffer(dX, False), _device_buffer(dW, accumulate),
        _device_buffer(db, accumulate), activation, _to_device(saved), state)
    return (_result(dX_device, _is_host(dY), dX), _result(dW_device, _is_host(W), dW),
            _result(db_device, _is_host(W), db))
