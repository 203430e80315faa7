"""Compute backends for fastlinear: one module per backend, each implementing ``Backend``.

The registry that maps backend names to these modules is ``fastlinear._dispatch.BACKENDS``.
A backend module is imported only when it is chosen (or when availability is asked for), so a
missing optional library costs nothing until then. The dispatcher (``fastlinear.functional``)
validates shapes, dtypes, array types and buffers and flattens batch dimensions before it calls a
backend, so backends contain no checks.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["Backend"]

# The arrays a backend takes and returns: numpy.ndarray, or cupy.ndarray on the GPU.
Array = Any


class Backend(Protocol):
    """What every backend module provides (``mypy`` holds each module to it, see ``_dispatch``).

    Array arguments are 2-D ``(rows, columns)`` except ``b``/``db`` (1-D), all of one dtype from
    ``DTYPES``. Inputs may have any memory layout (C, F or strided) and are never written. Output
    buffers are ``None`` (the backend allocates) or writable C-contiguous arrays of the right
    shape that overlap no input and no other output.
    """

    NAME: str
    """The registry name (``"numpy"``, ``"numba"``, ``"cupy"``)."""
    DTYPES: tuple[np.dtype, ...]
    """The floating dtypes the backend computes in; the dispatcher refuses others."""
    ARRAY_LIBRARIES: tuple[str, ...]
    """Array libraries whose arrays the backend takes; the first is the one it computes on."""

    def unavailable_reason(self) -> str | None:
        """``None`` when the backend can run here, else a one-line reason naming what is
        missing and how to get it (e.g. ``pip install "fastlinear[numba]"``). Cheap after the
        first call."""
        ...

    # The parameters may be passed by position, in this order: a planned call runs as
    # ``function(*args)`` (keywords cost more than a small layer's checks).

    def forward(self, X: Array, W: Array, b: Array | None, out: Array | None,
                activation: str | None = None, preactivation: Array | None = None) -> Array:
        """``Y = act(X @ W + b)`` for ``X`` (N, D), ``W`` (D, M), ``b`` (M,) or None.

        ``activation`` is ``None`` or a name from ``fastlinear.activations.ACTIVATIONS``,
        applied in the pass that writes ``Y``. ``preactivation``, when given (only with an
        activation), is an (N, M) buffer that also receives ``Z = X @ W + b``. Returns ``Y``
        (``out`` itself when given).
        """
        ...

    def backward(self, dY: Array, X: Array, W: Array, has_bias: bool, need_dX: bool,
                 accumulate: bool, dX: Array | None, dW: Array | None, db: Array | None,
                 activation: str | None = None, saved: Array | None = None,
                 ) -> tuple[Array | None, Array, Array | None]:
        """Gradients of ``Y = act(X @ W + b)`` from ``dY`` (N, M).

        With ``G = dY * act'(Z)`` (``G = dY`` without an activation; computed in the pass that
        reads ``dY``, never written into it): ``dX = G @ W.T`` (only when ``need_dX``, else
        ``None``), ``dW = X.T @ G``, ``db = G.sum(0)`` (only when ``has_bias``, else ``None``).
        ``saved`` is the (N, M) array that ``activations.saved_for_backward(activation)`` names:
        the forward output ``Y`` for relu, tanh and sigmoid, the pre-activation ``Z`` for the
        GELUs; ``None`` without an activation. With ``accumulate=True`` the ``dW`` (and ``db``
        when ``has_bias``) buffers are given and the gradients are added into them; ``dX`` is
        always overwritten.
        """
        ...
