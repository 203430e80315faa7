"""Launch plans of the cupy backend: block shapes, path choice, grids, cuBLAS argument mapping.

Pure functions of shapes, strides and constants: no CuPy needed, so the tests check them on any
machine. The block shapes and activation codes here are the only copy: ``compile_options``
hands them to NVRTC (and the tests to nvcc and g++) as ``-D`` defines, and ``kernels/linear.cu``
refuses to compile without them.
"""

import dataclasses
import math
import pathlib

import numpy as np

from fastlinear import _kernels, activations

# Block shapes of kernels/linear.cu (see the comment above each kernel there).
BLOCK_SHAPES = {
    "BIAS_THREADS": 256,
    "COLSUM_LANES": 32,
    "COLSUM_ROW_LANES": 8,
    "SMALL_BATCH_ROWS": 8,
    "SMALL_BATCH_COLS": 32,
    "SMALL_BATCH_SLICES": 8,
    "SMALL_BATCH_CHUNK": 256,
    "TILE_ROWS": 64,
    "TILE_COLS": 64,
    "TILE_DEPTH": 16,
    "TILE_THREADS": 16,
}
BIAS_THREADS = BLOCK_SHAPES["BIAS_THREADS"]
COLSUM_LANES = BLOCK_SHAPES["COLSUM_LANES"]
COLSUM_ROW_LANES = BLOCK_SHAPES["COLSUM_ROW_LANES"]
SMALL_BATCH_ROWS = BLOCK_SHAPES["SMALL_BATCH_ROWS"]
SMALL_BATCH_COLS = BLOCK_SHAPES["SMALL_BATCH_COLS"]
SMALL_BATCH_SLICES = BLOCK_SHAPES["SMALL_BATCH_SLICES"]
TILE_ROWS = BLOCK_SHAPES["TILE_ROWS"]
TILE_COLS = BLOCK_SHAPES["TILE_COLS"]
TILE_DEPTH = BLOCK_SHAPES["TILE_DEPTH"]
TILE_THREADS = BLOCK_SHAPES["TILE_THREADS"]
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y

# The kernels' activation argument: 0 for none, then the names of fastlinear.activations.
ACTIVATION_CODES = activations.ACTIVATION_CODES
# The formulas' constants, from fastlinear.activations (repr keeps every digit of a double).
ACTIVATION_CONSTANTS = {
    "FASTLINEAR_GELU_TANH_BETA": activations.GELU_TANH_BETA,
    "FASTLINEAR_GELU_TANH_KAPPA": activations.GELU_TANH_KAPPA,
    "FASTLINEAR_SQRT1_2": activations.SQRT1_2,
    "FASTLINEAR_INV_SQRT_2PI": activations.INV_SQRT_2PI,
    "FASTLINEAR_GELU_CLAMP": activations.GELU_CLAMP,
}


def kernel_defines():
    """``{name: value}`` of every ``-D`` define that kernels/linear.cu needs."""
    defines = {name: str(value) for name, value in BLOCK_SHAPES.items()}
    for name, code in ACTIVATION_CODES.items():
        defines[f"FASTLINEAR_ACT_{(name or 'none').upper()}"] = str(code)
    defines.update({name: repr(float(value)) for name, value in ACTIVATION_CONSTANTS.items()})
    return defines


def compile_options():
    """Options for NVRTC (and nvcc): the defines of ``kernel_defines`` as ``-DNAME=VALUE``."""
    return tuple(f"-D{name}={value}" for name, value in kernel_defines().items())


# The forward path rule's numbers. NOT MEASURED YET (this code was written without a GPU): each
# is a named default that a measured value replaces (``apply_thresholds``; measured on a GPU by
# ``fastlinear.backends.cupy_tune.measure_thresholds`` from the forced-path table).
@dataclasses.dataclass(frozen=True)
class PathThresholds:
    """The numbers of ``forward_path``'s rule (all positive ints).

    small_batch_max_rows
        ``small_batch`` for N <= this (one block row of 8 rows), when W's rows are contiguous.
    own_kernel_max_inner
        Our kernels walk all of D in each block, 16 (tiled) or 256 (small_batch) columns per
        step, with no prefetch: a step costs a global-memory round trip. They are taken for
        D <= this (16 steps of 16), where one fused launch beats cuBLAS's GEMM plus epilogue;
        for longer D only ``small_batch`` with at least half the SMs busy (a GEMV streaming W).
    tiled_max_work
        ``tiled`` for N * D * M <= this, where launch latency dominates a GEMM.
    """

    small_batch_max_rows: int = 8
    own_kernel_max_inner: int = 256
    tiled_max_work: int = 1 << 22


DEFAULT_THRESHOLDS = PathThresholds()
_thresholds = DEFAULT_THRESHOLDS
FORWARD_PATHS = ("small_batch", "tiled", "cublas")


def current_thresholds():
    """``{name: value}`` of the forward path rule's thresholds in force in this process."""
    return dataclasses.asdict(_thresholds)


def apply_thresholds(values=None):
    """Put ``values`` (``{name: int}``, e.g. a stored profile) in force; return them all.

    Names missing from ``values`` take their defaults (``DEFAULT_THRESHOLDS``); ``None`` or
    ``{}`` restores the defaults. An unknown name or a value that is not a positive int raises
    ``ValueError`` and changes nothing.
    """
    global _thresholds
    values = dict(values or {})
    known = [field.name for field in dataclasses.fields(PathThresholds)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown cupy path threshold(s) {unknown}: expected names from "
                         f"{known}")
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"cupy path threshold {name} must be a positive int, got "
                             f"{value!r}")
    _thresholds = PathThresholds(**{name: int(value) for name, value in values.items()})
    return current_thresholds()


# db reduction: a row split has at least this many rows; aim for this many blocks per SM.
COLSUM_MIN_ROWS_PER_SPLIT = 64
COLSUM_BLOCKS_PER_SM = 4

# Kernel argument types, in order: "ptr" a device array, "i64" long long, "i32" int. The launcher
# converts by them, and tests/test_kernels_compile.py checks them against the compiled PTX.
_FORWARD_SIGNATURE = ("ptr", "i64", "i64", "ptr", "i64", "i64", "ptr", "i64", "i32",
                      "ptr", "i64", "i64", "i64", "i32", "ptr", "i32")
KERNEL_SIGNATURES = {
    "fill_rows_with_bias": ("ptr", "ptr", "i64", "i64", "i64"),
    "bias_activation_epilogue": ("ptr", "ptr", "i64", "i32", "i32", "ptr", "i32", "i64",
                                 "i64"),
    "gradient_column_sums": ("ptr", "i64", "i64", "ptr", "i64", "i64", "i32", "ptr", "i64",
                             "i64", "i64", "ptr", "i32", "i32", "ptr", "ptr"),
    "linear_forward_small_batch": _FORWARD_SIGNATURE,
    "linear_forward_tiled": _FORWARD_SIGNATURE,
}
DTYPE_SUFFIXES = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32",
                  np.dtype(np.float64): "f64"}
ACCUMULATOR_DTYPES = {np.dtype(np.float16): np.dtype(np.float32),
                      np.dtype(np.float32): np.dtype(np.float32),
                      np.dtype(np.float64): np.dtype(np.float64)}

# cuBLAS constants (cudaDataType_t from library_types.h, cublasComputeType_t from cublas_api.h,
# cublasOperation_t); fixed by the CUDA ABI. dtype -> (data type, compute type, alpha/beta dtype).
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
_CUDA_R_16F, _CUDA_R_32F, _CUDA_R_64F = 2, 0, 1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_64F = 68, 70
CUBLAS_GEMM_DEFAULT = -1
# cublasMath_t flag: split-K partial sums of a float16 GEMM stay float32 (cuBLAS's default math
# mode may reduce them in float16). The backend ORs it into the handle's mode for float16 GEMMs.
CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16
GEMM_TYPES = {
    np.dtype(np.float16): (_CUDA_R_16F, _CUBLAS_COMPUTE_32F, np.float32),
    np.dtype(np.float32): (_CUDA_R_32F, _CUBLAS_COMPUTE_32F, np.float32),
    np.dtype(np.float64): (_CUDA_R_64F, _CUBLAS_COMPUTE_64F, np.float64),
}
# cublasGemmEx takes m, n, k and the leading dimensions as C ints.
GEMM_MAX_DIM = 2**31 - 1


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
    round. Anything else (negative or non-unit inner steps, overlapping rows, a leading dimension
    beyond a C int) returns None and is copied before the GEMM.
    """
    rows, cols = shape
    row_stride, col_stride = strides
    if row_stride % itemsize or col_stride % itemsize:
        return None
    row_step, col_step = row_stride // itemsize, col_stride // itemsize
    if (cols <= 1 or col_step == 1) and (rows <= 1 or row_step >= max(cols, 1)):
        leading = row_step if rows > 1 else max(cols, 1)
        return (True, leading) if leading <= GEMM_MAX_DIM else None
    if (rows <= 1 or row_step == 1) and (cols <= 1 or col_step >= max(rows, 1)):
        leading = col_step if cols > 1 else max(rows, 1)
        return (False, leading) if leading <= GEMM_MAX_DIM else None
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


def gemm_chunks(extent, limit=None):
    """``[(start, stop), ...]`` covering ``range(extent)`` in pieces of at most ``limit``
    (default ``GEMM_MAX_DIM``): how a GEMM dimension beyond a C int is split."""
    limit = GEMM_MAX_DIM if limit is None else limit
    return [(start, min(start + limit, extent)) for start in range(0, extent, limit)]


def forward_path(n, d, m, w_rows_contiguous, sm_count):
    """The forward path for ``X (n, d) @ W (d, m)``: one of ``FORWARD_PATHS``.

    Our kernels need W's rows contiguous (a warp reads adjacent elements of a row of W; a
    column-major W is read uncoalesced) and, as neither splits D, a short D
    (``PathThresholds.own_kernel_max_inner``); the one exception is ``small_batch`` with a grid
    that keeps at least half the SMs busy, a GEMV that streams W. Everything else is cuBLAS's.
    """
    limits = _thresholds
    if not w_rows_contiguous:
        return "cublas"
    short_inner = d <= limits.own_kernel_max_inner
    if n <= limits.small_batch_max_rows:
        if short_inner or 2 * math.ceil(m / SMALL_BATCH_COLS) >= sm_count:
            return "small_batch"
    if short_inner and n * d * m <= limits.tiled_max_work \
            and math.ceil(n / TILE_ROWS) <= MAX_GRID_Y:
        return "tiled"
    return "cublas"


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


def _lanes(cols, widest):
    """Threads of a block along the columns: ``widest``, or for fewer columns the power of two
    that covers them, so that narrow outputs put the other threads on rows."""
    return widest if cols >= widest else 1 << max(cols - 1, 0).bit_length()


def rows_launch(rows, cols, sm_count):
    """``(grid, block)`` of the row-wise passes (``fill_rows_with_bias``,
    ``bias_activation_epilogue``) over an (rows, cols) Y.

    A block has ``BIAS_THREADS`` threads: ``block.x`` along the columns (all of them up to
    ``BIAS_THREADS``, fewer for narrow outputs, see ``_lanes``), ``block.y`` along the rows.
    grid.x covers the columns; grid.y (row stride of the threads) is sized for about 32 blocks
    per SM in all, so that every thread walks several rows.
    """
    lanes = _lanes(cols, BIAS_THREADS)
    row_lanes = BIAS_THREADS // lanes
    grid_x = math.ceil(cols / lanes)
    grid_y = max(1, min(math.ceil(rows / row_lanes), MAX_GRID_Y, (32 * sm_count) // grid_x))
    return (grid_x, grid_y, 1), (lanes, row_lanes, 1)


def column_sum_launch(rows, cols, sm_count):
    """``(grid, block, rows_per_split)`` of ``gradient_column_sums`` for a (rows, cols) dY.

    A block has ``COLSUM_LANES * COLSUM_ROW_LANES`` threads: ``block.x`` along the columns
    (``COLSUM_LANES``, fewer for narrow outputs, see ``_lanes``), ``block.y`` (a power of two)
    along the rows. Rows are split over grid.y blocks when the column tiles alone leave SMs
    idle, keeping at least ``COLSUM_MIN_ROWS_PER_SPLIT`` rows in each split; no split is empty.
    """
    lanes = _lanes(cols, COLSUM_LANES)
    col_tiles = math.ceil(cols / lanes)
    target_splits = (COLSUM_BLOCKS_PER_SM * sm_count) // col_tiles
    splits = max(1, min(rows // COLSUM_MIN_ROWS_PER_SPLIT, target_splits, MAX_GRID_Y))
    rows_per_split = max(1, math.ceil(rows / splits))
    splits = max(1, math.ceil(rows / rows_per_split))
    block = (lanes, COLSUM_LANES * COLSUM_ROW_LANES // lanes, 1)
    return (col_tiles, splits, 1), block, rows_per_split


def element_strides(array):
    """Strides of an array in elements (None if a stride is not a whole number of elements)."""
    itemsize = array.itemsize
    if any(stride % itemsize for stride in array.strides):
        return None
    return tuple(stride // itemsize for stride in array.strides)


def matrix_steps(array):
    """``(row_step, col_step)`` of a 2-D array in elements, or None if a stride is not a whole
    number of elements (``element_strides`` for the per-call path: no generators)."""
    row_stride, col_stride = array.strides
    itemsize = array.itemsize
    if row_stride % itemsize or col_stride % itemsize:
        return None
    return row_stride // itemsize, col_stride // itemsize
