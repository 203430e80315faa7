"""Backend registry and resolution: argument > ``use_backend`` > ``FASTLINEAR_BACKEND`` > auto.

One dict maps each backend name to the module that implements it (``fastlinear.backends``
documents the interface). Modules are imported on first use only, so an optional library that is
missing costs nothing until its backend is chosen, and then raises an error naming the extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type checker holds every registered backend module to the contract
    from types import ModuleType

    from fastlinear.backends import Backend
    from fastlinear.backends import cupy as _cupy_backend
    from fastlinear.backends import numba as _numba_backend
    from fastlinear.backends import numpy as _numpy_backend

    _CHECKED: tuple[Backend, ...] = (_numpy_backend, _numba_backend, _cupy_backend)

ENV_VAR = "FASTLINEAR_BACKEND"
AUTO = "auto"

# name -> module path; the one source of truth for which backends exist.
BACKENDS = {
    "numpy": "fastlinear.backends.numpy",
    "numba": "fastlinear.backends.numba",
    "cupy": "fastlinear.backends.cupy",
}

# Preference order of ``auto`` per array library: fastest first. ``auto`` takes the first
# available backend; numpy is always available for NumPy arrays.
AUTO_ORDER = {
    "numpy": ("numba", "numpy"),
    "cupy": ("cupy",),
}

VALID_NAMES = (*BACKENDS, AUTO)
_CANONICAL = frozenset(VALID_NAMES)

_context_backend = contextvars.ContextVar("fastlinear_backend", default=None)
_modules: dict[str, ModuleType] = {}  # name -> backend module that can run
_unavailable: dict[str, str] = {}  # name -> reason it cannot
_auto_choice: dict[str, ModuleType] = {}  # array library -> module that auto picks


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine (the message says why)."""


def normalize_name(name, source="backend"):
    """Return the canonical backend name for ``name`` (case and surrounding space ignored)."""
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str naming one of {VALID_NAMES}, got {name!r}")
    canonical = name.strip().lower()
    if canonical not in VALID_NAMES:
        raise ValueError(
            f"unknown {source} {name!r}: expected one of {', '.join(repr(n) for n in VALID_NAMES)}"
        )
    return canonical


def _load(name):
    """Import (once) and return the module of backend ``name``; raise if it cannot run.

    Both outcomes are cached: a backend that cannot run is not re-imported on every call.
    """
    module = _modules.get(name)
    if module is not None:
        return module
    reason = _unavailable.get(name)
    if reason is None:
        try:
            module = importlib.import_module(BACKENDS[name])
        except ImportError as exc:  # a backend module imports only what it can guard
            reason = f"backend {name!r} failed to import: {exc}"
        else:
            why = module.unavailable_reason()
            if why is None:
                _modules[name] = module
                return module
            reason = f"backend {name!r} is not available: {why}"
        _unavailable[name] = reason
    raise BackendUnavailableError(reason)


def unavailable_reason(name: str) -> str | None:
    """``None`` if backend ``name`` can run here, else the reason it cannot."""
    try:
        _load(normalize_name(name))
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def available_backends() -> dict[str, str | None]:
    """Map every registered backend name to ``None`` (available) or the reason it is not.

    Examples
    --------
    >>> import fastlinear
    >>> fastlinear.available_backends()["numpy"] is None
    True
    """
    return {name: unavailable_reason(name) for name in BACKENDS}


def _env_raw():
    """The raw value of ``FASTLINEAR_BACKEND``, read at call time.

    ``os.environ.get`` encodes the key and decodes the value on every call (0.7 us, a sixth of a
    small layer's forward pass); the mapping's own store, which ``os.environ`` keeps in step with
    every assignment, answers several times faster. Interpreters without it take the plain way.
    """
    store = getattr(os.environ, "_data", None)
    if store is None:
        return os.environ.get(ENV_VAR)
    return store.get(_ENV_KEY)


_ENV_KEY = getattr(os.environ, "encodekey", lambda key: key)(ENV_VAR)


def _env_backend():
    """The normalised value of ``FASTLINEAR_BACKEND`` (``None`` when unset or blank)."""
    raw = _env_raw()
    return None if raw is None else _env_name(raw)


@functools.lru_cache(maxsize=8)
def _env_name(raw):
    """The backend name a raw ``FASTLINEAR_BACKEND`` value (str or bytes) asks for, or None."""
    text = raw if isinstance(raw, str) else os.fsdecode(raw)
    return normalize_name(text, source=f"{ENV_VAR} value") if text.strip() else None


def requested_backend(backend=None):
    """The backend name asked for, by precedence: argument, context, environment, else auto."""
    if backend is not None:
        if type(backend) is str and backend in _CANONICAL:
            return backend
        return normalize_name(backend)
    name = _context_backend.get()
    if name is not None:
        return name
    return _env_backend() or AUTO


def resolve(backend, array_library):
    """Return the backend module for this call.

    ``array_library`` is the library of the call's arrays (``"numpy"`` or ``"cupy"``); ``auto``
    picks the fastest available backend for it.
    """
    name = requested_backend(backend)
    if name != AUTO:
        return _load(name)
    module = _auto_choice.get(array_library)
    if module is None:
        for candidate in AUTO_ORDER.get(array_library, ()):
            try:
                module = _load(candidate)
                break
            except BackendUnavailableError:
                continue
        else:
            raise BackendUnavailableError(
                f"no backend is available for {array_library} arrays "
                f"(auto tries {', '.join(AUTO_ORDER.get(array_library, ())) or 'none'})")
        _auto_choice[array_library] = module
    return module


def current_backend(array_library: str = "numpy") -> str:
    """The name of the backend a call on ``array_library`` arrays would use right now."""
    return resolve(None, array_library).NAME


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` for fastlinear calls in this thread/context within the block.

    The ``backend=`` argument of a call still wins over it; it wins over ``FASTLINEAR_BACKEND``.
    The choice is held in a context variable, so one thread's choice never leaks into another's.

    Examples
    --------
    >>> import numpy as np, fastlinear
    >>> with fastlinear.use_backend("numpy"):
    ...     Y = fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)))
    """
    canonical = normalize_name(name)
    if canonical != AUTO:
        _load(canonical)  # fail at the `with`, not at the first call inside it
    token = _context_backend.set(canonical)
    try:
        yield canonical
    finally:
        _context_backend.reset(token)
