"""Property tests (hypothesis): random shapes, dtypes, layouts, bias, batch dims, on every backend.

Every backend's forward and backward must agree with the NumPy reference backend and with plain
float64 math. The tolerance is stated once, per dtype, by ``tests.helpers.error_bound``:

    |got - exact| <= 2 (k + 1) u (|x| . |w|)   elementwise,

with ``k`` the length of the sum (``D + 1`` for ``Y`` with its bias term, ``M`` for ``dX``, ``N``
for ``dW`` and ``db``) and ``u`` the unit roundoff of the dtype (2**-24 for float32, 2**-53 for
float64). This is Higham's bound for a dot product summed in any order (BLAS blocking, threads,
SIMD lanes), doubled because both sides of the comparison with the reference carry their own
rounding; against float64 math of float32 inputs the bound has room to spare. It scales with the
magnitudes, so inputs of any scale (drawn here from 1e-3 to 1e3) are held to the same bound.

Profiles (``FASTLINEAR_HYPOTHESIS_PROFILE``): ``ci`` (default) runs few examples so the whole
suite stays fast; ``thorough`` runs many. ``deadline=None``: numba compiles on first call.
Padding around strided views is NaN, so a kernel that reads outside a view fails loudly, and the
padding is checked afterwards, so a kernel that writes outside an output fails too.
"""

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import given as given_examples
from hypothesis import strategies as st

import fastlinear
from tests.helpers import assert_close, reference64, to_numpy

PROFILE_VAR = "FASTLINEAR_HYPOTHESIS_PROFILE"
PROFILES = {
    "ci": {"max_examples": 25},
    "thorough": {"max_examples": 2000},
}
for _name, _options in PROFILES.items():
    settings.register_profile(f"fastlinear-{_name}", deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.function_scoped_fixture],
                              **_options)
PROFILE_NAME = os.environ.get(PROFILE_VAR, "").strip().lower() or "ci"
if PROFILE_NAME not in PROFILES:
    raise ValueError(f"{PROFILE_VAR}={PROFILE_NAME!r}: expected one of {', '.join(PROFILES)}")
# Applied per test (not loaded globally), so other hypothesis tests keep their own settings.
PROFILE = settings.get_profile(f"fastlinear-{PROFILE_NAME}")

MAX_DIM = 300  # N, D, M up to a few hundred
LAYOUTS = ("C", "F", "transposed", "padded", "strided", "reversed")
DTYPES = (np.float32, np.float64)


def in_layout(a, layout):
    """``a`` (ndim >= 1) as a view in memory ``layout``; returns ``(view, base)``.

    ``base`` owns the memory (NaN outside the view), to check afterwards that nothing wrote
    outside the view. ``transposed``: the last two axes stored swapped (an F-ordered matrix in a
    C-ordered batch); ``padded``: rows longer than the data, at an offset (BLAS's ``lda > n``);
    ``strided``: steps of 2 and 3 in alternate axes; ``reversed``: negative strides.
    """
    if layout == "F":
        base = np.asfortranarray(a)
        return base, base
    if layout == "transposed" and a.ndim >= 2:
        base = np.ascontiguousarray(np.swapaxes(a, -1, -2))
        return np.swapaxes(base, -1, -2), base
    if layout == "reversed":
        flip = (slice(None, None, -1),) * a.ndim
        base = np.ascontiguousarray(a[flip])
        return base[flip], base
    if layout == "padded":
        base = np.full((*a.shape[:-1], a.shape[-1] + 3), np.nan, dtype=a.dtype)
        view = base[..., 1:a.shape[-1] + 1]
    elif layout == "strided":
        steps = [2 + axis % 2 for axis in range(a.ndim)]
        base = np.full([n * step for n, step in zip(a.shape, steps, strict=True)], np.nan,
                       dtype=a.dtype)
        view = base[tuple(slice(None, None, step) for step in steps)]
    else:  # "C", and "transposed" for 1-D
        base = np.ascontiguousarray(a)
        return base, base
    view[...] = a
    return view, base


def rows(a):
    """``a`` as a 2-D (rows, last axis) array, also when a dimension is 0."""
    return np.asarray(a).reshape(int(np.prod(a.shape[:-1])), a.shape[-1])


@st.composite
def problems(draw):
    """A random linear-layer problem: shapes, dtype, layouts, bias, batch dims and values."""
    small = st.sampled_from([0, 1, 2, 3])
    dim = st.one_of(small, st.integers(1, MAX_DIM))
    N, D, M = draw(dim), draw(dim), draw(dim)
    batch = draw(st.sampled_from([(), (), "split", "split3"]))
    if batch == "split" and N > 0:
        first = draw(st.sampled_from([d for d in range(1, min(N, 16) + 1) if N % d == 0]))
        lead = (first, N // first)
    elif batch == "split3":
        lead = (draw(st.integers(0, 3)), 1, draw(st.integers(0, 4)))
        N = lead[0] * lead[2]
    else:
        lead = (N,)
    return {
        "lead": lead, "N": N, "D": D, "M": M,
        "dtype": draw(st.sampled_from(DTYPES)),
        "layouts": {name: draw(st.sampled_from(LAYOUTS)) for name in ("X", "W", "dY")},
        "bias": draw(st.sampled_from([None, "1d", "row", "strided"])),
        "scale": draw(st.sampled_from([1e-3, 1.0, 1e3])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def build(problem):
    """The arrays of ``problem`` in their layouts, plus the bases that own their memory."""
    rng = np.random.default_rng(problem["seed"])
    lead, D, M, dtype, scale = (problem[k] for k in ("lead", "D", "M", "dtype", "scale"))

    def values(*shape):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    arrays, bases = {}, {}
    for name, shape in (("X", (*lead, D)), ("W", (D, M)), ("dY", (*lead, M))):
        arrays[name], bases[name] = in_layout(values(*shape), problem["layouts"][name])
    kind = problem["bias"]
    if kind is None:
        arrays["b"] = None
    else:
        b = values(M)
        if kind == "row":
            b = b.reshape(1, M)
        arrays["b"], bases["b"] = in_layout(b, "strided" if kind == "strided" else "C")
    return arrays, bases


def snapshot(bases):
    return {name: base.copy() for name, base in bases.items()}


def assert_untouched(bases, before):
    for name, base in bases.items():
        np.testing.assert_array_equal(base, before[name], err_msg=f"{name} was written to")


def check(name, got, expected, dtype, reference=None):
    """``got`` against float64 math ``expected = (value, magnitude, terms)`` (see
    ``reference64``), and against the reference backend's result if given."""
    value, magnitude, terms = expected
    got = to_numpy(got)
    assert isinstance(got, np.ndarray) and got.dtype == dtype, (name, type(got), got.dtype)
    got = got.reshape(value.shape)
    assert_close(got, value, dtype, terms, magnitude, f"{name} vs float64 math")
    if reference is not None:
        reference = to_numpy(reference).reshape(value.shape)
        assert_close(got, reference, dtype, terms, magnitude, f"{name} vs the numpy reference")


def float64_math(arrays):
    """``reference64`` of the problem, batch dimensions flattened to rows."""
    b = arrays["b"]
    return reference64(rows(arrays["X"]), arrays["W"], None if b is None else np.ravel(b),
                       rows(arrays["dY"]))


@PROFILE
@given_examples(problem=problems())
def test_forward_backward_match_reference(backend, problem):
    arrays, bases = build(problem)
    before = snapshot(bases)
    X, W, b, dY = arrays["X"], arrays["W"], arrays["b"], arrays["dY"]
    lead, D, M, dtype = problem["lead"], problem["D"], problem["M"], problem["dtype"]
    has_bias = b is not None
    exact = float64_math(arrays)

    Y = fastlinear.linear_forward(X, W, b, backend=backend)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, has_bias=has_bias, backend=backend)
    reference = {"Y": fastlinear.linear_forward(X, W, b, backend="numpy")}
    reference["dX"], reference["dW"], reference["db"] = fastlinear.linear_backward(
        dY, X, W, has_bias=has_bias, backend="numpy")
    assert_untouched(bases, before)

    assert Y.shape == (*lead, M) and dX.shape == (*lead, D) and dW.shape == (D, M)
    for name, got in (("Y", Y), ("dX", dX), ("dW", dW)):
        check(name, got, exact[name], dtype, reference[name])
    if has_bias:
        assert db.shape == (M,)
        check("db", db, exact["db"], dtype, reference["db"])
    else:
        assert db is None


@PROFILE
@given_examples(problem=problems(), need_dX=st.booleans(), repeats=st.integers(1, 3))
def test_buffers_and_accumulation(backend, problem, need_dX, repeats):
    """Given buffers are filled (NaN before) and returned; accumulate adds exactly once a call."""
    arrays, _ = build(problem)
    X, W, b, dY = arrays["X"], arrays["W"], arrays["b"], arrays["dY"]
    lead, D, M, dtype = problem["lead"], problem["D"], problem["M"], problem["dtype"]
    has_bias = b is not None
    exact = float64_math(arrays)

    out = np.full((*lead, M), np.nan, dtype=dtype)
    assert fastlinear.linear_forward(X, W, b, out=out, backend=backend) is out
    check("Y (out)", out, exact["Y"], dtype)

    rng = np.random.default_rng(problem["seed"] + 1)
    dW0 = rng.standard_normal((D, M)).astype(dtype)
    db0 = rng.standard_normal(M).astype(dtype)
    dW, db = dW0.copy(), db0.copy()
    dX = np.full((*lead, D), np.nan, dtype=dtype)
    for _ in range(repeats):
        result = fastlinear.linear_backward(dY, X, W, has_bias=has_bias, need_dX=need_dX,
                                            accumulate=True, dX=dX, dW=dW, db=db,
                                            backend=backend)
        assert result[0] is (dX if need_dX else None)
        assert result[1] is dW
        assert result[2] is (db if has_bias else None)
    if need_dX:
        check("dX (buffer)", dX, exact["dX"], dtype)
    else:
        assert np.isnan(dX).all()
    # ``repeats`` sums of N terms added onto the start value: at most repeats * (N + 1) terms
    for name, start, buffer in (("dW", dW0, dW), ("db", db0, db)):
        if name == "db" and not has_bias:
            np.testing.assert_array_equal(db, db0)
            continue
        value, magnitude, terms = exact[name]
        accumulated = (start + repeats * value, np.abs(start) + repeats * magnitude,
                       repeats * (terms + 1))
        check(f"{name} (accumulated {repeats}x)", buffer, accumulated, dtype)
