"""The Numba CPU backend: @njit kernels calling SciPy's BLAS, with the bias and db fused around it.

Method, by shape
----------------
* Forward, every shape: one compiled call fills ``Y`` with the bias rows, then runs BLAS ``?gemm``
  with ``beta=1`` straight into ``Y``: no temporary of ``Y``'s size, no second pass to add ``b``.
  Row-major and column-major (including transposed) operands map to gemm's ``'N'``/``'T'`` flags
  and leading dimensions, so C-order, F-order and sliced views with one unit stride are not
  copied; only operands with no unit stride (or negative strides) are copied.
* Backward, general shapes: gemm for ``dX = dY @ W.T`` and ``dW = X.T @ dY`` (``beta=1`` when
  accumulating, so ``dW += ...`` needs no temporary); ``db`` is summed row by row in the same
  compiled call, while ``dY`` is still in cache, and is a few percent of a gemm.
* Backward, skinny batches (``N <= SKINNY_ROWS``): BLAS turns ``dW = X.T @ dY`` into a zeroing
  pass plus an update pass over ``dW``, and a separate gemv pass over ``W``. A ``prange`` kernel
  walks the rows of ``W`` and ``dW`` once, together: it writes ``dW[d, :]`` and reduces
  ``W[d, :]`` into ``dX[:, d]`` in the same sweep; memory-bound, parallel over rows of ``W``.

Threads: BLAS runs with ``numba.get_num_threads()`` threads (which follows ``NUMBA_NUM_THREADS``
and ``numba.set_num_threads``), set on SciPy's BLAS only through threadpoolctl. BLAS calls and
``prange`` kernels never run at the same time within a call, so they do not oversubscribe. With
Numba's ``workqueue`` threading layer (not thread-safe) ``prange`` kernels are serialised by a
lock; the ``omp`` and ``tbb`` layers run concurrent callers as they are.

Precision: float32 products are accumulated in float32 (as the BLAS does and as the NumPy
reference does); the error stays within ``k * eps * (|x| . |w|)`` for a length-``k`` dot product.

Compilation: kernels are compiled lazily, once per dtype and memory layout, with ``cache=True``
(a new process loads them from Numba's cache). The BLAS routines are reached through symbols
registered with LLVM at import time, so the compiled code holds no process-specific addresses
and can be cached.
"""

import os
import threading

import numpy as np

NAME = "numba"
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)

# Batches of at most this many rows use the fused memory-bound backward kernel.
SKINNY_ROWS = 4
# Below this many multiply-adds BLAS runs single-threaded anyway: skip the thread-count check.
_BLAS_THREADS_MIN_WORK = 1 << 20

try:
    import llvmlite.binding as _llvm_binding
    import numba
    import scipy.linalg.cython_blas  # noqa: F401  (the BLAS the kernels call)
    from llvmlite import ir as _ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import get_cython_function_address, intrinsic
except ImportError as exc:  # the dispatcher imports this module to ask whether it can run
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def unavailable_reason():
    """``None`` when Numba and SciPy import, else why not and what to install."""
    if _IMPORT_ERROR is None:
        return None
    return (f"{_IMPORT_ERROR} (the numba backend needs numba, scipy and threadpoolctl: "
            f'pip install "fastlinear[numba]")')


# ---------------------------------------------------------------------------------------------
# BLAS threads: follow Numba's thread count, on SciPy's BLAS only.

_blas_controllers = None
_blas_lock = threading.Lock()


def _scipy_blas_controllers():
    """threadpoolctl controllers of the BLAS library that SciPy (hence the kernels) uses."""
    global _blas_controllers
    if _blas_controllers is None:
        with _blas_lock:
            if _blas_controllers is None:
                import scipy
                from threadpoolctl import ThreadpoolController

                scipy_dir = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
                prefixes = (os.path.join(scipy_dir, "scipy.libs"),
                            os.path.join(scipy_dir, "scipy", ""))
                controllers = ThreadpoolController().select(user_api="blas").lib_controllers
                _blas_controllers = [c for c in controllers
                                     if os.path.abspath(c.filepath).startswith(prefixes)]
    return _blas_controllers


def _match_blas_threads():
    """Give SciPy's BLAS as many threads as Numba may use (no more: no oversubscription)."""
    wanted = numba.get_num_threads()
    for controller in _scipy_blas_controllers():
        if controller.get_num_threads() != wanted:
            controller.set_num_threads(wanted)


# ---------------------------------------------------------------------------------------------
# Parallel kernels and Numba's threading layer.

_parallel_lock = threading.Lock()
_parallel_layer = []  # the layer name once known


def _run_parallel(kernel, *args):
    """Run a ``prange`` kernel; serialised only where the threading layer is not thread-safe.

    The layer is known only after the first parallel call, so that call holds the lock too.
    """
    if _parallel_layer and _parallel_layer[0] != "workqueue":
        return kernel(*args)
    with _parallel_lock:
        result = kernel(*args)
        if not _parallel_layer:
            _parallel_layer.append(numba.threading_layer())
    return result


if _IMPORT_ERROR is None:
    # ---------------------------------------------------------------------------------------
    # gemm from inside @njit. The symbol names are registered with LLVM in every process
    # before any kernel is linked, so cached machine code resolves them afresh each time.

    _GEMM_SYMBOLS = {np.dtype(np.float32): "fastlinear_scipy_sgemm",
                     np.dtype(np.float64): "fastlinear_scipy_dgemm"}
    for _dtype, _symbol in _GEMM_SYMBOLS.items():
        _routine = "sgemm" if _dtype == np.float32 else "dgemm"
        _llvm_binding.add_symbol(
            _symbol, get_cython_function_address("scipy.linalg.cython_blas", _routine))

    _TRANS_N = ord("N")
    _TRANS_T = ord("T")

    @intrinsic
    def _gemm(typingctx, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        """Column-major ``C = alpha op(A) op(B) + beta C`` (Fortran BLAS ?gemm, LP64 ints).

        ``a``, ``b``, ``c`` are arrays whose data pointer is the first matrix element; the
        ``trans_*`` arguments are the ASCII codes of ``'N'``/``'T'``.
        """
        symbol = _GEMM_SYMBOLS[np.dtype(str(c.dtype))]
        sig = types.void(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

        def codegen(context, builder, signature, args):
            (ta, tb, m_, n_, k_, alpha_, a_, lda_, b_, ldb_, beta_, c_, ldc_) = args
            arg_types = signature.args
            real = context.get_value_type(c.dtype)
            char_t, int_t = _ir.IntType(8), _ir.IntType(32)
            voidptr = _ir.IntType(8).as_pointer()

            def by_reference(value, from_type, to_llvm, to_type=None):
                slot = cgutils.alloca_once(builder, to_llvm)
                if to_type is not None:
                    value = context.cast(builder, value, from_type, to_type)
                else:
                    value = builder.trunc(value, to_llvm)
                builder.store(value, slot)
                return builder.bitcast(slot, voidptr)

            def data(value, array_type):
                array = context.make_array(array_type)(context, builder, value)
                return builder.bitcast(array.data, voidptr)

            call_args = [
                by_reference(ta, arg_types[0], char_t),
                by_reference(tb, arg_types[1], char_t),
                by_reference(m_, arg_types[2], int_t),
                by_reference(n_, arg_types[3], int_t),
                by_reference(k_, arg_types[4], int_t),
                by_reference(alpha_, arg_types[5], real, c.dtype),
                data(a_, arg_types[6]),
                by_reference(lda_, arg_types[7], int_t),
                data(b_, arg_types[8]),
                by_reference(ldb_, arg_types[9], int_t),
                by_reference(beta_, arg_types[10], real, c.dtype),
                data(c_, arg_types[11]),
                by_reference(ldc_, arg_types[12], int_t),
            ]
            fnty = _ir.FunctionType(_ir.VoidType(), [voidptr] * 13)
            fn = cgutils.get_or_insert_function(builder.module, fnty, symbol)
            builder.call(fn, call_args)
            return context.get_dummy_value()

        return sig, codegen

    @njit(cache=True)
    def _blas_operand(A):
        """How BLAS can read row-major ``A`` (r x c) as the column-major matrix ``A.T``.

        Returns ``(trans, ld)``: ``'N'`` when rows are contiguous (``A.T`` column-major with
        leading dimension = row stride), ``'T'`` when columns are (``A`` itself column-major),
        or ``(0, 0)`` when neither holds (no unit stride, negative or odd strides): copy then.
        """
        rows, cols = A.shape
        size = A.itemsize
        row_stride, col_stride = A.strides
        if row_stride % size or col_stride % size:
            return 0, 0
        row_stride //= size
        col_stride //= size
        if cols == 1 or col_stride == 1:
            ld = row_stride if rows > 1 else max(cols, 1)
            if ld >= max(cols, 1):
                return _TRANS_N, ld
        if rows == 1 or row_stride == 1:
            ld = col_stride if cols > 1 else max(rows, 1)
            if ld >= max(rows, 1):
                return _TRANS_T, ld
        return 0, 0

    @njit(cache=True)
    def _matmul_into(A, B, C, beta):
        """Row-major ``C = A @ B + beta * C`` (``C`` C-contiguous; ``A``, ``B`` any layout).

        Row-major ``C`` is column-major ``C.T = B.T @ A.T``: gemm with B first.
        """
        rows, inner = A.shape
        cols = B.shape[1]
        if rows == 0 or cols == 0:
            return
        if inner == 0:
            if beta == 0.0:
                C[:, :] = 0.0
            return
        trans_a, ld_a = _blas_operand(A)
        if trans_a == 0:
            A = np.ascontiguousarray(A)
            trans_a, ld_a = _blas_operand(A)
        trans_b, ld_b = _blas_operand(B)
        if trans_b == 0:
            B = np.ascontiguousarray(B)
            trans_b, ld_b = _blas_operand(B)
        _gemm(trans_b, trans_a, cols, rows, inner, 1.0, B, ld_b, A, ld_a, beta, C, cols)

    @njit(cache=True)
    def _forward_kernel(X, W, b, Y):
        """``Y = X @ W + b``: bias rows written first, then gemm adds the product (beta=1)."""
        if b is None:
            _matmul_into(X, W, Y, 0.0)
            return
        rows, cols = Y.shape
        for i in range(rows):
            for j in range(cols):
                Y[i, j] = b[j]
        _matmul_into(X, W, Y, 1.0)

    @njit(cache=True)
    def _backward_kernel(dY, X, W, dX, dW, db, accumulate):
        """dX = dY @ W.T (if dX given), db (+)= dY.sum(0) (if db given), dW (+)= X.T @ dY."""
        if dX is not None:
            _matmul_into(dY, W.T, dX, 0.0)
        if db is not None:
            rows, cols = dY.shape
            if not accumulate:
                db[:] = 0.0
            # Row by row: each pass is a contiguous, vectorised add of one dY row.
            for i in range(rows):
                for j in range(cols):
                    db[j] += dY[i, j]
        _matmul_into(X.T, dY, dW, 1.0 if accumulate else 0.0)

    @njit(cache=True, parallel=True)
    def _skinny_backward_kernel(dY, X, W, dX, dW, db, accumulate):
        """Backward for few rows N, one sweep over the rows of W and dW.

        Each parallel task owns one row d of W (length M) and the same row of dW: it writes
        ``dW[d, :] (+)= sum_n X[n, d] * dY[n, :]`` and reduces ``dX[n, d] = dY[n, :] . W[d, :]``.
        W and dW are streamed once; dY (N x M) and X's column stay in cache.
        """
        rows, cols = dY.shape
        depth = W.shape[0]
        for d in prange(depth):
            if dX is not None:
                for n in range(rows):
                    total = W.dtype.type(0.0)
                    for j in range(cols):
                        total += dY[n, j] * W[d, j]
                    dX[n, d] = total
            if not accumulate:
                for j in range(cols):
                    dW[d, j] = 0.0
            for n in range(rows):
                scale = X[n, d]
                for j in range(cols):
                    dW[d, j] += scale * dY[n, j]
        if db is not None:
            if not accumulate:
                db[:] = 0.0
            for n in range(rows):
                for j in range(cols):
                    db[j] += dY[n, j]


def forward(X, W, b, out):
    """``Y = X @ W + b`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    N, D = X.shape
    M = W.shape[1]
    Y = np.empty((N, M), dtype=W.dtype) if out is None else out
    if N * D * M >= _BLAS_THREADS_MIN_WORK:
        _match_blas_threads()
    _forward_kernel(X, W, b, Y)
    return Y


def backward(dY, X, W, *, has_bias, need_dX, accumulate, dX, dW, db):
    """``dX = dY @ W.T``, ``dW = X.T @ dY``, ``db = dY.sum(0)``; see ``fastlinear.backends``."""
    N, D = X.shape
    M = W.shape[1]
    dtype = W.dtype
    if need_dX and dX is None:
        dX = np.empty((N, D), dtype=dtype)
    if not need_dX:
        dX = None
    if dW is None:
        dW = np.empty((D, M), dtype=dtype)
    if has_bias:
        if db is None:
            db = np.empty(M, dtype=dtype)
    else:
        db = None
    if 0 < N <= SKINNY_ROWS and W.strides[1] == W.itemsize and dY.strides[1] == dY.itemsize:
        _run_parallel(_skinny_backward_kernel, dY, X, W, dX, dW, db, accumulate)
    else:
        if N * D * M >= _BLAS_THREADS_MIN_WORK:
            _match_blas_threads()
        _backward_kernel(dY, X, W, dX, dW, db, accumulate)
    return dX, dW, db
