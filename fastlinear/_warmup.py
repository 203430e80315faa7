"""Background loading for ``auto``: a backend imports and loads its kernels in a daemon thread.

The fastest CPU backend (numba) costs about half a second to import and to load its compiled
kernels from Numba's cache; NumPy costs nothing. So ``auto`` (``_dispatch.Registry``) serves
a program's first calls with numpy, starts that load here once the program has made enough calls
for it to pay (or at ``fastlinear.warm_up()``), and serves the calls made meanwhile with numpy
too. The registry owns every cache and the choice; its ``Loader`` owns the threads, their
steps, and what happens to them around ``fork`` and at interpreter exit.

* Steps: the import (the registry's ``load``, so a failure is cached as the backend's reason
  exactly as in a synchronous load), then one tiny call per kernel of a training step, for each
  dtype. The thread is "loading" until the last step is done; only then does ``auto`` switch.
* Fork: a child forked during a step would inherit locks held by a thread it does not have (the
  import's module locks, Numba's compiler lock) and hang at its next import or compile. So
  ``fork`` waits for the current step to end (``os.register_at_fork``). A child forked before
  the import finished starts the load again at its next ``auto`` call; one forked after it uses
  the backend at once and loads the remaining kernels at their first calls.
* Exit: the thread is a daemon, so the interpreter does not wait for it; it starts no new step
  once exit has begun.
* Failures: nothing raised in the thread is lost: the registry's ``on_failure`` turns it into
  the reason the backend is unavailable.
"""

from __future__ import annotations

import atexit
import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

ENV_VAR = "FASTLINEAR_AUTO_LOAD"
BACKGROUND = "background"
SYNC = "sync"
MODES = (BACKGROUND, SYNC)

_step_lock = threading.Lock()  # held by the thread during each step; fork waits for it
_exiting = threading.Event()
_loaders: weakref.WeakSet[Loader] = weakref.WeakSet()  # every Loader, for the fork hook


def mode() -> str:
    """``FASTLINEAR_AUTO_LOAD``: ``"background"`` (the default) or ``"sync"`` (the registry reads
    it once, at its first ``auto`` choice)."""
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or BACKGROUND
    if value not in MODES:
        raise ValueError(f"unknown {ENV_VAR} value {raw!r}: expected one of "
                         f"{', '.join(repr(m) for m in MODES)}")
    return value


def warm_up_calls(module):
    """Tiny calls that make backend ``module`` load the kernels of a training step, per dtype.

    Forward with a bias, without and with ReLU; backward with a bias, with and without ``dX``
    (a first layer needs none), and through ReLU: the calls of the demo's ``fastlinear.Linear``
    layers. Other variants load at their first call.
    """
    calls = []
    for dtype in module.DTYPES:
        X = np.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3)
        W = np.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4)
        b = np.linspace(-1.0, 1.0, 4, dtype=dtype)
        dY = np.linspace(-1.0, 1.0, 8, dtype=dtype).reshape(2, 4)
        Y = np.maximum(X @ W + b, 0)  # what a ReLU layer saves for its backward
        backward = functools.partial(module.backward, dY, X, W, has_bias=True, accumulate=False,
                                     dX=None, dW=None, db=None)
        calls += [functools.partial(module.forward, X, W, b, None),
                  functools.partial(module.forward, X, W, b, None, activation="relu"),
                  functools.partial(backward, need_dX=True),
                  functools.partial(backward, need_dX=False),
                  functools.partial(backward, need_dX=True, activation="relu", saved=Y)]
    return calls


class Loader:
    """The background loads of one registry: a thread per backend, started at most once.

    ``load(name)`` imports the backend and raises if it cannot run; then the warm-up calls run.
    Whatever either raises is passed to ``on_failure(name, exc)``, in the thread.
    """

    def __init__(self, load: Callable[[str], Any],
                 on_failure: Callable[[str, BaseException], None]) -> None:
        self._load, self._on_failure = load, on_failure
        self._lock = threading.Lock()  # guards _threads and _finished
        self._threads: dict[str, threading.Thread] = {}  # name -> the thread that loads it
        self._finished: set[str] = set()  # names whose thread ran to its end
        _loaders.add(self)

    def _run(self, name: str) -> None:
        """The thread's body: the load, then the warm-up calls, each one step."""
        try:
            with _step_lock:
                module = self._load(name)
            for call in warm_up_calls(module):
                if _exiting.is_set():
                    return
                with _step_lock:
                    call()
        except BaseException as exc:  # noqa: BLE001 (handed on: it becomes the reason)
            self._on_failure(name, exc)
        finally:
            with self._lock:
                self._finished.add(name)

    def start(self, name: str) -> bool:
        """Start loading backend ``name`` in a daemon thread, unless one has run or runs already.

        Returns whether a thread is loading ``name`` now (False once exit has begun: the caller
        loads synchronously).
        """
        with self._lock:
            if name not in self._threads and not _exiting.is_set():
                _register_hooks()
                thread = threading.Thread(target=self._run, args=(name,),
                                          name=f"fastlinear-load-{name}", daemon=True)
                self._threads[name] = thread  # before it starts: loading() is never behind
                try:
                    thread.start()
                except RuntimeError:  # no new threads (at exit, or at a resource limit)
                    del self._threads[name]
        return self.loading(name)

    def loading(self, name: str) -> bool:
        """Whether a thread is loading backend ``name`` now (its warm-up calls included)."""
        return name in self._threads and name not in self._finished

    def started(self) -> bool:
        """Whether any load thread was started (in this process)."""
        return bool(self._threads)

    def wait(self, name: str) -> None:
        """Wait until the thread loading backend ``name``, if there is one, has finished."""
        thread = self._threads.get(name)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def join_all(self, timeout: float | None = None) -> None:
        """Wait for every load thread (tests: none is left behind)."""
        for thread in list(self._threads.values()):
            thread.join(timeout)

    def _after_fork_in_child(self) -> None:
        """The child has no loading thread: forget those that had not finished."""
        self._lock = threading.Lock()
        for name in [name for name in self._threads if name not in self._finished]:
            del self._threads[name]  # its thread is the parent's: start again when asked


_hooks_registered: list[bool] = []  # [True] once _register_hooks ran


def _register_hooks():
    """Once per process, before the first thread starts: the exit flag and the fork guard.

    A module imported while a fork waits for a step, and registering fork handlers then, gets
    its ``after`` handlers run without its ``before``. Of the modules the numba backend imports,
    only ``logging`` registers such a pair (its ``after_in_parent`` releases a lock its ``before``
    took): it is imported here, before any thread imports it.
    """
    if _hooks_registered:
        return
    _hooks_registered.append(True)
    import logging  # noqa: F401
    atexit.register(_exiting.set)
    if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)


def _before_fork():
    _step_lock.acquire()


def _after_fork_in_parent():
    _step_lock.release()


def _after_fork_in_child():
    """The child has no loading thread; its locks may have been held by the parent's threads."""
    _step_lock.release()  # this thread acquired it in _before_fork
    for loader in list(_loaders):
        loader._after_fork_in_child()
