"""Backend registry and resolution: argument > ``use_backend`` > ``set_backend`` /
``FASTLINEAR_BACKEND`` > auto.

One dict maps each backend name to the module that implements it (``fastlinear.backends``
documents the interface). Modules are imported on first use only, so an optional library that is
missing costs nothing until its backend is chosen, and then raises an error naming the extra.

A ``Registry`` owns everything resolution remembers: the loaded modules and the reasons others
cannot run, ``auto``'s choices, the process default, and the background loads (``_warmup``).
The process has one, ``registry``; the module's functions ask it. Tests build their own.

A backend named by the argument, the context or the default loads in the calling thread and
raises ``BackendUnavailableError`` if it cannot run. ``auto`` serves its first calls with the
last backend of its order (numpy), loads its first choice (numba) in a background thread once
the program has made ``AUTO_LOAD_AFTER_CALLS`` calls, and switches when that is ready;
``FASTLINEAR_AUTO_LOAD=sync`` loads it in the first call instead.

``FASTLINEAR_BACKEND`` and ``FASTLINEAR_AUTO_LOAD`` are read once per process, at first use (as
NumPy and Numba read theirs); a forked child reads them again, and so does every dask worker.
``set_backend`` changes the default at run time.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastlinear import _warmup

if TYPE_CHECKING:  # the type checker holds every registered backend module to the contract
    from fastlinear.backends import Backend
    from fastlinear.backends import cupy as _cupy_backend
    from fastlinear.backends import numba as _numba_backend
    from fastlinear.backends import numpy as _numpy_backend

    _CHECKED: tuple[Backend, ...] = (_numpy_backend, _numba_backend, _cupy_backend)

__all__ = ["BACKENDS", "AUTO", "ENV_VAR", "BackendUnavailableError", "Registry", "registry",
           "available_backends", "current_backend", "load_backend", "set_backend", "use_backend",
           "warm_up"]

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

# ``auto`` calls served by numpy before numba is loaded in a background thread (0: load at the
# first call). Loading numba holds the interpreter (the GIL) for as long in a background thread
# as in the caller, and its kernels save a few microseconds per call at small layers, nothing at
# large ones: a program making fewer calls than load time / saving per call is faster without
# it, so auto rents numpy until the rent paid would have bought numba. The figures behind the
# number are in benchmarks/results/cold_start_2026-11-25.txt.
AUTO_LOAD_AFTER_CALLS = 100_000

# ``use_backend``'s name in this thread/context (None outside any): read by ``Registry.resolve``
# and by the plain branches that read ``Registry.for_numpy`` (functional, Sequential).
context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastlinear_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine (the message says why)."""


class Registry:
    """Backends by name for one process: resolution, what loaded and what cannot, ``auto``.

    Parameters
    ----------
    backends : mapping, optional
        Backend name -> module path (default ``BACKENDS``).
    auto_order : mapping, optional
        Array library -> ``auto``'s preference order (default ``AUTO_ORDER``).
    load_after_calls : int
        ``auto`` calls served by its last choice before the first loads in the background.
    import_module : callable
        Imports a backend module by path (tests pass a fake).
    """

    def __init__(self, backends: Mapping[str, str] | None = None,
                 auto_order: Mapping[str, tuple[str, ...]] | None = None, *,
                 load_after_calls: int = AUTO_LOAD_AFTER_CALLS,
                 import_module: Callable[[str], Any] = importlib.import_module) -> None:
        self.backends = dict(BACKENDS if backends is None else backends)
        self.auto_order = dict(AUTO_ORDER if auto_order is None else auto_order)
        self.valid_names = (*self.backends, AUTO)
        self.load_after_calls = load_after_calls
        self.interim_calls = 0  # auto calls served by an interim choice (a lost race is harmless)
        self.loader = _warmup.Loader(self.load, self._background_load_failed)
        self._import_module = import_module
        self._canonical = frozenset(self.valid_names)
        self._modules: dict[str, Any] = {}  # name -> backend module that can run
        self._unavailable: dict[str, str] = {}  # name -> reason it cannot
        self._locks: dict[str, threading.Lock] = {}  # name -> one loader at a time
        self._auto: dict[str, Any] = {}  # array library -> auto's choice, for good
        self._interim: dict[str, Any] = {}  # array library -> auto's choice while one loads
        self._chosen: str | None = None  # set_backend's name
        # For the plain branch of a call on NumPy arrays (fastlinear.functional), the usual
        # answers in one dict: each loaded backend that takes NumPy arrays by its canonical
        # name, and ``auto``'s choice for them (``renting_for_numpy`` while that is the interim
        # one, whose calls are counted). And the default's name: ``set_backend``'s, else
        # FASTLINEAR_BACKEND's (read at first use); None until then.
        self.for_numpy: dict[str, Any] = {}
        self.renting_for_numpy = False
        self.default_name: str | None = None
        self._load_mode: str | None = None  # FASTLINEAR_AUTO_LOAD, read at first need
        _registries.add(self)

    # -- names ---------------------------------------------------------------------------------

    def normalize(self, name: object, source: str = "backend") -> str:
        """The canonical backend name for ``name`` (case and surrounding space ignored)."""
        if not isinstance(name, str):
            raise TypeError(f"{source} must be a str naming one of {self.valid_names}, "
                            f"got {name!r}")
        canonical = name.strip().lower()
        if canonical not in self._canonical:
            valid = ", ".join(repr(n) for n in self.valid_names)
            raise ValueError(f"unknown {source} {name!r}: expected one of {valid}")
        return canonical

    def default(self) -> str:
        """The process default: ``set_backend``'s name, else ``FASTLINEAR_BACKEND``'s, else auto."""
        return self.default_name or self._read_environment()

    def _read_environment(self) -> str:
        raw = os.environ.get(ENV_VAR, "")
        name = self.normalize(raw, f"{ENV_VAR} value") if raw.strip() else AUTO
        self.default_name = self._chosen or name
        return name

    def set_default(self, name: str | None) -> None:
        """Make ``name`` the process default (``None``: ``FASTLINEAR_BACKEND``, read again)."""
        if name is None:
            self._chosen = self.default_name = None
            return
        canonical = self.normalize(name)
        if canonical != AUTO:
            self.load(canonical)  # fail here, not at the next call
        self._chosen = self.default_name = canonical

    def requested(self, backend: str | None = None) -> str:
        """The backend name asked for, by precedence: argument, context, default."""
        if backend is not None:
            return backend if backend in self._canonical else self.normalize(backend)
        return context_backend.get() or self.default()

    def _after_fork_in_child(self) -> None:
        self._load_mode = None  # the child reads its own, and its FASTLINEAR_BACKEND
        self.default_name = self._chosen
        # A load lock held at fork time (by a thread the child does not have) is never released
        # in the child: fresh locks, or its first load of that backend would hang.
        self._locks = {}

    # -- loading -------------------------------------------------------------------------------

    def load(self, name: str) -> Any:
        """Import (once) and return the module of backend ``name``; raise if it cannot run.

        Both outcomes are cached: a backend that cannot run is not re-imported on every call. A
        load under way in another thread (``auto``'s background load) is waited for.
        """
        module = self._modules.get(name)
        if module is not None:
            return module
        if name not in self._unavailable:
            with self._lock_for(name):
                return self._load_locked(name)
        raise BackendUnavailableError(self._unavailable[name])

    def _lock_for(self, name: str) -> threading.Lock:
        return self._locks.get(name) or self._locks.setdefault(name, threading.Lock())

    def _load_locked(self, name: str) -> Any:
        module = self._modules.get(name)
        if module is not None:
            return module
        reason = self._unavailable.get(name)
        if reason is None:
            try:
                module = self.declared(name)
                why = module.unavailable_reason()
            except ImportError as exc:  # a backend module imports only what it can guard
                reason = f"backend {name!r} failed to import: {exc}"
            except Exception as exc:  # a bug there: cached, not raised each call
                reason = f"backend {name!r} failed to load: {type(exc).__name__}: {exc}"
            else:
                if why is None:
                    self._modules[name] = module
                    if "numpy" in module.ARRAY_LIBRARIES:
                        self.for_numpy[name] = module
                    return module
                reason = f"backend {name!r} is not available: {why}"
            self._unavailable[name] = reason
        raise BackendUnavailableError(reason)

    def declared(self, name: str) -> Any:
        """Backend ``name``'s module, imported but not asked whether it can run here: its
        declarations (``DTYPES``, ``ARRAY_LIBRARIES``) hold on every machine."""
        return self._import_module(self.backends[name])

    def _background_load_failed(self, name: str, exc: BaseException) -> None:
        """Cache why the background load of ``name`` failed as its reason to be unavailable
        (``load`` has cached it already when the backend cannot run)."""
        if isinstance(exc, BackendUnavailableError):
            return
        with self._lock_for(name):
            self._unavailable[name] = (f"backend {name!r} failed in its background load: "
                                       f"{type(exc).__name__}: {exc}")
            self._modules.pop(name, None)
            self.for_numpy.pop(name, None)

    def unavailable_reason(self, name: str) -> str | None:
        """``None`` if backend ``name`` can run here, else the reason it cannot."""
        try:
            self.load(self.normalize(name))
        except BackendUnavailableError as exc:
            return str(exc)
        return None

    # -- resolution ----------------------------------------------------------------------------

    def resolve(self, backend: str | None, library: str) -> Any:
        """The backend module for a call on ``library`` arrays (``"numpy"``, ``"cupy"``).

        Every call asks, so the usual answers are one dict lookup: a loaded backend by its
        canonical name, ``auto``'s final choice by library, the interim one by library while
        its calls are counted. Anything else (another spelling, a first load) takes
        ``_resolve_slowly``.
        """
        if backend is None:  # the precedence of ``requested``, written out
            backend = context_backend.get() or self.default_name or self._read_environment()
        if backend == AUTO:
            module = self._auto.get(library)
            if module is not None:
                return module
            module = self._interim.get(library)
            if module is not None:
                self.interim_calls += 1
                if self.interim_calls < self.load_after_calls:
                    return module
            return self._choose_auto(library)
        module = self._modules.get(backend)
        return module if module is not None else self._resolve_slowly(backend, library)

    def _resolve_slowly(self, backend: str, library: str) -> Any:
        name = self.normalize(backend)
        if name == AUTO:
            return self.resolve(AUTO, library)
        return self.load(name)

    def _choose_auto(self, library: str) -> Any:
        """``auto``'s module once the interim calls are spent (or before the first call): the
        first of ``auto_order`` that can run and is not passed over, cached for good once none
        is, else for the interim."""
        module, for_good = self._pick(library, self.interim_calls, start=True)
        (self._auto if for_good else self._interim)[library] = module
        if library == "numpy":
            self.for_numpy[AUTO], self.renting_for_numpy = module, not for_good
        return module

    def count_calls(self, library: str, calls: int) -> None:
        """Count ``calls`` more toward ``auto``'s switch for ``library`` arrays, while its
        interim choice serves them: for one call that does the work of several (a whole
        training step)."""
        if library in self._interim and library not in self._auto:
            self.interim_calls += calls

    def _pick(self, library: str, calls: int, start: bool) -> tuple[Any, bool]:
        """The first backend of ``auto_order`` that can run, passing over those not ready
        while a later one serves; and whether none was passed over."""
        order = self.auto_order.get(library, ())
        passed_over = False
        for position, candidate in enumerate(order):
            if position + 1 < len(order) and self._passed_over(candidate, calls, start):
                passed_over = True
                continue
            try:
                return self.load(candidate), not passed_over
            except BackendUnavailableError:
                continue
        raise BackendUnavailableError(f"no backend is available for {library} arrays "
                                      f"(auto tries {', '.join(order) or 'none'})")

    def _passed_over(self, name: str, calls: int, start: bool) -> bool:
        """Whether ``auto`` passes over backend ``name`` for now: it is loading in the
        background, or not worth loading yet (``start``: start its load when it is)."""
        if self.loader.loading(name):
            return True
        if name in self._modules or name in self._unavailable or self._mode() == _warmup.SYNC:
            return False
        if calls < self.load_after_calls or not start:
            return True
        return self.loader.start(name)

    def _mode(self) -> str:
        mode = self._load_mode or _warmup.mode()
        self._load_mode = mode
        return mode

    def current(self, library: str = "numpy") -> str:
        """The name of the backend the next call on ``library`` arrays would use; asking is no
        call (it counts nothing and starts no load)."""
        if self.requested() != AUTO:
            return self.resolve(None, library).NAME
        chosen = self._auto.get(library)
        if chosen is not None:
            return chosen.NAME
        interim = self._interim.get(library)
        if interim is not None and self.interim_calls + 1 < self.load_after_calls:
            return interim.NAME
        calls = self.interim_calls + (interim is not None)
        return self._pick(library, calls, start=False)[0].NAME

    def warm_up(self, library: str = "numpy", wait: bool = True) -> str:
        """Start the load of ``auto``'s first choice for ``library`` now (and wait for it);
        return the backend ``auto`` picks then."""
        self.interim_calls = max(self.interim_calls, self.load_after_calls)  # no more waiting
        for name in self.auto_order.get(library, ())[:-1]:
            if name not in self._modules and name not in self._unavailable:
                self.loader.start(name)
            if wait:
                self.loader.wait(name)
        return self.resolve(AUTO, library).NAME


_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for each in list(_registries):
        each._after_fork_in_child()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)

registry = Registry()
"""The process's registry; every call resolves through it."""


# -- the public face: each asks the process's registry -------------------------------------------

def normalize_name(name: object, source: str = "backend") -> str:
    """Return the canonical backend name for ``name`` (case and surrounding space ignored)."""
    return registry.normalize(name, source)


def load_backend(name: str) -> Any:
    """The module of backend ``name`` (a ``fastlinear.backends.Backend``), loaded once per
    process; raises ``BackendUnavailableError`` if it cannot run here."""
    return registry.load(registry.normalize(name))


def unavailable_reason(name: str) -> str | None:
    """``None`` if backend ``name`` can run here, else the reason it cannot."""
    return registry.unavailable_reason(name)


def available_backends() -> dict[str, str | None]:
    """Map every registered backend name to ``None`` (available) or the reason it is not.

    Examples
    --------
    >>> import fastlinear
    >>> fastlinear.available_backends()["numpy"] is None
    True
    """
    return {name: registry.unavailable_reason(name) for name in registry.backends}


def requested_backend(backend: str | None = None) -> str:
    """The backend name asked for, by precedence: argument, context, default, else auto."""
    return registry.requested(backend)


def array_module(name: str) -> Any:
    """The array library (numpy or cupy) that backend ``name`` computes on; loads the backend."""
    return importlib.import_module(load_backend(name).ARRAY_LIBRARIES[0])


def current_backend(array_library: str = "numpy") -> str:
    """The name of the backend the next call on ``array_library`` arrays would use.

    Until ``auto``'s first choice is loaded (see ``warm_up``) this is the backend serving the
    calls meanwhile (``"numpy"`` for NumPy arrays). Asking does not count as a call.
    """
    return registry.current(array_library)


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
    return registry.warm_up(array_library, wait)


def set_backend(name: str | None) -> None:
    """Make ``name`` the process-wide default backend, over ``FASTLINEAR_BACKEND``.

    ``FASTLINEAR_BACKEND`` is read once per process, at the first call that needs it (a change
    of ``os.environ`` after that is not seen); ``set_backend(None)`` forgets the name set here
    and reads the variable again at the next call. The ``backend=`` argument and
    ``use_backend`` still win over the default. A backend that cannot run raises
    ``BackendUnavailableError`` here, and the default stays as it was.

    Examples
    --------
    >>> import fastlinear
    >>> fastlinear.set_backend("numpy")
    >>> fastlinear.current_backend()
    'numpy'
    >>> fastlinear.set_backend(None)
    """
    registry.set_default(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` for fastlinear calls in this thread/context within the block.

    The ``backend=`` argument of a call still wins over it; it wins over ``set_backend`` and
    ``FASTLINEAR_BACKEND``. The choice is held in a context variable, so one thread's choice
    never leaks into another's.

    Examples
    --------
    >>> import numpy as np, fastlinear
    >>> with fastlinear.use_backend("numpy"):
    ...     Y = fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)))
    """
    canonical = registry.normalize(name)
    if canonical != AUTO:
        registry.load(canonical)  # fail at the `with`, not at the first call inside it
    token = context_backend.set(canonical)
    try:
        yield canonical
    finally:
        context_backend.reset(token)
