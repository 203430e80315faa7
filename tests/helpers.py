"""Helpers the tests share: backend parameters, stated tolerances, inputs, float64 references."""

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch

BACKEND_NAMES = tuple(fastlinear.BACKENDS)
CPU_DTYPES = (np.float32, np.float64)


def install_registry(monkeypatch, **options):
    """A fresh backend registry, ``_dispatch.Registry(**options)``, for the rest of the test:
    nothing loaded, nothing chosen, the environment not read yet."""
    fresh = _dispatch.Registry(**options)
    monkeypatch.setattr(_dispatch, "registry", fresh)
    return fresh


def set_backend_variable(monkeypatch, value):
    """Set ``FASTLINEAR_BACKEND`` (unset it for ``None``) and have the registry read it again at
    the next call, as a new process would (it reads it once per process)."""
    if value is None:
        monkeypatch.delenv(fastlinear.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(fastlinear.ENV_VAR, value)
    fastlinear.set_backend(None)


def backend_param(name):
    """A pytest param for backend ``name`` that skips, with the reason, where it cannot run.

    cupy's carries the ``gpu`` mark: ``pytest -m gpu`` on a GPU machine (the first contact)
    runs every backend-generic test through cupy too."""
    reason = _dispatch.unavailable_reason(name)
    marks = [pytest.mark.gpu] if name == "cupy" else []
    if reason:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(name, marks=marks, id=name)


def to_numpy(a):
    """A NumPy copy/view of a NumPy or CuPy array (``None`` stays ``None``)."""
    if a is None:
        return None
    return a.get() if type(a).__module__.startswith("cupy") else np.asarray(a)


def error_bound(dtype, terms, magnitude):
    """Worst-case rounding error of a sum of ``terms`` products, elementwise.

    A dot product of length k computed in floating point with unit roundoff u satisfies
    |fl(x.w) - x.w| <= k u (|x|.|w|) (Higham, Accuracy and Stability, eq. 3.5), whatever order
    the terms are summed in (BLAS blocking, threads, SIMD lanes). ``magnitude`` is |x|.|w| per
    element (plus |b| for the bias term); ``terms`` is k. A factor 2 covers the reference's own
    rounding, as both sides are compared with each other. Tiny absolute slack covers k = 0.
    """
    u = np.finfo(dtype).eps / 2
    return 2 * (terms + 1) * u * magnitude + np.finfo(dtype).tiny


def assert_close(actual, expected, dtype, terms, magnitude, what=""):
    """Assert ``|actual - expected| <= error_bound`` elementwise, with a readable message."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = np.broadcast_to(error_bound(dtype, terms, np.asarray(magnitude, dtype=np.float64)),
                            expected.shape)
    err = np.abs(actual - expected)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {err.size} elements off by more than {terms + 1} terms x "
            f"eps; worst at {i}: got {actual[i]!r}, expected {expected[i]!r}, bound {bound[i]!r}"
        )


def assert_matches_reference(results, ref, dtype):
    """``assert_close`` for each ``name -> value`` of ``results`` against ``ref[name]``, as
    ``reference64`` gives them (expected value, magnitude, number of terms)."""
    for name, value in results.items():
        expected, magnitude, terms = ref[name]
        assert_close(value, expected, dtype, terms, magnitude, name)


def make_inputs(rng, N, D, M, dtype, bias=True):
    """Random X (N, D), W (D, M), b (M,) and dY (N, M) with values of both signs."""
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype) if bias else None
    dY = rng.standard_normal((N, M)).astype(dtype)
    return X, W, b, dY


def reference64(X, W, b, dY):
    """Float64 forward and backward with the magnitudes that bound their rounding errors."""
    X64, W64, dY64 = (np.asarray(a, dtype=np.float64) for a in (X, W, dY))
    b64 = np.zeros(W.shape[1]) if b is None else np.asarray(b, dtype=np.float64)
    return {
        "Y": (X64 @ W64 + b64, np.abs(X64) @ np.abs(W64) + np.abs(b64), X.shape[1] + 1),
        "dX": (dY64 @ W64.T, np.abs(dY64) @ np.abs(W64).T, W.shape[1]),
        "dW": (X64.T @ dY64, np.abs(X64).T @ np.abs(dY64), X.shape[0]),
        "db": (dY64.sum(0), np.abs(dY64).sum(0), X.shape[0]),
    }


# A small problem, (N, D, M) = (4, 3, 2), that the tests of errors, inputs and state share.
SMALL = make_inputs(np.random.default_rng(6), 4, 3, 2, np.float64)


def forward_small(backend, **kwargs):
    """``linear_forward`` on ``SMALL``, with the arguments in ``kwargs`` replaced."""
    X, W, b, _ = SMALL
    args = {"X": X, "W": W, "b": b, "out": None, **kwargs}
    return fastlinear.linear_forward(args["X"], args["W"], args["b"], out=args["out"],
                                     backend=backend)


def backward_small(backend, **kwargs):
    """``linear_backward`` on ``SMALL``, with the arguments in ``kwargs`` replaced or added."""
    X, W, _, dY = SMALL
    args = {"dY": dY, "X": X, "W": W, **kwargs}
    options = {k: v for k, v in args.items() if k not in ("dY", "X", "W")}
    return fastlinear.linear_backward(args["dY"], args["X"], args["W"], backend=backend,
                                      **options)
