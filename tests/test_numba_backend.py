"""Cases that break the numba backend's kernels, beyond the backend-parametrised tests.

Sizes of 1 and primes, the edges of its paths (one row: gemv; up to ``SKINNY_ROWS`` rows: the
fused ``prange`` backward; more: gemm, or for small calls the register-blocked dX), empty
dimensions, every layout BLAS can read without a copy and those it cannot, all flag combinations
of the backward pass, a long float32 reduction, the fused activations on every path (kinks,
large |z|, inf and NaN too), concurrent callers (also under Numba's ``workqueue`` threading
layer), forked children after GNU OpenMP started, missing dependencies, the SciPy BLAS fallback,
thread counts, allocations, and the on-disk cache (subprocesses where the process state matters).

Tolerance: ``helpers.error_bound``, i.e. ``2 (k + 1) u (|x| . |w|)`` elementwise for a length-k
dot product with unit roundoff ``u``: the worst case of any summation order (Higham, eq. 3.5), so
BLAS blocking, threads and SIMD reassociation all stay inside it; float32 sums are accumulated in
float32, by the reference and by this backend alike. Through an activation, the pre-activation's
bound times the activation's Lipschitz constant, plus the activation's own rounding (see
``assert_activation_close`` and ``reference_through``).
"""

import os
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

import fastlinear
from tests.helpers import (
    CPU_DTYPES,
    assert_close,
    assert_matches_reference,
    make_inputs,
    reference64,
)

backend_module = pytest.importorskip("fastlinear.backends.numba")
if backend_module.unavailable_reason() is not None:  # pragma: no cover - numba extra missing
    pytest.skip(backend_module.unavailable_reason(), allow_module_level=True)

numba = backend_module.numba
SKINNY = backend_module.SKINNY_ROWS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _skinny_kernel_on_small_inputs(monkeypatch):
    """Let the fused skinny backward kernel run on small W too, so its edges are tested fast."""
    monkeypatch.setattr(backend_module, "SKINNY_MIN_WEIGHTS", 1)

# (N, D, M): ones, primes, the path edges (N = 1, SKINNY_ROWS, SKINNY_ROWS + 1) and one past
# the power-of-two block sizes BLAS kernels use (16, 32, 64), empty dimensions.
SHAPES = [
    (1, 1, 1), (1, 2, 1), (2, 1, 3), (1, 97, 89), (2, 3, 5), (7, 11, 13), (SKINNY, 31, 17),
    (SKINNY + 1, 31, 17), (17, 33, 65), (65, 17, 33), (97, 101, 103), (0, 5, 3), (3, 0, 5),
    (3, 5, 0), (1, 0, 4), (1, 4, 0), (0, 0, 0),
]


def run_both(X, W, b, dY, **backward_args):
    """Forward and backward through the public API with the numba backend."""
    Y = fastlinear.linear_forward(X, W, b, backend="numba")
    grads = fastlinear.linear_backward(dY, X, W, has_bias=b is not None, backend="numba",
                                       **backward_args)
    return Y, grads


def check(X, W, b, dY, dtype, need_dX=True):
    ref = reference64(X, W, b, dY)
    Y, (dX, dW, db) = run_both(X, W, b, dY, need_dX=need_dX)
    results = {"Y": Y, "dW": dW}
    if need_dX:
        results["dX"] = dX
    else:
        assert dX is None
    if b is not None:
        results["db"] = db
    else:
        assert db is None
    for name, value in results.items():
        assert value.dtype == dtype and value.flags.c_contiguous, name
    assert_matches_reference(results, ref, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N,D,M", SHAPES)
def test_shapes(rng, N, D, M, dtype):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    check(X, W, b, dY, dtype)


@pytest.mark.parametrize("N", [1, SKINNY, SKINNY + 1, 40])
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("need_dX", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_backward_flags_and_buffers(rng, N, has_bias, need_dX, accumulate):
    """Every flag combination on every path, writing into given buffers (``out=``)."""
    dtype = np.float64
    X, W, b, dY = make_inputs(rng, N, 23, 19, dtype, bias=has_bias)
    ref = reference64(X, W, b, dY)
    dW0 = rng.standard_normal(W.shape)
    db0 = rng.standard_normal(W.shape[1])
    dX_buf, dW_buf, db_buf = np.full(X.shape, np.nan), dW0.copy(), db0.copy()
    dX, dW, db = fastlinear.linear_backward(
        dY, X, W, has_bias=has_bias, need_dX=need_dX, accumulate=accumulate, backend="numba",
        dX=dX_buf, dW=dW_buf, db=db_buf if has_bias else None)
    assert dW is dW_buf
    expected, magnitude, terms = ref["dW"]
    start = dW0 if accumulate else 0
    assert_close(dW, start + expected, dtype, terms + 1, magnitude + np.abs(start), "dW")
    if has_bias:
        assert db is db_buf
        expected, magnitude, terms = ref["db"]
        start = db0 if accumulate else 0
        assert_close(db, start + expected, dtype, terms + 1, magnitude + np.abs(start), "db")
    else:
        assert db is None
        np.testing.assert_array_equal(db_buf, db0)  # untouched
    if need_dX:
        assert dX is dX_buf
        expected, magnitude, terms = ref["dX"]
        assert_close(dX, expected, dtype, terms, magnitude, "dX")
    else:
        assert dX is None


@pytest.mark.parametrize("N", [1, 6])
def test_forward_out_buffer_and_no_bias(rng, N):
    X, W, b, _ = make_inputs(rng, N, 9, 7, np.float32)
    out = np.full((N, 7), np.nan, dtype=np.float32)
    for bias in (b, None):
        Y = fastlinear.linear_forward(X, W, bias, backend="numba", out=out)
        assert Y is out
        expected, magnitude, terms = reference64(X, W, bias, np.zeros_like(out))["Y"]
        assert_close(Y, expected, np.float32, terms, magnitude, "Y")


def views(a, kind):
    """``a`` (2-D) as ``kind``: C/F order, rows/columns sliced (one unit stride left, leading
    dimension larger than the extent), fully strided, reversed (negative strides), or a
    transposed view."""
    n, m = a.shape
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "C-padded":  # row-major with a row stride > m: BLAS reads it via lda
        padded = np.zeros((n, m + 5), dtype=a.dtype)
        padded[:, :m] = a
        return padded[:, :m]
    if kind == "F-padded":
        padded = np.zeros((n + 3, m), dtype=a.dtype, order="F")
        padded[:n] = a
        return padded[:n]
    if kind == "strided":  # no unit stride at all: copied
        padded = np.zeros((2 * n, 3 * m), dtype=a.dtype)
        padded[::2, ::3] = a
        return padded[::2, ::3]
    if kind == "reversed":  # negative strides: copied
        return np.ascontiguousarray(a[::-1, ::-1])[::-1, ::-1]
    if kind == "transposed":  # a C-contiguous array's .T: F-order
        return np.ascontiguousarray(a.T).T
    raise ValueError(kind)


LAYOUTS = ["C", "F", "C-padded", "F-padded", "strided", "reversed", "transposed"]


@pytest.mark.parametrize("N", [1, 3, 29])
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("w_layout", ["C", "F", "C-padded", "strided", "reversed"])
def test_layouts(rng, N, x_layout, w_layout):
    dtype = np.float32
    X, W, b, dY = make_inputs(rng, N, 21, 18, dtype)
    X, dY, W = views(X, x_layout), views(dY, x_layout), views(W, w_layout)
    b = rng.standard_normal(36).astype(dtype)[::2]  # strided bias
    check(X, W, b, dY, dtype)


@pytest.fixture
def dX_by_rows(monkeypatch):
    """Every backward through the BLAS path computes dX by the register-blocked row kernel."""
    monkeypatch.setattr(backend_module, "ROWS_DOT_ROWS_MIN_M", 0)
    monkeypatch.setattr(backend_module, "ROWS_DOT_ROWS_MAX_WORK", 1 << 62)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N,D,M", SHAPES + [(8, 8, 8), (9, 10, 11), (33, 7, 129)])
def test_shapes_dX_by_rows(rng, N, D, M, dtype, dX_by_rows):
    """The 4 x 4 blocks and every edge of the register-blocked dX = G @ W.T."""
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    check(X, W, b, dY, dtype)


@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("w_layout", ["C", "F", "C-padded", "strided"])
def test_layouts_dX_by_rows(rng, x_layout, w_layout, dX_by_rows):
    """Rows of dY or W not contiguous: dX through gemm; contiguous, with a padded stride: rows."""
    X, W, b, dY = make_inputs(rng, 29, 21, 18, np.float32)
    X, dY, W = views(X, x_layout), views(dY, x_layout), views(W, w_layout)
    check(X, W, b, dY, np.float32)


def test_batch_dims(rng):
    X, W, b, dY = make_inputs(rng, 24, 7, 5, np.float64)
    X3, dY3 = X.reshape(2, 3, 4, 7), dY.reshape(2, 3, 4, 5)
    Y3, (dX3, dW, db) = run_both(X3, W, b, dY3)
    Y, (dX, dW2, db2) = run_both(X, W, b, dY)
    assert Y3.shape == (2, 3, 4, 5) and dX3.shape == X3.shape
    np.testing.assert_allclose(Y3.reshape(24, 5), Y, rtol=1e-13)
    np.testing.assert_allclose(dX3.reshape(24, 7), dX, rtol=1e-13)
    np.testing.assert_allclose(dW, dW2, rtol=1e-13)
    np.testing.assert_allclose(db, db2, rtol=1e-13)


@pytest.mark.parametrize("N", [1, 3, 16])
@pytest.mark.parametrize("long_dim", ["D", "M"])
def test_long_float32_reduction(rng, N, long_dim):
    """2**17 terms per dot product, summed in float32: over D for Y (gemv for N = 1, gemm), over
    M for dX (the skinny kernel's SIMD-split dot product for N <= SKINNY_ROWS, gemm for 16).

    Tolerance: the stated bound ``2 (k + 1) u (|x| . |w|)`` (u = 2**-24) must hold; and since
    the rounding errors of random-sign terms mostly cancel (measured worst: about 1e-6 of that
    worst case), the error must also stay below 1e-3 of it, which a kernel accumulating in
    lower precision, or losing terms, would not.
    """
    D, M = (1 << 17, 3) if long_dim == "D" else (3, 1 << 17)
    X, W, b, dY = make_inputs(rng, N, D, M, np.float32)
    ref = reference64(X, W, b, dY)
    Y, (dX, dW, db) = run_both(X, W, b, dY)
    assert_matches_reference({"Y": Y, "dW": dW, "dX": dX, "db": db}, ref, np.float32)
    name, value = ("Y", Y) if long_dim == "D" else ("dX", dX)
    expected, magnitude, terms = ref[name]
    relative = np.abs(value - expected) / magnitude
    assert relative.max() < 1e-3 * terms * np.finfo(np.float32).eps, name


@pytest.mark.parametrize("min_weights", [1, 1 << 62])
def test_skinny_kernel_and_gemm_path_agree(rng, monkeypatch, min_weights):
    """N = SKINNY_ROWS through the fused skinny kernel and through the gemm path."""
    monkeypatch.setattr(backend_module, "SKINNY_MIN_WEIGHTS", min_weights)
    X, W, b, dY = make_inputs(rng, SKINNY, 300, 257, np.float32)
    ref = reference64(X, W, b, dY)
    _, (dX, dW, db) = run_both(X, W, b, dY)
    assert_matches_reference({"dX": dX, "dW": dW, "db": db}, ref, np.float32)


@pytest.mark.parametrize("spin_seconds", [0.0, 1e9])
def test_skinny_backward_after_a_forward_runs_on_one_thread(rng, monkeypatch, spin_seconds):
    """Within BLAS_SPIN_SECONDS of a skinny forward (OpenBLAS's workers still spin) the fused
    kernel runs on the calling thread only; either way the result is the same and Numba's
    thread count is left as it was."""
    monkeypatch.setattr(backend_module, "BLAS_SPIN_SECONDS", spin_seconds)
    one_thread_calls = []
    run_on_one_thread = backend_module._run_on_one_thread
    monkeypatch.setattr(backend_module, "_run_on_one_thread",
                        lambda *args: one_thread_calls.append(args) or run_on_one_thread(*args))
    threads = numba.get_num_threads()
    X, W, b, dY = make_inputs(rng, 1, 300, 257, np.float32)
    fastlinear.linear_forward(X, W, b, backend="numba")
    dX, dW, db = fastlinear.linear_backward(dY, X, W, backend="numba")
    assert len(one_thread_calls) == (1 if spin_seconds else 0)
    assert numba.get_num_threads() == threads
    ref = reference64(X, W, b, dY)
    assert_matches_reference({"dX": dX, "dW": dW, "db": db}, ref, np.float32)


def test_nan_and_inf_propagate(rng):
    X, W, b, dY = make_inputs(rng, 1, 8, 6, np.float64)
    X[0, 2] = np.nan
    dY[0, 1] = np.inf
    Y, (dX, dW, db) = run_both(X, W, b, dY)
    assert np.isnan(Y).all()
    assert np.isnan(dW[2]).all() and np.isinf(db[1])
    assert np.isinf(dX).any() or np.isnan(dX).any()


def worker_results(n_threads=8, rounds=20):
    """Run forward and backward from ``n_threads`` Python threads at once; return failures."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(n_threads):
        N = (1, 2, 5, 64)[i % 4]  # every path: gemv, skinny prange kernel, gemm
        cases.append(make_inputs(rng, N, 48 + i, 40 + i, np.float64))
    failures = []
    barrier = threading.Barrier(n_threads)

    def work(X, W, b, dY):
        barrier.wait()
        ref = reference64(X, W, b, dY)
        for _ in range(rounds):
            Y, (dX, dW, db) = run_both(X, W, b, dY)
            for name, value in (("Y", Y), ("dX", dX), ("dW", dW), ("db", db)):
                expected, magnitude, terms = ref[name]
                try:
                    assert_close(value, expected, np.float64, terms, magnitude, name)
                except AssertionError as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=work, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_concurrent_calls_from_8_threads():
    assert worker_results() == []


def run_python(code, **env):
    """Run ``code`` in a fresh interpreter with the repository importable; return stdout."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_concurrent_calls_under_workqueue_layer():
    """workqueue is not thread-safe: the backend must serialise its prange kernels there."""
    out = run_python(
        "import numba; from fastlinear.backends import numba as nb; nb.SKINNY_MIN_WEIGHTS = 1;"
        "from tests.test_numba_backend import worker_results;"
        "print(len(worker_results(rounds=5))); print(numba.threading_layer())",
        NUMBA_THREADING_LAYER="workqueue")
    assert out.split() == ["0", "workqueue"]


def test_small_calls_do_not_import_threadpoolctl():
    """threadpoolctl is imported only for the thread count of large calls. (SciPy's BLAS, the
    fallback, is not tested so: Numba imports scipy.linalg itself when its CPU target loads.)"""
    out = run_python(
        "import sys, numpy as np; from fastlinear.backends import numba as nb;"
        "X = np.ones((3, 4)); W = np.ones((4, 5));"
        "nb.forward(X, W, None, None); nb.backward(np.ones((3, 5)), X, W, has_bias=True,"
        " need_dX=True, accumulate=False, dX=None, dW=None, db=None);"
        "print('threadpoolctl' in sys.modules)")
    assert out.split() == ["False"]


def test_scipy_blas_fallback():
    """Without NumPy's BLAS symbols the kernels call SciPy's LP64 BLAS: same results."""
    out = run_python(
        "import numpy as np; from fastlinear.backends import numba as nb, _numba_blas;"
        "_numba_blas.NUMPY_BLAS_SYMBOLS = (); nb.SKINNY_MIN_WEIGHTS = 1;"
        "from tests.test_numba_backend import worker_results;"
        "print(len(worker_results(n_threads=4, rounds=2)));"
        "print(_numba_blas.blas_routines(np.dtype(np.float32)).int_bits)")
    assert out.split() == ["0", "32"]


FORK_AFTER_PARALLEL = """
import os, numpy as np, numba
from numba import njit, prange

@njit(parallel=True)
def users_parallel_sum(a):
    total = 0.0
    for i in prange(a.size):
        total += a[i]
    return total

def skinny_backward():
    nb.SKINNY_MIN_WEIGHTS = 1
    X, W, dY = np.ones((1, 64)), np.ones((64, 32)), np.ones((1, 32))
    args = dict(has_bias=True, need_dX=True, accumulate=False, dX=None, dW=None, db=None)
    return nb.backward(dY, X, W, **args)

{setup}
print(numba.threading_layer(), nb._parallel_usable())
pid = os.fork()
if pid == 0:
    usable = nb._parallel_usable()
    dX, dW, db = skinny_backward()
    os._exit(0 if (dW == 1).all() and (dX == 32).all() and not usable else 3)
print(os.waitpid(pid, 0)[1])
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("setup", [
    # fastlinear's own skinny kernel started the threading layer
    "from fastlinear.backends import numba as nb; skinny_backward()",
    # the user's parallel code started it, after fastlinear was imported
    "from fastlinear.backends import numba as nb; users_parallel_sum(np.ones(1000))",
    # the user's parallel code started it before fastlinear was imported
    "users_parallel_sum(np.ones(1000)); from fastlinear.backends import numba as nb",
])
def test_forked_child_after_parallel_code(setup):
    """Under GNU OpenMP a forked child's parallel region aborts the process ('fork() called
    from a process already using GNU OpenMP'): the child must take the BLAS path."""
    out = run_python(FORK_AFTER_PARALLEL.replace("{setup}", setup),
                     NUMBA_THREADING_LAYER="omp")
    layer, usable_in_parent, child_status = out.split()
    assert layer == "omp" and child_status == "0"
    # in the parent the fused kernel stays usable where the start was seen in this process
    assert usable_in_parent == str(not setup.startswith("users"))


@pytest.mark.parametrize("missing", ["numba", "scipy", "threadpoolctl"])
def test_missing_dependency_names_the_extra(missing):
    out = run_python(
        f"import sys; sys.modules[{missing!r}] = None;"
        "from fastlinear.backends import numba as nb; print(nb.unavailable_reason())")
    assert missing in out and 'pip install "fastlinear[numba]"' in out


def test_cached_kernels_load_in_a_new_process(rng):
    """cache=True: once compiled here, a new process loads the kernels from disk."""
    X, W, b, dY = make_inputs(rng, 3, 4, 5, np.float64)
    run_both(X, W, b, dY)  # compiled (or loaded) in this process: the cache files exist now
    out = run_python(
        "import numpy as np, fastlinear; from fastlinear.backends import numba as nb;"
        "X = np.ones((3, 4)); W = np.ones((4, 5)); b = np.ones(5);"
        "fastlinear.linear_forward(X, W, b, backend='numba');"
        "kernel, _ = nb._plans[('forward', np.dtype(np.float64), True, False)];"
        "print(sum(kernel.stats.cache_misses.values()), sum(kernel.stats.cache_hits.values()))")
    misses, hits = map(int, out.split())
    assert misses == 0 and hits >= 1


def test_blas_threads_follow_numba_threads(rng):
    from fastlinear.backends._numba_blas import blas_thread_controllers as controllers

    X, W, b, dY = make_inputs(rng, 256, 256, 128, np.float64)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        run_both(X, W, b, dY)
        assert [c.get_num_threads() for c in controllers()] == [1] * len(controllers())
    finally:
        numba.set_num_threads(before)
    run_both(X, W, b, dY)
    assert all(c.get_num_threads() == before for c in controllers())


def test_blas_thread_limit_set_by_the_user_is_kept(rng):
    """Issue 18, bug 4: threadpoolctl's limit is the user's; large calls do not undo it."""
    from threadpoolctl import threadpool_limits

    from fastlinear.backends._numba_blas import blas_thread_controllers as controllers

    X, W, b, dY = make_inputs(rng, 256, 256, 128, np.float64)  # 2**23 multiply-adds
    outside = [c.get_num_threads() for c in controllers()]
    with threadpool_limits(limits=1, user_api="blas"):
        run_both(X, W, b, dY)
        assert [c.get_num_threads() for c in controllers()] == [1] * len(controllers())
    assert [c.get_num_threads() for c in controllers()] == outside  # threadpoolctl restored it
    run_both(X, W, b, dY)
    assert [c.get_num_threads() for c in controllers()] == outside


def test_blas_threads_unchanged_since_the_last_call_are_only_read(monkeypatch):
    """Issue 20: once matched, a call with nothing changed reads the counts and stops there
    (threadpoolctl's controllers are not asked: their 4.6 us were the cost)."""
    from fastlinear.backends import _numba_blas

    _numba_blas.match_blas_threads()

    def asked():
        raise AssertionError("the controllers were asked though nothing changed")

    monkeypatch.setattr(_numba_blas, "blas_thread_controllers", asked)
    _numba_blas.match_blas_threads()
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:  # Numba's count changed: the slow path runs (and here meets the stand-in)
        with pytest.raises(AssertionError, match="were asked"):
            _numba_blas.match_blas_threads()
    finally:
        numba.set_num_threads(before)


def test_a_user_limit_set_after_a_first_call_is_honoured(rng):
    """A limit set by someone else after the counts were matched (and remembered) is seen: a
    lower one is kept, a higher one than Numba's count is lowered to it, and when threadpoolctl
    restores the count the next call follows Numba's again."""
    from threadpoolctl import threadpool_limits

    from fastlinear.backends import _numba_blas
    from fastlinear.backends._numba_blas import blas_thread_controllers as controllers

    def counts():
        return [c.get_num_threads() for c in controllers()]

    before = numba.get_num_threads()
    _numba_blas.match_blas_threads()
    matched = counts()
    with threadpool_limits(limits=1, user_api="blas"):
        _numba_blas.match_blas_threads()
        assert counts() == [1] * len(matched)
    _numba_blas.match_blas_threads()
    assert counts() == matched
    X, W, b, dY = make_inputs(rng, 256, 256, 128, np.float64)  # 2**23 multiply-adds
    try:
        numba.set_num_threads(1)
        run_both(X, W, b, dY)
        assert counts() == [1] * len(matched)
        with threadpool_limits(limits=max(2, before), user_api="blas"):
            run_both(X, W, b, dY)  # the user's higher count: lowered to Numba's
            assert counts() == [1] * len(matched)
    finally:
        numba.set_num_threads(before)
    run_both(X, W, b, dY)
    assert counts() == matched


@pytest.mark.parametrize("N", [1, 64])
def test_allocates_only_the_results(rng, N):
    """Forward allocates Y only; backward dX, dW, db only (NumPy allocations, by tracemalloc)."""
    X, W, b, dY = make_inputs(rng, N, 256, 192, np.float64)
    run_both(X, W, b, dY)  # compile and warm up outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        Y = fastlinear.linear_forward(X, W, b, backend="numba")
        forward_peak = tracemalloc.get_traced_memory()[1] - before
        del Y
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        grads = fastlinear.linear_backward(dY, X, W, backend="numba")
        backward_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    slack = 4096
    assert forward_peak <= N * 192 * 8 + slack
    assert backward_peak <= sum(g.nbytes for g in grads) + slack


# ---------------------------------------------------------------------------------------------
# Fused activations: the forward's epilogue and the backward's G = dY * act'(saved) pass.

# Bounds of |act'(z)|: an error e in z moves act(z) by at most this times e.
LIPSCHITZ = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": 1.13, "gelu_tanh": 1.13}
# Rounding of the activation and its derivative themselves (libm's erf, tanh, exp are within a
# few ulps): counted as this many more terms of the dot products that follow.
ACTIVATION_TERMS = 8


def assert_activation_close(Y, activation, Z_ref, dtype):
    """``Y`` against ``act`` of the float64 pre-activation ``Z_ref = (expected, magnitude, terms)``:
    the pre-activation's bound times the Lipschitz constant, plus the activation's own rounding
    (relative to |y|, and to |z| for the GELUs, whose 0.5 (1 + erf) is absolute-accurate)."""
    from fastlinear import activations
    from tests.helpers import error_bound

    expected_z, magnitude, terms = Z_ref
    expected = activations.apply(activation, expected_z)
    own = np.abs(expected) + (np.abs(expected_z) if activation.startswith("gelu") else 0)
    bound = (LIPSCHITZ[activation] * error_bound(dtype, terms, magnitude)
             + 2 * ACTIVATION_TERMS * np.finfo(dtype).eps * own)
    err = np.abs(Y.astype(np.float64) - expected)
    assert (err <= bound).all(), f"{activation}: worst {err.max()!r} over bound {bound.max()!r}"


def derivative_scale(activation, saved):
    """Size of the terms the derivative ``act'`` sums, elementwise: its rounding is relative to
    them, not to a small ``act'`` (they cancel). Order 1, except for the tanh GELU's second
    term, ``0.5 z (1 - t**2) beta (1 + 3 kappa z**2)``, where ``1 - t**2`` is rounded absolutely."""
    from fastlinear import activations as act

    if activation != "gelu_tanh":
        return 1.0
    zc = np.clip(saved, -act.GELU_CLAMP, act.GELU_CLAMP)
    return 1.0 + np.abs(zc) * act.GELU_TANH_BETA * (1 + 3 * act.GELU_TANH_KAPPA * zc * zc)


def reference_through(activation, X, W, dY, saved):
    """Float64 gradients of ``G = dY * act'(saved)`` with their magnitudes: the dot products'
    terms, and the rounding of ``G`` itself, relative to ``|dY|`` times the derivative's terms
    (see ``derivative_scale``)."""
    from fastlinear import activations

    dY64, saved64 = dY.astype(np.float64), saved.astype(np.float64)
    G = activations.grad(activation, dY64, saved64)
    ref = reference64(X, W, None, G)
    loose = reference64(X, W, None,
                        np.abs(G) + np.abs(dY64) * derivative_scale(activation, saved64))
    return {name: (ref[name][0], loose[name][1], ref[name][2] + ACTIVATION_TERMS)
            for name in ("dX", "dW", "db")}


def fused_step(X, W, b, dY, activation, **backward_args):
    """Forward with ``return_saved`` and backward through the activation, numba backend."""
    Y, saved = fastlinear.linear_forward(X, W, b, activation=activation, backend="numba",
                                         return_saved=True)
    grads = fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                       has_bias=b is not None, backend="numba", **backward_args)
    return Y, saved, grads


ACTIVATION_NAMES = ["relu", "gelu", "gelu_tanh", "tanh", "sigmoid"]


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N", [1, SKINNY, SKINNY + 1, 40])  # gemv, skinny, gemm paths
def test_fused_activation(rng, activation, dtype, N):
    X, W, b, dY = make_inputs(rng, N, 37, 29, dtype)
    X *= 0.5  # pre-activations of order 1..10: every part of the curves
    Y, saved, (dX, dW, db) = fused_step(X, W, b, dY, activation)
    ref = reference64(X, W, b, dY)
    assert_activation_close(Y, activation, ref["Y"], dtype)
    if activation.startswith("gelu"):  # the saved pre-activation, written in the same pass
        assert_matches_reference({"Y": saved}, ref, dtype)
    else:
        assert saved is Y
    assert_matches_reference({"dX": dX, "dW": dW, "db": db},
                             reference_through(activation, X, W, dY, saved), dtype)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_fused_activation_dX_by_rows(rng, activation, dtype, dX_by_rows):
    X, W, b, dY = make_inputs(rng, 13, 37, 29, dtype)
    _, saved, (dX, dW, db) = fused_step(X, W, b, views(dY, "F"), activation)
    assert_matches_reference({"dX": dX, "dW": dW, "db": db},
                             reference_through(activation, X, W, dY, saved), dtype)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("N", [SKINNY, 9])
def test_fused_activation_flags_layouts_and_accumulate(rng, activation, N):
    """Strided dY and saved, no dX, no bias, accumulation into given buffers; dY untouched."""
    dtype = np.float64
    X, W, b, dY = make_inputs(rng, N, 23, 19, dtype)
    _, saved = fastlinear.linear_forward(X, W, b, activation=activation, backend="numba",
                                         return_saved=True)
    dY, saved = views(dY, "strided"), views(saved, "F")
    dY_before = dY.copy()
    ref = reference_through(activation, X, W, dY, saved)
    dW0, db0 = rng.standard_normal(W.shape), rng.standard_normal(W.shape[1])
    for has_bias in (True, False):
        dW_buf, db_buf = dW0.copy(), db0.copy()
        dX, dW, db = fastlinear.linear_backward(
            dY, X, W, activation=activation, saved=saved, has_bias=has_bias, need_dX=False,
            accumulate=True, dW=dW_buf, db=db_buf if has_bias else None, backend="numba")
        assert dX is None and dW is dW_buf
        expected, magnitude, terms = ref["dW"]
        assert_close(dW, dW0 + expected, dtype, terms + 1, magnitude + np.abs(dW0), "dW")
        if has_bias:
            expected, magnitude, terms = ref["db"]
            assert_close(db, db0 + expected, dtype, terms + 1, magnitude + np.abs(db0), "db")
        else:
            assert db is None
            np.testing.assert_array_equal(db_buf, db0)
    np.testing.assert_array_equal(dY, dY_before)


SPECIAL_Z = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 20.0, -20.0, 90.0, -90.0, 1e3,
             -1e3, 1e4, -1e4, 3e38, -3e38, np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N", [1, SKINNY, SKINNY + 1])
def test_fused_activation_special_values(activation, dtype, N):
    """Kinks, large |z|, inf and NaN as the reference gives them, and no warnings: ``Z`` is set
    exactly (X = ones (N, 1), W = the values as one row), so ``db / N`` is ``act'(z)``."""
    import warnings

    from fastlinear import activations

    z = np.array(SPECIAL_Z, dtype=dtype)
    X, W, dY = np.ones((N, 1), dtype), z[None, :].copy(), np.ones((N, z.size), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Y, saved, (_, _, db) = fused_step(X, W, np.zeros(z.size, dtype), dY, activation)
    with np.errstate(all="ignore"):
        expected_y = activations.apply(activation, np.tile(z, (N, 1)))
        expected_g = activations.grad(activation, dY, saved)[0]
    eps = np.finfo(dtype).eps
    zz = np.tile(z, (N, 1)).astype(np.float64)
    with np.errstate(all="ignore"):
        own = np.abs(zz) if activation.startswith("gelu") else 0
        check_values(Y, expected_y, 2 * ACTIVATION_TERMS * eps * (np.abs(expected_y) + own))
        scale = derivative_scale(activation, saved[0].astype(np.float64))
        check_values(db / N, expected_g, 2 * ACTIVATION_TERMS * eps * (np.abs(expected_g) + scale))


def check_values(actual, expected, bound):
    """NaN where ``expected`` is NaN, infinities equal, finite values within ``bound``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(expected)],
                                  expected[~finite & ~np.isnan(expected)])
    bound = np.broadcast_to(bound, expected.shape)
    err = np.abs(actual[finite] - expected[finite])
    assert (err <= bound[finite]).all(), (actual, expected)
