"""The cupy backend: the linear layer on an NVIDIA GPU, by cuBLAS GEMMs and fastlinear's kernels.

Install with ``pip install "fastlinear[cuda]"`` (CuPy for CUDA 13). This module imports without
CuPy; CuPy is imported when the backend is first asked for.

Arrays
    CuPy arrays in, CuPy arrays out, with no host round trip. NumPy arrays are accepted too: they
    are copied to the device, computed there and the results copied back (into ``out``/``dX``/
    ``dW``/``db`` when those are NumPy buffers). That copies every input and result over PCIe on
    every call, so a training loop should keep its arrays on the device:
    ``fastlinear.Linear(..., backend="cupy")`` keeps its parameters and gradients there. Arrays
    of both libraries may be mixed in one call: ``Y`` and ``dX`` come back in the library of the
    data (``X``, ``dY``), ``dW`` and ``db`` in the library of ``W``.
Precision
    float64 in float64; float32 in float32 (cuBLAS with CUBLAS_COMPUTE_32F: no TF32 unless the
    cuBLAS handle's math mode allows it, which CuPy does not by default); float16 with float32
    accumulation, rounded to float16 once per output element (twice on the cublas_epilogue
    path: the product, then its sum with b).
Forward, ``Y = X @ W + b`` (one of these paths, see ``forward_path``)
    ``cublas_beta``: ``fill_rows_with_bias`` writes b into every row of Y, then one cuBLAS GEMM
    with beta = 1 adds ``X @ W`` in its epilogue: 2 launches, no read-modify-write pass for b.
    ``cublas_epilogue``: GEMM with beta = 0, then ``add_bias_to_rows`` (2 launches; kept to be
    measured against ``cublas_beta``). ``small_batch`` (few rows of X) and ``tiled`` (small
    problems): one launch of fastlinear's own kernel with the bias added in its epilogue.
    Without a bias every path is one launch.
Backward
    ``dX = dY @ W.T`` and ``dW = X.T @ dY`` are cuBLAS GEMMs (``dW`` with beta = 1 when
    accumulating); ``db = dY.sum(0)`` is one launch of ``column_sums`` (plus a memset of its
    tile counters when the rows are split over several blocks).
Kernels
    ``kernels/*.cu``, compiled once per process and device by ``cupy.RawModule`` (CuPy also
    caches the binary on disk), with a ``#line`` prefix so compiler messages name the real file.
"""

import contextlib
import contextvars
import functools
import math
import pathlib

import numpy as np

from fastlinear import _kernels

NAME = "cupy"
DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("cupy", "numpy")
INSTALL_HINT = 'pip install "fastlinear[cuda]"'

# Block shapes, as the #defines of kernels/linear.cu (tests/test_kernels_compile.py checks them).
BIAS_THREADS = 256
COLSUM_LANES = 32
COLSUM_ROW_LANES = 8
SMALL_BATCH_ROWS = 8
SMALL_BATCH_COLS = 32
SMALL_BATCH_SLICES = 8
TILE_ROWS = 64
TILE_COLS = 64
TILE_THREADS = 16
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y

# Shape rule of the forward pass. NOT MEASURED YET (this code was written without a GPU):
# set both from the per-path table of benchmarks/gpu_bench.py.
SMALL_BATCH_MAX_ROWS = 8  # small_batch for N <= this (one block row), when W's rows are contiguous
TILED_MAX_WORK = 1 << 22  # tiled for N * D * M <= this, where launch latency dominates a GEMM
FORWARD_PATHS = ("small_batch", "tiled", "cublas_beta", "cublas_epilogue")

# db reduction: a row split has at least this many rows; aim for this many blocks per SM.
COLSUM_MIN_ROWS_PER_SPLIT = 64
COLSUM_BLOCKS_PER_SM = 4

# Kernel argument types, in order: "ptr" a device array, "i64" long long, "i32" int. The launcher
# converts by them, and tests/test_kernels_compile.py checks them against the compiled PTX.
_FORWARD_SIGNATURE = ("ptr", "i64", "i64", "ptr", "i64", "i64", "ptr", "i64", "i32",
                      "ptr", "i64", "i64", "i64")
KERNEL_SIGNATURES = {
    "fill_rows_with_bias": ("ptr", "ptr", "i64", "i64", "i64"),
    "add_bias_to_rows": ("ptr", "ptr", "i64", "i64", "i64"),
    "column_sums": ("ptr", "i64", "i64", "i64", "i64", "i64", "ptr", "i32", "ptr", "ptr"),
    "linear_forward_small_batch": _FORWARD_SIGNATURE,
    "linear_forward_tiled": _FORWARD_SIGNATURE,
}
DTYPE_SUFFIXES = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
                  np.dtype(np.float64): "f64"}
ACCUMULATOR_DTYPES = {np.dtype(np.float16): np.dtype(np.float32),
                      np.dtype(np.float32): np.dtype(np.float32),
                      np.dtype(np.float64): np.dtype(np.float64)}
COMPILE_OPTIONS = ()

# cuBLAS constants (cudaDataType_t from library_types.h, cublasComputeType_t from cublas_api.h,
# cublasOperation_t); fixed by the CUDA ABI. dtype -> (data type, compute type, alpha/beta dtype).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
_CUDA_R_16F, _CUDA_R_32F, _CUDA_R_64F = 2, 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_64F = 68, 70
_CUBLAS_GEMM_DEFAULT = -1
_GEMM_TYPES = {
    np.dtype(np.float16): (_CUDA_R_16F, _CUBLAS_COMPUTE_32F, np.float32),
    np.dtype(np.float32): (_CUDA_R_32F, _CUBLAS_COMPUTE_32F, np.float32),
    np.dtype(np.float64): (_CUDA_R_64F, _CUBLAS_COMPUTE_64F, np.float64),
}
_INT32_MAX = 2**31 - 1

_forced_forward_path = contextvars.ContextVar("fastlinear_cupy_forward_path", default=None)


# --- availability ------------------------------------------------------------------------------

def _probe():
    """Why the backend cannot run here (uncached), or None."""
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
    return None


@functools.cache
def unavailable_reason():
    """None when CuPy imports and sees a CUDA device, else the reason (cached after one call)."""
    return _probe()


# --- pure helpers (no CuPy needed; tested on machines without a GPU) ---------------------------

def kernel_source(paths=None):
    """The CUDA C source handed to NVRTC: every ``.cu`` file, each after a ``#line 1 "path"``."""
    paths = _kernels.kernel_sources() if paths is None else paths
    parts = []
    for path in paths:
        path = pathlib.Path(path)
        quoted = str(path).replace("\\", "\\\\").replace('"', '\\"')
        text = path.read_text(encoding="utf-8")
        parts.append(f'#line 1 "{quoted}"\n{text}' + ("" if text.endswith("\n") else "\n"))
    return "".join(parts)


def blas_layout(shape, strides, itemsize):
    """How cuBLAS can read a 2-D array in place: ``(row_major, leading_dimension)``, else None.

    ``strides`` are in bytes, as NumPy and CuPy give them. A row-major array has contiguous rows
    (column step 1) spaced ``leading_dimension`` elements apart, a column-major one the other way
    round. Anything else (negative or non-unit inner steps, overlapping rows) returns None and is
    copied before the GEMM.
    """
    rows, cols = shape
    if any(stride % itemsize for stride in strides):
        return None
    row_step, col_step = (stride // itemsize for stride in strides)
    if (cols <= 1 or col_step == 1) and (rows <= 1 or row_step >= max(cols, 1)):
        leading = row_step if rows > 1 else max(cols, 1)
        return (True, leading) if leading <= _INT32_MAX else None
    if (rows <= 1 or row_step == 1) and (cols <= 1 or col_step >= max(rows, 1)):
        leading = col_step if cols > 1 else max(rows, 1)
        return (False, leading) if leading <= _INT32_MAX else None
    return None


def gemm_arguments(p_layout, q_layout, n, m, k):
    """cuBLAS arguments ``(transa, transb, m, n, k, lda, ldb, ldc)`` for ``C = P @ Q``.

    ``C`` is row-major ``(n, m)`` and C-contiguous, ``P`` is ``(n, k)``, ``Q`` is ``(k, m)``, with
    layouts from ``blas_layout``. cuBLAS is column-major, and a row-major matrix read
    column-major is its transpose, so it computes ``C.T = Q.T @ P.T``: Q is its A, P its B.
    A row-major operand already is the transpose cuBLAS needs (no op); a column-major one is
    transposed by cuBLAS.
    """
    p_row_major, p_leading = p_layout
    q_row_major, q_leading = q_layout
    transa = CUBLAS_OP_N if q_row_major else CUBLAS_OP_T
    transb = CUBLAS_OP_N if p_row_major else CUBLAS_OP_T
    return transa, transb, m, n, k, q_leading, p_leading, max(m, 1)


def forward_path(n, d, m, w_rows_contiguous):
    """The forward path for ``X (n, d) @ W (d, m)``: one of ``FORWARD_PATHS``.

    The thresholds are unmeasured guesses (see ``SMALL_BATCH_MAX_ROWS`` and ``TILED_MAX_WORK``).
    ``small_batch`` needs W's rows contiguous (a warp reads 32 adjacent elements of a row).
    """
    if n <= SMALL_BATCH_MAX_ROWS and w_rows_contiguous:
        return "small_batch"
    if n * d * m <= TILED_MAX_WORK and math.ceil(n / TILE_ROWS) <= MAX_GRID_Y:
        return "tiled"
    return "cublas_beta"


def forward_launch(path, n, m):
    """``(grid, block)`` of the forward kernel of ``path`` for an ``(n, m)`` output."""
    if path == "small_batch":
        grid = (math.ceil(m / SMALL_BATCH_COLS), math.ceil(n / SMALL_BATCH_ROWS), 1)
        block = (SMALL_BATCH_COLS, SMALL_BATCH_SLICES, 1)
    elif path == "tiled":
        grid = (math.ceil(m / TILE_COLS), math.ceil(n / TILE_ROWS), 1)
        block = (TILE_THREADS, TILE_THREADS, 1)
    else:
        raise ValueError(f"path {path!r} has no kernel of its own")
    if grid[1] > MAX_GRID_Y:
        raise ValueError(f"the {path!r} kernel takes at most {MAX_GRID_Y} row blocks; "
                         f"{n} rows need {grid[1]}")
    return grid, block


def bias_launch(rows, cols, sm_count):
    """``(grid, block)`` of ``fill_rows_with_bias``/``add_bias_to_rows`` for an (rows, cols) Y.

    grid.x covers the columns; grid.y (row stride of the threads) is sized for about 32 blocks
    per SM in all, so that every thread writes several rows.
    """
    grid_x = math.ceil(cols / BIAS_THREADS)
    grid_y = max(1, min(rows, MAX_GRID_Y, (32 * sm_count) // grid_x))
    return (grid_x, grid_y, 1), (BIAS_THREADS, 1, 1)


def column_sum_launch(rows, cols, sm_count):
    """``(grid, block, rows_per_split)`` of ``column_sums`` for a (rows, cols) dY.

    Rows are split over grid.y blocks when the column tiles alone leave SMs idle, keeping at
    least ``COLSUM_MIN_ROWS_PER_SPLIT`` rows in each split; no split is empty.
    """
    col_tiles = math.ceil(cols / COLSUM_LANES)
    target_splits = (COLSUM_BLOCKS_PER_SM * sm_count) // col_tiles
    splits = max(1, min(rows // COLSUM_MIN_ROWS_PER_SPLIT, target_splits, MAX_GRID_Y))
    rows_per_split = max(1, math.ceil(rows / splits))
    splits = max(1, math.ceil(rows / rows_per_split))
    return (col_tiles, splits, 1), (COLSUM_LANES, COLSUM_ROW_LANES, 1), rows_per_split


def element_strides(array):
    """Strides of an array in elements (None if a stride is not a whole number of elements)."""
    if any(stride % array.itemsize for stride in array.strides):
        return None
    return tuple(stride // array.itemsize for stride in array.strides)


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

def _cupy():
    import cupy

    return cupy


@functools.cache
def _module():
    """The RawModule of all kernels (compiled lazily by CuPy, once per device)."""
    return _cupy().RawModule(code=kernel_source(), options=COMPILE_OPTIONS)


@functools.cache
def _kernel(name, device_id):
    return _module().get_function(name)


@functools.cache
def _sm_count(device_id):
    return int(_cupy().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def _device_id():
    return _cupy().cuda.runtime.getDevice()


def _launch(kernel, dtype, grid, block, *args):
    """Launch ``kernel`` for ``dtype`` with ``args`` converted by ``KERNEL_SIGNATURES``."""
    signature = KERNEL_SIGNATURES[kernel]
    if len(args) != len(signature):
        raise TypeError(f"{kernel} takes {len(signature)} arguments, got {len(args)}")
    converted = []
    for kind, value in zip(signature, args, strict=True):
        if kind == "i64":
            converted.append(np.int64(value))
        elif kind == "i32":
            converted.append(np.int32(value))
        else:
            converted.append(value)
    function = _kernel(f"{kernel}_{DTYPE_SUFFIXES[np.dtype(dtype)]}", _device_id())
    function(grid, block, tuple(converted))


def _strided(array):
    """``(array, row_step, col_step)`` for a kernel; copies if a stride is not whole elements."""
    steps = element_strides(array)
    if steps is None:
        array = _cupy().ascontiguousarray(array)
        steps = element_strides(array)
    return array, steps[0], steps[1]


def _blas_operand(array):
    """``(array, layout)`` readable by cuBLAS, copying to C order only when it must."""
    layout = blas_layout(array.shape, array.strides, array.itemsize)
    if layout is None:
        array = _cupy().ascontiguousarray(array)
        layout = (True, max(array.shape[1], 1))
    return array, layout


def _gemm(P, Q, C, beta):
    """``C = P @ Q + beta * C`` by cuBLAS gemmEx; C is C-contiguous, no dimension is zero."""
    from cupy_backends.cuda.libs import cublas

    P, p_layout = _blas_operand(P)
    Q, q_layout = _blas_operand(Q)
    n, k = P.shape
    m = Q.shape[1]
    transa, transb, m, n, k, lda, ldb, ldc = gemm_arguments(p_layout, q_layout, n, m, k)
    data_type, compute_type, scalar_type = _GEMM_TYPES[C.dtype]
    # Host scalars: cuBLAS reads them during the call, so these arrays need only outlive it.
    alpha_value = np.array(1, dtype=scalar_type)
    beta_value = np.array(beta, dtype=scalar_type)
    handle = _cupy().cuda.device.get_cublas_handle()
    pointer_mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    try:
        cublas.gemmEx(handle, transa, transb, m, n, k, alpha_value.ctypes.data,
                      Q.data.ptr, data_type, lda, P.data.ptr, data_type, ldb,
                      beta_value.ctypes.data, C.data.ptr, data_type, ldc,
                      compute_type, _CUBLAS_GEMM_DEFAULT)
    finally:
        cublas.setPointerMode(handle, pointer_mode)


def _vector(array):
    """``(array, step)`` of a 1-D array for a kernel; copies if its stride is not whole elements."""
    steps = element_strides(array)
    if steps is None:
        array = _cupy().ascontiguousarray(array)
        steps = (1,)
    return array, steps[0]


def _bias_pass(kernel, Y, b):
    rows, cols = Y.shape
    grid, block = bias_launch(rows, cols, _sm_count(_device_id()))
    b, b_step = _vector(b)
    _launch(kernel, Y.dtype, grid, block, Y, b, b_step, rows, cols)


def _forward_kernel(path, X, W, b, Y):
    n, d = X.shape
    m = W.shape[1]
    grid, block = forward_launch(path, n, m)
    X, x_row, x_col = _strided(X)
    W, w_row, w_col = _strided(W)
    if b is None:
        bias, b_step, has_bias = Y, 0, 0  # any valid pointer; never read
    else:
        bias, b_step = _vector(b)
        has_bias = 1
    _launch(f"linear_forward_{path}", Y.dtype, grid, block, X, x_row, x_col, W, w_row, w_col,
            bias, b_step, has_bias, Y, n, d, m)


def _forward_device(X, W, b, out):
    cupy = _cupy()
    n, d = X.shape
    m = W.shape[1]
    Y = cupy.empty((n, m), dtype=W.dtype) if out is None else out
    if n == 0 or m == 0:
        return Y
    if d == 0:
        Y[...] = 0 if b is None else b
        return Y
    path = _forced_forward_path.get()
    if path is None:
        w_steps = element_strides(W)
        w_rows_contiguous = w_steps is not None and (m == 1 or w_steps[1] == 1)
        path = forward_path(n, d, m, w_rows_contiguous)
    if path in ("small_batch", "tiled"):
        _forward_kernel(path, X, W, b, Y)
    elif b is None:
        _gemm(X, W, Y, beta=0)
    elif path == "cublas_beta":
        _bias_pass("fill_rows_with_bias", Y, b)
        _gemm(X, W, Y, beta=1)
    else:  # cublas_epilogue
        _gemm(X, W, Y, beta=0)
        _bias_pass("add_bias_to_rows", Y, b)
    return Y


def _column_sums(dY, db, accumulate):
    """``db (+)= dY.sum(0)`` in one launch of ``column_sums``; dY has rows and columns."""
    cupy = _cupy()
    rows, cols = dY.shape
    grid, block, rows_per_split = column_sum_launch(rows, cols, _sm_count(_device_id()))
    dY, row_step, col_step = _strided(dY)
    if grid[1] > 1:
        partials = cupy.empty((grid[1], cols), dtype=ACCUMULATOR_DTYPES[db.dtype])
        tile_counters = cupy.zeros(grid[0], dtype=np.uint32)
    else:
        partials = tile_counters = db  # valid pointers, never read with one split
    _launch("column_sums", db.dtype, grid, block, dY, row_step, col_step, rows, cols,
            rows_per_split, db, int(accumulate), partials, tile_counters)


def _backward_device(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db):
    cupy = _cupy()
    n, d = X.shape
    m = W.shape[1]
    dtype = W.dtype
    if need_dX:
        if dX is None:
            dX = cupy.empty((n, d), dtype=dtype)
        if n and d:
            if m:
                _gemm(dY, W.T, dX, beta=0)
            else:
                dX.fill(0)
    else:
        dX = None
    if dW is None:
        dW = cupy.empty((d, m), dtype=dtype)
    if d and m:
        if n:
            _gemm(X.T, dY, dW, beta=1 if accumulate else 0)
        elif not accumulate:
            dW.fill(0)
    if has_bias:
        if db is None:
            db = cupy.empty(m, dtype=dtype)
        if m:
            if n:
                _column_sums(dY, db, accumulate)
            elif not accumulate:
                db.fill(0)
    else:
        db = None
    return dX, dW, db


def _is_host(array):
    return isinstance(array, np.ndarray)


def _to_device(array):
    return None if array is None else _cupy().asarray(array)


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

def forward(X, W, b, out, *, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` on the GPU; see ``fastlinear.backends`` and this module's docstring.

    NumPy inputs are copied to the device; ``Y`` comes back in the library of ``X``.
    """
    if activation is not None:  # TEMPORARY: activations are to be fused into the kernels
        raise NotImplementedError("cupy backend: fused activations are not implemented yet")
    Y = _forward_device(_to_device(X), _to_device(W), _to_device(b), _device_buffer(out, False))
    return _result(Y, _is_host(X), out)


def backward(dY, X, W, *, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
             saved=None):
    """``dX = dY @ W.T``, ``dW = X.T @ dY``, ``db = dY.sum(0)`` on the GPU; see the module doc.

    NumPy inputs are copied to the device; ``dX`` comes back in the library of ``dY``, ``dW`` and
    ``db`` in the library of ``W`` (a layer's gradients stay where its parameters are).
    """
    if activation is not None:  # TEMPORARY: activations are to be fused into the kernels
        raise NotImplementedError("cupy backend: fused activations are not implemented yet")
    dX_device, dW_device, db_device = _backward_device(
        _to_device(dY), _to_device(X), _to_device(W), has_bias, need_dX, accumulate,
        _device_buffer(dX, False), _device_buffer(dW, accumulate), _device_buffer(db, accumulate))
    return (_result(dX_device, _is_host(dY), dX), _result(dW_device, _is_host(W), dW),
            _result(db_device, _is_host(W), db))
