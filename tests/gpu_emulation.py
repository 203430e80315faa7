"""Test helpers that stand in for the GPU: array layouts, a cuBLAS GEMM emulator on NumPy
buffers, and fastlinear's CUDA kernels compiled for the CPU (``kernel_host_emulation.cpp``)."""

import ctypes
import pathlib
import re
import shutil
import subprocess

import numpy as np

from fastlinear.backends import cupy as cupy_backend
from fastlinear.backends import cupy_launch

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
    N, T = cupy_launch.CUBLAS_OP_N, cupy_launch.CUBLAS_OP_T
    assert transa in (N, T) and transb in (N, T)
    op_a = column_major(A, m, k, lda) if transa == N else column_major(A, k, m, lda).T
    op_b = column_major(B, k, n, ldb) if transb == N else column_major(B, n, k, ldb).T
    target = column_major(C, m, n, ldc)
    result = op_a.astype(np.float64) @ op_b.astype(np.float64)
    if beta:
        result += beta * target.astype(np.float64)
    target[...] = result


def backend_gemm_call(P, Q, C, beta):
    """The backend's ``_gemm_call`` with cuBLAS replaced by ``emulated_gemm`` (NumPy arrays):
    the backend's own plan (``_gemm_plan``: which operand to copy, the cuBLAS arguments)."""
    copy_p, copy_q, arguments = cupy_backend._gemm_plan(P, Q)
    P = np.ascontiguousarray(P) if copy_p else P
    Q = np.ascontiguousarray(Q) if copy_q else Q
    transa, transb, m_, n_, k_, lda, ldb, ldc = arguments
    assert max(m_, n_, k_) <= cupy_launch.GEMM_MAX_DIM, "a GEMM dimension beyond a C int"
    assert C.flags.c_contiguous
    emulated_gemm(transa, transb, m_, n_, k_, flat_from_first_element(Q), lda,
                  flat_from_first_element(P), ldb, C.reshape(-1), ldc, beta)


def build_host_kernels(directory):
    """Compile kernels/*.cu for the CPU with g++; return the ctypes library (None: no g++)."""
    compiler = shutil.which("g++")
    if compiler is None:
        return None
    source = cupy_launch.kernel_source()
    for pattern, replacement in _HOST_CONVERSIONS.items():
        source, count = re.subn(pattern, replacement, source)
        assert count == 1, f"expected one match of {pattern} in kernels/*.cu"
    kernels = pathlib.Path(directory) / "kernels_host.cu"
    kernels.write_text(source)
    library = pathlib.Path(directory) / "kernels_host.so"
    result = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-x", "c++",
         f'-DFASTLINEAR_KERNELS_FILE="{kernels}"', *cupy_launch.compile_options(), str(HARNESS),
         "-o", str(library)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    host = ctypes.CDLL(str(library))
    host.emulate_launch.restype = ctypes.c_int
    host.emulate_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [
        ctypes.POINTER(ctypes.c_void_p)]
    return host


class HostKernel:
    """Stands in for a ``cupy.RawKernel``: ``kernel(grid, block, args)`` runs it on the CPU.

    Each argument is held to the kernel's ``KERNEL_SIGNATURES`` entry as CuPy would pass it:
    "ptr" an array, "i64" a Python int or ``np.int64`` (CuPy passes Python ints as 64-bit),
    "i32" exactly an ``np.int32`` (a Python int there would be read as the wrong width on a GPU).
    """

    def __init__(self, host, name):
        self.host, self.name = host, name
        self.signature = cupy_launch.KERNEL_SIGNATURES[name.rpartition("_")[0]]

    def __call__(self, grid, block, args):
        # CuPy 14.2's Function.__call__ declares ``tuple grid, tuple block`` (a list raises)
        assert type(grid) is tuple and type(block) is tuple, (type(grid), type(block))
        assert grid[2] == 1 and block[2] == 1 and block[0] * block[1] <= 1024
        assert isinstance(args, tuple), f"{self.name}: CuPy takes the arguments as a tuple"
        assert len(args) == len(self.signature), (
            f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        holders = []
        for index, (kind, value) in enumerate(zip(self.signature, args, strict=True)):
            where = f"{self.name} argument {index} ({kind})"
            if kind == "ptr":
                assert isinstance(value, np.ndarray), f"{where}: got {type(value)}"
                holders.append(ctypes.c_void_p(value.ctypes.data))
            elif kind == "i64":
                assert type(value) in (int, np.int64), f"{where}: got {type(value)}"
                holders.append(ctypes.c_longlong(int(value)))
            else:
                assert type(value) is np.int32, f"{where}: got {type(value)}"
                holders.append(ctypes.c_int(int(value)))
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

    float16 is computed with float32 sums and rounded to float16 at most twice (the cuBLAS
    path with an activation rounds the product, then act(product + b)), hence the eps16 term.
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


# Largest |act'(z)| over every activation (GELU's derivative peaks at 1.13): how far an error in
# the pre-activation moves the output.
ACTIVATION_LIPSCHITZ = 1.2


def _compute_dtype(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def activation_reference(X, W, b, dY, activation, dtype):
    """Float64 expected values and elementwise error bounds of a fused layer.

    Returns ``(reference, saved)``: ``reference[key] = (expected, bound)`` for ``"Z"``,
    ``"Y"``, ``"G"``, ``"dX"``, ``"dW"``, ``"db"``; ``saved`` is the array the backward pass
    takes (the output or the pre-activation, as ``activations.saved_for_backward`` says), in
    ``dtype``, made from the float64 forward. Bounds: the GEMM's error bound (``error_bound``
    in the compute dtype, float32 for float16), carried through the activation by
    ``ACTIVATION_LIPSCHITZ``; a few units of roundoff of the activation's own formula, relative
    to |z| + |y| (the GELUs' 1 + erf cancels for negative z); one rounding to ``dtype`` per
    stored array (float16 stores Z, Y and G).
    """
    from fastlinear import activations
    from tests.helpers import error_bound

    compute = _compute_dtype(dtype)
    eps_c, eps_s = np.finfo(compute).eps, np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny
    base = _reference64(X, W, b, dY)
    Z64, magnitude, terms = base["Y"]
    z_bound = error_bound(compute, terms, magnitude) + eps_s * magnitude + tiny
    with np.errstate(all="ignore"):
        Y64 = activations.apply(activation, Z64)
    y_bound = (ACTIVATION_LIPSCHITZ * z_bound + 8 * eps_c * (np.abs(Z64) + np.abs(Y64))
               + eps_s * np.abs(Y64) + tiny)
    kind = activations.saved_for_backward(activation)
    saved = (Z64 if kind == "preactivation" else Y64).astype(dtype)
    dY64 = np.asarray(dY, dtype=np.float64)
    S64 = saved.astype(np.float64)
    G64 = activations.grad(activation, dY64, S64)
    g_bound = 16 * eps_c * np.abs(dY64) * (1 + np.abs(S64)) + eps_s * np.abs(G64) + tiny
    X64, W64 = np.asarray(X, dtype=np.float64), np.asarray(W, dtype=np.float64)
    absG, absX, absW = np.abs(G64), np.abs(X64), np.abs(W64)
    N, D = X.shape
    M = W.shape[1]

    def product_bound(magnitude, propagated, terms):
        return error_bound(compute, terms, magnitude) + propagated + eps_s * magnitude + tiny

    reference = {
        "Z": (Z64, z_bound),
        "Y": (Y64, y_bound),
        "G": (G64, g_bound),
        "dX": (G64 @ W64.T, product_bound(absG @ absW.T, g_bound @ absW.T, M)),
        "dW": (X64.T @ G64, product_bound(absX.T @ absG, absX.T @ g_bound, N)),
        "db": (G64.sum(0), product_bound(absG.sum(0), g_bound.sum(0), N)),
    }
    return reference, saved


def _reference64(X, W, b, dY):
    from tests.helpers import reference64

    return reference64(X, W, b, dY)


def assert_within(actual, expected, bound, what, previous=None):
    """``|actual - expected| <= bound`` elementwise, NaN where expected is NaN, infinities equal.

    ``previous``: the buffer's values before an accumulating call (added to the expected value,
    with a rounding of the sum in the bound).
    """
    actual = as_numpy(actual)
    eps = np.finfo(actual.dtype).eps
    actual = actual.astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if previous is not None:
        previous = as_numpy(previous).astype(np.float64)
        expected = expected + previous
        bound = bound + 2 * eps * (np.abs(previous) + np.abs(expected))
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_expected = np.isnan(expected)
    assert np.array_equal(np.isnan(actual), nan_expected), (
        f"{what}: NaN at {np.argwhere(np.isnan(actual) != nan_expected)[:5].tolist()} "
        f"differs from the reference")
    infinite = np.isinf(expected)
    assert np.array_equal(actual[infinite], expected[infinite]), f"{what}: infinities differ"
    finite = ~nan_expected & ~infinite
    err = np.abs(actual[finite] - expected[finite])
    bad = ~(err <= np.broadcast_to(bound, expected.shape)[finite])
    if bad.any():
        worst = np.argmax(np.where(bad, err, -np.inf))
        raise AssertionError(
            f"{what}: {bad.sum()} of {err.size} elements off; worst got "
            f"{actual[finite][worst]!r}, expected {expected[finite][worst]!r}, bound "
            f"{np.broadcast_to(bound, expected.shape)[finite][worst]!r}")
