"""What the benchmark times: fastlinear's layers beside NumPy, PyTorch and the bare GEMM.

Every case builds its contenders on one set of random inputs, so all of them compute the same
math on the same data. A fastlinear backend's contender goes through ``fastlinear.Linear`` (all
overhead included); the baselines are the expressions a user would write by hand.
"""

import importlib.util
import math

import numpy as np

import fastlinear
from fastlinear.bench.grid import FUSED_ACTIVATION, shape_text
from fastlinear.bench.timing import Case, Contender, array_module, device_timing

# Row labels of the baselines (a fastlinear backend's row is ``backend_label(name)``).
NUMPY_LABEL = "NumPy"
TORCH_LABEL = "torch"
GEMM_LABEL = "GEMM A@B"
GPU_GEMM_LABEL = "cuBLAS A@B"
# The training step's: the notebook's per-layer NumPy, JAX, the step's GEMMs alone (its floor).
NOTEBOOK_LABEL = "NumPy per layer"
JAX_LABEL = "jax.jit"
FLOOR_LABEL = "GEMMs @njit"
CEILING_LABELS = (GEMM_LABEL, GPU_GEMM_LABEL)


def backend_label(backend):
    """Row label of a fastlinear backend, e.g. ``fastlinear[numba]``."""
    return f"fastlinear[{backend}]"


def import_torch(wanted):
    """PyTorch when wanted and importable, else None (it is never a dependency)."""
    if not wanted or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def random_layer(shape, dtype, rng):
    """``X (N, D), W (D, M), b (M,), dY (N, M)`` in ``dtype``; W scaled like an initialised
    layer's."""
    N, D, M = shape
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype) * (1 / math.sqrt(max(D, 1)))
    b = rng.standard_normal(M).astype(dtype)
    dY = rng.standard_normal((N, M)).astype(dtype)
    return X, W, b, dY


def backend_layer(backend, X, W, b, dY, activation=None):
    """A ``Linear`` on ``backend`` holding ``W`` and ``b``, with its own copies of ``X`` and
    ``dY`` where its arrays live (the GPU), and the fields that time work there."""
    layer = fastlinear.Linear(*W.shape, dtype=W.dtype, backend=backend, activation=activation)
    xp = array_module(layer.W)
    layer.W, layer.b = xp.asarray(W), xp.asarray(b)
    return layer, xp.asarray(X), xp.asarray(dY), backend, device_timing(xp)


def layer_case(shape, dtype, backends, torch_module, rng):
    """Forward and backward of one ``Linear(D, M)`` per backend, NumPy's ``X @ W + b`` and its
    three backward products, PyTorch's ``F.linear`` and its autograd, and the GEMM ceiling."""
    N, D, M = shape
    X, W, b, dY = random_layer(shape, dtype, rng)
    contenders = [
        Contender(NUMPY_LABEL, "forward", "numpy", lambda: X @ W + b),
        Contender(NUMPY_LABEL, "backward", "numpy", lambda: (dY @ W.T, X.T @ dY, dY.sum(axis=0))),
        Contender(GEMM_LABEL, "forward", "numpy", lambda: X @ W),
    ]
    for backend in backends:
        layer, X_b, dY_b, group, timing = backend_layer(backend, X, W, b, dY)
        layer.forward(X_b)  # caches X for backward
        contenders += [
            Contender(backend_label(backend), "forward", group,
                      lambda layer=layer, X_b=X_b: layer.forward(X_b), **timing),
            Contender(backend_label(backend), "backward", group,
                      lambda layer=layer, dY_b=dY_b: layer.backward(dY_b), **timing),
        ]
        if timing and not any(c.label == GPU_GEMM_LABEL for c in contenders):
            contenders.append(Contender(GPU_GEMM_LABEL, "forward", group,
                                        lambda X_b=X_b, W_b=layer.W: X_b @ W_b, **timing))
    if torch_module is not None:
        contenders += torch_layer_contenders(torch_module, X, W, b, dY)
    itemsize = np.dtype(dtype).itemsize
    return Case("layer", shape_text(shape), shape, dtype,
                flops={"forward": 2 * N * D * M, "backward": 4 * N * D * M},
                contenders=contenders,
                output_bytes={"forward": N * M * itemsize,
                              "backward": (N * D + D * M + M) * itemsize})


def torch_inputs(torch, X, W, b):
    """PyTorch tensors sharing the NumPy arrays' memory; the weight is ``(M, D) = W.T``."""
    return (torch.from_numpy(X), torch.from_numpy(np.ascontiguousarray(W.T)),
            torch.from_numpy(b))


def torch_layer_contenders(torch, X, W, b, dY):
    functional = torch.nn.functional
    X_t, W_t, b_t = torch_inputs(torch, X, W, b)
    inputs = [t.clone().requires_grad_(True) for t in (X_t, W_t, b_t)]
    Y_graph = functional.linear(*inputs)
    dY_t = torch.from_numpy(dY)
    return [
        # No tensor requires grad here, so no graph is recorded: the bare inference call.
        Contender(TORCH_LABEL, "forward", "torch", lambda: functional.linear(X_t, W_t, b_t),
                  traced=False),
        Contender(TORCH_LABEL, "backward", "torch",
                  lambda: torch.autograd.grad(Y_graph, inputs, dY_t, retain_graph=True),
                  traced=False),
    ]


def numpy_relu_layer_step(X, W, b, dY):
    """Forward and backward of ``max(X @ W + b, 0)`` written by hand in NumPy."""
    Y = np.maximum(X @ W + b, 0)
    G = dY * (Y > 0)
    return Y, (G @ W.T, X.T @ G, G.sum(axis=0))


def layer_forward(layer, X):
    return lambda: layer.forward(X)


def layer_step(layer, X, dY):
    """Forward then backward through ``layer``, as one call."""
    def step():
        layer.forward(X)
        return layer.backward(dY)

    return step


def fused_case(shape, pass_name, dtype, backends, torch_module, rng):
    """A linear layer with ReLU: its forward (``pass_name="forward"``, beside the bare GEMM
    ``A @ B``) or its forward and backward (``"step"``), per backend, NumPy and PyTorch."""
    N, D, M = shape
    X, W, b, dY = random_layer(shape, dtype, rng)
    if pass_name == "forward":
        contenders = [
            Contender(NUMPY_LABEL, pass_name, "numpy", lambda: np.maximum(X @ W + b, 0)),
            Contender(GEMM_LABEL, pass_name, "numpy", lambda: X @ W),
        ]
    else:
        contenders = [Contender(NUMPY_LABEL, pass_name, "numpy",
                                lambda: numpy_relu_layer_step(X, W, b, dY))]
    for backend in backends:
        layer, X_b, dY_b, group, timing = backend_layer(backend, X, W, b, dY, FUSED_ACTIVATION)
        call = (layer_forward(layer, X_b) if pass_name == "forward"
                else layer_step(layer, X_b, dY_b))
        contenders.append(Contender(backend_label(backend), pass_name, group, call, **timing))
        if timing and pass_name == "forward" and not any(c.label == GPU_GEMM_LABEL
                                                         for c in contenders):
            contenders.append(Contender(GPU_GEMM_LABEL, pass_name, group,
                                        lambda X_b=X_b, W_b=layer.W: X_b @ W_b, **timing))
    if torch_module is not None:
        contenders.append(torch_relu_layer(torch_module, pass_name, X, W, b, dY))
    flops = 2 * N * D * M if pass_name == "forward" else 6 * N * D * M
    return Case("fused", f"{shape_text(shape)} {pass_name}", shape, dtype,
                flops={pass_name: flops}, contenders=contenders)


def torch_relu_layer(torch, pass_name, X, W, b, dY):
    """PyTorch's ``relu(F.linear(X, W, b))``: inference, or forward and autograd backward."""
    functional = torch.nn.functional
    tensors = torch_inputs(torch, X, W, b)
    if pass_name == "forward":
        return Contender(TORCH_LABEL, pass_name, "torch",
                         lambda: functional.relu(functional.linear(*tensors)), traced=False)
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    dY_t = torch.from_numpy(dY)

    def step():
        Y = functional.relu(functional.linear(*inputs))
        return torch.autograd.grad(Y, inputs, dY_t)

    return Contender(TORCH_LABEL, pass_name, "torch", step, traced=False)
