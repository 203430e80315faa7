"""The drop-in ``Linear`` layer: the notebook's worked example and the classic class's API."""

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch
from tests.helpers import install_registry, to_numpy

# The worked example of the seed notebook (shared/seed), with its printed results.
X = np.array([[0.1, 0.2], [0.3, 0.4]])
W = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
b = np.array([[0.1, 0.2, 0.3]])
dY = np.array([[0.2, 0.3, 0.4], [0.5, 0.6, 0.7]])
Y_EXPECTED = [[0.19, 0.32, 0.45], [0.29, 0.46, 0.63]]
DX_EXPECTED = [[0.2, 0.47], [0.38, 0.92]]
DW_EXPECTED = [[0.17, 0.21, 0.25], [0.24, 0.3, 0.36]]
DB_EXPECTED = [0.7, 0.9, 1.1]


class NotebookLinear:
    """The seed notebook's class, verbatim in behaviour: the contract fastlinear.Linear serves."""

    def __init__(self, in_features, out_features):
        self.W = np.random.randn(in_features, out_features) * 0.01  # noqa: NPY002
        self.b = np.zeros(out_features)
        self.dW = np.zeros_like(self.W)
        self.db = np.zeros_like(self.b)
        self.X = None

    def forward(self, X):
        self.X = X
        return X @ self.W + self.b

    def backward(self, dY):
        self.dW = self.X.T @ dY
        self.db = dY.sum(axis=0)
        return dY @ self.W.T


def run_notebook_cells(Linear):
    """The notebook's cells, unchanged, on a given class."""
    linear = Linear(2, 3)
    linear.W = W
    linear.b = b
    Y = linear.forward(X)
    dX = linear.backward(dY)
    return linear, Y, dX


def test_notebook_worked_example(backend):
    with fastlinear.use_backend(backend):
        linear, Y, dX = run_notebook_cells(fastlinear.Linear)
    assert Y.shape == (2, 3) and dX.shape == (2, 2)
    np.testing.assert_allclose(Y, Y_EXPECTED, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dX, DX_EXPECTED, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(linear.dW, DW_EXPECTED, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(linear.db, DB_EXPECTED, rtol=1e-14, atol=1e-15)
    assert linear.X is X


def test_same_results_as_the_notebook_class(backend, rng):
    """Seeded, the two classes give the same initial weights, outputs and gradients."""
    inputs = rng.standard_normal((16, 10))
    upstream = rng.standard_normal((16, 4))
    results = []
    for cls in (NotebookLinear, lambda d, m: fastlinear.Linear(d, m, backend=backend)):
        np.random.seed(7)  # noqa: NPY002 (the notebook class uses the global RNG)
        layer = cls(10, 4)
        Y = layer.forward(inputs)
        dX = layer.backward(upstream)
        results.append([to_numpy(a) for a in (layer.W, layer.b, Y, dX, layer.dW, layer.db)])
    for ours, theirs in zip(*results, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)


def test_initialisation():
    layer = fastlinear.Linear(5, 3, rng=0)
    assert layer.W.shape == (5, 3) and layer.W.dtype == np.float64
    assert 0 < np.abs(layer.W).max() < 0.1  # randn * 0.01
    np.testing.assert_array_equal(layer.b, np.zeros(3))
    np.testing.assert_array_equal(layer.dW, np.zeros((5, 3)))
    np.testing.assert_array_equal(layer.db, np.zeros(3))
    assert layer.X is None
    assert (layer.in_features, layer.out_features) == (5, 3)
    np.testing.assert_array_equal(fastlinear.Linear(5, 3, rng=0).W, layer.W)


def test_float32_layer_stays_float32(backend, rng):
    layer = fastlinear.Linear(6, 4, dtype=np.float32, backend=backend, rng=1)
    assert layer.W.dtype == layer.b.dtype == np.float32
    Y = layer.forward(rng.standard_normal((3, 6)).astype(np.float32))
    dX = layer.backward(np.ones((3, 4), dtype=np.float32))
    assert Y.dtype == dX.dtype == layer.dW.dtype == layer.db.dtype == np.float32


def test_no_bias_layer(backend, rng):
    layer = fastlinear.Linear(4, 2, bias=False, backend=backend, rng=2)
    assert layer.b is None and layer.db is None
    inputs = rng.standard_normal((5, 4))
    np.testing.assert_allclose(layer.forward(inputs), inputs @ to_numpy(layer.W), rtol=1e-12)
    layer.backward(np.ones((5, 2)))
    assert layer.db is None
    assert len(layer.parameters()) == 1


def test_backward_accumulate_and_zero_grad(backend, rng):
    layer = fastlinear.Linear(4, 3, backend=backend, rng=3)
    first, second = rng.standard_normal((2, 6, 4))
    g1, g2 = rng.standard_normal((2, 6, 3))
    layer.forward(first)
    layer.backward(g1)
    layer.forward(second)
    dW_buffer = layer.dW
    layer.backward(g2, accumulate=True)
    assert layer.dW is dW_buffer  # accumulated in place
    np.testing.assert_allclose(to_numpy(layer.dW), first.T @ g1 + second.T @ g2, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(layer.db), g1.sum(0) + g2.sum(0), rtol=1e-12)
    layer.zero_grad()
    assert layer.dW is dW_buffer
    np.testing.assert_array_equal(to_numpy(layer.dW), 0)
    np.testing.assert_array_equal(to_numpy(layer.db), 0)


def test_backward_accumulate_without_gradients_says_what_is_missing(rng):
    layer = fastlinear.Linear(4, 3, backend="numpy", rng=3)
    layer.forward(rng.standard_normal((6, 4)))
    layer.dW = None  # the user dropped the gradients (dW and db are plain attributes)
    held_db = layer.db
    with pytest.raises(ValueError, match="accumulate=True adds into existing gradients"):
        layer.backward(rng.standard_normal((6, 3)), accumulate=True)
    assert layer.dW is None and layer.db is held_db  # unchanged


def test_parameters_pairs_and_sgd_step(rng):
    layer = fastlinear.Linear(3, 2, rng=4)
    inputs = rng.standard_normal((4, 3))
    layer.forward(inputs)
    layer.backward(np.ones((4, 2)))
    before = layer.W.copy()
    for param, grad in layer.parameters():
        param -= 0.1 * grad
    np.testing.assert_allclose(layer.W, before - 0.1 * inputs.T @ np.ones((4, 2)))


def test_assigned_parameters_of_new_shape_are_used(rng):
    """As in the notebook class, W and b are plain attributes; the shapes follow W."""
    layer = fastlinear.Linear(2, 3)
    layer.W = rng.standard_normal((5, 4))
    layer.b = rng.standard_normal(4)
    assert (layer.in_features, layer.out_features) == (5, 4)
    inputs = rng.standard_normal((3, 5))
    np.testing.assert_allclose(layer.forward(inputs), inputs @ layer.W + layer.b, rtol=1e-12)


def test_repr():
    assert repr(fastlinear.Linear(3, 2, dtype=np.float32, backend="numpy")) == (
        "Linear(in_features=3, out_features=2, bias=True, dtype=float32, backend='numpy')"
    )


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        fastlinear.Linear(2, 3).backward(np.ones((1, 3)))


@pytest.mark.parametrize("args,error", [
    ((2.5, 3), ValueError), ((-1, 3), ValueError), ((2, "3"), ValueError), ((True, 3), ValueError),
])
def test_bad_constructor_arguments(args, error):
    with pytest.raises(error, match="must be a non-negative int"):
        fastlinear.Linear(*args)


def test_integer_dtype_is_refused():
    with pytest.raises(TypeError, match="floating dtype"):
        fastlinear.Linear(2, 3, dtype=np.int32)


def test_the_dtype_check_asks_the_registry_in_use(monkeypatch):
    """A registry of the numpy backend alone: no backend of it computes in float16 (the
    module-wide table would name cupy)."""
    install_registry(monkeypatch, backends={"numpy": _dispatch.BACKENDS["numpy"]})
    with pytest.raises(TypeError, match="float16: no backend available here computes in "
                                        "float16, nor does any other"):
        fastlinear.Linear(4, 3, dtype=np.float16)


def test_resolution_follows_argument_context_default(monkeypatch):
    registry = install_registry(monkeypatch)
    registry.set_default("numpy")
    assert registry.resolve(None, "numpy").NAME == "numpy"
    with fastlinear.use_backend("numba"):
        assert registry.requested() == "numba"
        assert registry.requested(" NumPy ") == "numpy"
        assert registry.resolve(" NumPy ", "numpy").NAME == "numpy"
    assert registry.requested() == _dispatch.registry.requested() == "numpy"
