"""The functional API: ``linear_forward`` and ``linear_backward``: check the call, then run it.

Conventions (the classic NumPy layer's, not PyTorch's): ``W`` has shape ``(in_features,
out_features)`` = ``(D, M)``, ``X`` has shape ``(N, D)``, ``(*, D)`` or ``(D,)``, ``b``
broadcasts to ``(M,)``, ``Y`` has ``X``'s leading shape and ``M`` columns. The README's "Rules"
section states the rest.

Each function is the one entrance for its pass (``Linear`` and the dask tasks call it too). A
plain call (2-D NumPy ``X`` and ``W`` of one dtype, a 1-D bias or none, no buffers, a canonical
activation name) is checked here in a few comparisons and runs its backend's function
directly: at a small layer every bytecode on this path is a measurable part of the call (the
overhead table of ``python -m fastlinear bench --overhead``). Any other call goes to
``fastlinear._plan``, which converts, promotes and checks it, or says what is wrong; dask
arrays go to ``fastlinear._dask``, which builds a graph of these calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastlinear import _dask, _dispatch, _plan, activations

__all__ = ["linear_forward", "linear_backward"]

_ndarray = np.ndarray
_context_backend = _dispatch.context_backend
_AUTO = _dispatch.AUTO
_CANONICAL = frozenset(activations.ACTIVATIONS)  # names the plain branch takes as they are


def linear_forward(X: Any, W: Any, b: Any = None, *, activation: str | None = None,
                   backend: str | None = None, out: Any = None, return_saved: bool = False,
                   casting: str = "safe") -> Any:
    """Forward pass of a linear layer, ``Y = act(X @ W + b)``, bias and activation fused.

    Parameters
    ----------
    X : array, shape (N, D), (*, D) or (D,)
        Input rows; leading dimensions are batch dimensions, a 1-D ``X`` is one sample.
        NumPy, CuPy, or any array with ``__dlpack__`` (PyTorch, JAX, ...); lists too.
    W : array, shape (D, M)
        Weights as ``(in_features, out_features)`` (the transpose of PyTorch's ``weight``).
    b : array or scalar, broadcasting to (M,), optional
        Bias, added to every row: shape ``(M,)``, ``(1, M)``, ``(1,)`` or a scalar.
    activation : str, optional
        ``None`` or one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"``, ``"sigmoid"``
        (defined as PyTorch's, see ``fastlinear.activations``), applied in the pass that
        writes ``Y``.
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"auto"``; overrides ``use_backend`` and
        ``FASTLINEAR_BACKEND``.
    out : array, shape of Y, optional
        C-contiguous buffer of the result dtype that receives ``Y``.
    return_saved : bool
        Also return what ``linear_backward`` needs to differentiate the activation: ``Y``
        itself for relu, tanh and sigmoid, the pre-activation ``X @ W + b`` (a second array)
        for the GELUs, ``None`` without an activation.
    casting : {"safe", "no", "equiv", "same_kind", "unsafe"}
        NumPy's casting rule for converting operands to the result dtype (NumPy's
        ``result_type`` of ``X``, ``W`` and ``b``). A conversion copies the operand; ``"no"``
        refuses any conversion instead.

    Returns
    -------
    Y : array of X's leading shape by M, in the result dtype and X's array library.
    (Y, saved) : when ``return_saved``.

    Raises
    ------
    TypeError
        Non-array input, non-floating or complex data, a cast that ``casting`` forbids.
    ValueError
        Shapes that do not agree, a bad ``out`` buffer, an unknown backend or activation.
    fastlinear.BackendUnavailableError
        The backend asked for cannot run here (the message says why and what to install).
    """
    if type(X) is _ndarray and type(W) is _ndarray and out is None and casting == "safe":
        try:
            (N, D), (K, M) = X.shape, W.shape
        except ValueError:  # not two matrices: the general branch says what is wrong
            N = D = M = 0
            K = -1
        dtype = W.dtype
        if (D == K and X.dtype is dtype and N * M <= _plan.PLAIN_MAX_ELEMENTS
                and (b is None or (type(b) is _ndarray and b.shape == (M,) and b.dtype is dtype))
                and (activation is None or activation in _CANONICAL)):
            module = _numpy_backend(backend)
            if module is not None and dtype in module.DTYPES:
                if return_saved:
                    return _forward_saving(module, X, W, b, activation)
                return module.forward(X, W, b, None, activation)
    elif _dask.is_dask(X):  # one task per row chunk, on the workers
        return _dask.linear_forward(X, W, b, activation=activation, backend=backend, out=out,
                                    return_saved=return_saved, casting=casting)
    return _plan.forward(X, W, b, activation, backend, out, return_saved, casting)


def linear_backward(dY: Any, X: Any, W: Any, *, activation: str | None = None, saved: Any = None,
                    has_bias: bool = True, need_dX: bool = True, backend: str | None = None,
                    accumulate: bool = False, dX: Any = None, dW: Any = None, db: Any = None,
                    casting: str = "safe") -> tuple[Any, Any, Any]:
    """Backward pass of a linear layer from ``dY``, through the activation.

    With ``G = dY * act'(Z)`` (``G = dY`` without an activation, computed in the pass that reads
    ``dY``): ``dX = G @ W.T``, ``dW = X.T @ G``, ``db = G.sum(0)``.

    Parameters
    ----------
    dY : array, the shape of the forward output
        Upstream gradient: ``(N, M)``, ``(*, M)`` or ``(M,)`` for a 1-D ``X``.
    X : array, shape (N, D), (*, D) or (D,)
        The forward input.
    W : array, shape (D, M)
        Weights as ``(in_features, out_features)``.
    activation : str, optional
        The forward call's activation; ``dY`` is the gradient with respect to its output.
    saved : array, shape of dY
        With an activation: what ``linear_forward(..., return_saved=True)`` returned beside
        ``Y`` (the output ``Y`` for relu, tanh, sigmoid; the pre-activation for the GELUs).
    has_bias : bool
        Compute ``db`` (else it is returned as ``None``).
    need_dX : bool
        Compute ``dX`` (else it is returned as ``None``; a first layer does not need it).
    backend : str, optional
        As for ``linear_forward``.
    accumulate : bool
        Add the gradients into the given ``dW`` (and ``db``) buffers instead of overwriting them
        (gradient accumulation). Both buffers are then required.
    dX, dW, db : arrays, optional
        C-contiguous output buffers of shapes ``X.shape``, ``(D, M)``, ``(M,)``.
    casting : str
        As for ``linear_forward``; the result dtype is that of ``dY``, ``X``, ``W``, ``saved``.

    Returns
    -------
    (dX, dW, db) : ``dX`` in dY's array library, ``dW`` and ``db`` in W's; ``dX`` is ``None``
    without ``need_dX``, ``db`` is ``None`` without ``has_bias``.
    """
    if (type(dY) is _ndarray and type(X) is _ndarray and type(W) is _ndarray and dW is None
            and dX is None and db is None and not accumulate and casting == "safe"):
        try:
            (N, D), (K, M) = X.shape, W.shape
        except ValueError:  # not two matrices: the general branch says what is wrong
            N = D = M = 0
            K = -1
        dtype = W.dtype
        if (D == K and dY.shape == (N, M) and X.dtype is dtype and dY.dtype is dtype
                and (N + M) * D <= _plan.PLAIN_MAX_ELEMENTS
                and (activation is None
                     or (activation in _CANONICAL and type(saved) is _ndarray
                         and saved.shape == (N, M) and saved.dtype is dtype))):
            module = _numpy_backend(backend)
            if module is not None and dtype in module.DTYPES:
                return module.backward(dY, X, W, bool(has_bias), bool(need_dX), False, None,
                                       None, None, activation, saved)
    elif _dask.is_dask(dY) or _dask.is_dask(X):  # row chunks on the workers
        return _dask.linear_backward(dY, X, W, activation=activation, saved=saved,
                                     has_bias=has_bias, need_dX=need_dX, backend=backend,
                                     accumulate=accumulate, dX=dX, dW=dW, db=db, casting=casting)
    return _plan.backward(dY, X, W, activation, saved, has_bias, need_dX, backend, accumulate,
                          dX, dW, db, casting)


def _forward_saving(module: Any, X: Any, W: Any, b: Any, activation: str | None) -> Any:
    """``(Y, saved)`` of a plain call: ``saved`` is what the activation's backward reads."""
    if activations.saved_for_backward(activation) != "preactivation":
        Y = module.forward(X, W, b, None, activation=activation)
        return Y, (None if activation is None else Y)
    Z = np.empty((X.shape[0], W.shape[1]), W.dtype)
    return module.forward(X, W, b, None, activation=activation, preactivation=Z), Z


def _numpy_backend(backend: str | None) -> Any:
    """The backend module of a plain call, or None where it does not take NumPy arrays (the
    general branch says so): ``Registry.resolve``'s answer, whose precedence this follows
    (argument, ``use_backend``, the default), read from its dict of the usual answers."""
    registry = _dispatch.registry
    if backend is None:
        backend = _context_backend.get() or registry.default_name
    module = registry.for_numpy.get(backend)  # type: ignore[arg-type]
    if module is None:  # a first load, another spelling, no backend for NumPy arrays
        module = registry.resolve(backend, "numpy")
        return module if "numpy" in module.ARRAY_LIBRARIES else None
    if registry.renting_for_numpy and backend == _AUTO:  # counted as resolve counts them
        calls = registry.interim_calls + 1
        if calls >= registry.load_after_calls:
            return registry.resolve(backend, "numpy")  # this call's count; may start the load
        registry.interim_calls = calls
    return module
