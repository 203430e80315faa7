"""Fused activations: every activation x backend x dtype against PyTorch and float64 math.

Tolerances extend ``tests.helpers.error_bound`` through the activation. With ``e_Z`` the bound of
the pre-activation ``Z = X W + b``: ``|Y - y(Z)| <= L e_Z + c u |Y|`` (``L`` bounds ``|act'|``,
1.13 for GELU; ``c u`` the activation's own rounding), and the upstream gradient through the
derivative ``G = dY act'(Z)`` is off by at most ``|dY| (L2 e_Z + c u)`` (``L2`` bounds
``|act''|``, below 1 for all five), which ``dX = G W^T``, ``dW = X^T G``, ``db = sum G`` carry on
as ``|e_G| |W|^T`` etc. on top of their own product bounds. ReLU's mask is taken from the
backend's own ``Y``: where ``|Z|`` is below ``e_Z`` either side of the kink is right.
"""

import warnings

import numpy as np
import pytest
from hypothesis import given as given_examples
from hypothesis import strategies as st

import fastlinear
from fastlinear import activations
from tests.helpers import error_bound, to_numpy
from tests.test_properties import PROFILE, build, problems, rows

ACTS = activations.ACTIVATIONS
LIPSCHITZ = 1.13  # max |act'| over the five (GELU's), and a bound on |act''| too
OWN_ROUNDING = 16  # ulps an activation and its derivative may round by (erf, exp, tanh)


def torch_reference(X, W, b, dY, activation):
    """Float64 forward and autograd backward by PyTorch (skips where it is not installed)."""
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for activations")
    functions = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "gelu": lambda z: torch.nn.functional.gelu(z, approximate="none"),
                 "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh")}
    Xt, Wt, bt = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (X, W, b))
    Z = Xt @ Wt + bt
    Y = functions[activation](Z)
    Y.backward(torch.tensor(np.asarray(dY, np.float64)))
    return {"Z": Z.detach().numpy(), "Y": Y.detach().numpy(), "dX": Xt.grad.numpy(),
            "dW": Wt.grad.numpy(), "db": bt.grad.numpy()}


def exact_saved(activation, exact):
    """What the activation's derivative reads, from float64 ``{"Z": ..., "Y": ...}``."""
    if activations.saved_for_backward(activation) == "preactivation":
        return exact["Z"]
    return exact["Y"]


def bounds(X, W, b, dY, G_exact, dtype, activation):
    """Elementwise error bounds of Y, dX, dW, db (see the module docstring)."""
    X, W, b, dY = (np.abs(np.asarray(a, np.float64)) for a in (X, W, b, dY))
    N, D = X.shape
    u = np.finfo(dtype).eps / 2
    e_Z = error_bound(dtype, D + 1, X @ W + b)
    e_G = np.zeros_like(dY) if activation == "relu" else dY * (LIPSCHITZ * e_Z + OWN_ROUNDING * u)
    G = np.abs(G_exact)
    return {
        "Y": lambda Y: LIPSCHITZ * e_Z + OWN_ROUNDING * u * np.abs(Y),
        "dX": e_G @ W.T + error_bound(dtype, W.shape[1], G @ W.T),
        "dW": X.T @ e_G + error_bound(dtype, N, X.T @ G),
        "db": e_G.sum(0) + error_bound(dtype, N, G.sum(0)),
    }


def assert_within(name, got, expected, bound):
    got = np.asarray(to_numpy(got), np.float64)
    err = np.abs(got - expected)
    bad = ~(err <= bound) & ~(np.isnan(got) & np.isnan(expected))
    assert not bad.any(), (f"{name}: {bad.sum()} of {err.size} off; worst got "
                           f"{got[bad][0]!r} expected {expected[bad][0]!r} bound {bound[bad][0]!r}")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 7, 5), (33, 64, 130), (3, 300, 2), (40, 17, 1)])
def test_against_torch(backend, activation, dtype, shape):
    N, D, M = shape
    rng = np.random.default_rng(sum(shape))
    X = rng.standard_normal((N, D)).astype(dtype)
    W = (rng.standard_normal((D, M)) / np.sqrt(D) * 2).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    dY = rng.standard_normal((N, M)).astype(dtype)
    Y, saved = fastlinear.linear_forward(X, W, b, activation=activation, backend=backend,
                                         return_saved=True)
    dX, dW, db = fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                            backend=backend)
    ref = torch_reference(X, W, b, dY, activation)
    if activation == "relu":  # the side of the kink the backend's own Z fell on
        G = np.asarray(dY, np.float64) * (to_numpy(Y) > 0)
        W64 = W.astype(np.float64)
        ref["dX"], ref["dW"], ref["db"] = G @ W64.T, X.astype(np.float64).T @ G, G.sum(0)
    else:
        G = activations.grad(activation, dY.astype(np.float64), exact_saved(activation, ref))
    bound = bounds(X, W, b, dY, G, dtype, activation)
    for name, got in (("dX", dX), ("dW", dW), ("db", db)):
        assert to_numpy(got).dtype == dtype
        assert_within(name, got, ref[name], bound[name])
    assert_within("Y", Y, ref["Y"], bound["Y"](ref["Y"]))
    if activations.saved_for_backward(activation) == "preactivation":
        assert_within("Z", saved, ref["Z"], bound["Y"](ref["Z"]) / LIPSCHITZ)
    else:
        assert saved is Y


@pytest.mark.parametrize("activation", ACTS)
def test_layer_matches_functional(backend, activation):
    rng = np.random.default_rng(11)
    layer = fastlinear.Linear(6, 4, backend=backend, rng=3, activation=activation)
    X, dY = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 4))
    Y = layer.forward(X)
    Y_ref, saved = fastlinear.linear_forward(X, layer.W, layer.b, activation=activation,
                                             backend="numpy", return_saved=True)
    np.testing.assert_allclose(to_numpy(Y), Y_ref, rtol=1e-12, atol=1e-14)
    layer.zero_grad()
    dX = layer.backward(dY, accumulate=True)
    dX2 = layer.backward(dY, accumulate=True, need_dX=False)
    assert dX2 is None
    ref = fastlinear.linear_backward(dY, X, layer.W, activation=activation, saved=saved,
                                     backend="numpy")
    np.testing.assert_allclose(to_numpy(dX), ref[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(layer.dW), 2 * ref[1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(to_numpy(layer.db), 2 * ref[2], rtol=1e-12, atol=1e-14)
    assert repr(layer).endswith(f"activation={activation!r})")


SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4, 1e30,
           -1e30, 3e38, -3e38]


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_special_values_and_kinks(backend, activation, dtype):
    """Pre-activations set exactly (X = 1, W = the values): kinks, NaN, inf, huge |z|."""
    z = np.array(SPECIAL, dtype=dtype)
    X = np.ones((1, 1), dtype=dtype)  # Z = W exactly
    W = z.reshape(1, -1)
    dY = np.ones((1, len(z)), dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings
        Y, saved = fastlinear.linear_forward(X, W, activation=activation, backend=backend,
                                             return_saved=True)
        _, dW, _ = fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                              has_bias=False, need_dX=False, backend=backend)
        # the reference in the same dtype: y = 1 - 1e-13 is 1 in float32, so sigmoid' is 0
        expected_Y = activations.apply(activation, W)
        expected_G = activations.grad(activation, dY, W if activation in
                                      activations.SAVES_PREACTIVATION else expected_Y)
    u = np.finfo(dtype).eps
    np.testing.assert_allclose(to_numpy(Y), expected_Y, rtol=8 * u, atol=1e-30)
    np.testing.assert_allclose(to_numpy(dW), expected_G, rtol=8 * u, atol=1e-30)
    if activation == "relu":
        assert to_numpy(dW)[0, SPECIAL.index(0.0)] == 0  # PyTorch's gradient at the kink
        assert np.isnan(to_numpy(Y)[0, 2]) and to_numpy(dW)[0, 2] == 1  # NaN passes, as torch


def test_reference_matches_torch_elementwise():
    torch = pytest.importorskip("torch", reason="PyTorch is the reference for activations")
    for dtype, tdtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        rng = np.random.default_rng(0)
        z = np.concatenate([rng.standard_normal(20000) * 5, SPECIAL[:3], [30, -30, 1e3]])
        z = z.astype(dtype)
        dy = rng.standard_normal(z.size).astype(dtype)
        for name, function in (("relu", torch.relu), ("tanh", torch.tanh),
                               ("sigmoid", torch.sigmoid),
                               ("gelu", lambda t: torch.nn.functional.gelu(t)),
                               ("gelu_tanh", lambda t: torch.nn.functional.gelu(
                                   t, approximate="tanh"))):
            zt = torch.tensor(z, dtype=tdtype, requires_grad=True)
            yt = function(zt)
            yt.backward(torch.tensor(dy))
            y = activations.apply(name, z)
            g = activations.grad(name, dy, z if name in activations.SAVES_PREACTIVATION else y)
            # 1 + erf(z / sqrt 2) cancels for z << 0: an absolute error of u |z| either side
            finite_z = np.where(np.isfinite(z), np.abs(z.astype(np.float64)), 0)
            slack = 16 * np.finfo(dtype).eps * (1 + finite_z)
            assert_within(f"{name} {dtype.__name__}", y, yt.detach().numpy(), slack)
            assert_within(f"{name}' {dtype.__name__}", g, zt.grad.numpy(),
                          slack * (1 + np.abs(dy)))


@pytest.mark.parametrize("bad", ["softmax", "ReLU6", 3, ""])
def test_unknown_activation_lists_the_valid_ones(backend, bad):
    with pytest.raises(ValueError, match=r"unknown activation .* expected None or one of 'relu', "
                                         r"'gelu', 'gelu_tanh', 'tanh', 'sigmoid'"):
        fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 2)), activation=bad,
                                  backend=backend)
    with pytest.raises(ValueError, match="unknown activation"):
        fastlinear.Linear(3, 2, activation=bad)


def test_backward_needs_what_forward_saved(backend):
    with pytest.raises(ValueError, match=r"activation='gelu' needs saved=.*pre-activation|"
                                         r"activation='gelu' needs saved=.*preactivation"):
        fastlinear.linear_backward(np.ones((2, 2)), np.ones((2, 3)), np.ones((3, 2)),
                                   activation="gelu", backend=backend)
    with pytest.raises(ValueError, match=r"saved must have the shape of the forward output"):
        fastlinear.linear_backward(np.ones((2, 2)), np.ones((2, 3)), np.ones((3, 2)),
                                   activation="relu", saved=np.ones((2, 3)), backend=backend)


@PROFILE
@given_examples(problem=problems(), activation=st.sampled_from(ACTS))
def test_properties_against_the_reference(backend, problem, activation):
    """Random shapes 0..300, layouts, bias kinds and batch dims: same as the numpy backend."""
    arrays, _ = build(problem)
    X, W, b, dY = arrays["X"], arrays["W"], arrays["b"], arrays["dY"]
    dtype = problem["dtype"]
    Y, saved = fastlinear.linear_forward(X, W, b, activation=activation, backend=backend,
                                         return_saved=True)
    grads = fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                       has_bias=b is not None, backend=backend)
    b64 = np.zeros(W.shape[1]) if b is None else np.ravel(b).astype(np.float64)
    X2, dY2 = rows(X).astype(np.float64), rows(dY).astype(np.float64)
    Z = X2 @ W.astype(np.float64) + b64
    with np.errstate(all="ignore"):
        Y_exact = activations.apply(activation, Z)
        if activation == "relu":
            G = dY2 * (rows(to_numpy(Y)) > 0)
        else:
            G = activations.grad(activation, dY2, exact_saved(activation, {"Z": Z, "Y": Y_exact}))
    bound = bounds(X2, W, b64, dY2, G, dtype, activation)
    assert_within("Y", rows(to_numpy(Y)), Y_exact, bound["Y"](Y_exact))
    expected = {"dX": G @ W.astype(np.float64).T, "dW": X2.T @ G, "db": G.sum(0)}
    for name, got in zip(("dX", "dW", "db"), grads, strict=True):
        if got is None:
            assert name == "db" and b is None
            continue
        got = rows(to_numpy(got)) if name == "dX" else to_numpy(got)
        assert_within(name, got, expected[name], bound[name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_selects_as_torch(backend, dtype):
    """Where y <= 0 the gradient is 0 even for a NaN or inf dY (PyTorch's threshold_backward)."""
    X = np.ones((1, 1), dtype=dtype)
    W = np.array([[-1.0, 0.0, 2.0, np.nan, -3.0, 4.0]], dtype=dtype)
    dY = np.array([[np.nan, np.inf, np.nan, 1.0, -np.inf, np.inf]], dtype=dtype)
    Y, saved = fastlinear.linear_forward(X, W, activation="relu", backend=backend,
                                         return_saved=True)
    _, dW, _ = fastlinear.linear_backward(dY, X, W, activation="relu", saved=saved,
                                          has_bias=False, need_dX=False, backend=backend)
    np.testing.assert_array_equal(to_numpy(dW), [[0, 0, np.nan, 1, 0, np.inf]])
