"""``fastlinear.Linear``: a drop-in for the classic NumPy ``Linear`` class of teaching notebooks.

Code written for that class runs unchanged: ``W`` (``randn * 0.01``, shape ``(in, out)``), ``b``
(zeros), ``dW``, ``db`` and the cached input ``X`` are plain attributes the user may read and
assign; ``forward(X)`` returns ``Y``; ``backward(dY)`` stores ``dW``/``db`` and returns ``dX``.
The math lives in ``fastlinear.functional``; the layer only holds state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fastlinear import _arrays, _dispatch, activations
from fastlinear.functional import linear_backward, linear_forward

__all__ = ["Linear"]


class Linear:
    """A linear (dense) layer ``Y = act(X @ W + b)`` with the gradients of its backward pass.

    Parameters
    ----------
    in_features, out_features : int
        ``D`` and ``M``: ``W`` has shape ``(D, M)``, ``b`` shape ``(M,)``.
    bias : bool
        Whether the layer has a bias (``b`` and ``db`` are ``None`` when it has not).
    dtype : numpy dtype
        float32 or float64 (float16 too on the GPU backend). Default float64, as the notebook.
    backend : str, optional
        Backend for this layer's calls (``"numpy"``, ``"numba"``, ``"cupy"``, ``"auto"``); when
        ``None`` the ``use_backend`` context, then ``FASTLINEAR_BACKEND``, then ``auto`` decide at
        each call. With the cupy backend the parameters live on the GPU (CuPy arrays).
    rng : numpy.random.Generator or int, optional
        Source of the initial weights. ``None`` uses ``np.random.randn`` like the notebook, so
        ``np.random.seed`` reproduces its weights.
    activation : str, optional
        ``None`` or one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"``, ``"sigmoid"``:
        ``forward`` returns ``act(X @ W + b)``, fused into the pass that writes it, and
        ``backward`` takes the gradient with respect to that activated output.
    casting : str
        NumPy's casting rule for data of another dtype than the parameters: ``"safe"`` (the
        default) computes in NumPy's result dtype as ``X @ W + b`` would, copying what needs
        converting; ``"no"`` refuses any conversion (no hidden copies).

    Attributes
    ----------
    W : array (D, M)
    b : array (M,) or None
    dW, db : gradients of the last ``backward`` (zeros before it; lazy dask arrays after a
        ``backward`` on dask arrays, see ``backward``)
    X : the input cached by the last ``forward`` (``None`` before it)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: npt.DTypeLike = np.float64, backend: str | None = None,
                 rng: np.random.Generator | int | None = None, activation: str | None = None,
                 casting: str = "safe") -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"dtype must be a floating dtype (float32, float64), got {dtype}")
        self.backend = None if backend is None else _dispatch.normalize_name(backend)
        self.activation = activations.check_activation(activation)
        self.casting = _arrays.check_casting(casting)
        shape = (int(in_features), int(out_features))
        if rng is None:
            W = np.random.randn(*shape) * 0.01  # noqa: NPY002 (the notebook's global RNG)
        else:
            W = np.random.default_rng(rng).standard_normal(shape) * 0.01
        xp = self._array_module()
        self.W = xp.asarray(W, dtype=dtype)
        self.b = xp.zeros(shape[1], dtype=dtype) if bias else None
        self.dW = xp.zeros_like(self.W)
        self.db = xp.zeros_like(self.b) if bias else None
        self.X = None
        self._saved = None  # what backward needs for the activation (Y or the pre-activation)

    def _array_module(self) -> Any:
        """CuPy when this layer's backend is cupy (parameters live on the device), else NumPy."""
        if self.backend is None or self.backend == _dispatch.AUTO:
            return np
        return _dispatch.array_module(self.backend)

    @property
    def in_features(self) -> int:
        return int(self.W.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.W.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.W.dtype)

    def forward(self, X: Any) -> Any:
        """Return ``Y = act(X @ W + b)`` for ``X`` ``(N, in_features)``, ``(*, in_features)`` or
        one sample ``(in_features,)`` (``act`` is the identity without an activation).

        The input is cached in ``self.X`` for ``backward`` (and, with an activation, the output
        or the pre-activation that its derivative needs).
        """
        if self.activation is None:
            Y = linear_forward(X, self.W, self.b, backend=self.backend, casting=self.casting)
            saved = None
        else:
            Y, saved = linear_forward(X, self.W, self.b, activation=self.activation,
                                      backend=self.backend, return_saved=True,
                                      casting=self.casting)
        self.X, self._saved = X, saved
        return Y

    __call__ = forward

    def backward(self, dY: Any, *, accumulate: bool = False, need_dX: bool = True) -> Any:
        """Store ``dW = X.T @ G`` and ``db = G.sum(0)``; return ``dX = G @ W.T``.

        ``dY`` is the gradient with respect to the last ``forward`` output, of its shape;
        ``G = dY * act'(X @ W + b)`` (``G = dY`` without an activation), computed in the pass
        that reads ``dY``. With ``accumulate=True`` the
        gradients are added to ``self.dW``/``self.db`` (gradient accumulation) instead of
        replacing them. ``need_dX=False`` skips ``dX`` (returns ``None``), e.g. for a first layer.
        If the call raises, ``dW`` and ``db`` keep their previous values.

        With dask arrays (``forward`` on a dask ``X``, then a dask ``dY``), ``dX`` and the stored
        ``dW``/``db`` are lazy dask arrays (one chunk each, tree sums over the row chunks):
        compute them together, ``dX, layer.dW, layer.db = dask.compute(dX, layer.dW,
        layer.db)``, before updating the parameters. ``accumulate=True`` is refused with them.
        """
        if self.X is None:
            raise RuntimeError("backward() called before forward(): the layer has no cached input "
                               "X; call forward(X) first")
        has_bias = self.b is not None
        # linear_backward validates everything before a backend writes, so a call that raises
        # leaves the stored gradients untouched, also when accumulating into them in place.
        dW, db = (self.dW, self.db) if accumulate else (None, None)
        dX, dW, db = linear_backward(dY, self.X, self.W, activation=self.activation,
                                     saved=self._saved, has_bias=has_bias, need_dX=need_dX,
                                     backend=self.backend, accumulate=accumulate, dW=dW, db=db,
                                     casting=self.casting)
        self.dW, self.db = dW, db
        return dX

    def zero_grad(self) -> None:
        """Reset ``dW`` and ``db`` to zeros, in place when their shapes still match."""
        xp = self._array_module()
        grads = [("dW", self.W.shape)]
        if self.b is not None:
            grads.append(("db", (self.out_features,)))
        else:
            self.db = None
        for name, shape in grads:
            grad = getattr(self, name)
            # a lazy dask gradient (from a dask backward) is replaced, not zeroed lazily
            if (grad is not None and type(grad) is type(self.W) and grad.shape == shape
                    and grad.dtype == self.dtype):
                grad[...] = 0
            else:
                setattr(self, name, xp.zeros(shape, dtype=self.dtype))

    def parameters(self) -> list[tuple[Any, Any]]:
        """``[(W, dW), (b, db)]``: parameter/gradient pairs (no bias pair without a bias)."""
        pairs = [(self.W, self.dW)]
        if self.b is not None:
            pairs.append((self.b, self.db))
        return pairs

    def __repr__(self) -> str:
        backend = self.backend or "default"
        activation = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.b is not None}, dtype={self.dtype.name}, backend={backend!r}"
                f"{activation})")
