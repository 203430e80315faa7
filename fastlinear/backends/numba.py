"""The Numba CPU backend: the layer's compiled functions around NumPy's BLAS, bias, activation
and db fused.

Method, by shape:

* Forward, N >= 2: one compiled call fills ``Y`` with the bias rows, then runs gemm with
  ``beta=1`` straight into ``Y``: no temporary of ``Y``'s size, no separate bias pass. Each
  row of ``Y``, still in cache, is then copied to the pre-activation buffer (if given) and
  activated.
* Forward, N = 1: gemv (``beta=1`` on the bias), which streams ``W`` at memory speed.
* Backward: ``G = dY * act'(saved)`` and ``db`` in one pass, in the compiled call that then
  runs the products on ``G`` (``dY`` is read, never written).
* Backward, N > ``SKINNY_ROWS``: gemm for ``dX`` and ``dW`` (``beta=1`` when accumulating);
  for small calls (``ROWS_DOT_ROWS_*``) ``dX`` as register-blocked dot products of rows.
* Backward, N <= ``SKINNY_ROWS`` and ``W`` not tiny: memory-bound, so one ``prange`` function
  walks the rows of ``W`` and ``dW`` together, once.

The BLAS is NumPy's own (see ``_numba_blas``). Large calls lower its threads to
``numba.get_num_threads()`` through threadpoolctl, and never raise them above a limit the user
set. BLAS calls and ``prange`` functions never run at the same time within a call, so they do
not oversubscribe the cores.

float32 products and sums are accumulated in float32, as by the BLAS and the NumPy reference.

In a process forked after GNU OpenMP started (by anyone's parallel code) the ``prange`` path is
not taken: a parallel region there would abort the child.
"""

import importlib.util
import math
import os
import threading
import time

import numpy as np

from fastlinear import _profile

NAME = "numba"
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ARRAY_LIBRARIES = ("numpy",)

# Batches of at most this many rows use the fused memory-bound backward, when W has at least
# SKINNY_MIN_WEIGHTS elements: below that, starting the threads costs more than it saves.
SKINNY_ROWS = 4
SKINNY_MIN_WEIGHTS = 1 << 17
# Backward calls of at most this many multiply-adds, with rows of at least this length, compute
# dX = G @ W.T as register-blocked dot products of rows (_numba_layer._rows_dot_rows). It beat
# OpenBLAS's gemm with a transposed operand on an AVX-512 machine and lost on an AVX2-only Zen 3
# (0.82-0.87x NumPy), so it is off unless ``python -m fastlinear tune`` measured it to pay here.
ROWS_DOT_ROWS_MAX_WORK = 0
ROWS_DOT_ROWS_MIN_M = 96
# Shape classes (``shape_class``) where ``tune`` measured NumPy's own expression faster than
# this backend's kernels on this machine: calls of those classes run the NumPy reference.
NUMPY_CLASSES: frozenset[str] = frozenset()
_numpy_keys: frozenset[tuple] = frozenset()  # the same as _class_key tuples, for the calls
# OpenBLAS's workers spin-wait for about this long after each call; a prange function started
# in that window shares the cores with them and runs slower than on one thread. So the skinny
# backward runs on the calling thread alone this soon after a skinny forward (a training step).
# OpenBLAS's default is 2**28 cycles (0.11 s at 2.45 GHz); ``tune`` measures it (CPU time burnt
# after a call); without a profile, 0.25 s is safe down to about 1 GHz.
BLAS_SPIN_SECONDS = 0.25


def _missing_dependency():
    """An ImportError naming SciPy or threadpoolctl where one is not installed, else ``None``.

    They are imported only when needed (SciPy's BLAS is the fallback; threadpoolctl sets the
    BLAS's threads for large calls): here they are only looked up.
    """
    for name in ("scipy", "threadpoolctl"):
        if importlib.util.find_spec(name) is None:
            return ImportError(f"No module named {name!r}")
    return None


_IMPORT_ERROR: ImportError | None
try:
    import numba

    from fastlinear.backends import _numba_blas, _numba_layer
    from fastlinear.backends import numpy as _reference
    from fastlinear.backends._numba_activations import activation_code
except ImportError as exc:  # the dispatcher imports this module to ask whether it can run
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = _missing_dependency()


# ---------------------------------------------------------------------------------------------
# The tuning profile (fastlinear._profile): this machine's thresholds, read at import.

def _is_class_name(name):
    """``"pass:path:dtype:bits"`` as ``shape_class`` writes it."""
    if not isinstance(name, str) or name.count(":") != 3:
        return False
    pass_name, path, dtype_name, bits = name.split(":")
    try:
        np.dtype(dtype_name)
    except TypeError:
        return False
    return pass_name in ("forward", "backward") and bool(path) and bits.isdigit()


PROFILE_SCHEMA = {"rows_dot_rows_max_work": _profile.int_at_least(0),
                  "rows_dot_rows_min_m": _profile.int_at_least(1),
                  "skinny_min_weights": _profile.int_at_least(0),
                  "numpy_classes": _profile.list_of(_is_class_name),
                  "blas_spin_seconds": _profile.seconds_at_most(10.0),
                  "blas_threads_min_work": _profile.int_at_least(1)}


def profile_key():
    """What the thresholds depend on: the CPU, the BLAS the kernels call, library versions."""
    blas = [{"api": c.internal_api, "version": c.version, "architecture": c.architecture}
            for c in _numba_blas.blas_thread_controllers()]
    return {**_profile.cpu_key(), "blas": blas, "numpy": np.__version__,
            "numba": numba.__version__, "fastlinear": _profile.library_version("fastlinear")}


def apply_profile(values):
    """Put measured thresholds in force (names of ``PROFILE_SCHEMA``; the rest keep theirs)."""
    global ROWS_DOT_ROWS_MAX_WORK, ROWS_DOT_ROWS_MIN_M, SKINNY_MIN_WEIGHTS, NUMPY_CLASSES
    global _numpy_keys, BLAS_SPIN_SECONDS
    classes = frozenset(str(name) for name in values.get("numpy_classes", NUMPY_CLASSES))
    keys = set()
    for name in classes:  # all checked before anything changes
        pass_name, path, dtype_name, bits = name.split(":")
        keys.add((pass_name, path, np.dtype(dtype_name).char, int(bits)))
    ROWS_DOT_ROWS_MAX_WORK = values.get("rows_dot_rows_max_work", ROWS_DOT_ROWS_MAX_WORK)
    ROWS_DOT_ROWS_MIN_M = values.get("rows_dot_rows_min_m", ROWS_DOT_ROWS_MIN_M)
    SKINNY_MIN_WEIGHTS = values.get("skinny_min_weights", SKINNY_MIN_WEIGHTS)
    NUMPY_CLASSES, _numpy_keys = classes, frozenset(keys)
    BLAS_SPIN_SECONDS = float(values.get("blas_spin_seconds", BLAS_SPIN_SECONDS))
    _numba_blas.BLAS_THREADS_MIN_WORK = values.get("blas_threads_min_work",
                                                   _numba_blas.BLAS_THREADS_MIN_WORK)


def _class_key(pass_name, N, D, M, dtype):
    """``(pass, path, dtype char, bit length of the multiply-adds)``: calls of one path within a
    factor of two of work share a class."""
    if pass_name == "forward":
        path = "gemv" if N == 1 else "gemm"
    elif 0 < N <= SKINNY_ROWS and D * M >= SKINNY_MIN_WEIGHTS:
        path = "skinny"
    else:
        path = "gemm"
    return pass_name, path, np.dtype(dtype).char, (N * D * M).bit_length()


def shape_class(pass_name, N, D, M, dtype):
    """``"pass:path:dtype:size"``, the class of a call as the profile names it."""
    pass_name, path, char, bits = _class_key(pass_name, N, D, M, dtype)
    return f"{pass_name}:{path}:{np.dtype(char).name}:{bits}"


def unavailable_reason():
    """``None`` when Numba imports and SciPy and threadpoolctl are installed, else why not and
    what to install."""
    if _IMPORT_ERROR is None:
        return None
    return (f"{_IMPORT_ERROR} (the numba backend needs numba, scipy and threadpoolctl: "
            f'pip install "fastlinear[numba]")')


# The one cache of what runs: key = (function name, dtype, *which optional arrays are present)
# -> (compiled function, the BLAS routines it calls for that dtype).
_plans: dict[tuple, tuple] = {}
_plans_lock = threading.Lock()


def _plan(key):
    """What a call of ``key`` runs: compiled (or loaded from Numba's cache) once per process."""
    with _plans_lock:
        plan = _plans.get(key)
        if plan is None:
            plan = (_numba_layer.compile_function(key), _numba_blas.blas_routines(key[1]))
            _plans[key] = plan
    return plan


class _ProcessState:
    """What this backend remembers between calls in this process."""

    def __init__(self):
        self.skinny_forward_end = -math.inf  # when the last skinny forward ended (perf_counter)
        # The process in which GNU OpenMP, if it starts, starts: this one, or None when it had
        # already started when this module was imported (then it may have started in a parent).
        self.openmp_owner = None


_state = _ProcessState()


# ---------------------------------------------------------------------------------------------
# Numba's threading layer.

_parallel_lock = threading.Lock()


def _threading_layer():
    """Numba's threading layer once a parallel region started it (in this process or in the
    parent it was forked from), else ``None``."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _note_openmp_owner():
    """Record this process as the future owner of GNU OpenMP, unless it has started already."""
    if _threading_layer() != "omp":
        _state.openmp_owner = os.getpid()


def _parallel_usable():
    """False where GNU OpenMP started in another process (a parent this one was forked from, by
    whoever's parallel code): a parallel region here would abort the process.

    The callers then take the BLAS path (OpenBLAS is fork-safe).
    """
    return _threading_layer() != "omp" or _state.openmp_owner == os.getpid()


def _run_on_one_thread(function, *args):
    """Run a ``prange`` function on the calling thread only (Numba's thread count is per thread)."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return _run_parallel(function, *args)
    finally:
        numba.set_num_threads(threads)


def _run_parallel(function, *args):
    """Run a ``prange`` function; serialised where the threading layer is not thread-safe
    (``workqueue``) or not known yet."""
    if _threading_layer() not in (None, "workqueue"):
        return function(*args)
    with _parallel_lock:
        return function(*args)


if _IMPORT_ERROR is None:
    _profile.apply_section(NAME, profile_key, PROFILE_SCHEMA, apply_profile)
    _note_openmp_owner()
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_note_openmp_owner)


# ---------------------------------------------------------------------------------------------
# Entry points.


def forward(X, W, b, out, activation=None, preactivation=None):
    """``Y = act(X @ W + b)`` into ``out`` (or a new array); see ``fastlinear.backends``."""
    # Written for the per-call overhead at tiny shapes: one dict lookup finds what to call.
    dtype = W.dtype
    if _numpy_keys and _class_key("forward", *X.shape, W.shape[1], dtype) in _numpy_keys:
        return _reference.forward(X, W, b, out, activation, preactivation)
    key = ("forward", dtype, b is not None, preactivation is not None)
    function, blas = _plans.get(key) or _plan(key)
    N, D = X.shape
    M = W.shape[1]
    if out is None:
        out = np.empty((N, M), dtype)
    if N * D * M >= _numba_blas.BLAS_THREADS_MIN_WORK:
        _numba_blas.match_blas_threads()
    function(blas.gemm, blas.gemv, blas.int_bits, X, W, b, out, activation_code(activation),
             preactivation)
    if N <= SKINNY_ROWS and D * M >= SKINNY_MIN_WEIGHTS:
        _state.skinny_forward_end = time.perf_counter()
    return out


def backward(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db, activation=None,
             saved=None):
    """Gradients from ``dY``, through the activation; see ``fastlinear.backends``."""
    N, D = X.shape
    M = W.shape[1]
    dtype = W.dtype
    if _numpy_keys and _class_key("backward", N, D, M, dtype) in _numpy_keys:
        return _reference.backward(dY, X, W, has_bias, need_dX, accumulate, dX, dW, db,
                                   activation, saved)
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
    code = activation_code(activation)
    has_saved = activation is not None
    if not has_saved:
        saved = None
    if (0 < N <= SKINNY_ROWS and D * M >= SKINNY_MIN_WEIGHTS
            and (M <= 1 or W.strides[1] == W.itemsize)
            and _parallel_usable()):
        key = ("skinny_backward", dtype, need_dX, has_bias, has_saved)
        function, _ = _plans.get(key) or _plan(key)
        args = (dY, X, W, dX, dW, db, accumulate, code, saved)
        if time.perf_counter() - _state.skinny_forward_end < BLAS_SPIN_SECONDS:
            _run_on_one_thread(function, *args)
        else:
            _run_parallel(function, *args)
    else:
        key = ("backward", dtype, need_dX, has_bias, has_saved)
        function, blas = _plans.get(key) or _plan(key)
        if N * D * M >= _numba_blas.BLAS_THREADS_MIN_WORK:
            _numba_blas.match_blas_threads()
        dX_by_rows = (need_dX and N * D * M <= ROWS_DOT_ROWS_MAX_WORK and M >= ROWS_DOT_ROWS_MIN_M
                      and (M <= 1 or W.strides[1] == W.itemsize)
                      and (has_saved or M <= 1 or dY.strides[1] == dY.itemsize))
        function(blas.gemm, blas.int_bits, dY, X, W, dX, dW, db, accumulate, code, saved,
                 dX_by_rows)
    return dX, dW, db
