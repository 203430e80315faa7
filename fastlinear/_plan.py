"""The general branch of a call: convert, promote and check its arrays once, pick its backend,
then run it.

``forward`` and ``backward`` take a call's arguments as the public functions do; they first
plan the call (a ``_Forward`` or ``_Backward``), raising every error it can raise before
anything is allocated or written, so a failing call changes no state; then they run it and give
the result back in the caller's array library. The public functions send here every call but
the plain ones (2-D NumPy ``X`` and ``W``, a 1-D bias or none, one dtype, no buffers, small
outputs), which they run directly (``fastlinear.functional``). Conventions (the classic NumPy
layer's): ``W`` is ``(in_features, out_features)`` = ``(D, M)``, ``X`` is ``(N, D)``, ``(*, D)``
or ``(D,)``, ``b`` broadcasts to ``(M,)``.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import numpy as np

from fastlinear import _arrays, _dispatch, activations

__all__ = ["forward", "backward", "check_backend", "check_rows", "check_upstream"]

_library = _arrays.library


def _host_memory_bytes() -> int:
    """Bytes an output may take: this machine's physical memory, at most the largest array size."""
    largest = int(np.iinfo(np.intp).max)
    try:
        return min(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), largest)
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): NumPy's own check
        return largest


HOST_MEMORY_BYTES = _host_memory_bytes()

# Outputs up to this many bytes may take the plain branch of ``fastlinear.functional`` (larger
# calls spend too long in the product for the general checks to matter); counted as elements
# of Y, or of X and W, at the widest dtype, twice over (Y and Z) for the forward.
PLAIN_MAX_ELEMENTS = min(1 << 24, HOST_MEMORY_BYTES) // 16


# -- checks shared with the dask adapter ------------------------------------------------------

def check_rows(x: Any, name: str, width: int, what: str) -> Any:
    """Check ``x`` is ``(*, width)`` or ``(width,)``; return it as 2-D ``(rows, width)``."""
    if x.ndim == 0:
        raise ValueError(f"{name} must be (N, {width}), (*, {width}) or one sample ({width},), "
                         f"got a 0-d array")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has {_arrays.count(x.shape[-1], what)} but "
                         f"{_arrays.count(width, 'were')} expected (shape {x.shape})")
    # an explicit row count: reshape(-1, 0) is ambiguous when a dimension is 0
    return x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), width)


def check_upstream(dY: Any, X: Any, M: int, name: str) -> None:
    """Check ``dY`` (or ``saved``) has the forward output's shape, ``(*X.shape[:-1], M)``."""
    expected = (*X.shape[:-1], M)
    if dY.shape != expected:
        raise ValueError(f"{name} must have the shape of the forward output {expected} "
                         f"(X has shape {X.shape}, W has {M} columns), got {dY.shape}")


def _upstream_rows(dY: Any, X: Any, M: int, name: str) -> Any:
    """``check_upstream``, then ``dY`` as 2-D ``(rows, M)``."""
    check_upstream(dY, X, M, name)
    return dY if dY.ndim == 2 else dY.reshape(math.prod(dY.shape[:-1]), M)


def check_backend(module: Any, libraries: list[tuple[str, str]], dtype: np.dtype) -> None:
    """The backend ``module`` takes arrays of these ``(library, what came)`` and computes in
    ``dtype``; its declarations say so without a load."""
    for library, what in libraries:
        if library not in module.ARRAY_LIBRARIES:
            raise TypeError(f"the {module.NAME!r} backend takes "
                            f"{' or '.join(module.ARRAY_LIBRARIES)} arrays, got {what}")
    if dtype not in module.DTYPES:
        names = ", ".join(d.name for d in module.DTYPES)
        raise TypeError(f"the call computes in {dtype} (NumPy's result dtype of its operands); "
                        f"the {module.NAME!r} backend computes in {names}"
                        f"{_arrays.dtype_hint(dtype)}")


# -- buffers ----------------------------------------------------------------------------------

def _shares_memory(a: Any, b: Any) -> bool:
    """Whether the memory spans of ``a`` and ``b`` overlap (a bounds check, as NumPy's
    ``may_share_memory``). For CuPy arrays it is computed from pointers and strides on the host:
    ``cupy.shares_memory`` is exact, but lists every element's address on the device and
    synchronises it, on every call with a buffer."""
    if _library(a) != _library(b):
        return False  # host and device memory never overlap
    if _library(a) != "cupy":
        return bool(np.may_share_memory(a, b))
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


def _check_out(buf: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, library: str,
               inputs: tuple[tuple[str, Any], ...], rows: bool = True) -> Any:
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


def _check_size(outputs: list[tuple[str, tuple[int, ...]]], dtype: np.dtype) -> None:
    """Raise MemoryError, before allocating, if the host ``outputs`` ((name, shape) pairs) of
    ``dtype`` need more than ``HOST_MEMORY_BYTES``. Callers first compare a quick upper bound,
    so a call that fits pays one multiplication."""
    total = sum(math.prod(shape) for _, shape in outputs) * dtype.itemsize
    if total > HOST_MEMORY_BYTES:
        what = ", ".join(f"{name} {tuple(shape)}" for name, shape in outputs)
        raise MemoryError(f"the {dtype} outputs {what} would need {total / 2**30:.4g} GiB, more "
                          f"than the {HOST_MEMORY_BYTES / 2**30:.4g} GiB this machine can hold; "
                          f"split the batch into smaller chunks")


def _check_outputs_apart(outputs: tuple[tuple[str, Any], ...]) -> None:
    """Raise ValueError if two given output buffers ((name, buffer or None) pairs) overlap."""
    given = [(name, buf) for name, buf in outputs if buf is not None]
    for i, (name, buf) in enumerate(given):
        for other_name, other in given[:i]:
            if _shares_memory(buf, other):
                raise ValueError(f"{name} overlaps the output {other_name}; "
                                 f"pass separate buffers")


# -- conversion -------------------------------------------------------------------------------

class _Call(NamedTuple):
    """A call's arrays after conversion and promotion, and where its results go back to."""

    module: Any  # the backend module (fastlinear.backends.Backend)
    dtype: np.dtype
    W: Any
    arrays: list[Any]  # the other operands, converted, in the order given (None where absent)
    data_back: _arrays.Converter  # Y / dX back into the data input's library
    weight_back: _arrays.Converter  # dW / db back into W's library


def _convert(W: Any, arrays: tuple[tuple[str, Any], ...], backend: str | None,
             casting: str) -> _Call:
    """Convert, promote and check the call's arrays; resolve its backend.

    ``arrays`` is ``((name, array or None), ...)`` with the data input (X or dY) first: its
    library decides what ``auto`` picks and where ``Y``/``dX`` go back to.
    """
    W, weight_back = _arrays.to_native(W, "W")
    pairs = [None if x is None and i else _arrays.to_native(x, name, scalar_ok=name == "b")
             for i, (name, x) in enumerate(arrays)]
    data_back = pairs[0][1] if pairs[0] is not None else None
    natives = [None if pair is None else pair[0] for pair in pairs]
    operands = [(name, x) for (name, _), x in zip(arrays, natives, strict=True) if x is not None]
    operands.insert(1, ("W", W))
    dtype = _arrays.result_dtype(operands)
    module = _dispatch.registry.resolve(backend, _library(natives[0]))
    check_backend(module, [(_library(x), f"{name} as a {_arrays.type_name(x)}")
                           for name, x in operands if hasattr(x, "dtype")], dtype)
    _arrays.check_weight(W)
    if casting != "safe":
        _arrays.check_casts(operands, dtype, casting)
    cast = [x if x is None or not hasattr(x, "dtype") else _arrays.cast(x, name, dtype, casting)
            for (name, _), x in zip(arrays, natives, strict=True)]
    return _Call(module, dtype, _arrays.cast(W, "W", dtype, casting), cast, data_back,
                 weight_back)


def _give_back(result: Any, converter: _arrays.Converter) -> Any:
    return result if converter is None or result is None else converter(result)


# -- forward ----------------------------------------------------------------------------------

def forward(X: Any, W: Any, b: Any, activation: str | None, backend: str | None, out: Any,
            return_saved: bool, casting: str) -> Any:
    """``linear_forward(X, W, b, ...)`` in the general branch (the public function documents
    the arguments)."""
    if activation is not None:
        activation = activations.check_activation(activation)
    if casting != "safe":
        _arrays.check_casting(casting)
    return _run_forward(_plan_forward(X, W, b, activation, backend, out, return_saved, casting))


class _Forward(NamedTuple):
    """A checked forward call of the general branch."""

    call: _Call
    X2: Any  # X as (rows, D)
    b: Any
    shape: tuple[int, ...]  # Y's shape
    out: Any  # the caller's buffer, or None
    out_2d: Any
    activation: str | None
    return_saved: bool
    saves_z: bool


def _plan_forward(X: Any, W: Any, b: Any, activation: str | None, backend: str | None,
                  out: Any, return_saved: bool, casting: str) -> _Forward:
    call = _convert(W, (("X", X), ("b", b)), backend, casting)
    X, b = call.arrays
    D, M = call.W.shape
    X2 = check_rows(X, "X", D, "features")
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
    return _Forward(call, X2, b, shape, out, out_2d, activation, return_saved, saves_z)


def _run_forward(plan: _Forward) -> Any:
    call = plan.call
    rows, M = plan.X2.shape[0], call.W.shape[1]
    Z = _arrays.empty_like_device(plan.X2, (rows, M), call.dtype) if plan.saves_z else None
    Y = call.module.forward(plan.X2, call.W, plan.b, plan.out_2d, activation=plan.activation,
                            preactivation=Z)
    Y = plan.out if plan.out is not None else _give_back(Y.reshape(plan.shape), call.data_back)
    if not plan.return_saved:
        return Y
    if plan.activation is None:
        return Y, None
    return Y, (Y if Z is None else _give_back(Z.reshape(plan.shape), call.data_back))


# -- backward ---------------------------------------------------------------------------------

def backward(dY: Any, X: Any, W: Any, activation: str | None, saved: Any, has_bias: bool,
             need_dX: bool, backend: str | None, accumulate: bool, dX: Any, dW: Any, db: Any,
             casting: str) -> Any:
    """``linear_backward(dY, X, W, ...)`` in the general branch (the public function documents
    the arguments)."""
    if activation is not None:
        activation = activations.check_activation(activation)
        activations.check_saved(activation, saved)
    if casting != "safe":
        _arrays.check_casting(casting)
    return _run_backward(_plan_backward(dY, X, W, activation, saved, bool(has_bias),
                                        bool(need_dX), backend, bool(accumulate), (dX, dW, db),
                                        casting))


def _gradient_buffers(call: _Call, given: tuple[Any, Any, Any],
                      shapes: tuple[tuple[int, ...], ...], inputs: tuple[tuple[str, Any], ...],
                      has_bias: bool, need_dX: bool, accumulate: bool) -> list[Any]:
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


def _check_backward_size(call: _Call, X2: Any, dY: Any, shapes: tuple[tuple[int, ...], ...],
                         buffers: list[Any], has_bias: bool, need_dX: bool) -> None:
    """MemoryError before allocating host gradients that would not fit (see ``_check_size``)."""
    D, M = call.W.shape
    if (X2.size + D * M + M) * call.dtype.itemsize <= HOST_MEMORY_BYTES:
        return
    wanted = (need_dX and _library(dY) == "numpy", _library(call.W) == "numpy",
              has_bias and _library(call.W) == "numpy")
    _check_size([(name, shape) for name, shape, want, buf
                 in zip(("dX", "dW", "db"), shapes, wanted, buffers, strict=True)
                 if want and buf is None], call.dtype)


class _Backward(NamedTuple):
    """A checked backward call of the general branch."""

    call: _Call
    dY2: Any
    X2: Any
    saved2: Any
    x_shape: tuple[int, ...]
    given: tuple[Any, Any, Any]  # the caller's (dX, dW, db)
    buffers: list[Any]  # their native 2-D views
    has_bias: bool
    need_dX: bool
    accumulate: bool
    activation: str | None


def _plan_backward(dY: Any, X: Any, W: Any, activation: str | None, saved: Any,
                   has_bias: bool, need_dX: bool, backend: str | None, accumulate: bool,
                   given: tuple[Any, Any, Any], casting: str) -> _Backward:
    call = _convert(W, (("dY", dY), ("X", X), ("saved", saved if activation else None)),
                    backend, casting)
    dY, X, saved = call.arrays
    D, M = call.W.shape
    X2 = check_rows(X, "X", D, "features")
    dY2 = _upstream_rows(dY, X, M, "dY")
    saved2 = None if activation is None else _upstream_rows(saved, X, M, "saved")
    if saved2 is not None and _library(saved2) != _library(dY):
        raise TypeError(f"saved must be a {_library(dY)} array like dY, got {_library(saved2)}")
    shapes = (X.shape, (D, M), (M,))
    inputs = (("dY", dY), ("X", X), ("W", call.W), ("saved", saved2))
    buffers = _gradient_buffers(call, given, shapes, inputs, has_bias, need_dX, accumulate)
    _check_backward_size(call, X2, dY, shapes, buffers, has_bias, need_dX)
    return _Backward(call, dY2, X2, saved2, X.shape, given, buffers, has_bias, need_dX,
                     accumulate, activation)


def _run_backward(plan: _Backward) -> tuple[Any, Any, Any]:
    call, (dX, dW, db) = plan.call, plan.given
    dX2, dW2, db2 = call.module.backward(
        plan.dY2, plan.X2, call.W, has_bias=plan.has_bias, need_dX=plan.need_dX,
        accumulate=plan.accumulate, dX=plan.buffers[0], dW=plan.buffers[1], db=plan.buffers[2],
        activation=plan.activation, saved=plan.saved2)
    if dX2 is not None and dX is None:
        dX2 = dX2.reshape(plan.x_shape)
    return (_result(dX2, dX, call.data_back), _result(dW2, dW, call.weight_back),
            _result(db2, db, call.weight_back))


def _result(result: Any, given: Any, converter: _arrays.Converter) -> Any:
    """A backward result for the caller: their own buffer when they gave one, else converted."""
    return given if result is not None and given is not None else _give_back(result, converter)
