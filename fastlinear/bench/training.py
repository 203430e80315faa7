"""The full-training-step case: one SGD step of an MLP, every way a user could write it.

One step is the forward pass of a batch through every layer (ReLU between layers), the mean
softmax cross-entropy against integer labels and its gradient, the backward pass (every ``dW``
and ``db``, no ``dX`` for the input) and the SGD-with-momentum update of every parameter, as
``torch.optim.SGD(lr, momentum)``. Contenders, on the same weights and batch:

* ``fastlinear[<backend>]``: ``fastlinear.Sequential.train_step`` per backend;
* ``NumPy``: the leanest plain-NumPy step of the same math (buffers allocated once, in-place
  updates on flat arenas): the baseline the speed-ups are against;
* ``NumPy per layer``: the notebook's way, a class per layer with its own forward, backward and
  parameter update, allocating as it goes;
* ``torch``: ``nn.Sequential`` + ``CrossEntropyLoss`` + ``optim.SGD``, eager;
* ``jax.jit``: the step as one jitted function (parameters and velocity donated);
* ``GEMMs @njit``: the step's products alone, back to back in one ``@njit`` call: the floor.
"""

import importlib.util

import numpy as np

import fastlinear
from fastlinear import _dispatch
from fastlinear.bench.contenders import (
    FLOOR_LABEL,
    JAX_LABEL,
    NOTEBOOK_LABEL,
    NUMPY_LABEL,
    TORCH_LABEL,
    backend_label,
)
from fastlinear.bench.timing import Case, Contender, device_timing
from fastlinear.demo import LAYER_SIZES

LEARNING_RATE = 0.01
MOMENTUM = 0.9


def step_flops(batch, sizes=LAYER_SIZES):
    """Flops of one step's products: 2·N·D·M per layer forward, 4·N·D·M backward (2·N·D·M for
    the first layer, which computes no dX). Loss and update are O(N·C + parameters) beside."""
    products = [batch * d * m for d, m in zip(sizes[:-1], sizes[1:], strict=True)]
    return 6 * sum(products) - 2 * products[0]


def initial_parameters(sizes, dtype, seed):
    """``[(W, b), ...]`` He-initialised (``W`` is ``(in, out)``), the same for every contender."""
    rng = np.random.default_rng(seed)
    params = []
    for d, m in zip(sizes[:-1], sizes[1:], strict=True):
        W = (rng.standard_normal((d, m)) * np.sqrt(2.0 / d)).astype(dtype)
        params.append((W, (rng.standard_normal(m) * 0.1).astype(dtype)))
    return params


def sequential(params, backend, xp=np):
    """A ``fastlinear.Sequential`` of ReLU layers (the last one plain) holding ``params``."""
    layers = []
    for index, (W, b) in enumerate(params):
        layer = fastlinear.Linear(*W.shape, dtype=W.dtype, backend=backend,
                                  activation="relu" if index < len(params) - 1 else None)
        layer.W, layer.b = xp.asarray(W), xp.asarray(b)
        layers.append(layer)
    return fastlinear.Sequential(*layers, backend=backend)


def lean_numpy_step(X, y, params, lr=LEARNING_RATE, momentum=MOMENTUM):
    """The step in plain NumPy, as tight as we can write it: parameters, gradients and velocity
    in flat arenas (one update of three ufuncs for all), every buffer allocated once, ufuncs
    with ``out=``. Returns ``step()`` -> loss and ``arenas`` = (parameters, gradients)."""
    dtype = X.dtype
    sizes = [W.shape for W, _ in params]
    total = sum(d * m + m for d, m in sizes)
    arena, grads, velocity, scratch = (np.zeros(total, dtype) for _ in range(4))
    Ws, bs, dWs, dbs, position = [], [], [], [], 0
    for (W, b), (d, m) in zip(params, sizes, strict=True):
        for target, grad, shape in ((Ws, dWs, (d, m)), (bs, dbs, (m,))):
            size = int(np.prod(shape))
            target.append(arena[position:position + size].reshape(shape))
            grad.append(grads[position:position + size].reshape(shape))
            position += size
        Ws[-1][...], bs[-1][...] = W, b
    N = X.shape[0]
    H = [np.empty((N, m), dtype) for _, m in sizes]
    dA = [np.empty((N, m), dtype) for _, m in sizes]
    rows_max = np.empty((N, 1), dtype)
    rows_sum = np.empty((N, 1), dtype)
    rows = np.arange(N)
    last = len(sizes) - 1
    rate, keep, inv_n = dtype.type(lr), dtype.type(momentum), dtype.type(1.0 / N)

    def step():
        A = X
        for i in range(last + 1):
            np.matmul(A, Ws[i], out=H[i])
            H[i] += bs[i]
            if i < last:
                np.maximum(H[i], 0, out=H[i])
            A = H[i]
        logits, G = H[last], dA[last]
        np.max(logits, axis=1, keepdims=True, out=rows_max)
        np.subtract(logits, rows_max, out=G)
        np.exp(G, out=G)
        np.sum(G, axis=1, keepdims=True, out=rows_sum)
        loss = float(np.mean(np.log(rows_sum[:, 0]) + rows_max[:, 0] - logits[rows, y]))
        np.multiply(rows_sum, N, out=rows_sum)
        G /= rows_sum
        G[rows, y] -= inv_n
        for i in range(last, -1, -1):
            np.matmul(X.T if i == 0 else H[i - 1].T, G, out=dWs[i])
            np.sum(G, axis=0, out=dbs[i])
            if i > 0:
                np.matmul(G, Ws[i].T, out=dA[i - 1])
                dA[i - 1] *= H[i - 1] > 0
                G = dA[i - 1]
        np.multiply(velocity, keep, out=velocity)
        np.add(velocity, grads, out=velocity)
        np.multiply(velocity, rate, out=scratch)
        np.subtract(arena, scratch, out=arena)
        return loss

    return step, (arena, grads)


class NotebookLinear:
    """The classic teaching notebook's layer: ``forward`` caches its input, ``backward`` stores
    ``dW``/``db`` and returns ``dX``, ``step`` updates its own parameters."""

    def __init__(self, W, b, relu):
        self.W, self.b, self.relu = W.copy(), b.copy(), relu
        self.vW, self.vb = np.zeros_like(W), np.zeros_like(b)

    def forward(self, X):
        self.X = X
        Y = X @ self.W + self.b
        if self.relu:
            Y = np.maximum(Y, 0)
            self.Y = Y
        return Y

    def backward(self, dY):
        if self.relu:
            dY = dY * (self.Y > 0)
        self.dW, self.db = self.X.T @ dY, dY.sum(axis=0)
        return dY @ self.W.T

    def step(self, lr, momentum):
        self.vW = momentum * self.vW + self.dW
        self.vb = momentum * self.vb + self.db
        self.W -= lr * self.vW
        self.b -= lr * self.vb


def notebook_step(X, y, params, lr=LEARNING_RATE, momentum=MOMENTUM):
    """The step the notebook way: layer objects, a softmax cross-entropy function, a loop of
    per-layer updates. Returns ``step()`` -> loss and the layers."""
    layers = [NotebookLinear(W, b, index < len(params) - 1) for index, (W, b) in enumerate(params)]
    rows = np.arange(X.shape[0])

    def step():
        A = X
        for layer in layers:
            A = layer.forward(A)
        shifted = A - A.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = float(-np.log(probs[rows, y]).mean())
        probs[rows, y] -= 1
        grad = probs / len(y)
        for layer in reversed(layers):
            grad = layer.backward(grad)
        for layer in layers:
            layer.step(lr, momentum)
        return loss

    return step, layers


def torch_step(torch, X, y, params, lr=LEARNING_RATE, momentum=MOMENTUM):
    """``nn.Sequential`` + ``CrossEntropyLoss`` + ``optim.SGD(momentum)``, eager; returns
    ``step()`` -> loss and the model (``nn.Linear`` holds ``W.T``)."""
    modules = []
    for index, (W, b) in enumerate(params):
        linear = torch.nn.Linear(*W.shape, dtype=torch.from_numpy(W).dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            linear.bias.copy_(torch.from_numpy(b))
        modules.append(linear)
        if index < len(params) - 1:
            modules.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*modules)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))

    def step():
        optimizer.zero_grad()
        loss = criterion(model(X_t), y_t)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, model


def jax_step(X, y, params, lr=LEARNING_RATE, momentum=MOMENTUM):
    """The step as one ``jax.jit`` function over (parameters, velocity), both donated; returns
    ``step()`` -> loss and ``state`` = [parameters, velocity]; ``None`` without JAX, and for
    float64 unless JAX computes in it (``jax_enable_x64``; by default it would round to float32).
    """
    if importlib.util.find_spec("jax") is None:
        return None
    import jax
    import jax.numpy as jnp

    if X.dtype == np.float64 and not jax.config.jax_enable_x64:
        return None

    def loss_of(weights, X, y):
        A = X
        for W, b in weights[:-1]:
            A = jax.nn.relu(A @ W + b)
        W, b = weights[-1]
        logits = A @ W + b
        picked = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

    def update(weights, velocity, X, y):
        loss, grads = jax.value_and_grad(loss_of)(weights, X, y)
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
        weights = jax.tree_util.tree_map(lambda p, v: p - lr * v, weights, velocity)
        return weights, velocity, loss

    jitted = jax.jit(update, donate_argnums=(0, 1))
    state = [[(jnp.asarray(W), jnp.asarray(b)) for W, b in params], None]
    state[1] = jax.tree_util.tree_map(jnp.zeros_like, state[0])
    X_j, y_j = jnp.asarray(X), jnp.asarray(y.astype(np.int32))

    def step():
        state[0], state[1], loss = jitted(state[0], state[1], X_j, y_j)
        return float(loss)  # waits for the step, as the others return their loss

    return step, state


def gemm_floor(X, params):
    """``call()`` running the step's GEMMs back to back in one ``@njit`` call (needs Numba)."""
    from fastlinear.backends import _numba_blas
    from fastlinear.bench._gemm_floor import step_gemms

    net = sequential(params, "numpy")
    layout, arena, grads = net._layout, net._params, net._grads
    work = np.zeros(3 * X.shape[0] * int(layout[:, 1].sum()), X.dtype)
    blas = _numba_blas.blas_routines(X.dtype)
    return lambda: step_gemms(blas.gemm, blas.int_bits, layout, arena, grads, X, work)


def batch_of(sizes, batch, dtype, seed):
    """Inputs ``(batch, sizes[0])`` and integer labels ``(batch,)`` in ``[0, sizes[-1])``."""
    rng = np.random.default_rng(seed + 1)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    return X, rng.integers(0, sizes[-1], batch)


def training_case(batch, dtype, backends, torch_module, seed, sizes=LAYER_SIZES,
                  with_jax=True):
    """One full training step of the MLP ``sizes`` at ``batch`` rows, every contender."""
    params = initial_parameters(sizes, dtype, seed)
    X, y = batch_of(sizes, batch, dtype, seed)
    contenders = []
    for backend in backends:
        xp = _dispatch.array_module(backend)
        net = sequential(params, backend, xp)
        X_b, y_b = xp.asarray(X), xp.asarray(y)

        def step(net=net, X_b=X_b, y_b=y_b):
            return net.train_step(X_b, y_b, loss="softmax_cross_entropy", lr=LEARNING_RATE,
                                  momentum=MOMENTUM)

        contenders.append(Contender(backend_label(backend), "step", backend, step,
                                    **device_timing(xp)))
    contenders.append(Contender(NUMPY_LABEL, "step", "numpy", lean_numpy_step(X, y, params)[0]))
    contenders.append(Contender(NOTEBOOK_LABEL, "step", "numpy", notebook_step(X, y, params)[0]))
    if torch_module is not None:
        contenders.append(Contender(TORCH_LABEL, "step", "torch",
                                    torch_step(torch_module, X, y, params)[0], traced=False))
    jax_contender = jax_step(X, y, params) if with_jax else None
    if jax_contender is not None:
        contenders.append(Contender(JAX_LABEL, "step", "jax", jax_contender[0], traced=False))
    if "numba" in backends:
        contenders.append(Contender(FLOOR_LABEL, "step", "numba", gemm_floor(X, params)))
    return Case("training", str(batch), (batch, *sizes), np.dtype(dtype).name,
                flops={"step": step_flops(batch, sizes)}, contenders=contenders)
