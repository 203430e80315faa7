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


_CPU_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_served(dtype: np.dtype, backend: str | None) -> None:
    """Refuse a layer ``dtype`` that no backend able to run here computes in (float16 without a
    GPU), naming those that compute it."""
    registry = _dispatch.registry
    names = [backend] if backend not in (None, _dispatch.AUTO) else list(registry.backends)
    serving, others = [], []
    for name in names:
        reason = registry.unavailable_reason(name)
        if reason is None and dtype in registry.load(registry.normalize(name)).DTYPES:
            serving.append(name)
        elif reason is not None:
            others.append(f"{name}: {reason}")
    if serving:
        return
    computing = [name for name in registry.backends if dtype in _backend_dtypes(name)]
    asked = (f"the {backend!r} backend does not compute in {dtype}"
             if backend not in (None, _dispatch.AUTO) else
             f"no backend available here computes in {dtype}")
    if not computing:
        raise TypeError(f"dtype={dtype}: {asked}, nor does any other; use dtype=np.float64 or "
                        f"np.float32")
    unavailable = f" ({'; '.join(others)})" if others else ""
    raise TypeError(f"dtype={dtype}: {asked}; only the {', '.join(computing)} backend does"
                    f"{unavailable}. Use dtype=np.float32, or backend='cupy' on an NVIDIA GPU "
                    f"(pip install \"fastlinear[cuda]\")")


def _backend_dtypes(name: str) -> tuple:
    """The dtypes backend ``name`` computes in, read from its module (importable without its
    library)."""
    try:
        return tuple(_dispatch.registry.declared(name).DTYPES)
    except Exception:  # a module that cannot even be imported computes nothing here
        return ()


def _as_bias_parameter(value: Any, W: Any) -> Any:
    """An assigned bias as an array: a number, a 0-d or one-element array or a list becomes an
    ``(M,)`` array (numbers in ``W``'s floating dtype, as NumPy's weak scalars)."""
    if value is None:
        return None
    M = W.shape[1] if getattr(W, "ndim", 0) == 2 else None
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if _arrays.is_scalar(value):
        if not isinstance(value, (int, float)):
            raise TypeError(f"b must be a number (int, float), a NumPy scalar or an array, got a "
                            f"{_arrays.type_name(value)}; pass float(b)")
        dtype = W.dtype if getattr(W, "dtype", np.dtype(object)).kind == "f" else np.float64
        value = np.asarray(value, dtype=dtype)
    elif isinstance(value, np.generic):
        value = np.asarray(value)
    if M is None or _arrays.library(value) not in ("numpy", "cupy") or value.size != 1 \
            or value.ndim > 1 or value.shape == (M,):
        return value  # an (M,) array is kept as given, also with M = 1 (it may be a view)
    if _arrays.library(value) == "numpy":  # on the device where the layer keeps W
        with _arrays.on_device_of(W):  # CuPy allocates on the current device, maybe not W's
            return _arrays.namespace(W).full(M, value.item(), dtype=value.dtype)
    return _arrays.as_bias(value, M, value.dtype)  # a one-element CuPy array: on its device


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
        if dtype not in _CPU_DTYPES:
            _check_served(dtype, self.backend)
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

    @property
    def b(self) -> Any:
        """The bias, ``(M,)`` (or ``(1, M)`` as assigned), or ``None`` without a bias.

        Assigning a number, a 0-d or one-element array, or a list stores an array (a number or a
        single element broadcast to ``(M,)``), so that in-place updates such as
        ``b -= lr * db`` reach the layer's own bias.
        """
        return self._b

    @b.setter
    def b(self, value: Any) -> None:
        self._b = _as_bias_parameter(value, self.W)

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
        activation = self.activation
        result = linear_forward(X, self.W, self._b, activation=activation, backend=self.backend,
                                return_saved=activation is not None, casting=self.casting)
        Y, saved = (result, None) if activation is None else result
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
        has_bias = self._b is not None
        # The plan validates everything before a backend writes, so a call that raises leaves
        # the stored gradients untouched, also when accumulating into them in place.
        if not accumulate:
            dX, self.dW, self.db = linear_backward(
                dY, self.X, self.W, activation=self.activation, saved=self._saved,
                has_bias=has_bias, need_dX=need_dX, backend=self.backend, casting=self.casting)
            return dX
        in_place = accumulate and self._accumulates_in_place(dY)
        dW, db = (self.dW, self.db) if in_place else (None, None)
        dX, dW, db = linear_backward(dY, self.X, self.W, activation=self.activation,
                                     saved=self._saved, has_bias=has_bias, need_dX=need_dX,
                                     backend=self.backend, accumulate=in_place, dW=dW, db=db,
                                     casting=self.casting)
        if accumulate and not in_place:
            self._add_into_grads(dW, db)
        else:
            self.dW, self.db = dW, db
        return dX

    def _accumulates_in_place(self, dY: Any) -> bool:
        """Whether the call computes in the dtype of the held ``dW``/``db`` (the backend adds
        into them); else ``backward`` computes fresh gradients and adds them as ``+=`` would."""
        if self.dW is None or (self.b is not None and self.db is None):
            return True  # nothing to add into: linear_backward says so
        grads = [g for g in (self.dW, self.db if self.b is not None else None) if g is not None]
        operands = [dY, self.X, self.W] + ([] if self._saved is None else [self._saved])
        if not all(_arrays.library(a) in ("numpy", "cupy") for a in operands + grads):
            return True  # dask, torch, lists: linear_backward checks (or refuses) the buffers
        dtype = self.dW.dtype
        return all(a.dtype == dtype for a in operands + grads)

    def _add_into_grads(self, dW: Any, db: Any) -> None:
        """``self.dW += dW``, ``self.db += db`` into the buffers the layer holds, cast as NumPy's
        in-place addition casts (``same_kind``; ``unsafe`` for a layer with that rule); checked
        for both before either changes."""
        casting = "unsafe" if self.casting == "unsafe" else "same_kind"
        pairs = [("dW", self.dW, dW)] + ([("db", self.db, db)] if self.b is not None else [])
        for name, held, new in pairs:
            if held is None or getattr(held, "shape", None) != new.shape:
                raise ValueError(f"accumulate=True adds into the layer's {name}, which has shape "
                                 f"{getattr(held, 'shape', None)} where {new.shape} was expected; "
                                 f"call zero_grad() first")
            if not np.can_cast(new.dtype, held.dtype, casting=casting):  # type: ignore[arg-type]
                raise TypeError(f"accumulate=True adds {new.dtype} gradients into the layer's "
                                f"{held.dtype} {name}, which casting={casting!r} forbids")
        for _, held, new in pairs:
            xp = _arrays.namespace(held)
            xp.add(held, new, out=held, casting=casting)

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
