"""Arrays at the boundary: the caller's array library, NumPy's promotion, conversion in and out.

Backends see NumPy or CuPy arrays of one floating dtype. Everything else a caller may hold is
turned into those here, zero-copy where the memory allows: NumPy array subclasses, Python lists
and scalars, and any object with ``__dlpack__`` (PyTorch tensors, JAX arrays, array-api-strict
arrays), host memory through NumPy and CUDA memory through CuPy. Results go back in the caller's
library through that library's own ``from_dlpack``.
"""

from __future__ import annotations

import contextlib
import importlib
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["library", "to_native", "result_dtype", "cast", "namespace", "as_bias", "check_weight",
           "check_backend_dtype", "on_device_of", "empty_like_device"]

# DLPack device types (dlpack.h). Host memory: kDLCPU (1) and CUDA's pinned host memory,
# kDLCUDAHost (3), which NumPy reads and cupy.from_dlpack refuses. CUDA memory: kDLCUDA (2) and
# managed memory, kDLCUDAManaged (13).
_DLPACK_HOST = (1, 3)
_DLPACK_CUDA = (2, 13)
CASTING_RULES = ("no", "equiv", "safe", "same_kind", "unsafe")

# A converter that gives a NumPy/CuPy result back in the caller's library (None: as it is).
Converter = Callable[[Any], Any] | None


def library(x: object) -> str:
    """The root module of an object's type: ``"numpy"``, ``"cupy"``, ``"torch"``, ``"builtins"``."""
    return type(x).__module__.partition(".")[0]


def type_name(x: object) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def namespace(x: object):
    """The module of NumPy-like functions for a native array: ``numpy`` or ``cupy``."""
    return importlib.import_module("cupy") if library(x) == "cupy" else np


def on_device_of(x: Any):
    """A context in which CuPy allocates on ``x``'s device (``x.device``; nothing for NumPy).

    CuPy allocates on the current device, which need not be the one the call's arrays live on.
    """
    return x.device if library(x) == "cupy" else contextlib.nullcontext()


def empty_like_device(x: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """An uninitialised array of ``x``'s library and, for CuPy, on ``x``'s device."""
    with on_device_of(x):
        return namespace(x).empty(shape, dtype)


def to_numpy(x: Any) -> Any:
    """A NumPy view (or, from the GPU, a copy) of a NumPy or CuPy array; ``None`` stays ``None``."""
    if x is None:
        return None
    return x.get() if library(x) == "cupy" else np.asarray(x)


def count(n: int, plural: str) -> str:
    """``count(1, "features")`` -> ``"1 feature"``, ``count(3, "were")`` -> ``"3 were"``."""
    if n != 1:
        return f"{n} {plural}"
    return f"{n} {'was' if plural == 'were' else plural.removesuffix('s')}"


def is_scalar(x: object) -> bool:
    """A Python number (not a NumPy scalar, which NumPy types strongly)."""
    return isinstance(x, numbers.Number) and not isinstance(x, np.generic)


def to_native(x: Any, name: str, *, scalar_ok: bool = False) -> tuple[Any, Converter]:
    """``(array, converter)``: ``x`` as a NumPy or CuPy array, and how to give results back.

    Python lists and tuples become NumPy arrays of their own dtype, as ``numpy.asarray`` makes
    them; a Python number stays as it is where ``scalar_ok`` (NumPy promotes it weakly).
    """
    if type(x) is np.ndarray or library(x) == "cupy":
        return x, None
    if isinstance(x, np.ndarray):
        if isinstance(x, np.ma.MaskedArray):
            raise TypeError(f"{name} is a numpy masked array; fastlinear would ignore its mask. "
                            f"Pass {name}.filled(...) or an unmasked ndarray")
        return np.asarray(x), None
    if scalar_ok and (is_scalar(x) or isinstance(x, np.generic)):
        return x, None
    if isinstance(x, (list, tuple, np.generic)):
        try:
            array = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} could not be converted to an array: {exc}") from exc
        return array, None
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return _from_dlpack(x, name), _converter_back(x, name)
    raise TypeError(f"{name} must be an array (NumPy, CuPy, or any object with __dlpack__ such as "
                    f"a PyTorch tensor or JAX array) or a list of numbers, got {type_name(x)}")


def _from_dlpack(x: Any, name: str) -> Any:
    """``x``'s memory as a NumPy array (host) or CuPy array (CUDA), without a copy."""
    device_type = int(x.__dlpack_device__()[0])
    if device_type in _DLPACK_HOST:
        module_name = "numpy"
    elif device_type in _DLPACK_CUDA:
        module_name = "cupy"
    else:
        raise TypeError(f"{name} ({type_name(x)}) lives on DLPack device type {device_type}; "
                        f"fastlinear takes host memory (NumPy) and CUDA memory (CuPy)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TypeError(f"{name} ({type_name(x)}) is in CUDA memory, which needs CuPy: "
                        f'pip install "fastlinear[cuda]" ({exc})') from exc
    try:
        return module.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        hint = ""
        if getattr(x, "requires_grad", False):
            hint = (f"; fastlinear computes outside autograd: pass {name}.detach() "
                    f"(the layer's backward gives the gradients)")
        raise TypeError(f"{name} ({type_name(x)}, dtype {getattr(x, 'dtype', '?')}) could not "
                        f"be read through DLPack: {exc}{hint}") from exc


def _converter_back(x: Any, name: str) -> Callable[[Any], Any]:
    """The ``from_dlpack`` of ``x``'s own library, to give results back as its type."""
    get_namespace = getattr(x, "__array_namespace__", None)
    if get_namespace is not None:
        return get_namespace().from_dlpack
    try:
        module = importlib.import_module(library(x))
    except ImportError:
        module = None
    from_dlpack = getattr(module, "from_dlpack", None)
    if from_dlpack is None:
        raise TypeError(f"{name} is a {type_name(x)}, whose library has no from_dlpack to take "
                        f"the results back; pass a NumPy array (numpy.from_dlpack({name}))")
    return from_dlpack


def result_dtype(operands: list[tuple[str, Any]]) -> np.dtype:
    """NumPy's result dtype of the operands (arrays and Python numbers), in native byte order.

    The linear layer computes in floating point: a non-floating result (all operands integer or
    bool) and complex, object or string data raise a ``TypeError`` that names the operands.
    """
    for name, x in operands:
        if not hasattr(x, "dtype") and not isinstance(x, (int, float, complex)):
            raise TypeError(f"{name} is a {type_name(x)}, which NumPy cannot compute with; pass "
                            f"a float (float({name})), a NumPy scalar or an array")
        kind = x.dtype.kind if hasattr(x, "dtype") else ("c" if isinstance(x, complex) else "f")
        if kind not in "biuf":
            raise TypeError(f"{name} has dtype {getattr(x, 'dtype', type(x).__name__)}; "
                            f"fastlinear computes in floating point (float32, float64)")
    dtype = np.result_type(*(x.dtype if hasattr(x, "dtype") else x for _, x in operands))
    if dtype.kind != "f":
        what = ", ".join(f"{name} {x.dtype}" for name, x in operands if hasattr(x, "dtype"))
        raise TypeError(f"{what} promote to {dtype}, but fastlinear computes in floating point: "
                        f"convert one operand, e.g. W.astype('float32')")
    return dtype.newbyteorder("=")


def _convertible(x: Any, dtype: np.dtype, casting: str) -> bool:
    return (x.dtype == dtype and x.dtype.isnative) or bool(
        np.can_cast(x.dtype, dtype, casting=casting))  # type: ignore[arg-type]


def check_casts(operands: list[tuple[str, Any]], dtype: np.dtype, casting: str) -> None:
    """Raise, naming the operand to convert, if ``casting`` forbids converting an operand to the
    call's ``dtype``.

    ``operands`` are ``(name, array or scalar)`` pairs including ``("W", W)``. The parameters
    (``W``, then ``b``) set the dtype the caller meant: the operand of another dtype is the one
    to convert, also when it is the parameters that the call would have to convert (a float32
    layer fed float64 ``X`` names ``X``, not ``b``).
    """
    arrays = [(name, x) for name, x in operands if hasattr(x, "dtype")]
    refused = [name for name, x in arrays if not _convertible(x, dtype, casting)]
    if not refused:
        return
    target = dict(arrays)["W"].dtype
    differ = [(name, x) for name, x in arrays if name not in ("W", "b") and x.dtype != target]
    differ = differ or [(name, x) for name, x in arrays if name != "W" and x.dtype != target]
    if not differ:  # W itself: nothing else to blame
        differ = [("W", dict(arrays)["W"])]
        target = dtype
    name, x = differ[0]
    fix = f"convert with {name}.astype({target.newbyteorder('=').name!r}) or pass casting='safe'"
    if name in refused:
        raise TypeError(f"{name} has dtype {x.dtype} but the call computes in {dtype}, and "
                        f"casting={casting!r} forbids converting it; {fix}")
    raise TypeError(f"{name} has dtype {x.dtype} but W has {target}: the call would compute in "
                    f"{dtype}, and casting={casting!r} forbids converting {' and '.join(refused)}; "
                    f"{fix}")


def cast(x: Any, name: str, dtype: np.dtype, casting: str) -> Any:
    """``x`` in ``dtype`` (a copy when it differs), if NumPy's ``casting`` rule allows it."""
    if x.dtype == dtype and x.dtype.isnative:
        return x
    if not np.can_cast(x.dtype, dtype, casting=casting):  # type: ignore[arg-type]
        raise TypeError(f"{name} has dtype {x.dtype} but the call computes in {dtype}, and "
                        f"casting={casting!r} forbids converting it; convert with "
                        f"{name}.astype({dtype.name!r}) or pass casting='safe'")
    return x.astype(dtype)


def check_weight(W):
    """``W`` must be a matrix ``(in_features, out_features)``."""
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (in_features, out_features), got shape {W.shape}")


def check_backend_dtype(dtype, module):
    """The call's dtype must be one the backend ``module`` computes in."""
    if dtype not in module.DTYPES:
        names = ", ".join(d.name for d in module.DTYPES)
        raise TypeError(f"the call computes in {dtype} (NumPy's result dtype of its operands); "
                        f"the {module.NAME!r} backend computes in {names}{dtype_hint(dtype)}")


def dtype_hint(dtype: np.dtype) -> str:
    """What to do about a floating dtype a backend does not compute in (``""`` for others)."""
    if dtype == np.float16:
        return ("; convert the operands with .astype(np.float32), or compute on the GPU with the "
                "cupy backend (backend='cupy', pip install \"fastlinear[cuda]\")")
    if dtype.kind == "f" and dtype.itemsize > 8:
        return "; convert the operands with .astype(np.float64)"
    return ""


def as_bias(b, M, dtype):
    """``b`` as a 1-D ``(M,)`` array: NumPy broadcasting of a scalar, ``(1,)``, ``(1, M)``..."""
    if is_scalar(b) or isinstance(b, np.generic):
        return np.full(M, b, dtype=dtype)
    if b.ndim == 2 and b.shape[0] == 1:
        b = b.reshape(b.shape[1])
    if b.shape == (M,):
        return b
    if b.ndim <= 1 and b.size == 1:
        with on_device_of(b):  # CuPy: on b's device, not the current one
            return namespace(b).full(M, b.reshape(()), dtype=dtype)
    raise ValueError(f"b must broadcast to ({M},) to match W's {M} columns (a scalar, (1,), "
                     f"({M},) or (1, {M})), got shape {b.shape}")


def check_casting(casting: str) -> str:
    if casting not in CASTING_RULES:
        raise ValueError(f"casting must be one of {CASTING_RULES}, got {casting!r}")
    return casting
