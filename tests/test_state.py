"""The state a failing call leaves: gradients, buffers and the cached input unchanged."""

import numpy as np
import pytest

import fastlinear
from tests.helpers import SMALL, backward_small, make_inputs, to_numpy

rng = np.random.default_rng(6)
X, W, b, dY = SMALL
backward = backward_small



def trained_layer(backend, batch_shape=(4,)):
    layer = fastlinear.Linear(3, 2, backend=backend, rng=7)
    inputs = rng.standard_normal((*batch_shape, 3))
    layer.forward(inputs)
    layer.backward(rng.standard_normal((*batch_shape, 2)))
    return layer, inputs

def snapshot(layer):
    return [to_numpy(a).copy() for a in (layer.W, layer.b, layer.dW, layer.db)]

def assert_unchanged(layer, before):
    for saved, now in zip(before, snapshot(layer), strict=True):
        np.testing.assert_array_equal(now, saved)

@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("bad_dY,error", [
    (np.ones((4, 2), dtype=np.complex64), TypeError),
    (np.ones((4, 2), dtype=object), TypeError),
    (np.ones((2, 2, 2)), ValueError),  # the 8 rows of the last forward, wrongly batched
    (np.ones((8, 2)), ValueError),  # flattened: refused too, as dY must match Y exactly
    (np.ones((2, 4, 3)), ValueError),
    ("dY", TypeError),
])
def test_failed_backward_keeps_the_layer_gradients(backend, accumulate, bad_dY, error):
    layer, inputs = trained_layer(backend, batch_shape=(4, 2))
    before = snapshot(layer)
    with pytest.raises(error):
        layer.backward(bad_dY, accumulate=accumulate)
    assert_unchanged(layer, before)
    assert layer.X is inputs

def test_failed_forward_keeps_the_cached_input(backend):
    layer, inputs = trained_layer(backend)
    for bad in (np.ones((4, 5)), np.ones((4, 3), dtype=np.complex64), "X", np.ones(4)):
        with pytest.raises((TypeError, ValueError)):
            layer.forward(bad)
        assert layer.X is inputs
    before = snapshot(layer)
    upstream = rng.standard_normal((4, 2))
    layer.backward(upstream)  # still pairs with the last successful forward
    np.testing.assert_allclose(to_numpy(layer.dW), inputs.T @ upstream, rtol=1e-12)
    assert not np.array_equal(snapshot(layer)[2], before[2])


def test_failed_call_leaves_buffers_untouched(backend):
    dW = np.full((3, 2), 7.0)
    with pytest.raises(ValueError):
        backward(backend, dY=np.ones((5, 2)), dW=dW, db=np.zeros(2), accumulate=True)
    np.testing.assert_array_equal(dW, 7.0)


def test_accumulate_adds_exactly_once_per_call(backend):
    layer = fastlinear.Linear(5, 3, backend=backend, rng=8)
    batches = [make_inputs(rng, 6, 5, 3, np.float64) for _ in range(3)]
    layer.zero_grad()
    expected_dW, expected_db = np.zeros((5, 3)), np.zeros(3)
    for inputs, _, _, upstream in batches:
        layer.forward(inputs)
        dX = layer.backward(upstream, accumulate=True)
        expected_dW += inputs.T @ upstream
        expected_db += upstream.sum(0)
        np.testing.assert_allclose(to_numpy(dX), upstream @ to_numpy(layer.W).T, rtol=1e-12)
        np.testing.assert_allclose(to_numpy(layer.dW), expected_dW, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(layer.db), expected_db, rtol=1e-12, atol=1e-14)
    inputs, _, _, upstream = batches[0]
    layer.forward(inputs)
    layer.backward(upstream)  # no accumulate: replaces
    np.testing.assert_allclose(to_numpy(layer.dW), inputs.T @ upstream, rtol=1e-12)

def test_accumulate_into_a_gradient_of_a_stale_shape_is_refused(backend):
    """After assigning a W of a new shape, accumulating into the old dW is an error, not a mix."""
    layer, _ = trained_layer(backend)
    old_dW = to_numpy(layer.dW).copy()
    layer.W = layer.W[:, :1].copy()
    layer.b = None
    layer.forward(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match=r"dW must have shape \(3, 1\), got \(3, 2\)"):
        layer.backward(np.ones((4, 1)), accumulate=True)
    np.testing.assert_array_equal(to_numpy(layer.dW), old_dW)
