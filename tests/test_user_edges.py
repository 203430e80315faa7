"""Regressions from issue 18: what a new user met first (mixed-dtype accumulation, a scalar bias
that never trained, errors that blamed the wrong array or said nothing useful)."""

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import fastlinear

N, D, M = 4, 3, 2


# --- 1. accumulate with data of another dtype than the layer ---------------------------------

@pytest.mark.parametrize("x_dtype, dy_dtype", [(np.float64, np.float64), (np.float32, np.float64),
                                               (np.float64, np.float32)])
def test_float32_layer_accumulates_float64_gradients_in_its_own_buffers(backend, x_dtype,
                                                                         dy_dtype):
    layer = fastlinear.Linear(D, M, dtype=np.float32, backend=backend, rng=0)
    layer.zero_grad()
    dW_buffer, db_buffer = layer.dW, layer.db
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, D)).astype(x_dtype)
    dY = rng.standard_normal((N, M)).astype(dy_dtype)
    layer.forward(X)
    for _ in range(2):
        layer.backward(dY, accumulate=True)
    assert layer.dW is dW_buffer and layer.db is db_buffer  # the layer's own buffers, in place
    assert layer.dW.dtype == np.float32 and layer.db.dtype == np.float32
    G, X64 = dY.astype(np.float64), X.astype(np.float64)
    np.testing.assert_allclose(layer.dW, 2 * X64.T @ G, rtol=1e-5)
    np.testing.assert_allclose(layer.db, 2 * G.sum(0), rtol=1e-5)


def test_accumulate_with_an_activation_and_mixed_dtypes(backend):
    layer = fastlinear.Linear(D, M, dtype=np.float32, backend=backend, rng=0, activation="gelu")
    layer.zero_grad()
    X = np.linspace(-1, 1, N * D).reshape(N, D)
    layer.forward(X)
    layer.backward(np.ones((N, M)), accumulate=True)
    expected = fastlinear.linear_backward(np.ones((N, M)), X, layer.W, activation="gelu",
                                          saved=layer._saved, backend=backend)
    np.testing.assert_allclose(layer.dW, expected[1], rtol=1e-5)
    assert layer.dW.dtype == np.float32


def test_functional_buffer_of_the_wrong_dtype_says_which_dtype(backend):
    with pytest.raises(TypeError, match=r"dW must have dtype float64, got float32: the call "
                                        r"computes in float64 \(NumPy's result dtype"):
        fastlinear.linear_backward(np.ones((N, M)), np.ones((N, D)), np.ones((D, M)),
                                   backend=backend, dW=np.zeros((D, M), np.float32))


# --- 3. an assigned scalar bias is an array that trains ---------------------------------------

@pytest.mark.parametrize("value, dtype", [(0.5, np.float32), (1, np.float32),  # weak, as NumPy's
                                          (np.float32(0.5), np.float32),
                                          (np.array(0.5), np.float64),
                                          (np.array([0.5]), np.float64),
                                          ([0.5], np.float64)])
def test_scalar_bias_is_stored_as_an_array_and_trains(value, dtype):
    layer = fastlinear.Linear(D, M, dtype=np.float32, rng=0)
    layer.b = value
    assert isinstance(layer.b, np.ndarray) and layer.b.shape == (M,)
    assert layer.b.dtype == dtype
    layer.forward(np.ones((N, D), np.float32))
    layer.backward(np.ones((N, M), np.float32))
    for param, grad in layer.parameters():
        param -= 0.1 * grad
    np.testing.assert_allclose(layer.b, float(np.asarray(value).ravel()[0]) - 0.1 * N)


def test_a_broadcast_bias_is_made_on_the_device_of_W(monkeypatch):
    """CuPy's ``full`` lands on the current device: the layer makes a scalar bias inside
    ``on_device_of(W)`` (recorded here, as there is no second GPU to see it on)."""
    import contextlib

    from fastlinear import _arrays

    layer = fastlinear.Linear(D, M, dtype=np.float32, rng=0)
    seen = []

    def on_device_of(x):
        seen.append(x)
        return contextlib.nullcontext()

    monkeypatch.setattr(_arrays, "on_device_of", on_device_of)
    layer.b = 0.5
    assert seen and seen[0] is layer.W
    np.testing.assert_array_equal(layer.b, np.full(M, 0.5, np.float32))


@pytest.mark.parametrize("out_features", [M, 1])
def test_assigned_bias_arrays_are_kept_as_given(out_features):
    layer = fastlinear.Linear(D, out_features, rng=0)
    b = np.arange(out_features, dtype=np.float64)
    layer.b = b
    assert layer.b is b  # also a one-element (1,) bias of one output: a view stays a view
    layer.b = None
    assert layer.b is None and len(layer.parameters()) == 1


# --- 5. casting="no" names the array that differs ---------------------------------------------

def test_casting_no_names_X_not_the_bias():
    layer = fastlinear.Linear(D, M, dtype=np.float32, casting="no")
    with pytest.raises(TypeError, match=r"^X has dtype float64 but W has float32.*"
                                        r"X\.astype\('float32'\)"):
        layer.forward(np.ones((N, D)))
    with pytest.raises(TypeError, match=r"^dY has dtype float64 but W has float32"):
        layer.forward(np.ones((N, D), np.float32))
        layer.backward(np.ones((N, M)))


def test_casting_no_names_a_bias_of_another_dtype():
    with pytest.raises(TypeError, match=r"^b has dtype float64 but W has float32.*b\.astype"):
        fastlinear.linear_forward(np.ones((N, D), np.float32), np.ones((D, M), np.float32),
                                  np.ones(M), casting="no")


# --- 6, 8. float16 layers and calls: refused early, with what to do --------------------------

def test_float16_layer_is_refused_at_construction_without_a_backend_for_it():
    if fastlinear.available_backends()["cupy"] is None:
        pytest.skip("the cupy backend computes float16 here")
    with pytest.raises(TypeError, match=r"dtype=float16: no backend available here computes in "
                                        r"float16; only the cupy backend does.*np\.float32"):
        fastlinear.Linear(3, 4, dtype=np.float16)


def test_float16_layer_on_a_named_cpu_backend_is_refused():
    with pytest.raises(TypeError, match="the 'numpy' backend does not compute in float16"):
        fastlinear.Linear(3, 4, dtype=np.float16, backend="numpy")


def test_float16_call_says_what_to_do(backend):
    if np.dtype(np.float16) in fastlinear._dispatch.load_backend(backend).DTYPES:
        pytest.skip(f"{backend} computes in float16")
    with pytest.raises(TypeError, match=r"astype\(np\.float32\), or compute on the GPU with the "
                                        r"cupy backend"):
        fastlinear.linear_forward(np.ones((N, D), np.float16), np.ones((D, M), np.float16),
                                  backend=backend)


# --- 7. messages that name the array ----------------------------------------------------------

def test_one_feature_is_singular():
    with pytest.raises(ValueError, match=r"X has 1 feature but 3 were expected"):
        fastlinear.linear_forward(np.ones((N, 1)), np.ones((D, M)))
    with pytest.raises(ValueError, match=r"X has 3 features but 1 was expected"):
        fastlinear.linear_forward(np.ones((N, 3)), np.ones((1, M)))


@pytest.mark.parametrize("bias", [Fraction(1, 2), Decimal("0.5")])
def test_exotic_number_bias_names_b(bias):
    with pytest.raises(TypeError, match=r"^b is a (fractions\.Fraction|decimal\.Decimal).*"
                                        r"float\(b\)"):
        fastlinear.linear_forward(np.ones((N, D)), np.ones((D, M)), bias)
    layer = fastlinear.Linear(D, M)
    with pytest.raises(TypeError, match=r"^b must be a number .*float\(b\)"):
        layer.b = bias
    assert layer.b.shape == (M,)  # the refused assignment changed nothing


# --- the dask example keeps a checkout clean -------------------------------------------------

def test_dask_example_writes_its_data_to_a_temporary_folder():
    import pathlib
    import runpy
    import tempfile

    example = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dask_out_of_core.py"
    parse_args = runpy.run_path(str(example))["parse_args"]
    defaults = parse_args([])
    assert defaults.data.parent == pathlib.Path(tempfile.gettempdir())
    nbytes = defaults.rows * (defaults.features + defaults.outputs) * 4  # float32
    assert f"{nbytes / 1e9:.2f} GB = {nbytes / 2**30:.2f} GiB" == "1.27 GB = 1.18 GiB"
    readme = (example.parents[1] / "README.md").read_text()
    assert "1.27 GB = 1.18 GiB" in readme
