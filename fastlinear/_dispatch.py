"""Backend registry and resolution: argument > ``use_backend`` > ``FASTLINEAR_BACKEND`` > auto.

One dict maps each backend name to the module that implements it (``fastlinear.backends``
documents the interface). Modules are imported on first use only, so an optional library that is
missing costs nothing until its backend is chosen, and then raises an error naming the extra.

A backend named by the argument, the context or the environment loads in the calling thread and
raises ``BackendUnavailableError`` if it cannot run. ``auto`` serves its first calls with the
last backend of its order (numpy), loads its first choice (numba) in a background thread once
the program has made ``AUTO_LOAD_AFTER_CALLS`` calls (``_warmup``), and switches when that is
ready; ``FASTLINEAR_AUTO_LOAD=sync`` loads it in the first call instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fastlinear import _warmup

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
_load_locks: dict[str, threading.Lock] = {}  # name -> one loader at a time (see _load_lock)
_auto_choice: dict[str, ModuleType] = {}  # array library -> module that auto picks, for good
# array library -> module serving auto while a better one is passed over
_interim_choice: dict[str, ModuleType] = {}


class _CallCount:
    """How many calls ``auto`` has served with an interim choice (a count lost to a race between
    threads does not matter: it only decides when the background load starts)."""

    calls = 0


_interim = _CallCount()
# ``auto`` calls served by numpy before numba is loaded in a background thread (0: load at the
# first call). Loading numba holds the interpreter (the GIL) for as long in a background thread
# as in the caller, and its kernels save a few microseconds per call at small layers, nothing at
# large ones: a program making fewer calls than load time / saving per call is faster without
# it, so auto rents numpy until the rent paid would have bought numba. The figures behind the
# number are in benchmarks/results/cold_start_2026-11-25.txt.
AUTO_LOAD_AFTER_CALLS = 100_000


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

    Both outcomes are cached: a backend that cannot run is not re-imported on every call. A
    load under way in another thread (``auto``'s background load) is waited for, not repeated.
    """
    module = _modules.get(name)
    if module is not None:
        return module
    reason = _unavailable.get(name)
    if reason is None:
        with _load_lock(name):
            return _load_locked(name)
    raise BackendUnavailableError(reason)


def _load_lock(name):
    """The lock that loads of backend ``name`` hold (made at first use: the registry may grow)."""
    return _load_locks.get(name) or _load_locks.setdefault(name, threading.Lock())


def _load_locked(name):
    """``_load`` for a backend not cached when the caller looked, holding its load lock."""
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


def _background_load_failed(name: str, exc: BaseException) -> None:
    """Cache why the background load of backend ``name`` failed: its reason to be unavailable.

    ``_load`` has cached the reason already when the backend cannot run; anything else (an
    exception from Numba in a warm-up call, say) makes the backend unavailable here.
    """
    if isinstance(exc, BackendUnavailableError):
        return
    with _load_lock(name):
        _unavailable[name] = (f"backend {name!r} failed in its background load: "
                              f"{type(exc).__name__}: {exc}")
        _modules.pop(name, None)


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
        module = _choose_auto(array_library)
    return module


def _passed_over(name):
    """Whether ``auto`` passes over backend ``name`` for now, serving with a later choice: it is
    not loaded and is loading in a background thread, or is not worth loading yet.
    """
    if _warmup.loading(name):
        return True
    if name in _modules or name in _unavailable or _warmup.mode() == _warmup.SYNC:
        return False
    if _interim.calls < AUTO_LOAD_AFTER_CALLS:
        return True
    return _warmup.start(name, _load, _background_load_failed)


def _choose_auto(array_library):
    """The first backend of ``AUTO_ORDER`` that can run, passing over those ``_passed_over``
    while a later one serves (the interim choice); cached for good once none is passed over."""
    module = _interim_choice.get(array_library)
    if module is not None:
        _interim.calls += 1
        if _interim.calls < AUTO_LOAD_AFTER_CALLS:
            return module
    order = AUTO_ORDER.get(array_library, ())
    passed_over = False
    for position, candidate in enumerate(order):
        if position + 1 < len(order) and _passed_over(candidate):
            passed_over = True
            continue
        try:
            module = _load(candidate)
        except BackendUnavailableError:
            continue
        if passed_over:
            _interim_choice[array_library] = module
        else:
            _auto_choice[array_library] = module
        return module
    raise BackendUnavailableError(
        f"no backend is available for {array_library} arrays "
        f"(auto tries {', '.join(order) or 'none'})")


def warm_up(array_library: str = "numpy", wait: bool = True) -> str:
    """Start loading ``auto``'s first choice for ``array_library`` arrays now, in the background.

    ``auto`` serves its first ``AUTO_LOAD_AFTER_CALLS`` calls with the numpy backend and only
    then loads numba, in a background thread, switching when it is ready (a short script never
    pays for loading it). A program that will make many calls can start the load at once; with
    ``wait=True`` it also waits for the load, so that ``auto`` uses one backend from here on
    and two runs of a script round alike (as ``FASTLINEAR_AUTO_LOAD=sync`` does at the first
    call).

    Returns
    -------
    str : the backend ``auto`` picks now (``"numba"`` for NumPy arrays where it can run, when
    ``wait``).

    Examples
    --------
    >>> import fastlinear
    >>> fastlinear.warm_up() in ("numba", "numpy")
    True
    """
    _interim.calls = max(_interim.calls, AUTO_LOAD_AFTER_CALLS)  # no more waiting
    for name in AUTO_ORDER.get(array_library, ())[:-1]:
        if name not in _modules and name not in _unavailable:
            _warmup.start(name, _load, _background_load_failed)
        if wait:
            _warmup.wait(name)
    return resolve(AUTO, array_library).NAME


def array_module(name: str) -> ModuleType:
    """The array library (numpy or cupy) that backend ``name`` computes on; loads the backend."""
    return importlib.import_module(_load(name).ARRAY_LIBRARIES[0])


def current_backend(array_library: str = "numpy") -> str:
    """The name of the backend a call on ``array_library`` arrays would use right now.

    Until ``auto``'s first choice is loaded (see ``warm_up``) this is the backend serving the
    calls meanwhile (``"numpy"`` for NumPy arrays). Asking does not count as a call.
    """
    if requested_backend(None) == AUTO and array_library not in _auto_choice \
            and array_library in _interim_choice:
        for name in AUTO_ORDER.get(array_library, ()):  # what the next call would switch to
            if name in _modules and not _warmup.loading(name):
                return name
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
