"""Test helpers that stand in for the GPU: array layouts, a cuBLAS GEMM emulator on NumPy
buffers, and fastlinear's CUDA kernels compiled for the CPU (``kernel_host_emulation.cpp``)."""

import ctypes
import pathlib
import re
import shutil
import subprocess

import numpy as np

from fastlinear.backends import cupy as cupy_backend

LAYOUTS = ("C", "F", "rows_padded", "cols_padded", "every_other_col", "reversed")
HARNESS = pathlib.Path(__file__).with_name("kernel_host_emulation.cpp")

# The two PTX conversions of kernels/linear.cu and their host replacements.
_HOST_CONVERSIONS = {
    r'asm\("cvt\.f32\.f16 %0, %1;"\s*:\s*"=f"\(result\)\s*:\s*"h"\(value\.bits\)\);':
        "result = fastlinear_host_half_to_float(value.bits);",
    r'asm\("cvt\.rn\.f16\.f32 %0, %1;"\s*:\s*"=h"\(result\.bits\)\s*:\s*"f"\(value\)\);':
        "result.bits = fastlinear_host_float_to_half(value);",
}


def make_layout(xp, a, layout):
    """``a`` (C-ordered, on ``xp``'s device) as a view with the memory layout ``layout``."""
    rows, cols = a.shape
    if layout == "C":
        return xp.ascontiguousarray(a)
    if layout == "F":
        return xp.asfortranarray(a)
    if layout == "rows_padded":  # row-major, rows further apart than their length
        big = xp.zeros((rows, cols + 3), dtype=a.dtype)
        big[:, :cols] = a
        return big[:, :cols]
    if layout == "cols_padded":  # column-major, columns further apart than their length
        big = xp.zeros((rows + 3, cols), dtype=a.dtype, order="F")
        big[:rows] = a
        return big[:rows]
    if layout == "every_other_col":  # no unit stride: cuBLAS cannot read it in place
        big = xp.zeros((rows, 2 * cols), dtype=a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if layout == "reversed":  # negative strides
        return xp.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    raise ValueError(layout)


def flat_from_first_element(view):
    """A 1-D view of the memory of ``view``'s base, starting at ``view``'s first element."""
    base = view
    while base.base is not None:
        base = base.base
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return base.ravel(order="K")[offset // view.itemsize:]


def column_major(flat, rows, cols, leading):
    """cuBLAS's reading of a buffer: element (i, j) at ``i + j * leading``, bounds-checked."""
    assert leading >= max(1, rows), f"leading dimension {leading} < rows {rows}"
    if rows and cols:
        assert (rows - 1) + (cols - 1) * leading < flat.size, "reads past the buffer"
    return np.lib.stride_tricks.as_strided(
        flat, shape=(rows, cols), strides=(flat.itemsize, leading * flat.itemsize))


def emulated_gemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc, beta=0.0):
    """cuBLAS column-major ``C = op(A) @ op(B) + beta C`` on flat NumPy buffers, in float64."""
    N, T = cupy_backend.CUBLAS_OP_N, cupy_backend.CUBLAS_OP_T
    assert transa in (N, T) and transb in (N, T)
    op_a = column_major(A, m, k, lda) if transa == N else column_major(A, k, m, lda).T
    op_b = column_major(B, k, n, ldb) if transb == N else column_major(B, n, k, ldb).T
    target = column_major(C, m, n, ldc)
    result = op_a.astype(np.float64) @ op_b.astype(np.float64)
    if beta:
        result += beta * target.astype(np.float64)
    target[...] = result


def backend_gemm(P, Q, C, beta):
    """The backend's ``_gemm`` with cuBLAS replaced by ``emulated_gemm`` (NumPy arrays)."""
    P, p_layout = cupy_backend._blas_operand(P)
    Q, q_layout = cupy_backend._blas_operand(Q)
    n, k = P.shape
    m = Q.shape[1]
    transa, transb, m_, n_, k_, lda, ldb, ldc = cupy_backend.gemm_arguments(p_layout, q_layout,
                                                                            n, m, k)
    assert C.flags.c_contiguous
    emulated_gemm(transa, transb, m_, n_, k_, flat_from_first_element(Q), lda,
                  flat_from_first_element(P), ldb, C.reshape(-1), ldc, beta)


def build_host_kernels(directory):
    """Compile kernels/*.cu for the CPU with g++; return the ctypes library (None: no g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    source = cupy_backend.kernel_source()
    for pattern, replacement in _HOST_CONVERSIONS.items():
        source, count = re.subn(pattern, replacement, source)
        assert count == 1, f"expected one match of {pattern} in kernels/*.cu"
    kernels = pathlib.Path(directory) / "kernels_host.cu"
    kernels.write_text(source)
    library = pathlib.Path(directory) / "kernels_host.so"
    result = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-x", "c++",
         f'-DFASTLINEAR_KERNELS_FILE="{kernels}"', str(HARNESS), "-o", str(library)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    host = ctypes.CDLL(str(library))
    host.emulate_launch.restype = ctypes.c_int
    host.emulate_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [
        ctypes.POINTER(ctypes.c_void_p)]
    return host


class HostKernel:
    """Stands in for a ``cupy.RawKernel``: ``kernel(grid, block, args)`` runs it on the CPU."""

    def __init__(self, host, name):
        self.host, self.name = host, name

    def __call__(self, grid, block, args):
        assert grid[2] == 1 and block[2] == 1 and block[0] * block[1] <= 1024
        holders = []
        for value in args:
            if isinstance(value, np.ndarray):
                holders.append(ctypes.c_void_p(value.ctypes.data))
            elif isinstance(value, np.int64):
                holders.append(ctypes.c_longlong(int(value)))
            elif isinstance(value, np.int32):
                holders.append(ctypes.c_int(int(value)))
            else:
                raise TypeError(f"{self.name}: argument of type {type(value)}")
        pointers = (ctypes.c_void_p * len(holders))(
            *[ctypes.cast(ctypes.pointer(holder), ctypes.c_void_p) for holder in holders])
        status = self.host.emulate_launch(self.name.encode(), grid[0], grid[1], block[0],
                                          block[1], pointers)
        assert status == 0, f"no emulated kernel {self.name}"


def as_numpy(array):
    """A NumPy copy of a CuPy array (``.get()``); NumPy arrays and None pass through."""
    return array if array is None or isinstance(array, np.ndarray) else array.get()


def assert_backward_matches(results, reference, dtype, need_dX, has_bias, dW0, db0):
    """Check ``(dX, dW, db)`` of a backward call: ``None`` where not asked for, else against
    ``reference`` (``dW0``/``db0``: the buffers' values before an accumulating call, or None)."""
    dX, dW, db = results
    if need_dX:
        assert_matches(dX, "dX", reference, dtype, "dX")
    else:
        assert dX is None
    assert_matches(dW, "dW", reference, dtype, "dW", previous=dW0)
    if has_bias:
        assert_matches(db, "db", reference, dtype, "db", previous=db0)
    else:
        assert db is None


def assert_matches(actual, key, reference, dtype, what, previous=None):
    """Check a result against the float64 reference (plus ``previous`` when accumulating).

    float16 is computed with float32 sums and rounded to float16 at most twice (the
    cublas_epilogue path rounds the product, then the sum with b), hence the eps16 term.
    """
    from tests.helpers import assert_close, error_bound

    expected, magnitude, terms = reference[key]
    actual, previous = as_numpy(actual), as_numpy(previous)
    if previous is not None:
        previous = previous.astype(np.float64)
        expected, magnitude, terms = expected + previous, magnitude + np.abs(previous), terms + 1
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}"
    if np.dtype(dtype) != np.float16:
        assert_close(actual, expected, dtype, terms, magnitude, what)
        return
    assert actual.shape == expected.shape, what
    bound = (error_bound(np.float32, terms, magnitude)
             + np.finfo(np.float16).eps * magnitude + np.finfo(np.float16).tiny)
    err = np.abs(actual.astype(np.float64) - expected)
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {bad.sum()} of {err.size} elements off; worst "
                           f"{np.max(err - bound)} over the bound")
