"""The functional API: ``linear_forward`` and ``linear_backward`` validate once, then dispatch.

All input checks live here, so backends stay free of them. Conventions (the classic NumPy layer's,
not PyTorch's): ``W`` has shape ``(in_features, out_features)`` = ``(D, M)``, ``X`` has shape
``(N, D)`` or ``(*, D)``, ``b`` has shape ``(M,)`` or ``(1, M)``, ``Y`` has shape ``(N, M)`` or
``(*, M)``.

Rules
-----
* Array type in = array type out. NumPy and CuPy arrays are accepted; Python lists and tuples are
  converted with ``numpy.asarray(x, dtype=W.dtype)`` (a list has no dtype of its own); anything
  else is a ``TypeError``. Masked arrays are refused (the mask would be ignored silently).
  The CPU backends take NumPy arrays only. The cupy backend takes CuPy arrays, and NumPy arrays
  too, which it copies to the device: ``Y`` and ``dX`` come back in the library of the data input
  (``X``, ``dY``), ``dW`` and ``db`` in the library of ``W`` (so a layer whose parameters live on
  the GPU keeps its gradients there).
* Every array of a call has the same floating dtype, from the backend's ``DTYPES`` (float32 and
  float64 everywhere, float16 on the GPU too). float32 stays float32. Mixed dtypes and integer,
  bool, complex or object arrays are a ``TypeError``; nothing is cast behind your back.
* Shapes must agree exactly; nothing is broadcast except the bias over rows.
* NaN and inf propagate as in NumPy; they are not checked for.
* Output buffers (``out``, ``dX``, ``dW``, ``db``) overlap no input and no other output; the
  buffer given is the array returned, also with leading batch dimensions.
* Outputs that fastlinear allocates in host memory and that would not fit in it (more bytes than
  the machine's physical memory) are refused with a ``MemoryError`` before anything is
  allocated; an operating system that overcommits memory would otherwise accept the allocation
  and kill the process when it is filled.
"""

import math
import os

import numpy as np

from fastlinear import _dispatch, activations

__all__ = ["linear_forward", "linear_backward"]


def _library(x):
    """Root module of an array's type: ``"numpy"``, ``"cupy"``, ``"builtins"`` ..."""
    return type(x).__module__.partition(".")[0]


def _as_array(x, name, dtype=None):
    """Return ``x`` as an array (converting lists/tuples), or raise TypeError naming what came."""
    if type(x) is np.ndarray:
        return x
    if _library(x) == "cupy":
        return x
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(
                f"{name} is a numpy masked array; fastlinear would ignore its mask. "
                f"Pass {name}.filled(...) or an unmasked ndarray"
            )
        return x if type(x) is np.ndarray else np.asarray(x)
    if isinstance(x, (list, tuple)):
        try:
            return np.asarray(x, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} could not be converted to a {dtype} array: {exc}") from exc
    raise TypeError(
        f"{name} must be a numpy.ndarray or cupy.ndarray (or a list of numbers), "
        f"got {type(x).__module__}.{type(x).__qualname__}"
    )


def _check_dtype(x, name, dtype):
    if x.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {x.dtype} but the call computes in {dtype} (the dtype of W); "
            f"fastlinear does not cast: convert with {name}.astype({dtype.name!r})"
        )


def _check_weight(W, module):
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (in_features, out_features), got shape {W.shape}")
    if W.dtype not in module.DTYPES:
        names = ", ".join(d.name for d in module.DTYPES)
        raise TypeError(
            f"W has dtype {W.dtype}; the {module.NAME!r} backend computes in {names}"
        )


def _check_bias(b, M, dtype):
    """Return ``b`` as a 1-D ``(M,)`` view; ``(1, M)`` is accepted as the notebook uses it."""
    _check_dtype(b, "b", dtype)
    if b.ndim == 2 and b.shape[0] == 1:
        b = b.reshape(b.shape[1])
    if b.ndim != 1 or b.shape[0] != M:
        raise ValueError(f"b must have shape ({M},) or (1, {M}) to match W's {M} columns, "
                         f"got shape {b.shape}")
    return b


def _check_rows(x, name, width, what):
    """Check ``x`` is ``(*, width)``; return it flattened to 2-D ``(rows, width)``."""
    if x.ndim < 2:
        raise ValueError(f"{name} must be 2-D (N, {width}) or (*, {width}), got shape {x.shape}"
                         f"; for a single row use {name}.reshape(1, -1)")
    if x.shape[-1] != width:
        raise ValueError(f"{name} has {x.shape[-1]} {what} but {width} were expected "
                         f"(shape {x.shape})")
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


def _check_out(buf, name, shape, dtype, library, inputs):
    """Check a caller-supplied output buffer of exactly ``shape``; return it as 2-D (or 1-D)."""
    if _library(buf) != library:
        raise TypeError(f"{name} must be a {library}.ndarray like the inputs, "
                        f"got {type(buf).__module__}.{type(buf).__qualname__}")
    if buf.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {buf.dtype}")
    if buf.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {buf.shape}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {buf.strides}")
    # Some CuPy versions have no flags.writeable (their arrays are always writable).
    if not getattr(buf.flags, "writeable", True):
        raise ValueError(f"{name} is read-only")
    for input_name, array in inputs:
        if array is not None and _shares_memory(buf, array):
            raise ValueError(f"{name} overlaps the input {input_name}; pass a separate buffer")
    return buf if buf.ndim <= 2 else buf.reshape(math.prod(shape[:-1]), shape[-1])


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


def _prepare(W, arrays, backend):
    """Convert and check the call's arrays and resolve its backend.

    ``arrays`` is ``((name, array), ...)`` with the data input (X or dY) first: its library
    decides what ``auto`` picks. Returns ``(module, W, [arrays...])``. This runs on every call,
    so it is written for speed: one pass per array, no work for arrays already in order.
    """
    W = _as_array(W, "W")
    dtype = W.dtype
    checked = [None if x is None and name == "b" else _as_array(x, name, dtype)
               for name, x in arrays]
    module = _dispatch.resolve(backend, _library(checked[0]))
    libraries = module.ARRAY_LIBRARIES
    for name, x in (("W", W), *zip((name for name, _ in arrays), checked, strict=True)):
        if x is not None and _library(x) not in libraries:
            raise TypeError(
                f"the {module.NAME!r} backend takes {' or '.join(libraries)} "
                f"arrays, got {name} as a {type(x).__module__}.{type(x).__qualname__}"
            )
    _check_weight(W, module)
    for (name, _), x in zip(arrays, checked, strict=True):
        if x is not None and x.dtype != dtype:
            _check_dtype(x, name, dtype)
    return module, W, checked


def linear_forward(X, W, b=None, *, activation=None, backend=None, out=None, return_saved=False):
    """Forward pass of a linear layer, ``Y = act(X @ W + b)``, bias and activation fused.

    Parameters
    ----------
    X : array, shape (N, D) or (*, D)
        Input rows. Leading dimensions are batch dimensions.
    W : array, shape (D, M)
        Weights as ``(in_features, out_features)`` (the transpose of PyTorch's ``weight``).
    b : array, shape (M,) or (1, M), optional
        Bias, added to every row.
    activation : str, optional
        ``None`` or one of ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"tanh"``, ``"sigmoid"``
        (defined as PyTorch's, see ``fastlinear.activations``), applied in the pass that
        writes ``Y``.
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"auto"``; overrides ``use_backend`` and
        ``FASTLINEAR_BACKEND``.
    out : array, shape (N, M) or (*, M), optional
        C-contiguous buffer of the result dtype that receives ``Y``.
    return_saved : bool
        Also return what ``linear_backward`` needs to differentiate the activation: ``Y``
        itself for relu, tanh and sigmoid, the pre-activation ``X @ W + b`` (a second array)
        for the GELUs, ``None`` without an activation.

    Returns
    -------
    Y : array, shape (N, M) or (*, M), same dtype and array type as ``X``.
    (Y, saved) : when ``return_saved``.

    Raises
    ------
    TypeError
        Non-array input, non-float or mixed dtypes, arrays of different libraries.
    ValueError
        Shapes that do not agree, a bad ``out`` buffer, an unknown backend name.
    fastlinear.BackendUnavailableError
        The backend asked for cannot run here (the message says why and what to install).
    """
    if activation is not None:
        activation = activations.check_activation(activation)
    if out is None and not return_saved and _is_plain_call(X, W, b) and \
            _fits_fast_path(X.shape[0] * W.shape[1], W.dtype):
        module = _dispatch.resolve(backend, "numpy")
        if W.dtype in module.DTYPES and "numpy" in module.ARRAY_LIBRARIES:
            return module.forward(X, W, b, None, activation=activation)
    module, W, (X, b) = _prepare(W, (("X", X), ("b", b)), backend)
    D, M = W.shape
    lead = X.shape[:-1]
    X2 = _check_rows(X, "X", D, "features")
    if b is not None:
        b = _check_bias(b, M, W.dtype)
    saves_z = return_saved and activations.saved_for_backward(activation) == "preactivation"
    out_2d = None
    if out is not None:
        out_2d = _check_out(out, "out", (*lead, M), W.dtype, _library(X),
                            (("X", X), ("W", W), ("b", b)))
    elif X2.shape[0] * M * W.dtype.itemsize * (1 + saves_z) > HOST_MEMORY_BYTES \
            and _library(X) == "numpy":
        _check_size([("Y", (*lead, M))] + [("Z", (*lead, M))] * saves_z, W.dtype)
    Z = None
    if saves_z:
        Z = _empty_like_library(X, (X2.shape[0], M), W.dtype)
    Y = module.forward(X2, W, b, out_2d, activation=activation, preactivation=Z)
    Y = out if out is not None else (Y if len(lead) == 1 else Y.reshape(*lead, M))
    if not return_saved:
        return Y
    if activation is None:
        return Y, None
    return Y, (Y if Z is None else Z.reshape(Y.shape))


def _empty_like_library(like, shape, dtype):
    """A new C-contiguous array in the library (NumPy or CuPy) of the array ``like``."""
    if _library(like) == "cupy":
        import cupy

        return cupy.empty(shape, dtype)
    return np.empty(shape, dtype)


def linear_backward(dY, X, W, *, activation=None, saved=None, has_bias=True, need_dX=True,
                    backend=None, accumulate=False, dX=None, dW=None, db=None):
    """Backward pass of a linear layer from ``dY``, through the activation.

    With ``G = dY * act'(Z)`` (``G = dY`` without an activation, computed in the pass that reads
    ``dY``): ``dX = G @ W.T``, ``dW = X.T @ G``, ``db = G.sum(0)``.

    Parameters
    ----------
    dY : array, shape (N, M) or (*, M)
        Upstream gradient, the shape of the forward output.
    X : array, shape (N, D) or (*, D)
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

    Returns
    -------
    (dX, dW, db) : tuple of arrays (``dX``/``db`` may be ``None``, see above)
    """
    if activation is not None:
        activation = activations.check_activation(activation)
        if activation is not None and saved is None:
            raise ValueError(f"activation={activation!r} needs saved=, what linear_forward(..., "
                             f"return_saved=True) returned beside Y "
                             f"(the {activations.saved_for_backward(activation)})")
    if (activation is None and dX is None and dW is None and db is None and not accumulate
            and _is_plain_call(X, W, None)
            and type(dY) is np.ndarray and dY.shape == (X.shape[0], W.shape[1])
            and dY.dtype is W.dtype and _fits_fast_path(X.size + W.size + W.shape[1], W.dtype)):
        module = _dispatch.resolve(backend, "numpy")
        if W.dtype in module.DTYPES and "numpy" in module.ARRAY_LIBRARIES:
            return module.backward(dY, X, W, has_bias=bool(has_bias), need_dX=bool(need_dX),
                                   accumulate=False, dX=None, dW=None, db=None)
    module, W, (dY, X) = _prepare(W, (("dY", dY), ("X", X)), backend)
    D, M = W.shape
    X2 = _check_rows(X, "X", D, "features")
    if dY.shape != (*X.shape[:-1], M):
        raise ValueError(f"dY must have the shape of the forward output {(*X.shape[:-1], M)} "
                         f"(X has shape {X.shape}, W {W.shape}), got {dY.shape}")
    dY2 = dY if dY.ndim == 2 else dY.reshape(X2.shape[0], M)
    saved2 = None
    if activation is not None:
        saved = _as_array(saved, "saved", W.dtype)
        if _library(saved) != _library(dY):
            raise TypeError(f"saved must be a {_library(dY)} array like dY, got "
                            f"{type(saved).__module__}.{type(saved).__qualname__}")
        _check_dtype(saved, "saved", W.dtype)
        if saved.shape != dY.shape:
            raise ValueError(f"saved must have dY's shape {dY.shape}, got {saved.shape}")
        saved2 = saved if saved.ndim == 2 else saved.reshape(dY2.shape)
    inputs = (("dY", dY), ("X", X), ("W", W), ("saved", saved2))
    if accumulate and (dW is None or (has_bias and db is None)):
        raise ValueError("accumulate=True adds into existing gradients: pass the dW buffer "
                         "(and db when has_bias)")
    if dW is not None:
        dW = _check_out(dW, "dW", (D, M), W.dtype, _library(W), inputs)
    if has_bias and db is not None:
        db = _check_out(db, "db", (M,), W.dtype, _library(W), inputs)
    dX_given = dX if need_dX else None
    if dX_given is not None:
        dX = _check_out(dX, "dX", X.shape, W.dtype, _library(dY), inputs)
    db_given = db if has_bias else None
    if (dX_given is not None) + (dW is not None) + (db_given is not None) > 1:
        _check_outputs_apart((("dX", dX_given), ("dW", dW), ("db", db_given)))
    if (X2.size + D * M + M) * W.dtype.itemsize > HOST_MEMORY_BYTES:
        allocated = []  # the outputs the backend will allocate in host memory
        if need_dX and dX_given is None and _library(dY) == "numpy":
            allocated.append(("dX", X.shape))
        if _library(W) == "numpy":
            allocated += [("dW", (D, M))] if dW is None else []
            allocated += [("db", (M,))] if has_bias and db_given is None else []
        _check_size(allocated, W.dtype)
    dX2, dW, db = module.backward(dY2, X2, W, has_bias=bool(has_bias), need_dX=bool(need_dX),
                                  accumulate=bool(accumulate), dX=dX if need_dX else None,
                                  dW=dW, db=db_given, activation=activation, saved=saved2)
    if dX_given is not None:
        return dX_given, dW, db
    if dX2 is not None and X.ndim != 2:
        dX2 = dX2.reshape(X.shape)
    return dX2, dW, db
