"""The training-step case: the demo's network, forward and backward through every layer.

One step is the forward pass of a batch through every layer and the backward pass from a fixed
gradient of the logits through every layer (every ``dW`` and ``db``; no ``dX`` for the input),
without loss or optimizer. Three ways, on the same weights and data:

* fastlinear: the demo's own ``MLP`` (fused ``Linear`` + ReLU layers), per backend;
* NumPy by hand: ``np.maximum(X @ W + b, 0)`` per hidden layer and its backward;
* PyTorch eager autograd: ``nn.Linear`` and ``nn.ReLU`` in an ``nn.Sequential``.
"""

import numpy as np

from fastlinear import _arrays
from fastlinear.bench.contenders import NUMPY_LABEL, TORCH_LABEL, backend_label
from fastlinear.bench.timing import Case, Contender, array_module, device_timing
from fastlinear.demo import LAYER_SIZES, MLP


def step_flops(batch, sizes=LAYER_SIZES):
    """Flops of one step: 2·N·D·M per layer forward, 4·N·D·M backward (2·N·D·M for the first
    layer, which computes no dX)."""
    products = [batch * d * m for d, m in zip(sizes[:-1], sizes[1:], strict=True)]
    return 6 * sum(products) - 2 * products[0]


def numpy_mlp_step(X, params, dlogits):
    """Forward and backward of the network written by hand in NumPy: ``params`` is
    ``[(W, b), ...]``; returns the logits and ``[(dW, db), ...]`` from the last layer back."""
    activations = [X]
    for W, b in params[:-1]:
        activations.append(np.maximum(activations[-1] @ W + b, 0))
    W, b = params[-1]
    logits = activations[-1] @ W + b
    grads = []
    G = dlogits
    for index in range(len(params) - 1, -1, -1):
        A = activations[index]
        grads.append((A.T @ G, G.sum(axis=0)))
        if index:
            G = (G @ params[index][0].T) * (A > 0)
    return logits, grads


def torch_mlp_step(torch, X, params, dlogits):
    """A step of the same network in PyTorch eager autograd (``nn.Linear`` holds ``W.T``)."""
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
    parameters = list(model.parameters())
    X_t, dlogits_t = torch.from_numpy(X), torch.from_numpy(dlogits)

    def step():
        logits = model(X_t)
        return torch.autograd.grad(logits, parameters, dlogits_t)

    return step


def training_case(batch, dtype, backends, torch_module, seed):
    """One training step of the demo's network at ``batch`` rows, per backend, NumPy, PyTorch."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, LAYER_SIZES[0])).astype(dtype)
    dlogits = rng.standard_normal((batch, LAYER_SIZES[-1])).astype(dtype)
    params = None
    contenders = []
    for backend in backends:
        model = MLP(LAYER_SIZES, dtype, backend, rng=seed)  # the same weights on every backend
        if params is None:
            params = [(_arrays.to_numpy(layer.W), _arrays.to_numpy(layer.b))
                      for layer in model.layers]
        xp = array_module(model.layers[0].W)
        X_b, dlogits_b = xp.asarray(X), xp.asarray(dlogits)

        def step(model=model, X_b=X_b, dlogits_b=dlogits_b):
            model.forward(X_b)
            model.backward(dlogits_b)

        contenders.append(Contender(backend_label(backend), "step", backend, step,
                                    **device_timing(xp)))
    if params is None:  # no backend chosen: the baselines still need the demo's weights
        model = MLP(LAYER_SIZES, dtype, "numpy", rng=seed)
        params = [(layer.W, layer.b) for layer in model.layers]
    contenders.append(Contender(NUMPY_LABEL, "step", "numpy",
                                lambda: numpy_mlp_step(X, params, dlogits)))
    if torch_module is not None:
        contenders.append(Contender(TORCH_LABEL, "step", "torch",
                                    torch_mlp_step(torch_module, X, params, dlogits),
                                    traced=False))
    sizes = (batch, *LAYER_SIZES)
    return Case("training", str(batch), sizes, dtype,
                flops={"step": step_flops(batch)}, contenders=contenders)
