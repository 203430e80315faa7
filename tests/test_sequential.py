"""``fastlinear.Sequential``: every backend against PyTorch (nn.Sequential + loss + SGD with
momentum) step by step, property tests over sizes, activations and batches, bad input (which must
change nothing) and the layers' views of the arenas."""

import contextlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlinear
from fastlinear import Linear, Sequential, losses
from tests.helpers import install_registry, to_numpy

torch = pytest.importorskip("torch")

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "tanh", "sigmoid")
# Agreement with PyTorch in float64 over a few steps: rounding of both sides, amplified through
# the layers and steps, relative to the largest element of the compared array.
TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_layers(sizes, activations, dtype, seed, bias=True, backend=None):
    """Linear layers with He-scaled weights and nonzero biases (values of both signs)."""
    rng = np.random.default_rng(seed)
    layers = []
    for (d, m), activation in zip(zip(sizes[:-1], sizes[1:], strict=True), activations,
                                  strict=True):
        layer = Linear(d, m, bias=bias, dtype=dtype, activation=activation, backend=backend)
        xp = np if backend != "cupy" else __import__("cupy")
        layer.W = xp.asarray((rng.standard_normal((d, m)) * np.sqrt(2 / d)).astype(dtype))
        if bias:
            layer.b = xp.asarray((rng.standard_normal(m) * 0.3).astype(dtype))
        layers.append(layer)
    return layers


def torch_model(layers):
    """The same network in float64 PyTorch (``nn.Linear`` holds ``W.T``)."""
    modules = []
    for layer in layers:
        linear = torch.nn.Linear(layer.in_features, layer.out_features,
                                 bias=layer.b is not None, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(to_numpy(layer.W).astype(np.float64).T))
            if layer.b is not None:
                linear.bias.copy_(torch.from_numpy(to_numpy(layer.b).astype(np.float64)))
        modules.append(linear)
        activation = {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(),
                      "sigmoid": torch.nn.Sigmoid(), "gelu": torch.nn.GELU(),
                      "gelu_tanh": torch.nn.GELU(approximate="tanh")}.get(layer.activation)
        if activation is not None:
            modules.append(activation)
    return torch.nn.Sequential(*modules)


def assert_near(actual, expected, dtype, what):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(to_numpy(actual), np.float64), expected, rtol=0,
                               atol=TOLERANCE[np.dtype(dtype)] * scale, err_msg=what)


def batch(rng, loss, N, sizes, dtype):
    X = rng.standard_normal((N, sizes[0])).astype(dtype)
    if loss == "mse":
        return X, rng.standard_normal((N, sizes[-1])).astype(dtype)
    return X, rng.integers(0, sizes[-1], N)


def compare_steps(layers, backend, loss, momentum, steps, N, seed, lr=0.1):
    """Train ``layers`` through Sequential and a PyTorch copy side by side; compare every step's
    loss, every layer's W, b, dW, db and the velocity."""
    dtype = layers[0].dtype
    sizes = (layers[0].in_features, *(layer.out_features for layer in layers))
    model = torch_model(layers)
    net = Sequential(*layers, backend=backend)
    criterion = torch.nn.CrossEntropyLoss() if loss != "mse" else torch.nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    rng = np.random.default_rng(seed)
    xp = np if backend != "cupy" else __import__("cupy")
    for step in range(steps):
        X, y = batch(rng, loss, N, sizes, dtype)
        value = net.train_step(xp.asarray(X), xp.asarray(y), loss=loss, lr=lr, momentum=momentum)
        optimizer.zero_grad()
        target = torch.from_numpy(y if loss != "mse" else y.astype(np.float64))
        expected = criterion(model(torch.from_numpy(X.astype(np.float64))), target)
        expected.backward()
        optimizer.step()
        assert type(value) is float
        assert_near(value, expected.item(), dtype, f"loss at step {step}")
        for index, (layer, linear) in enumerate(zip(layers, linears, strict=True)):
            where = f"layer {index} after step {step}"
            assert_near(layer.dW, linear.weight.grad.numpy().T, dtype, f"dW of {where}")
            assert_near(layer.W, linear.weight.detach().numpy().T, dtype, f"W of {where}")
            if layer.b is not None:
                assert_near(layer.db, linear.bias.grad.numpy(), dtype, f"db of {where}")
                assert_near(layer.b, linear.bias.detach().numpy(), dtype, f"b of {where}")
            if momentum:
                buffer = optimizer.state[linear.weight]["momentum_buffer"]
                assert_near(net.velocity[index][0], buffer.numpy().T, dtype, f"vW of {where}")
    return net


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss", losses.LOSSES)
def test_train_step_matches_torch(backend, dtype, loss):
    layers = make_layers((5, 7, 6, 4), ("gelu", "sigmoid", None), dtype, seed=1,
                         backend=backend)
    compare_steps(layers, backend, loss, momentum=0.9, steps=4, N=9, seed=2)


@pytest.mark.parametrize("bias", [True, False])
def test_every_activation_without_momentum(backend, bias):
    layers = make_layers((3, 8, 5, 6, 4, 5, 3, 2), ACTIVATIONS + (None,), np.float64, seed=3,
                         bias=bias, backend=backend)
    compare_steps(layers, backend, "softmax_cross_entropy", momentum=0.0, steps=3, N=6, seed=4)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_the_per_layer_update_keeps_to_its_layer(backend, momentum):
    """The numba step updates each layer as soon as its backward is done, over the layer's W
    and b (adjacent in the arenas): with layers with and without a bias side by side no update
    may reach a neighbour's parameters or miss one of its own (compared with torch)."""
    dtype, sizes = np.float64, (4, 6, 5, 3)
    layers = [fastlinear.Linear(d, m, bias=bias, dtype=dtype, rng=40 + index, backend=backend,
                                activation=act)
              for index, (d, m, bias, act) in enumerate(zip(sizes[:-1], sizes[1:],
                                                             (False, True, False),
                                                             ("relu", "tanh", None),
                                                             strict=True))]
    compare_steps(layers, backend, "softmax_cross_entropy", momentum, steps=3, N=5, seed=41)


def test_forward_and_backward_update_nothing(backend):
    """Only ``train_step`` updates: ``backward`` (the same compiled backward pass on numba,
    without its update) leaves parameters and velocity as they were."""
    xp = np if backend != "cupy" else __import__("cupy")
    net = Sequential(*make_layers((4, 5, 3), ("relu", None), np.float64, seed=42,
                                  backend=backend), backend=backend)
    net.train_step(xp.ones((6, 4)), xp.asarray([0, 1, 2, 0, 1, 2]),
                   loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
    params, velocity = to_numpy(net._params).copy(), to_numpy(net._velocity).copy()
    net.forward(xp.ones((6, 4)))
    net.backward(xp.ones((6, 3)))
    np.testing.assert_array_equal(to_numpy(net._params), params)
    np.testing.assert_array_equal(to_numpy(net._velocity), velocity)


def test_relu_special_values_as_the_reference():
    """The numba step's ReLU, forward and its gradient in place: NaN passes (its output and its
    gradient), -inf and negative zero give 0, +inf stays, as the numpy backend gives them."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    z = np.array([np.nan, -np.inf, np.inf, -0.0, 0.0, -2.0, 3.0, 1e-300])
    nets = []
    for backend in ("numpy", "numba"):
        layer = Linear(1, z.size, bias=False, activation="relu", backend=backend)
        layer.W = z[None, :].copy()
        nets.append(Sequential(layer, backend=backend))
    X, dY = np.ones((3, 1)), np.ones((3, z.size))
    with np.errstate(invalid="ignore"):
        outs = [net.forward(X) for net in nets]
        dXs = [net.backward(dY) for net in nets]
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(nets[1].layers[0].dW, nets[0].layers[0].dW)
    np.testing.assert_array_equal(dXs[1], dXs[0])
    np.testing.assert_array_equal(outs[1][0], [np.nan, 0, np.inf, 0, 0, 0, 3, 1e-300])


def test_the_numba_float32_softmax_exp_matches_np_exp():
    """The numba step's vectorised float32 exp of shifted logits (all <= 0): within 2 ulp of the
    exact exp wherever that is a normal float32, 0 below (an absolute error under 1.2e-38), and
    exp(-inf) = 0, exp(0) = 1, NaN stays NaN."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear.backends._numba_network import _exp_nonpositive_f32

    x = np.concatenate([-np.linspace(0, 110, 400_001), [-0.0, 0.0, -np.inf, np.nan, -1e-45,
                                                        -1e30, -87.3365, -87.3366]])
    x = x.astype(np.float32)
    e = x.copy()
    _exp_nonpositive_f32(e)
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    ulps = np.abs(e[normal] - exact[normal]) / np.spacing(exact[normal].astype(np.float32))
    assert ulps.max() <= 2.0
    assert np.all(e[~normal & ~np.isnan(x)] == 0)
    np.testing.assert_array_equal(e[-8:-4], np.array([1, 1, 0, np.nan], np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("classes", [1, 7, 8, 9, 10, 17])
def test_cross_entropy_rows_with_nan_inf_and_negative_zero(dtype, classes):
    """The numba step's loss pass row by row against float64 NumPy: a NaN in the first, a
    middle or the last class makes its row's gradient all NaN (and the loss NaN), as does +inf
    or a row of -inf; -inf elsewhere gives 0, -0.0 a logit like 0.0; N = 1 too."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear.backends._numba_network import _cross_entropy

    rng = np.random.default_rng(classes)
    rows = [rng.standard_normal(classes) * 3 for _ in range(8)]
    for row, (at, value) in zip(rows[1:], [(0, np.nan), (classes // 2, np.nan),
                                           (classes - 1, np.nan), (classes // 2, np.inf),
                                           (slice(1, None), -np.inf), (slice(None), -np.inf),
                                           (0, -0.0)], strict=True):
        row[at] = value
    Z = np.array(rows, dtype)
    labels = rng.integers(0, classes, len(Z))

    def reference(logits, labels):
        logits = logits.astype(np.float64)
        with np.errstate(invalid="ignore"):
            shifted = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            norm = e.sum(axis=1, keepdims=True)
            grad = (e / norm - np.eye(classes)[labels]) / len(logits)
            loss = np.mean(np.log(norm[:, 0]) - shifted[np.arange(len(logits)), labels])
        return loss, grad

    tolerance = {"rtol": 2e-5 if dtype == np.float32 else 1e-13, "atol": 1e-7}
    for logits, y in ((Z, labels), (Z[:1], labels[:1]), (Z[[0, 7]], labels[[0, 7]])):
        grad = np.empty_like(logits)
        loss = _cross_entropy(np.ascontiguousarray(logits), np.ascontiguousarray(y), grad)
        expected_loss, expected_grad = reference(logits, y)
        np.testing.assert_allclose(grad, expected_grad, **tolerance)
        np.testing.assert_allclose(loss, expected_loss, **tolerance)
    bad = np.isnan(reference(Z, labels)[1]).any(axis=1)
    assert bad.tolist() == [False, True, True, True, True, False, True, False]


def test_borrowed_workspace_views_are_the_arena_elements():
    """The numba step's views into its arenas (``_block``, ``_vector``, ``_flat``: built without
    a reshape or a reference count) read and write the elements NumPy's slice and reshape name,
    for widths 1, 7, 8, 9, 10, 17, one row and none; a view past the arena's end raises."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from numba import njit

    from fastlinear.backends._numba_network import _block, _flat, _vector

    @njit
    def probe(arena, offset, rows, cols):
        block = _block(arena, offset, rows, cols)
        flat, vector = _flat(block), _vector(arena, offset, rows * cols)
        copies = block.copy(), flat.copy(), vector.copy()
        if block.size > 0:
            block[rows - 1, cols - 1] = -1.0
        return copies

    arena = np.arange(300, dtype=np.float32)
    for rows, cols, offset in [(3, 1, 5), (2, 7, 0), (4, 8, 11), (1, 9, 2), (3, 10, 270),
                               (5, 17, 215), (0, 10, 300), (1, 17, 283)]:
        expected = arena[offset:offset + rows * cols].copy()
        block, flat, vector = probe(arena, offset, rows, cols)
        np.testing.assert_array_equal(block, expected.reshape(rows, cols))
        np.testing.assert_array_equal(flat, expected)
        np.testing.assert_array_equal(vector, expected)
        if rows:
            assert arena[offset + rows * cols - 1] == -1.0
            arena[offset + rows * cols - 1] = expected[-1]
    for rows, cols, offset in [(1, 1, 300), (2, 10, 281), (1, 1, -1)]:
        with pytest.raises(IndexError, match="out of its arena"):
            probe(arena, offset, rows, cols)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_with_underflowing_and_infinite_logits_as_the_reference(dtype):
    """Logits 200 apart (probabilities that underflow to 0) and an infinite one: the numba
    step's loss and gradients are the numpy backend's."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    W = np.array([[0.0, -200.0, 5.0, -np.inf, 100.0, -90.0, -100.0, 1.0, 2.0, 3.0]], dtype)
    X, y = np.array([[1.0], [0.5], [2.0]], dtype), np.array([0, 2, 4])
    nets = []
    for backend in ("numpy", "numba"):
        layer = Linear(1, W.shape[1], dtype=dtype, backend=backend)
        layer.W, layer.b = W.copy(), np.zeros(W.shape[1], dtype)
        nets.append(Sequential(layer, backend=backend))
    with np.errstate(invalid="ignore", over="ignore"):
        values = [net.train_step(X, y, loss="softmax_cross_entropy", lr=0.1) for net in nets]
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)
    for name in ("dW", "db", "W", "b"):
        np.testing.assert_allclose(getattr(nets[1].layers[0], name),
                                   getattr(nets[0].layers[0], name), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_of_many_rows_of_many_classes_as_float64_math(dtype):
    """3000 classes of nearly equal logits over 300 rows: the numba step sums the rows' log
    norms as logs of partial products (each norm near 3000, the product taken into the total
    about every 70 rows); the loss is the float64 log-sum-exp's to rounding."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    rng = np.random.default_rng(12)
    layer = Linear(4, 3000, dtype=dtype, rng=3, backend="numba")
    layer.W = (rng.standard_normal((4, 3000)) * 0.01).astype(dtype)
    X, y = rng.standard_normal((300, 4)).astype(dtype), rng.integers(0, 3000, 300)
    Z = X.astype(np.float64) @ layer.W.astype(np.float64) + layer.b.astype(np.float64)
    top = Z.max(axis=1)
    exact = np.mean(top + np.log(np.exp(Z - top[:, None]).sum(axis=1)) - Z[np.arange(300), y])
    value = Sequential(layer, backend="numba").train_step(X, y, loss="softmax_cross_entropy",
                                                           lr=0.0)
    assert value == pytest.approx(exact, rel=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("inputs, dtype",
                         [(1024, np.float32), (512, np.float64), (1000, np.float32)])
def test_the_arenas_are_rows_of_one_array_padded_off_4k_multiples(inputs, dtype):
    """Parameters, gradients and velocity are rows of one array, the layers' views into them;
    rows whose distance would be within 256 bytes of a multiple of 4 KiB are padded apart."""
    net = Sequential(Linear(inputs, 1, bias=False, dtype=dtype, rng=0), backend="numpy")
    params, grads, velocity = net._params, net._grads, net._velocity
    assert params.shape == grads.shape == velocity.shape == (inputs,)
    for row, arena in enumerate((params, grads, velocity)):
        assert np.shares_memory(arena, net._arenas[row])
    distance = (grads.ctypes.data - params.ctypes.data) % 4096
    assert 256 <= distance <= 3840
    assert np.shares_memory(net.layers[0].W, params) and np.shares_memory(net.layers[0].dW, grads)


def test_relu_turns_negative_zero_into_positive_zero_as_the_reference():
    """-0.0 never reaches the ReLU through the step (the gemm gives +0.0), so the compiled
    activation is applied to it directly: +0.0, as np.maximum (torch.relu keeps -0.0)."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear import activations
    from fastlinear.backends import _numba_activations

    row = np.array([-0.0, 0.0, -1.0, 2.0])
    reference = activations.apply("relu", row.copy())
    # the signature the step compiled: an int64 code, a C-contiguous float64 row
    _numba_activations.activate(np.int64(activations.ACTIVATION_CODES["relu"]), row)
    np.testing.assert_array_equal(np.signbit(reference), [False] * 4)
    np.testing.assert_array_equal(np.signbit(row), [False] * 4)
    np.testing.assert_array_equal(row, [0.0, 0.0, 0.0, 2.0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
       activations=st.lists(st.sampled_from(ACTIVATIONS), min_size=4, max_size=4),
       bias=st.booleans(), N=st.sampled_from([1, 2, 3, 7, 17]),
       loss=st.sampled_from(losses.LOSSES), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       seed=st.integers(0, 2**16))
def test_any_network_matches_torch(sizes, activations, bias, N, loss, momentum, seed):
    """Sizes from 1 up, every activation, bias or not, batches from one row, on every CPU
    backend (numba and numpy), float64."""
    for backend in ("numpy", "numba"):
        if fastlinear.available_backends()[backend] is not None:
            continue
        layers = make_layers(sizes, activations[:len(sizes) - 1], np.float64, seed, bias=bias)
        compare_steps(layers, backend, loss, momentum, steps=2, N=N, seed=seed + 1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_and_backward_match_torch_autograd(backend, dtype):
    layers = make_layers((6, 5, 4), ("tanh", "gelu_tanh"), dtype, seed=5, backend=backend)
    model = torch_model(layers)
    net = Sequential(*layers, backend=backend)
    rng = np.random.default_rng(6)
    X, dY = rng.standard_normal((7, 6)).astype(dtype), rng.standard_normal((7, 4)).astype(dtype)
    xp = np if backend != "cupy" else __import__("cupy")
    X_t = torch.from_numpy(X.astype(np.float64)).requires_grad_(True)
    Y_t = model(X_t)
    Y_t.backward(torch.from_numpy(dY.astype(np.float64)))
    Y = net.forward(xp.asarray(X))
    assert Y.dtype == dtype and Y.shape == (7, 4)
    assert_near(Y, Y_t.detach().numpy(), dtype, "forward")
    dX = net.backward(xp.asarray(dY))
    assert_near(dX, X_t.grad.numpy(), dtype, "dX")
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip(layers, linears, strict=True):
        assert_near(layer.dW, linear.weight.grad.numpy().T, dtype, "dW")
        assert_near(layer.db, linear.bias.grad.numpy(), dtype, "db")


# --- the layers' views and assignments -------------------------------------------------------


def test_layers_are_the_trained_layers_and_assignments_are_used(backend):
    """After a step the user's layers hold the new values; a ``layer.W = ...`` or an in-place
    edit between steps is what the next step uses (PyTorch gets the same edits)."""
    if backend == "cupy":
        pytest.skip("the cupy case is covered by the step comparisons")
    layers = make_layers((4, 6, 3), ("relu", None), np.float64, seed=7)
    net = compare_steps(layers, backend, "softmax_cross_entropy", 0.9, steps=1, N=5, seed=8)
    first = layers[0]
    assert np.shares_memory(first.W, net._params) and np.shares_memory(first.dW, net._grads)
    replacement = np.random.default_rng(9).standard_normal((4, 6))
    first.W = replacement.copy()
    layers[1].b *= 2.0  # in place, through the view
    model = torch_model(layers)
    net.train_step(np.ones((2, 4)), np.array([0, 2]), loss="softmax_cross_entropy", lr=0.1)
    assert np.shares_memory(first.W, net._params), "the layer points at the arena again"
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion(model(torch.ones((2, 4), dtype=torch.float64)), torch.tensor([0, 2])).backward()
    optimizer.step()
    np.testing.assert_allclose(first.W, model[0].weight.detach().numpy().T, atol=1e-12)
    np.testing.assert_allclose(layers[1].b, model[2].bias.detach().numpy(), atol=1e-12)


def test_a_layer_in_two_networks_carries_each_ones_updates_to_the_other(backend):
    """A layer shared by two networks: each step starts from the values the other left in the
    layer, as two torch models sharing the module do (each with its own optimizer, momentum)."""
    if backend == "cupy":
        pytest.skip("the layer-by-layer cupy path shares the same adoption code")
    first, shared = make_layers((4, 5, 3), ("relu", None), np.float64, seed=90)
    (other,) = make_layers((6, 5), ("tanh",), np.float64, seed=91)
    models = [torch_model([first, shared]), torch_model([other])]
    models[1].append(models[0][2])  # the same torch Linear: shared parameters
    nets = [Sequential(first, shared, backend=backend), Sequential(other, shared, backend=backend)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) for model in models]
    rng = np.random.default_rng(92)
    for step in range(4):
        index = step % 2
        X, y = rng.standard_normal((5, (4, 6)[index])), rng.integers(0, 3, 5)
        nets[index].train_step(X, y, loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
        optimizers[index].zero_grad()
        torch.nn.CrossEntropyLoss()(models[index](torch.from_numpy(X)),
                                    torch.from_numpy(y)).backward()
        optimizers[index].step()
        np.testing.assert_allclose(shared.W, models[0][2].weight.detach().numpy().T,
                                   atol=1e-12)
        np.testing.assert_allclose(shared.b, models[0][2].bias.detach().numpy(), atol=1e-12)


def test_an_assigned_activation_is_used():
    layers = make_layers((3, 4, 2), ("relu", None), np.float64, seed=10)
    net = Sequential(*layers, backend="numpy")
    X = np.random.default_rng(11).standard_normal((5, 3))
    layers[0].activation = "tanh"
    expected = np.tanh(X @ layers[0].W + layers[0].b) @ layers[1].W + layers[1].b
    np.testing.assert_allclose(net.forward(X), expected, atol=1e-12)
    if fastlinear.available_backends()["numba"] is None:
        np.testing.assert_allclose(Sequential(*layers, backend="numba").forward(X), expected,
                                   atol=1e-12)


# --- bad input -----------------------------------------------------------------------------


def snapshot(net):
    return [a.copy() for a in (net._params, net._velocity, net._grads)]


BAD_STEPS = [
    ("wrong feature count", dict(X=np.ones((3, 5))), ValueError, "features"),
    ("1-D X", dict(X=np.ones(4)), ValueError, "2-D"),
    ("empty batch", dict(X=np.ones((0, 4)), y=np.zeros(0, int)), ValueError, "empty"),
    ("label too large", dict(y=np.array([0, 3, 1])), ValueError, "label 3 at row 1"),
    ("negative label", dict(y=np.array([0, 1, -1])), ValueError, "label -1 at row 2"),
    ("float labels", dict(y=np.array([0.0, 1.0, 2.0])), TypeError, "integer"),
    ("labels of wrong shape", dict(y=np.array([[0, 1, 2]])), ValueError, "shape (3,)"),
    ("too few labels", dict(y=np.array([0, 1])), ValueError, "shape (3,)"),
    ("mse targets of wrong shape", dict(loss="mse", y=np.ones((3, 2))), ValueError,
     "y has 2 columns (targets) but the network expects 3"),
    ("unknown loss", dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    ("NaN lr", dict(lr=float("nan")), ValueError, "lr must be finite"),
    ("negative lr", dict(lr=-0.1), ValueError, "lr must be finite and >= 0"),
    ("negative momentum", dict(momentum=-0.5), ValueError, "momentum must be finite"),
    ("lr not a number", dict(lr="0.1"), TypeError, "lr must be a real number"),
    ("complex X", dict(X=np.ones((3, 4), complex)), TypeError, "dtype complex128"),
]


@pytest.mark.parametrize(("what", "change", "error", "message"), BAD_STEPS,
                         ids=[case[0] for case in BAD_STEPS])
def test_a_bad_step_raises_and_changes_nothing(backend, what, change, error, message):
    if backend == "cupy":
        pytest.skip("input checks are shared; the cupy backend's arrays are covered elsewhere")
    layers = make_layers((4, 5, 3), ("relu", None), np.float32, seed=12)
    net = Sequential(*layers, backend=backend)
    good = dict(X=np.ones((3, 4), np.float32), y=np.array([0, 1, 2]),
                loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
    net.train_step(**good)  # nonzero velocity and gradients to keep
    before = snapshot(net)
    arguments = {**good, **change}
    X, y = arguments.pop("X"), arguments.pop("y")
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        net.train_step(X, y, **arguments)
    for old, new in zip(before, snapshot(net), strict=True):
        np.testing.assert_array_equal(old, new)
    assert net.train_step(**good) > 0  # still trains


def test_a_bad_assignment_raises_and_changes_nothing(backend):
    if backend == "cupy":
        pytest.skip("checked on the CPU backends")
    layers = make_layers((4, 5, 3), ("relu", None), np.float64, seed=13)
    net = Sequential(*layers, backend=backend)
    before = snapshot(net)
    layers[1].W = np.ones((5, 3))  # a good assignment beside a bad one: neither is copied
    layers[0].W = np.ones((4, 6))
    with pytest.raises(ValueError, match=r"layer 0's W has shape \(4, 6\) but the network was "
                                         r"built with \(4, 5\)"):
        net.train_step(np.ones((2, 4)), np.array([0, 1]), loss="softmax_cross_entropy", lr=0.1)
    for old, new in zip(before, snapshot(net), strict=True):
        np.testing.assert_array_equal(old, new)
    assert layers[1].W.shape == (5, 3), "the user's value is kept for the next call"
    layers[0].W, layers[0].b = np.ones((4, 5)), None
    with pytest.raises(ValueError, match="layer 0 now has no bias"):
        net.forward(np.ones((2, 4)))


def test_construction_checks():
    with pytest.raises(TypeError, match=r"one dtype .*\['float32', 'float64'\]"):
        Sequential(Linear(2, 3, dtype=np.float32), Linear(3, 2, dtype=np.float64))
    with pytest.raises(ValueError, match="layer 0 has 3 outputs but layer 1 expects 4 inputs"):
        Sequential(Linear(2, 3), Linear(4, 2))
    with pytest.raises(ValueError, match="at least one"):
        Sequential()
    with pytest.raises(TypeError, match="layer 1 is a str"):
        Sequential(Linear(2, 3), "relu")
    with pytest.raises(ValueError, match="unknown backend"):
        Sequential(Linear(2, 3), backend="fortran")
    with pytest.raises(RuntimeError, match="before forward"):
        Sequential(Linear(2, 3)).backward(np.ones((1, 3)))


def test_backend_chosen_as_everywhere(monkeypatch):
    """``use_backend`` and FASTLINEAR_BACKEND decide when ``backend=`` is not given."""
    calls = []
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=14))
    original = net._layered_forward

    def spy(backend, X):
        calls.append(backend)
        return original(backend, X)

    monkeypatch.setattr(net, "_layered_forward", spy)
    with fastlinear.use_backend("numpy"):
        net.forward(np.ones((1, 3)))
    monkeypatch.setenv(fastlinear.ENV_VAR, "numpy")
    net.forward(np.ones((1, 3)))
    assert calls == ["numpy", "numpy"]


def test_second_process_compiles_nothing(tmp_path):
    """The compiled step is cached on disk: a process after the first loads it."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    code = textwrap.dedent("""
        import numpy as np, fastlinear
        from fastlinear.backends import _numba_network
        layers = [fastlinear.Linear(3, 4, activation="relu", dtype=np.float32),
                  fastlinear.Linear(4, 2, dtype=np.float32)]
        net = fastlinear.Sequential(*layers, backend="numba")
        net.train_step(np.ones((2, 3), np.float32), np.array([0, 1]),
                       loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
        stats = _numba_network.network_call.stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    """)
    environ = {**os.environ, "PYTHONPATH": REPO}
    runs = [subprocess.run([sys.executable, "-c", code], env=environ, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    hits, misses = map(int, runs[1])
    assert (hits, misses) == (1, 0), runs


def test_import_does_not_load_numba():
    code = "import sys, fastlinear; print('numba' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_auto_counts_a_step_as_many_layer_calls(monkeypatch):
    """While ``auto`` serves with numpy before loading numba, a network call counts toward its
    break-even rule as ``STEP_WEIGHT_IN_CALLS`` layer calls."""
    from fastlinear import sequential

    registry = install_registry(monkeypatch)
    fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 2)))  # auto serves numpy meanwhile
    assert fastlinear.current_backend() == "numpy"
    before = registry.interim_calls
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=15))
    net.train_step(np.ones((2, 3)), np.array([0, 1]), loss="softmax_cross_entropy", lr=0.1)
    assert registry.interim_calls - before == sequential.STEP_WEIGHT_IN_CALLS


def test_a_named_backend_does_not_count_toward_auto(monkeypatch):
    """A network whose backend is named (``backend=``, ``use_backend``) is not ``auto``'s call:
    its steps leave auto's count alone."""
    registry = install_registry(monkeypatch)
    fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 2)))  # auto serves numpy meanwhile
    before = registry.interim_calls
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=15), backend="numpy")
    net.train_step(np.ones((2, 3)), np.array([0, 1]), loss="softmax_cross_entropy", lr=0.1)
    net.forward(np.ones((2, 3)))
    other = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=15))
    with fastlinear.use_backend("numpy"):
        other.forward(np.ones((2, 3)))
    assert registry.interim_calls == before


@pytest.mark.parametrize("loss", losses.LOSSES)
def test_layer_by_layer_path_matches_torch(loss, monkeypatch):
    """The path the cupy backend takes (layer calls through fastlinear.functional), run here
    through the numba layer kernels: the same steps as PyTorch."""
    from fastlinear import sequential

    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    monkeypatch.setattr(sequential, "NATIVE_STEP_BACKENDS", frozenset())
    layers = make_layers((4, 6, 5, 3), ("gelu", "relu", None), np.float64, seed=16)
    net = compare_steps(layers, "numba", loss, momentum=0.9, steps=3, N=5, seed=17)
    assert net._work.size == 0, "the compiled step was not used"


# --- review fixes ----------------------------------------------------------------------------


def test_backward_after_a_step_needs_a_fresh_forward(backend):
    """One rule on every backend: a step keeps no activations, so ``backward`` after
    ``train_step`` raises until the next ``forward``; a step refused for bad labels keeps the
    forward it followed."""
    xp = np if backend != "cupy" else __import__("cupy")
    net = Sequential(*make_layers((4, 5, 3), ("relu", None), np.float64, seed=30,
                                  backend=backend), backend=backend)
    X, dY = xp.ones((6, 4)), xp.ones((6, 3))
    with pytest.raises(RuntimeError, match=r"before forward\(\)"):
        net.backward(dY)
    net.forward(X)
    with pytest.raises(ValueError, match="label 3"):
        net.train_step(X, xp.asarray([0, 1, 2, 0, 1, 3]), loss="softmax_cross_entropy", lr=0.1)
    assert net.backward(dY).shape == (6, 4)
    net.train_step(X, xp.asarray([0, 1, 2, 0, 1, 2]), loss="softmax_cross_entropy", lr=0.1)
    message = r"train_step\(\) keeps no activations; call forward\(X\) before backward\(dY\)"
    with pytest.raises(RuntimeError, match=message):
        net.backward(dY)
    net.forward(X)
    assert net.backward(dY).shape == (6, 4)


def test_backward_refuses_an_activation_changed_since_the_forward(backend):
    """One rule on every backend: ``backward`` differentiates the forward that was run, so an
    activation changed in between raises (the saved activations are stale) and changes nothing;
    the activation set back, or a fresh forward, and backward runs."""
    xp = np if backend != "cupy" else __import__("cupy")
    layers = make_layers((4, 5, 3), ("relu", None), np.float64, seed=43, backend=backend)
    net = Sequential(*layers, backend=backend)
    rng = np.random.default_rng(44)
    X, dY = xp.asarray(rng.standard_normal((6, 4))), xp.asarray(rng.standard_normal((6, 3)))
    net.forward(X)
    dX = to_numpy(net.backward(dY))
    params, grads = to_numpy(net._params).copy(), to_numpy(net._grads).copy()
    views = [(layer.W, layer.b, layer.dW, layer.db) for layer in layers]
    layers[0].activation = "tanh"
    message = (r"since it ran layer 0's activation changed from 'relu' to 'tanh': .* call "
               r"forward\(X\) again")
    with pytest.raises(RuntimeError, match=message):
        net.backward(dY)
    np.testing.assert_array_equal(to_numpy(net._params), params)
    np.testing.assert_array_equal(to_numpy(net._grads), grads)
    assert all(now is before for layer, held in zip(layers, views, strict=True)
               for now, before in zip((layer.W, layer.b, layer.dW, layer.db), held, strict=True))
    layers[0].activation = "relu"  # the forward's activation again: its backward is valid
    np.testing.assert_array_equal(to_numpy(net.backward(dY)), dX)
    layers[0].activation = "tanh"
    net.forward(X)
    assert not np.array_equal(to_numpy(net.backward(dY)), dX)


def test_backward_uses_a_w_assigned_since_the_forward_as_linear_does():
    """A ``W`` assigned between ``forward`` and ``backward`` is used as it is now (as
    ``Linear.backward`` uses the current ``W``), the same on numpy and numba: ``dX`` and the
    earlier layers' gradients flow back through the new ``W``; ``dW``, ``db`` come from the
    forward's saved activations. Compared with the math written out."""
    backends = ["numpy"]
    if fastlinear.available_backends()["numba"] is None:
        backends.append("numba")
    rng = np.random.default_rng(45)
    X, dY = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    new_W0, new_W1 = rng.standard_normal((4, 5)), rng.standard_normal((5, 3))
    results = []
    for backend in backends:
        layers = make_layers((4, 5, 3), ("relu", None), np.float64, seed=46)
        W0, b0 = layers[0].W.copy(), layers[0].b.copy()
        net = Sequential(*layers, backend=backend)
        net.forward(X)
        layers[0].W, layers[1].W = new_W0.copy(), new_W1.copy()
        dX = net.backward(dY)
        assert np.shares_memory(layers[1].W, net._params)
        np.testing.assert_array_equal(layers[1].W, new_W1)
        results.append((dX, *(grad.copy() for layer in layers for grad in (layer.dW, layer.db))))
    Z0 = X @ W0 + b0  # the forward ran with the old W0
    G0 = (dY @ new_W1.T) * (Z0 > 0)
    expected = (G0 @ new_W0.T, X.T @ G0, G0.sum(0), np.maximum(Z0, 0).T @ dY, dY.sum(0))
    for backend, result in zip(backends, results, strict=True):
        for name, actual, wanted in zip(("dX", "dW0", "db0", "dW1", "db1"), result, expected,
                                        strict=True):
            np.testing.assert_allclose(actual, wanted, rtol=0, atol=1e-12,
                                       err_msg=f"{name} on {backend}")


@pytest.mark.parametrize("loss, target", [("softmax_cross_entropy", np.zeros(0, np.int64)),
                                          ("mse", np.zeros((0, 3)))])
def test_the_loss_functions_refuse_an_empty_batch(loss, target):
    """The public reference losses: an empty batch has no mean, a ValueError says so (not a
    ZeroDivisionError, nor NaN with a warning)."""
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 3\)\)"):
        losses.value_and_grad(loss, np.zeros((0, 3)), target)


def test_a_refused_bigger_step_keeps_the_forward_for_backward(backend):
    """A step refused for a bad label, with a bigger batch than the last forward's, leaves that
    forward's activations: the next ``backward`` gives the same values as without the refused
    step (the numba step grows its workspace for the bigger batch, which must not be the
    forward's)."""
    xp = np if backend != "cupy" else __import__("cupy")
    nets = [Sequential(*make_layers((4, 5, 3), ("gelu", None), np.float64, seed=36,
                                    backend=backend), backend=backend) for _ in range(2)]
    rng = np.random.default_rng(37)
    X, dY = xp.asarray(rng.standard_normal((2, 4))), xp.asarray(rng.standard_normal((2, 3)))
    big, labels = xp.asarray(rng.standard_normal((50, 4))), xp.zeros(50, np.int64)
    labels[7] = 9
    for net in nets:
        net.forward(X)
    with pytest.raises(ValueError, match="label 9 at row 7"):
        nets[1].train_step(big, labels, loss="softmax_cross_entropy", lr=0.1)
    dXs = [to_numpy(net.backward(dY)) for net in nets]
    np.testing.assert_array_equal(dXs[1], dXs[0])
    for first, second in zip(*(net.layers for net in nets), strict=True):
        np.testing.assert_array_equal(to_numpy(second.dW), to_numpy(first.dW))
        np.testing.assert_array_equal(to_numpy(second.db), to_numpy(first.db))


def test_a_refused_step_takes_in_no_assignment(backend):
    """A step refused for a bad label changes nothing on any backend, not even by taking in an
    assigned ``W`` or activation: the arena keeps its values, the layer its new array, until
    the next call that runs."""
    if backend == "cupy":
        pytest.skip("the label check is shared; the cupy backend's arrays are covered elsewhere")
    net = Sequential(*make_layers((4, 5, 3), ("relu", None), np.float64, seed=38,
                                  backend=backend), backend=backend)
    X, y = np.ones((3, 4)), np.array([0, 1, 2])
    net.train_step(X, y, loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
    before, layout = snapshot(net), net._layout.copy()
    assigned = np.full((4, 5), 0.25)
    net.layers[0].W = assigned
    net.layers[1].activation = "tanh"
    with pytest.raises(ValueError, match="label 3 at row 2"):
        net.train_step(X, np.array([0, 1, 3]), loss="softmax_cross_entropy", lr=0.1)
    for old, new in zip(before, snapshot(net), strict=True):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(net._layout, layout)
    assert net.layers[0].W is assigned
    net.train_step(X, y, loss="softmax_cross_entropy", lr=0.0)
    np.testing.assert_array_equal(net.layers[0].W, assigned)
    assert np.shares_memory(net.layers[0].W, net._params)
    assert net._activations[1] == "tanh"


@pytest.mark.parametrize("libraries, dtypes, message", [
    (("cupy", "numpy"), (np.dtype(np.float64),), "computes on cupy arrays"),
    (("cupy",), (np.dtype(np.float64),), "takes cupy arrays, got the layers' parameters"),
    (("numpy",), (np.dtype(np.float32),), "computes in float32"),
])
def test_a_backend_that_cannot_take_the_network_fails_before_anything_changes(
        libraries, dtypes, message, monkeypatch):
    """The backend's array libraries and dtypes are checked as a layer's call checks them,
    before an assigned ``W`` is copied into the arena or any step runs."""
    from types import SimpleNamespace

    from fastlinear import _dispatch

    fake = SimpleNamespace(NAME="fake", ARRAY_LIBRARIES=libraries, DTYPES=dtypes)
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=31))
    params = net._params.copy()
    net.layers[0].W = np.zeros((3, 2))
    monkeypatch.setattr(_dispatch.registry, "resolve", lambda backend, library: fake)
    for call in (lambda: net.forward(np.ones((2, 3))),
                 lambda: net.train_step(np.ones((2, 3)), np.array([0, 1]),
                                        loss="softmax_cross_entropy", lr=0.1)):
        with pytest.raises(TypeError, match=message):
            call()
        np.testing.assert_array_equal(net._params, params)
        assert net.layers[0].W is not net._views[0][0]


def test_an_unavailable_backend_fails_before_anything_changes():
    if fastlinear.available_backends()["cupy"] is None:
        pytest.skip("cupy is available here")
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=32), backend="cupy")
    params = net._params.copy()
    net.layers[0].W = np.zeros((3, 2))
    with pytest.raises(fastlinear.BackendUnavailableError):
        net.forward(np.ones((2, 3)))
    np.testing.assert_array_equal(net._params, params)


def test_calls_take_in_assignments_only_when_a_layer_changed(backend, monkeypatch):
    """``forward``, ``backward`` and ``train_step`` sync the layers only after an assignment;
    the assignment is then used, and the layer points at the arena's view again."""
    xp = np if backend != "cupy" else __import__("cupy")
    net = Sequential(*make_layers((3, 4, 2), ("relu", None), np.float64, seed=33,
                                  backend=backend), backend=backend)
    syncs = []
    original = net._sync_layers
    monkeypatch.setattr(net, "_sync_layers", lambda: (syncs.append(1), original())[1])
    X, dY, y = xp.ones((2, 3)), xp.ones((2, 2)), xp.asarray([0, 1])
    net.forward(X)
    net.backward(dY)
    net.train_step(X, y, loss="softmax_cross_entropy", lr=0.1)
    assert syncs == []
    net.layers[1].W = xp.zeros((4, 2))
    net.layers[1].b = xp.full(2, 3.0)
    np.testing.assert_array_equal(to_numpy(net.forward(X)), np.full((2, 2), 3.0))
    assert syncs == [1]
    assert net.layers[1].W is net._views[1][0] and net.layers[1].b is net._views[1][1]
    net.layers[0].W = xp.ones((3, 4))  # backward takes in a new W (an activation raises)
    net.backward(dY)
    assert syncs == [1, 1]
    assert net.layers[0].W is net._views[0][0]


@pytest.mark.parametrize("threshold, calls", [(0, 1), (1 << 62, 0)])
def test_the_blas_threads_threshold_is_the_numba_blas_one(threshold, calls, monkeypatch):
    """The network call follows the one threshold defined in ``_numba_blas``."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear import sequential
    from fastlinear.backends import _numba_blas

    assert not hasattr(sequential, "_BLAS_THREADS_MIN_WORK")
    matched = []
    monkeypatch.setattr(_numba_blas, "BLAS_THREADS_MIN_WORK", threshold)
    monkeypatch.setattr(_numba_blas, "match_blas_threads", lambda: matched.append(1))
    net = Sequential(*make_layers((3, 2), ("relu",), np.float64, seed=34), backend="numba")
    net.forward(np.ones((2, 3)))
    assert len(matched) == calls


def test_checked_steps_call_the_compiled_step_directly_with_the_same_results():
    """train_step's common case (C-contiguous float X and int64 labels, checked inline) calls
    numba's compiled step itself from its second step on, skipping the dispatcher's type
    resolution; every other input goes through the dispatcher. Both give the same bits."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear.backends import _numba_network

    nets = [Sequential(*make_layers((6, 9, 4), ("tanh", None), np.float32, seed=80),
                       backend="numba") for _ in range(2)]
    rng = np.random.default_rng(81)
    X = rng.standard_normal((7, 6)).astype(np.float32)
    labels = np.empty(14, np.int64)
    labels[::2] = rng.integers(0, 4, 7)
    y = labels[::2]  # strided: not the common case
    for step in range(3):
        fast = nets[0].train_step(X, y.copy(), loss="softmax_cross_entropy", lr=0.1,
                                  momentum=0.9)
        slow = nets[1].train_step(np.asfortranarray(X), y, loss="softmax_cross_entropy",
                                  lr=0.1, momentum=0.9)
        assert fast == slow, step
        np.testing.assert_array_equal(nets[0]._arenas, nets[1]._arenas)
    entry = nets[0]._native_call.checked_call
    assert entry is not None and entry is not _numba_network.network_call  # numba exposes it
    assert nets[1]._native_call.checked_call is None  # never a checked step
    # Inputs the inline check must turn away from the compiled entry (which would misread
    # them): strided labels, F-ordered X, a one-row view of X with a row stride of its own.
    big = np.repeat(X, 2, axis=0)
    for odd_X, odd_y in [(X, y), (np.asfortranarray(X), y.copy()), (big[::2], y.copy()),
                         (big[2::3][:1], y[:1].copy()), (X[:1], labels[:2:2])]:
        fast = nets[0].train_step(odd_X, odd_y, loss="softmax_cross_entropy", lr=0.1,
                                  momentum=0.9)
        slow = nets[1].train_step(np.asfortranarray(odd_X), np.repeat(odd_y, 2)[::2],
                                  loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
        assert fast == slow
        np.testing.assert_array_equal(nets[0]._arenas, nets[1]._arenas)
    assert nets[0]._native_call.checked_call is entry  # looked up once


def test_the_compiled_entry_is_the_dispatcher_where_numba_does_not_expose_it():
    """A numba without ``overloads`` or ``typeof_pyval`` (or an uncompiled signature) leaves
    the dispatcher in place."""
    from fastlinear.sequential import _compiled_entry

    class Bare:
        pass

    bare = Bare()
    assert _compiled_entry(bare, (1, 2.0)) is bare

    class Uncompiled:
        overloads: dict = {}

        def typeof_pyval(self, value):
            return type(value)

    uncompiled = Uncompiled()
    assert _compiled_entry(uncompiled, (1, 2.0)) is uncompiled


def test_a_numba_without_the_compiled_entry_looks_it_up_once(monkeypatch):
    """Where numba does not expose its compiled function, the checked step keeps calling the
    dispatcher, and the lookup is not repeated at every step."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    from fastlinear import sequential
    from fastlinear.backends import _numba_network

    lookups = []

    def unexposed(dispatcher, args):
        lookups.append(args)
        return dispatcher

    monkeypatch.setattr(sequential, "_compiled_entry", unexposed)
    net = Sequential(*make_layers((5, 3), (None,), np.float64, seed=84), backend="numba")
    for _ in range(3):
        net.train_step(np.ones((2, 5)), np.array([0, 2]), loss="softmax_cross_entropy", lr=0.1)
    assert len(lookups) == 1 and net._native_call.checked_call is _numba_network.network_call


def test_x_is_converted_to_the_networks_dtype(backend):
    """As documented: float64 X into a float32 network computes in float32 (the result is the
    float32 X's); integer X is accepted; complex X is refused."""
    xp = np if backend != "cupy" else __import__("cupy")
    net = Sequential(*make_layers((3, 4, 2), ("relu", None), np.float32, seed=37,
                                  backend=backend), backend=backend)
    X = np.random.default_rng(38).standard_normal((5, 3))
    out = net.forward(xp.asarray(X))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(out),
                                  to_numpy(net.forward(xp.asarray(X.astype(np.float32)))))
    assert net.backward(xp.ones((5, 2))).dtype == np.float32
    assert net.forward(xp.ones((5, 3), dtype=np.int64)).dtype == np.float32
    with pytest.raises(TypeError, match="complex128; expected float32"):
        net.forward(xp.ones((5, 3), dtype=np.complex128))
    assert "converted to the network's dtype" in Sequential.__doc__


def test_kept_backend_answer_follows_context_default_and_registry(monkeypatch):
    """``_module`` keeps its last answer only while the name asked for and the registry's answer
    for it stay the same: a ``use_backend``, a ``set_backend`` or a new registry between calls
    is honoured, and the steps' values match a network that resolved afresh each time."""
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("numba backend not available")
    install_registry(monkeypatch)
    fastlinear.set_backend("numba")
    net = Sequential(*make_layers((3, 4, 2), ("relu", None), np.float64, seed=31))
    twin = Sequential(*make_layers((3, 4, 2), ("relu", None), np.float64, seed=31))
    X, y = np.random.default_rng(32).standard_normal((5, 3)), np.array([0, 1, 1, 0, 1])
    seen = []
    for context, default in (("numpy", "numba"), (None, "numba"), (None, "numpy"),
                             ("numba", "numpy"), (None, "numba")):
        fastlinear.set_backend(default)
        with fastlinear.use_backend(context) if context else contextlib.nullcontext():
            seen.append(net._module().NAME)
            value = net.train_step(X, y, loss="softmax_cross_entropy", lr=0.1, momentum=0.9)
            twin._known = (None, None, {}, None, None)  # forget: resolve afresh
            assert value == twin.train_step(X, y, loss="softmax_cross_entropy", lr=0.1,
                                            momentum=0.9)
    assert seen == ["numpy", "numba", "numpy", "numba", "numba"]
    fresh = install_registry(monkeypatch)
    fresh.set_default("numpy")
    assert net._module().NAME == "numpy"
    for mine, other in zip(net.layers, twin.layers, strict=True):
        np.testing.assert_allclose(mine.W, other.W, rtol=1e-12, atol=1e-12)
