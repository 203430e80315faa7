"""BLAS from inside ``@njit``: NumPy's own gemm and gemv, called through their addresses.

The kernels call the BLAS that ``X @ W`` uses, so the process has one BLAS thread pool: two
OpenBLAS pools that both spin-wait after a call fight over the cores when NumPy and fastlinear
calls alternate. SciPy's ``cython_blas`` (LP64) is the fallback where NumPy's symbols are not
found. A routine's address and int width are passed at run time, so the machine code holds no
process-specific address and Numba can cache it.

Row-major arrays map to BLAS's column-major view without copies: a C-order operand is the
transpose of a column-major one (``'N'`` with its row stride as leading dimension), an F-order
operand is column-major itself (``'T'``). Only operands with no unit stride are copied.
"""

import ctypes
import functools
import itertools
import os
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import get_cython_function_address, intrinsic

__all__ = ["BLAS_THREADS_MIN_WORK", "BlasRoutines", "blas_routines", "match_blas_threads",
           "matmul_into", "row_times_matrix", "assume_contiguous", "is_contiguous"]

# Symbol templates of NumPy's BLAS (OpenBLAS, ILP64 in NumPy's wheels) and their int width.
NUMPY_BLAS_SYMBOLS = (("scipy_{}_64_", 64), ("{}_64_", 64), ("{}64_", 64))
_TRANS_N = ord("N")
_TRANS_T = ord("T")


class BlasRoutines(NamedTuple):
    """Addresses of one dtype's gemm and gemv, and the width of the BLAS's ints (32 or 64)."""

    gemm: int
    gemv: int
    int_bits: int


def _prefix(dtype):
    return "s" if dtype == np.float32 else "d"


def _numpy_blas(dtype):
    """NumPy's gemm and gemv for ``dtype``, or ``None`` where its symbols are not found.

    ``dlsym`` on the handle of NumPy's core extension searches that extension's own
    dependencies: the exact BLAS NumPy linked, without scanning the process's libraries.
    """
    from numpy._core import _multiarray_umath

    core = ctypes.CDLL(_multiarray_umath.__file__)  # already loaded: only a new handle
    for template, bits in NUMPY_BLAS_SYMBOLS:
        try:
            gemm, gemv = (ctypes.cast(getattr(core, template.format(_prefix(dtype) + name)),
                                      ctypes.c_void_p).value for name in ("gemm", "gemv"))
        except AttributeError:
            continue
        return BlasRoutines(gemm, gemv, bits)
    return None


def _scipy_blas(dtype):
    """SciPy's LP64 gemm and gemv for ``dtype`` (a second OpenBLAS: the fallback only)."""
    import scipy.linalg.cython_blas  # noqa: F401

    gemm, gemv = (get_cython_function_address("scipy.linalg.cython_blas", _prefix(dtype) + name)
                  for name in ("gemm", "gemv"))
    return BlasRoutines(gemm, gemv, 32)


@functools.cache
def blas_routines(dtype):
    """The ``BlasRoutines`` the kernels call for ``dtype``: NumPy's BLAS, else SciPy's."""
    return _numpy_blas(dtype) or _scipy_blas(dtype)


def _library_dir(module):
    return os.path.dirname(os.path.abspath(module.__file__))


@functools.cache
def blas_thread_controllers():
    """threadpoolctl's controllers of the BLAS the kernels call (imported on first need)."""
    from threadpoolctl import ThreadpoolController

    if blas_routines(np.dtype(np.float64)).int_bits == 64:
        owner = _library_dir(np)
    else:
        import scipy

        owner = _library_dir(scipy)
    return [controller for controller
            in ThreadpoolController().select(user_api="blas").lib_controllers
            if os.path.abspath(controller.filepath).startswith((owner + os.sep, owner + ".libs"))]


# From this many multiply-adds on (a layer call's N * D * M, a network call's batch rows times
# its multiply-adds per row), a numba call first lets the BLAS use as many threads as Numba may
# (match_blas_threads). The setting persists, so smaller calls follow it once one large call ran.
BLAS_THREADS_MIN_WORK = 1 << 23

# BLAS library path -> (the thread count this module set, the count it found before): a count
# that still reads as set here may be changed again; any other count is someone else's.
_set_here: dict[str, tuple[int, int]] = {}


# What match_blas_threads left in force, one tuple (replaced whole: threads may race): Numba's
# count then, and per BLAS a cheap reader of its count with the count. While all read the same
# there is nothing to do. And the reader of Numba's count: a cheaper one after the first call.
_seen: tuple[int, tuple] = (0, ())
_read_numba_threads = numba.get_num_threads


@functools.cache
def _numba_thread_reader():
    """Numba's thread count reader for this thread's calls: its threading layer's own C getter
    (0.14 us; ``numba.get_num_threads()`` costs 1 us, most of it taking a process lock to see
    the threads started), checked against the public function once; else the public one."""
    from numba.np.ufunc import parallel

    public = numba.get_num_threads()  # starts the threads: the C getter is bound from then on
    reader = getattr(parallel, "_get_num_threads", None)
    try:
        if callable(reader) and reader() == public:
            return reader
    except Exception:  # noqa: BLE001 - a private function that changed: use the public one
        pass
    return numba.get_num_threads


@functools.cache
def _blas_thread_reader(controller):
    """A cheap reader of ``controller``'s thread count: OpenBLAS's own C getter where OpenBLAS
    runs its own threads (0.13 us, against 0.48 us through threadpoolctl), else threadpoolctl's
    (an OpenMP build's count is per calling thread: threadpoolctl knows which to ask)."""
    if controller.internal_api == "openblas" and controller.threading_layer == "pthreads":
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            try:
                reader = controller.dynlib[f"{prefix}openblas_get_num_threads{suffix}"]
            except AttributeError:
                continue
            reader.restype, reader.argtypes = ctypes.c_int, ()
            if reader() == controller.get_num_threads():
                return reader
    return controller.get_num_threads


def _unchanged():
    """Whether Numba's count and every BLAS count read as ``match_blas_threads`` left them."""
    numba_threads, blas = _seen
    if _read_numba_threads() != numba_threads:  # never 0: the first call is a change
        return False
    for read, count in blas:
        if read() != count:
            return False
    return True


def match_blas_threads():
    """Give the BLAS no more threads than Numba may use (no oversubscription), and never more
    than a limit someone else set (``threadpoolctl.threadpool_limits``, say): that is theirs.

    A count this function lowered may rise again, up to what it was before, when Numba's rises.
    When nothing changed since the last call (Numba's count in this thread, each BLAS count:
    a user's limit set meanwhile changes the latter), it only reads them: 0.4 us, not 4.6.
    """
    global _seen, _read_numba_threads
    if _unchanged():
        return
    _read_numba_threads = _numba_thread_reader()
    wanted = numba.get_num_threads()
    blas = []
    for controller in blas_thread_controllers():
        current = controller.get_num_threads()
        mine = _set_here.get(controller.filepath)
        ceiling = mine[1] if mine is not None and mine[0] == current else current
        target = min(wanted, ceiling)
        if target != current:
            controller.set_num_threads(target)
            _set_here[controller.filepath] = (target, ceiling)
        blas.append((_blas_thread_reader(controller), controller.get_num_threads()))
    _seen = (wanted, tuple(blas))


def _blas_codegen(kinds, dtype):
    """Code that calls a Fortran BLAS routine: every argument by reference.

    The intrinsic's arguments are ``(routine, int_bits, *blas_args)``: the routine's address,
    the width of its ints (32: LP64, 64: ILP64), then the BLAS arguments, whose ``kinds`` are
    ``c`` (a char, given as its ASCII code), ``i`` (a BLAS int), ``r`` (a real of ``dtype``) or
    ``a`` (an array: its data pointer is passed).
    """

    def codegen(context, builder, signature, args):
        voidptr = ir.IntType(8).as_pointer()
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
                fixed[position] = by_reference(value, ir.IntType(8))
            elif kind == "r":
                fixed[position] = by_reference(value, real, value_type)
            elif kind == "a":
                array = context.make_array(value_type)(context, builder, value)
                fixed[position] = builder.bitcast(array.data, voidptr)
        fnty = ir.FunctionType(ir.VoidType(), [voidptr] * len(kinds))
        function = builder.inttoptr(routine, fnty.as_pointer())

        def call(int_type):
            pointers = [fixed[position] if kind != "i" else by_reference(value, int_type)
                        for position, (kind, value, _) in enumerate(blas_args)]
            builder.call(function, pointers)

        is_lp64 = builder.icmp_signed("==", int_bits, int_bits.type(32))
        with builder.if_else(is_lp64) as (lp64, ilp64):
            with lp64:
                call(ir.IntType(32))
            with ilp64:
                call(ir.IntType(64))
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

    Returns ``(trans, ld)``: ``'N'`` when rows are contiguous (``A.T`` column-major with leading
    dimension = row stride), ``'T'`` when columns are (``A`` itself column-major), or ``(0, 0)``
    when neither holds (no unit stride, negative or odd strides): copy then.
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
def matmul_into(routine, int_bits, A, B, C, beta):
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
def row_times_matrix(gemv, int_bits, x, W, y, beta):
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
def assume_contiguous(typingctx, vector):
    """The 1-D array ``vector`` typed as C-contiguous, so loops over it vectorise.

    Only for vectors whose stride the caller checked is one element (or of length <= 1): a
    C-typed array is indexed as if it were contiguous. Same data, no copy.
    """
    result = vector.copy(layout="C")

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, signature.return_type, args[0])

    return result(vector), codegen


@njit(cache=True)
def is_contiguous(vector):
    """Whether the 1-D ``vector`` has a unit stride (or at most one element)."""
    return vector.shape[0] <= 1 or vector.strides[0] == vector.itemsize
