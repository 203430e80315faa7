"""The functional API: ``linear_forward`` and ``linear_backward`` check once, then dispatch.

All input checks live here, so backends stay free of them. Conventions (the classic NumPy layer's,
not PyTorch's): ``W`` has shape ``(in_features, out_features)`` = ``(D, M)``, ``X`` has shape
``(N, D)``, ``(*, D)`` or ``(D,)``, ``b`` broadcasts to ``(M,)``, ``Y`` has ``X``'s leading
shape and ``M`` columns. The README's "Rules" section states the rest; ``fastlinear._arrays``
converts the caller's arrays and applies NumPy's type promotion.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from fastlinear import _arrays, _dask, _dispatch, activations

__all__ = ["linear_forward", "linear_backward"]

_library = _arrays.library


def _as_rows(x, name, width, what):
    """Check ``x`` is ``(*, width)`` or ``(width,)``; return it as 2-D ``(rows, width)``."""
    if x.ndim == 0:
        raise ValueError(f"{name} must be (N, {width}), (*, {width}) or one sample ({width},), "
                         f"got a 0-d array")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has {_arrays.count(x.shape[-1], what)} but "
                         f"{_arrays.count(width, 'were')} expected (shape {x.shape})")
    # an explicit row count: reshape(-1, 0) is ambiguous when a dimension is 0
    return x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), width)


def _shares_memory(a, b):
    """Whether the memory spans of ``a`` and ``b`` overlap (a bounds check, as NumPy's
    ``may_share_memory``). For CuPy arrays it is computed from pointers and strides on the host:
    ``cupy.shares_memory`` is exact, but lists every element's address on the device and
    synchronises it, on every call with a buffer."""
    if _library(a) != _library(b):
        return False  # host and device memory never overlap
    if _library(a) != "cupy":
        return np.may_share_memory(a, b)
    if a.size == 0 or b.size == 0:
        return False
    spans = []
    for array in (a, b):
        low = high = array.data.ptr
        for extent, stride in zip(array.shape, array.strides, strict=True):
            reach = (extent - 1) * stride
            low, high = (low + reach, high) if reach < 0 else (low, high + reach)
        spans.append((low, high + array.itemsize))
    (a_low, a_high), (b_low, b_high) = spans
    return a_low < b_high and b_low < a_high


def _check_out(buf, name, shape, dtype, library, inputs, rows=True):
    """Check a caller-supplied output buffer of exactly ``shape``.

    Returns the buffer as a NumPy/CuPy array (a view of a foreign buffer), as the 2-D
    ``(rows, columns)`` view backends take when ``rows`` (Y and dX, also for one sample).
    """
    if isinstance(buf, (list, tuple)):  # a converted copy would receive the result, not buf
        raise TypeError(f"{name} must be an array that receives the result, got "
                        f"{_arrays.type_name(buf)}")
    native, _ = _arrays.to_native(buf, name)
    if _library(native) != library:
        raise TypeError(f"{name} must be a {library} array like the result, "
                        f"got {_arrays.type_name(buf)}")
    if native.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {native.dtype}: the call computes "
                        f"in {dtype} (NumPy's result dtype of its operands) and writes {name} in "
                        f"it; pass a {dtype} buffer, or operands that promote to {native.dtype}")
    if native.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {native.shape}")
    if not native.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {native.strides}")
    # Some CuPy versions have no flags.writeable (their arrays are always writable).
    if not getattr(native.flags, "writeable", True):
        raise ValueError(f"{name} is read-only")
    for input_name, array in inputs:
        if array is not None and _shares_memory(native, array):
            raise ValueError(f"{name} overlaps the input {input_name}; pass a separate buffer")
    if native.ndim == 2 or not rows:
        return native
    return native.reshape(math.prod(shape[:-1]), shape[-1])


def _host_memory_bytes():
    """Bytes an output may take: this machine's physical memory, at most the largest array size."""
    largest = int(np.iinfo(np.intp).max)
    try:
        return min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), largest)
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): NumPy's own check
        return largest


HOST_MEMORY_BYTES = _host_memory_bytes()


def _check_size(outputs, dtype):
    """Raise MemoryError, before allocating, if the host ``outputs`` ((name, shape) pairs) of
    ``dtype`` need more than ``HOST_MEMORY_BYTES``. Callers first compare a quick upper bound,
    so a call that fits pays one multiplication."""
    total = sum(math.prod(shape) for _, shape in outputs) * dtype.itemsize
    if total > HOST_MEMORY_BYTES:
        what = ", ".join(f"{name} {tuple(shape)}" for name, shape in outputs)
        raise MemoryError(f"the {dtype} outputs {what} would need {total / 2**30:.4g} GiB, more "
                          f"than the {HOST_MEMORY_BYTES / 2**30:.4g} GiB this machine can hold; "
                          f"split the batch into smaller chunks")


def _check_outputs_apart(outputs):
    """Raise ValueError if two given output buffers ((name, buffer or None) pairs) overlap."""
    given = [(name, buf) for name, buf in outputs if buf is not None]
    for i, (name, buf) in enumerate(given):
        for other_name, other in given[:i]:
            if _shares_memory(buf, other):
                raise ValueError(f"{name} overlaps the output {other_name}; "
                                 f"pass separate buffers")


# Outputs up to this many bytes may take the fast path of linear_forward (larger calls spend
# too long in the product for ~4 us of checks to matter).
FAST_PATH_MAX_BYTES = 1 << 24


def _is_plain_call(X, W, b):
    """True for the common call that needs no conversion: 2-D NumPy ``X`` and ``W`` and a 1-D
    bias (or none), of one dtype, with agreeing shapes.

    Such a call, when small (``_fits_fast_path``), skips the general checks (~4 us, as long as a
    small layer's product). This is only a guard: anything else takes the general path, which
    accepts it or says what is wrong.
    """
    if type(X) is not np.ndarray or type(W) is not np.ndarray:
        return False
    x_shape, w_shape = X.shape, W.shape
    return (len(x_shape) == 2 and len(w_shape) == 2 and x_shape[1] == w_shape[0]
            and X.dtype is W.dtype
            and (b is None or (type(b) is np.ndarray and b.shape == w_shape[1:]
                               and b.dtype is W.dtype)))


def _fits_fast_path(elements, dtype):
    """Whether outputs of ``elements`` in all may be allocated without the general checks."""
    nbytes = elements * dtype.itemsize
    return nbytes <= FAST_PATH_MAX_BYTES and nbytes <= HOST_MEMORY_BYTES


class _Call(NamedTuple):
    """A call's arrays after conversion and promotion, and where its results go back to."""

    module: Any  # the backend module (fastlinear.backends.Backend)
    dtype: np.dtype
    W: Any
    arrays: list  # the other operands, converted, in the order given (None where absent)
    data_back: _arrays.Converter  # Y / dX back into the data input's library
    weight_back: _arrays.Converter  # dW / db back into W's library


def _check_libraries(module, operands):
    libraries = module.ARRAY_LIBRARIES
    for name, x in operands:
        if hasattr(x, "dtype") and _library(x) not in libraries:
            raise TypeError(f"the {module.NAME!r} backend takes {' or '.join(libraries)} arrays, "
                            f"got {name} as a {_arrays.type_name(x)}")


def _prepare(W, arrays, backend, casting):
    """Convert, promote and check the call's arrays; resolve its backend.

    ``arrays`` is ``((name, array or None), ...)`` with the data input (X or dY) first: its
    library decides what ``auto`` picks and where ``Y``/``dX`` go back to.
    """
    W, weight_back = _arrays.to_native(W, "W")
    natives = [None if x is None and i else _arrays.to_native(x, name, scalar_ok=name == "b")
               for i, (name, x) in enumerate(arrays)]
    data_back = natives[0][1]
    natives = [None if pair is None else pair[0] for pair in natives]
    operands = [(name, x) for (name, _), x in zip(arrays, natives, strict=True) if x is not None]
    operands.insert(1, ("W", W))
    dtype = _arrays.result_dtype(operands)
    module = _dispatch.resolve(backend, _library(natives[0]))
    _check_libraries(module, operands)
    _arrays.check_weight(W)
    _arrays.check_backend_dtype(dtype, module)
    if casting != "safe":
        _arrays.check_casts(operands, dtype, casting)
    cast = [x if x is None or not hasattr(x, "dtype") else _arrays.cast(x, name, dtype, casting)
            for (name, _), x in zip(arrays, natives, strict=True)]
    return _Call(module, dtype, _arrays.cast(W, "W", dtype, casting), cast, data_back,
                 weight_back)


def _give_back(result, converter):
    return result if converter is None or result is None else converter(result)


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
    if activation is not None:
        activation = activations.check_activation(activation)
    if casting != "safe":
        _arrays.check_casting(casting)
    if out is None and _is_plain_call(X, W, b) and \
            _fits_fast_path(X.shape[0] * W.shape[1] * (1 + return_saved), W.dtype):
        module = _dispatch.resolve(backend, "numpy")
        if W.dtype in module.DTYPES and "numpy" in module.ARRAY_LIBRARIES:
            if not return_saved:
                return module.forward(X, W, b, None, activation=activation)
            return _forward_saving(module, X, W, b, activation)
    if _dask.is_dask(X):  # one task per row chunk, on the workers
        return _dask.linear_forward(X, W, b, activation=activation, backend=backend, out=out,
                                    return_saved=return_saved, casting=casting)
    call = _prepare(W, (("X", X), ("b", b)), backend, casting)
    X, b = call.arrays
    D, M = call.W.shape
    X2 = _as_rows(X, "X", D, "features")
    if b is not None:
        b = _arrays.as_bias(b, M, call.dtype)
    shape = (*X.shape[:-1], M)
    saves_z = return_saved and activations.saved_for_backward(activation) == "preactivation"
    out_2d = None
    if out is not None:
        out_2d = _check_out(out, "out", shape, call.dtype, _library(X),
                            (("X", X), ("W", call.W), ("b", b)))
    elif X2.shape[0] * M * call.dtype.itemsize * (1 + saves_z) > HOST_MEMORY_BYTES \
            and _library(X) == "numpy":
        _check_size([("Y", shape)] + [("Z", shape)] * saves_z, call.dtype)
    Z = _arrays.empty_like_device(X, (X2.shape[0], M), call.dtype) if saves_z else None
    Y = call.module.forward(X2, call.W, b, out_2d, activation=activation, preactivation=Z)
    Y = out if out is not None else _give_back(Y.reshape(shape), call.data_back)
    if not return_saved:
        return Y
    if activation is None:
        return Y, None
    return Y, (Y if Z is None else _give_back(Z.reshape(shape), call.data_back))


def _forward_saving(module, X, W, b, activation):
    """``(Y, saved)`` of a plain NumPy call: ``saved`` is what the activation's backward reads."""
    if activations.saved_for_backward(activation) != "preactivation":
        Y = module.forward(X, W, b, None, activation=activation)
        return Y, (None if activation is None else Y)
    Z = np.empty((X.shape[0], W.shape[1]), W.dtype)
    return module.forward(X, W, b, None, activation=activation, preactivation=Z), Z


def _check_upstream(dY, X, M, name):
    """Check ``dY`` (or ``saved``) has the forward output's shape; return it as 2-D."""
    expected = (*X.shape[:-1], M)
    if dY.shape != expected:
        raise ValueError(f"{name} must have the shape of the forward output {expected} "
                         f"(X has shape {X.shape}, W has {M} columns), got {dY.shape}")
    return dY if dY.ndim == 2 else dY.reshape(math.prod(expected[:-1]), M)


def _gradient_buffers(call, given, shapes, inputs, has_bias, need_dX, accumulate):
    """Check the caller's gradient buffers; return them as native 2-D arrays (or None).

    ``given`` and ``shapes`` are ``(dX, dW, db)``; dX lives in the data's library, dW and db
    in W's.
    """
    dX, dW, db = given[0] if need_dX else None, given[1], given[2] if has_bias else None
    if accumulate and (dW is None or (has_bias and db is None)):
        raise ValueError("accumulate=True adds into existing gradients: pass the dW buffer "
                         "(and db when has_bias)")
    libraries = (_library(inputs[0][1]), _library(call.W), _library(call.W))
    checked = [None if buf is None else _check_out(buf, name, shape, call.dtype, library, inputs,
                                                   rows=name != "db")
               for buf, name, shape, library in zip((dX, dW, db), ("dX", "dW", "db"), shapes,
                                                    libraries, strict=True)]
    if sum(buf is not None for buf in checked) > 1:
        _check_outputs_apart(tuple(zip(("dX", "dW", "db"), checked, strict=True)))
    return checked


def _check_backward_size(call, X2, dY, shapes, buffers, has_bias, need_dX):
    """MemoryError before allocating host gradients that would not fit (see ``_check_size``)."""
    D, M = call.W.shape
    if (X2.size + D * M + M) * call.dtype.itemsize <= HOST_MEMORY_BYTES:
        return
    wanted = (need_dX and _library(dY) == "numpy", _library(call.W) == "numpy",
              has_bias and _library(call.W) == "numpy")
    _check_size([(name, shape) for name, shape, want, buf
                 in zip(("dX", "dW", "db"), shapes, wanted, buffers, strict=True)
                 if want and buf is None], call.dtype)


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
    if activation is not None:
        activation = activations.check_activation(activation)
        activations.check_saved(activation, saved)
    if casting != "safe":
        _arrays.check_casting(casting)
    if (dX is None and dW is None and db is None and not accumulate
            and _is_plain_call(X, W, None)
            and type(dY) is np.ndarray and dY.shape == (X.shape[0], W.shape[1])
            and dY.dtype is W.dtype and _fits_fast_path(X.size + W.size + W.shape[1], W.dtype)
            and (activation is None or (type(saved) is np.ndarray and saved.shape == dY.shape
                                        and saved.dtype is W.dtype))):
        module = _dispatch.resolve(backend, "numpy")
        if W.dtype in module.DTYPES and "numpy" in module.ARRAY_LIBRARIES:
            return module.backward(dY, X, W, has_bias=bool(has_bias), need_dX=bool(need_dX),
                                   accumulate=False, dX=None, dW=None, db=None,
                                   activation=activation, saved=saved)
    if _dask.is_dask(dY) or _dask.is_dask(X):  # row chunks on the workers, dW/db tree-summed
        return _dask.linear_backward(dY, X, W, activation=activation, saved=saved,
                                     has_bias=has_bias, need_dX=need_dX, backend=backend,
                                     accumulate=accumulate, dX=dX, dW=dW, db=db, casting=casting)
    call = _prepare(W, (("dY", dY), ("X", X), ("saved", saved if activation else None)),
                    backend, casting)
    dY, X, saved = call.arrays
    D, M = call.W.shape
    X2 = _as_rows(X, "X", D, "features")
    dY2 = _check_upstream(dY, X, M, "dY")
    saved2 = None if activation is None else _check_upstream(saved, X, M, "saved")
    if saved2 is not None and _library(saved2) != _library(dY):
        raise TypeError(f"saved must be a {_library(dY)} array like dY, got {_library(saved2)}")
    shapes = (X.shape, (D, M), (M,))
    inputs = (("dY", dY), ("X", X), ("W", call.W), ("saved", saved2))
    has_bias, need_dX, accumulate = bool(has_bias), bool(need_dX), bool(accumulate)
    buffers = _gradient_buffers(call, (dX, dW, db), shapes, inputs, has_bias, need_dX,
                                accumulate)
    _check_backward_size(call, X2, dY, shapes, buffers, has_bias, need_dX)
    dX2, dW2, db2 = call.module.backward(
        dY2, X2, call.W, has_bias=has_bias, need_dX=need_dX, accumulate=accumulate,
        dX=buffers[0], dW=buffers[1], db=buffers[2], activation=activation, saved=saved2)
    if dX2 is not None and dX is None:
        dX2 = dX2.reshape(X.shape)
    return (_result(dX2, dX, call.data_back), _result(dW2, dW, call.weight_back),
            _result(db2, db, call.weight_back))


def _result(result, given, converter):
    """A backward result for the caller: their own buffer when they gave one, else converted."""
    return given if result is not None and given is not None else _give_back(result, converter)
