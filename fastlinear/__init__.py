"""fastlinear: a fast linear (dense) layer on every machine: NumPy, Numba (CPU) and CuPy (GPU).

>>> import numpy as np, fastlinear
>>> layer = fastlinear.Linear(2, 3)
>>> Y = layer.forward(np.ones((4, 2)))
>>> dX = layer.backward(np.ones_like(Y))
>>> layer.dW.shape, layer.db.shape, dX.shape
((2, 3), (3,), (4, 2))
"""

from fastlinear._dispatch import (
    BACKENDS,
    ENV_VAR,
    BackendUnavailableError,
    available_backends,
    current_backend,
    set_backend,
    use_backend,
    warm_up,
)
from fastlinear.functional import linear_backward, linear_forward
from fastlinear.layer import Linear
from fastlinear.sequential import Sequential

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "Linear",
    "Sequential",
    "available_backends",
    "current_backend",
    "linear_backward",
    "linear_forward",
    "set_backend",
    "use_backend",
    "warm_up",
]
