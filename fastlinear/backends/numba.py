"""The Numba CPU backend: @njit kernels around the BLAS, with the bias and db fused into the call.

Method, by shape
----------------
* Forward, N >= 2: one compiled call fills ``Y`` with the bias rows, then runs BLAS ``?gemm``
  with ``beta=1`` straight into ``Y``: no temporary of ``Y``'s size and no separate bias pass
  over the product (numpy's ``X @ W + b`` makes both). Row-major and column-major (including
  transposed) operands map to gemm's ``'N'``/``'T'`` flags and leading dimensions, so C-order,
  F-order and sliced views with one unit stride are not copied; only operands with no unit
  stride (or a negative one) are copied, inside the compiled call.
* Forward, N = 1: ``?gemv`` (``beta=1`` on the bias), which streams ``W`` at memory speed, where
  gemm with one column is ~3x slower (1.4 ms against 4.2 ms at D = M = 4096, float32).
* Backward, N > ``SKINNY_ROWS``: gemm for ``dX = dY @ W.T`` and ``dW = X.T @ dY`` (``beta=1``
  when accumulating, so ``dW += ...`` needs no temporary); ``db`` is summed row by row in the
  same compiled call, a pass over ``dY`` that costs about 1% of the gemms.
* Backward, N <= ``SKINNY_ROWS`` and ``W`` not tiny: memory-bound (``dW`` is an outer
  product). BLAS would zero ``dW``, update it, and read ``W`` in a separate gemv. One ``prange``
  kernel instead walks the rows of ``W`` and ``dW`` together, once: parallel over rows of ``W``,
  or on the calling thread alone right after a skinny forward (``BLAS_SPIN_SECONDS``: OpenBLAS's
  workers still spin then, and sharing the cores with them made the parallel run slower).

BLAS: NumPy's own OpenBLAS (the one ``X @ W`` uses), called from ``@njit`` through its address,
passed at run time, so the machine code holds no process-specific address and is cached. One
BLAS in the process means one thread pool: OpenBLAS workers spin-wait after each call, and two
pools (NumPy's and SciPy's) alternating on the same cores slow each other down several times.
SciPy's ``cython_blas`` (LP64) is the fallback where NumPy's BLAS symbols are not found.

Threads: BLAS runs with ``numba.get_num_threads()`` threads (which follows ``NUMBA_NUM_THREADS``
and ``numba.set_num_threads``), set through threadpoolctl when it differs. BLAS calls and
``prange`` kernels never run at the same time within a call, so they do not oversubscribe. With
Numba's ``workqueue`` threading layer (not thread-safe) ``prange`` kernels are serialised by a
lock; the ``omp`` and ``tbb`` layers run concurrent callers as they are.

Precision: float32 products and sums are accumulated in float32 (as the BLAS and the NumPy
reference do); the error stays within ``k * eps * (|x| . |w|)`` for a length-``k`` dot product.

Compilation: kernels are compiled lazily, once per dtype and memory layout, with ``cache=True``
(a new process loads them from Numba's cache).
"""

import os
import threading
import time

import numpy as np

from fastlinear import activations

NAME = "numba"
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)

# Batches of at most this many rows use the fused memory-bound backward kernel, when W has at
# least SKINNY_MIN_WEIGHTS elements (below that, starting the threads costs more than it saves:
# (1, 64, 64) takes 4.9 us there against 1.5 us through BLAS; (1, 1024, 1024) 84 us against 740).
SKINNY_ROWS = 4
SKINNY_MIN_WEIGHTS = 1 << 17
# From this many multiply-adds on, each call checks that the BLAS thread count follows Numba's
# (numba.get_num_threads() costs 0.8 us, under 1% of such a call). The setting persists, so
# smaller calls follow it too once one large call has run.
_BLAS_THREADS_MIN_WORK = 1 << 23
# OpenBLAS's worker threads spin-wait after each call (2**28 cycles by default, about 0.1 s). A
# prange kernel started in that window shares the cores with them: the skinny backward at
# (1, 4096, 4096) float32 took 10-22 ms right after a gemv, 6 ms 0.1 s later, and a serial build
# of the same kernel a steady 10.5 ms. So the skinny backward runs serially when this backend's
# skinny-sized forward (a gemv/gemm) ran less than this long ago, as in a training step.
BLAS_SPIN_SECONDS = 0.1
_last_skinny_forward = [-float("inf")]  # perf_counter() at the end of the last one

try:
    import numba
    import scipy  # noqa: F401  (its cython_blas is the fallback BLAS; imported when needed)
    import threadpoolctl  # noqa: F401
    from llvmlite import ir as _ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.core.imputils import impl_ret_borrowed
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
# Which BLAS the kernels call, and its threads.
#
# NumPy's own BLAS is preferred: it is the BLAS that ``X @ W`` uses, so there is one thread pool
# in the process (two OpenBLAS pools that both spin-wait after a call fight over the cores when
# NumPy and fastlinear calls alternate). SciPy's ``cython_blas`` is the fallback (LP64 ints).

# Symbol templates of NumPy's BLAS (OpenBLAS, ILP64 in NumPy's wheels) and their int width.
_NUMPY_BLAS_SYMBOLS = (("scipy_{}_64_", 64), ("{}_64_", 64), ("{}64_", 64))
_ROUTINES = ("gemm", "gemv")

_blas = {}  # "routines": {(routine, dtype): (address, int bits)}, "controllers": threadpoolctl's
_blas_lock = threading.Lock()


def _routine_names(dtype):
    return {name: ("s" if dtype == np.float32 else "d") + name for name in _ROUTINES}


def _find_blas():
    """Find gemm and gemv (NumPy's BLAS, else SciPy's) and that BLAS's threadpoolctl controller."""
    import ctypes

    from threadpoolctl import ThreadpoolController

    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    for controller in controllers:
        if not os.path.abspath(controller.filepath).startswith((numpy_dir + os.sep,
                                                               numpy_dir + ".libs")):
            continue
        for template, bits in _NUMPY_BLAS_SYMBOLS:
            try:
                routines = {
                    (name, dtype): (ctypes.cast(getattr(controller.dynlib, template.format(
                        symbol)), ctypes.c_void_p).value, bits)
                    for dtype in DTYPES for name, symbol in _routine_names(dtype).items()}
            except AttributeError:
                continue
            return routines, [controller]
    import scipy
    import scipy.linalg.cython_blas  # noqa: F401

    routines = {(name, dtype): (get_cython_function_address("scipy.linalg.cython_blas", symbol),
                                32)
                for dtype in DTYPES for name, symbol in _routine_names(dtype).items()}
    scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))
    own = [c for c in controllers
           if os.path.abspath(c.filepath).startswith((scipy_dir + os.sep, scipy_dir + ".libs"))]
    return routines, own


_routines_by_dtype = {}  # dtype -> (gemm address, gemv address, int bits): one lookup per call


def _routines(dtype):
    """``(gemm address, gemv address, int bits)`` of the BLAS the kernels call for ``dtype``."""
    with _blas_lock:
        if "routines" not in _blas:
            _blas["routines"], _blas["controllers"] = _find_blas()
        routines = _blas["routines"]
    found = (routines["gemm", dtype][0], routines["gemv", dtype][0], routines["gemm", dtype][1])
    _routines_by_dtype[dtype] = found
    return found


def _match_blas_threads():
    """Give the BLAS as many threads as Numba may use (no more: no oversubscription)."""
    wanted = numba.get_num_threads()
    for controller in _blas["controllers"]:
        if controller.get_num_threads() != wanted:
            controller.set_num_threads(wanted)


# ---------------------------------------------------------------------------------------------
# Parallel kernels and Numba's threading layer.

_parallel_lock = threading.Lock()
_parallel_layer = []  # [layer name, id of the process that started it] once known


def _parallel_usable():
    """False in a child forked after GNU OpenMP started: its next parallel region would abort.

    The callers then take the BLAS path (OpenBLAS is fork-safe).
    """
    return not _parallel_layer or _parallel_layer[0] != "omp" or (
        _parallel_layer[1] == os.getpid())


def _run_on_one_thread(kernel, *args):
    """Run a ``prange`` kernel on the calling thread only (Numba's thread count is per thread)."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return _run_parallel(kernel, *args)
    finally:
        numba.set_num_threads(threads)


def _run_parallel(kernel, *args):
    """Run a ``prange`` kernel; serialised only where the threading layer is not thread-safe.

    The layer is known only after the first parallel call, so that call holds the lock too.
    """
    if _parallel_layer and _parallel_layer[0] != "workqueue":
        return kernel(*args)
    with _parallel_lock:
        result = kernel(*args)
        if not _parallel_layer:
            try:
                _parallel_layer[:] = [numba.threading_layer(), os.getpid()]
            except ValueError:  # no parallel region ran yet: stay serialised, ask next time
                pass
    return result


if _IMPORT_ERROR is None:
    # ---------------------------------------------------------------------------------------
    # gemm from inside @njit. Its address and int width come as arguments at run time, so the
    # machine code holds no process-specific address and can be cached.

    _TRANS_N = ord("N")
    _TRANS_T = ord("T")

    def _blas_codegen(kinds, dtype):
        """Code that calls a Fortran BLAS routine: every argument by reference.

        The intrinsic's arguments are ``(routine, int_bits, *blas_args)``: the routine's address,
        the width of its ints (32: LP64, 64: ILP64), then the BLAS arguments, whose ``kinds``
        are ``c`` (a char, given as its ASCII code), ``i`` (a BLAS int), ``r`` (a real of
        ``dtype``) or ``a`` (an array: its data pointer, the first element, is passed).
        """

        def codegen(context, builder, signature, args):
            voidptr = _ir.IntType(8).as_pointer()
            real = context.get_value_type(dtype)
            routine, int_bits = args[:2]
            blas_args = list(zip(kinds, args[2:], signature.args[2:], strict=True))

            def by_reference(value, llvm_type, value_type=None):
                slot = cgutils.alloca_once(builder, llvm_type)
                if value_type is not None:
                    value = context.cast(builder, value, value_type, dtype)
                elif value.type.width < llvm_type.width:
                    value = builder.sext(value, llvm_type)
                else:
                    value = builder.trunc(value, llvm_type)
                builder.store(value, slot)
                return builder.bitcast(slot, voidptr)

            fixed = {}  # position -> pointer, for arguments that do not depend on the int width
            for position, (kind, value, value_type) in enumerate(blas_args):
                if kind == "c":
                    fixed[position] = by_reference(value, _ir.IntType(8))
                elif kind == "r":
                    fixed[position] = by_reference(value, real, value_type)
                elif kind == "a":
                    array = context.make_array(value_type)(context, builder, value)
                    fixed[position] = builder.bitcast(array.data, voidptr)
            fnty = _ir.FunctionType(_ir.VoidType(), [voidptr] * len(kinds))
            function = builder.inttoptr(routine, fnty.as_pointer())

            def call(int_type):
                pointers = [fixed[position] if kind != "i" else by_reference(value, int_type)
                            for position, (kind, value, _) in enumerate(blas_args)]
                builder.call(function, pointers)

            is_lp64 = builder.icmp_signed("==", int_bits, int_bits.type(32))
            with builder.if_else(is_lp64) as (lp64, ilp64):
                with lp64:
                    call(_ir.IntType(32))
                with ilp64:
                    call(_ir.IntType(64))
            return context.get_dummy_value()

        return codegen

    @intrinsic
    def _gemm(typingctx, routine, int_bits, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
              beta, c, ldc):
        """Column-major ``C = alpha op(A) op(B) + beta C``: Fortran BLAS ``?gemm``."""
        sig = types.void(routine, int_bits, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb,
                         beta, c, ldc)
        return sig, _blas_codegen("cciiiraiairai", c.dtype)

    @intrinsic
    def _gemv(typingctx, routine, int_bits, trans, m, n, alpha, a, lda, x, incx, beta, y, incy):
        """Column-major ``y = alpha op(A) x + beta y``: Fortran BLAS ``?gemv``."""
        sig = types.void(routine, int_bits, trans, m, n, alpha, a, lda, x, incx, beta, y, incy)
        return sig, _blas_codegen("ciiraiairai", y.dtype)

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
    def _matmul_into(routine, int_bits, A, B, C, beta):
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
        _gemm(routine, int_bits, trans_b, trans_a, cols, rows, inner, 1.0, B, ld_b, A, ld_a, beta,
              C, cols)

    @njit(cache=True)
    def _row_times_matrix(gemv, int_bits, x, W, y, beta):
        """``y = x @ W + beta * y``, one row ``x`` (D,), ``W`` (D, M), ``y`` (M,) contiguous.

        Row-major ``W`` is column-major ``W.T`` (M x D): ``y = W.T x`` is gemv ``'N'`` on it.
        """
        trans, ld = _blas_operand(W)
        if trans == 0:
            W = np.ascontiguousarray(W)
            trans, ld = _blas_operand(W)
        step = x.strides[0] // x.itemsize
        if step <= 0 or x.strides[0] % x.itemsize:
            x = np.ascontiguousarray(x)
            step = 1
        depth, cols = W.shape
        if trans == _TRANS_N:
            _gemv(gemv, int_bits, _TRANS_N, cols, depth, 1.0, W, ld, x, step, beta, y, 1)
        else:  # W is column-major (D x M): y = W.T x is gemv 'T' on it
            _gemv(gemv, int_bits, _TRANS_T, depth, cols, 1.0, W, ld, x, step, beta, y, 1)

    @intrinsic
    def _assume_contiguous(typingctx, vector):
        """The 1-D array ``vector`` typed as C-contiguous, so loops over it vectorise.

        Only for vectors whose stride the caller checked is one element (or of length <= 1):
        a C-typed array is indexed as if it were contiguous. Same data, no copy.
        """
        result = vector.copy(layout="C")

        def codegen(context, builder, signature, args):
            return impl_ret_borrowed(context, builder, signature.return_type, args[0])

        return result(vector), codegen

    @njit(cache=True)
    def _is_contiguous(vector):
        return vector.shape[0] <= 1 or vector.strides[0] == vector.itemsize

    @njit(cache=True)
    def _fill_rows(Y, row):
        """Every row of ``Y`` (C-contiguous) = ``row``."""
        for i in range(Y.shape[0]):
            target = Y[i]
            for j in range(Y.shape[1]):
                target[j] = row[j]

    @njit(cache=True)
    def _add_rows(total, A):
        """``total += A.sum(0)``, row by row: each step a contiguous, vectorised add."""
        for i in range(A.shape[0]):
            if _is_contiguous(A[i]):
                row = _assume_contiguous(A[i])
                for j in range(A.shape[1]):
                    total[j] += row[j]
            else:
                for j in range(A.shape[1]):
                    total[j] += A[i, j]


# ---------------------------------------------------------------------------------------------
# The kernels the entry points call. Each is compiled for one explicit signature per dtype and
# present/absent optional array: inputs typed as read-only arrays of any layout ('A'; C- and
# F-order arrays convert to it at the call, no copy; the conversion costs the dispatcher 0.05 us),
# outputs as C-contiguous. So a dtype costs at most a handful of compilations whatever layouts
# come, instead of one per layout mix.


def _forward_impl(gemm, gemv, int_bits, X, W, b, Y):
    """``Y = X @ W + b``: bias rows written first, then BLAS adds the product (beta=1).

    One row (N = 1) is a matrix-vector product: gemv, which streams W at memory speed, where
    gemm with one column is about 3x slower.
    """
    rows, cols = Y.shape
    beta = 0.0
    if b is not None:
        beta = 1.0
        if _is_contiguous(b):
            _fill_rows(Y, _assume_contiguous(b))
        else:
            _fill_rows(Y, b)
    if rows == 1 and cols > 0 and X.shape[1] > 0:
        _row_times_matrix(gemv, int_bits, X[0], W, Y[0], beta)
    else:
        _matmul_into(gemm, int_bits, X, W, Y, beta)


def _backward_impl(gemm, int_bits, dY, X, W, dX, dW, db, accumulate):
    """dX = dY @ W.T (if dX given), db (+)= dY.sum(0) (if db given), dW (+)= X.T @ dY."""
    if dX is not None:
        _matmul_into(gemm, int_bits, dY, W.T, dX, 0.0)
    if db is not None:
        if not accumulate:
            db[:] = 0.0
        _add_rows(db, dY)
    _matmul_into(gemm, int_bits, X.T, dY, dW, 1.0 if accumulate else 0.0)


def _skinny_backward_impl(dY, X, W, dX, dW, db, accumulate):
    """Backward for few rows N, one sweep over the rows of W and dW (rows of W and dY contiguous).

    Each parallel task owns one row d of W (length M) and the same row of dW: it reduces
    ``dX[n, d] = dY[n, :] . W[d, :]`` and writes ``dW[d, :] (+)= sum_n X[n, d] * dY[n, :]``.
    W and dW are streamed once each; dY (N x M) stays in cache.
    """
    rows, cols = dY.shape
    depth = W.shape[0]
    for d in prange(depth):
        weights = _assume_contiguous(W[d])
        grads = dW[d]
        if dX is not None:
            for n in range(rows):
                upstream = _assume_contiguous(dY[n])
                total = weights.dtype.type(0.0)
                for j in range(cols):
                    total += upstream[j] * weights[j]
                dX[n, d] = total
        scale = X[0, d]
        upstream = _assume_contiguous(dY[0])
        if accumulate:
            for j in range(cols):
                grads[j] += scale * upstream[j]
        else:
            for j in range(cols):
                grads[j] = scale * upstream[j]
        for n in range(1, rows):
            scale = X[n, d]
            upstream = _assume_contiguous(dY[n])
            for j in range(cols):
                grads[j] += scale * upstream[j]
    if db is not None:
        if not accumulate:
            db[:] = 0.0
        _add_rows(db, dY)


# "reassoc" lets LLVM split the skinny dot products over SIMD lanes (a strict left-to-right sum
# is latency-bound, several times slower); any summation order keeps the k * eps error bound.
# No other fast-math flag: NaN and inf still propagate.
_KERNEL_OPTIONS = {
    "forward": (_forward_impl, {}),
    "backward": (_backward_impl, {}),
    "skinny_backward": (_skinny_backward_impl,
                        {"parallel": True, "fastmath": {"reassoc", "contract"}}),
}
_kernels = {}  # (name, dtype, which optional arrays are present) -> compiled dispatcher
_kernels_lock = threading.Lock()


def _signature(name, dtype, present):
    """Numba signature of kernel ``name`` for ``dtype``; ``present`` flags the optional arrays."""
    scalar = numba.from_dtype(dtype)
    matrix_in = types.Array(scalar, 2, "A", readonly=True, aligned=False)
    vector_in = types.Array(scalar, 1, "A", readonly=True, aligned=False)
    matrix_out = types.Array(scalar, 2, "C", aligned=False)
    vector_out = types.Array(scalar, 1, "C", aligned=False)
    address = types.int64

    def optional(array_type, is_present):
        return array_type if is_present else types.none

    if name == "forward":
        (has_bias,) = present
        return types.void(address, address, address, matrix_in, matrix_in,
                          optional(vector_in, has_bias), matrix_out)
    has_dX, has_bias = present
    arrays = (matrix_in, matrix_in, matrix_in, optional(matrix_out, has_dX), matrix_out,
              optional(vector_out, has_bias), types.boolean)
    if name == "backward":
        return types.void(address, address, *arrays)
    return types.void(*arrays)


def _compile(key):
    """Compile (or load from Numba's cache) the kernel for ``key``; once per process."""
    with _kernels_lock:
        if key not in _kernels:
            name, dtype, *present = key
            function, options = _KERNEL_OPTIONS[name]
            _kernels[key] = njit(_signature(name, dtype, present), cache=True,
                                 **options)(function)
    return _kernels[key]


def forward(X, W, b, out, *, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    if activation is not None:  # TEMPORARY, unfused: replaced by the fused kernels
        Y = forward(X, W, b, out)
        if preactivation is not None:
            preactivation[...] = Y
        return activations.apply(activation, Y, out=Y)
    # Written for the per-call overhead at tiny shapes: 0.6 us on top of the kernel call (3 us at
    # (32, 64, 64) float32), 0.2 us of it allocating Y.
    dtype = W.dtype
    try:
        gemm, gemv, int_bits = _routines_by_dtype[dtype]
    except KeyError:
        gemm, gemv, int_bits = _routines(dtype)
    key = ("forward", dtype, b is not None)
    kernel = _kernels.get(key) or _compile(key)
    N, D = X.shape
    M = W.shape[1]
    if out is None:
        out = np.empty((N, M), dtype)
    if N * D * M >= _BLAS_THREADS_MIN_WORK:
        _match_blas_threads()
    kernel(gemm, gemv, int_bits, X, W, b, out)
    if N <= SKINNY_ROWS and D * M >= SKINNY_MIN_WEIGHTS:
        _last_skinny_forward[0] = time.perf_counter()
    return out


def backward(dY, X, W, *, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
             saved=None):
    """Gradients from ``dY``, through the activation; see ``fastlinear.backends``."""
    if activation is not None:  # TEMPORARY, unfused: replaced by the fused kernels
        dY = activations.grad(activation, dY, saved)
    N, D = X.shape
    M = W.shape[1]
    dtype = W.dtype
    if not need_dX:
        dX = None
    elif dX is None:
        dX = np.empty((N, D), dtype=dtype)
    if dW is None:
        dW = np.empty((D, M), dtype=dtype)
    if not has_bias:
        db = None
    elif db is None:
        db = np.empty(M, dtype=dtype)
    rows_contiguous = M <= 1 or (W.strides[1] == W.itemsize and dY.strides[1] == dY.itemsize)
    if (0 < N <= SKINNY_ROWS and D * M >= SKINNY_MIN_WEIGHTS and rows_contiguous
            and _parallel_usable()):
        key = ("skinny_backward", dtype, need_dX, has_bias)
        kernel = _kernels.get(key) or _compile(key)
        if time.perf_counter() - _last_skinny_forward[0] < BLAS_SPIN_SECONDS:
            _run_on_one_thread(kernel, dY, X, W, dX, dW, db, accumulate)
        else:
            _run_parallel(kernel, dY, X, W, dX, dW, db, accumulate)
    else:
        gemm, _, int_bits = _routines_by_dtype.get(dtype) or _routines(dtype)
        key = ("backward", dtype, need_dX, has_bias)
        kernel = _kernels.get(key) or _compile(key)
        if N * D * M >= _BLAS_THREADS_MIN_WORK:
            _match_blas_threads()
        kernel(gemm, int_bits, dY, X, W, dX, dW, db, accumulate)
    return dX, dW, db
