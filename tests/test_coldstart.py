"""Cold start: ``auto`` serves numpy first and loads numba in a background thread, race-free.

In-process tests replace the backend modules by recorders whose import waits on an event, so the
order of events is set by the test, not by timing. Subprocess tests check a fresh interpreter:
what its first calls import, fork during the background import, and exit while it runs.
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch, _warmup
from tests.helpers import install_registry

TIMEOUT = 60  # seconds; a deadlock fails the test instead of hanging CI
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recorder:
    """A fake backend module: records (thread, function) per call, delegates to the reference."""

    def __init__(self, name):
        from fastlinear.backends import numpy as ref

        self.NAME, self.DTYPES, self.ARRAY_LIBRARIES = name, ref.DTYPES, ref.ARRAY_LIBRARIES
        self._ref, self.calls, self.fail = ref, [], None

    def unavailable_reason(self):
        return None

    def _record(self, what):
        self.calls.append((threading.current_thread(), what))
        if self.fail is not None and threading.current_thread().name.startswith("fastlinear"):
            raise self.fail

    def forward(self, *args, **kwargs):
        self._record("forward")
        return self._ref.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self._record("backward")
        return self._ref.backward(*args, **kwargs)


class FakeBackends:
    """Recorders for every backend; importing ``gated`` ones waits until ``release`` is set."""

    def __init__(self, gated=("numba",)):
        self.modules = {name: Recorder(name) for name in _dispatch.BACKENDS}
        self.gated, self.release, self.importing = set(gated), threading.Event(), set()
        self.import_error = None

    def import_module(self, path):
        name = next(n for n, p in _dispatch.BACKENDS.items() if p == path)
        if name in self.gated:
            self.importing.add(name)
            assert self.release.wait(TIMEOUT), "the test never released the import"
            if self.import_error is not None:
                raise self.import_error
        return self.modules[name]


@pytest.fixture
def fakes(monkeypatch):
    """A fresh registry over fake backends: nothing is loaded yet."""
    monkeypatch.delenv(_warmup.ENV_VAR, raising=False)
    fake = FakeBackends()
    fake.registry = install_registry(monkeypatch, import_module=fake.import_module)
    fake.loader = fake.registry.loader
    yield fake
    fake.release.set()  # never leave a loading thread behind
    fake.loader.join_all(TIMEOUT)


X = np.linspace(-1, 1, 6).reshape(2, 3)
W = np.linspace(-2, 2, 12).reshape(3, 4)


def user_calls(recorder):
    """The calls a recorder got from threads other than the loading thread."""
    return [what for thread, what in recorder.calls
            if not thread.name.startswith("fastlinear-load")]


def test_first_calls_use_numpy_and_import_nothing(fakes):
    for _ in range(3):
        np.testing.assert_allclose(fastlinear.linear_forward(X, W), X @ W)
    assert user_calls(fakes.modules["numpy"]) == ["forward"] * 3
    assert fakes.importing == set() and not fakes.loader.loading("numba")
    assert fastlinear.current_backend() == "numpy"


def test_load_starts_after_the_threshold_and_auto_switches_when_ready(fakes, monkeypatch):
    fakes.registry.load_after_calls = 5
    for _ in range(5):
        fastlinear.linear_forward(X, W)
    assert not fakes.loader.loading("numba")
    fastlinear.linear_forward(X, W)  # the call that reaches the threshold starts the load
    assert fakes.loader.loading("numba")
    fastlinear.linear_forward(X, W)  # served by numpy while numba loads
    assert user_calls(fakes.modules["numpy"]) == ["forward"] * 7
    fakes.release.set()
    fakes.loader.wait("numba")
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"]
    assert fastlinear.current_backend() == "numba"
    # the loading thread made the warm-up calls: each kernel of a training step, per dtype
    warm = [what for thread, what in fakes.modules["numba"].calls
            if thread.name == "fastlinear-load-numba"]
    assert warm == ["forward"] * 2 + ["backward"] * 3 + ["forward"] * 2 + ["backward"] * 3


def test_warm_up_loads_now_and_waits(fakes):
    fastlinear.linear_forward(X, W)
    fakes.release.set()
    assert fastlinear.warm_up() == "numba"
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"]


def test_warm_up_without_waiting_starts_the_load(fakes):
    assert fastlinear.warm_up(wait=False) == "numpy"
    assert fakes.loader.loading("numba")
    fakes.release.set()
    fakes.loader.wait("numba")
    assert fastlinear.current_backend() == "numba"


def test_switch_is_race_free_between_threads(fakes, monkeypatch):
    """Threads calling through auto while numba loads: each call runs on one backend, gets the
    right result, and once a thread has seen numba it never goes back to numpy."""
    fakes.registry.load_after_calls = 0
    threads, calls_each = 8, 60
    barrier = threading.Barrier(threads + 1, timeout=TIMEOUT)
    seen = [[] for _ in range(threads)]
    errors = []

    def worker(index):
        try:
            barrier.wait()
            for call in range(calls_each):
                if index == 0 and call == calls_each // 3:
                    fakes.release.set()  # the load finishes while the threads run
                Y = fastlinear.linear_forward(X, W)
                np.testing.assert_allclose(Y, X @ W)
                seen[index].append(fastlinear.current_backend())
        except BaseException as exc:  # noqa: BLE001 (reported in the main thread)
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    barrier.wait()
    for thread in workers:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread is still running: deadlock?"
    assert not errors, errors[0]
    fakes.loader.wait("numba")
    served = len(user_calls(fakes.modules["numpy"])) + len(user_calls(fakes.modules["numba"]))
    assert served == threads * calls_each  # every call ran on exactly one backend
    for names in seen:
        first_numba = names.index("numba") if "numba" in names else len(names)
        assert set(names[first_numba:]) <= {"numba"}, names
    assert fastlinear.current_backend() == "numba"


@pytest.mark.parametrize("how", ["argument", "context", "environment"])
def test_named_backend_loads_in_the_calling_thread(fakes, monkeypatch, how):
    fakes.gated.clear()
    if how == "argument":
        fastlinear.linear_forward(X, W, backend="numba")
    elif how == "context":
        with fastlinear.use_backend("numba"):
            fastlinear.linear_forward(X, W)
    else:
        monkeypatch.setenv(fastlinear.ENV_VAR, "numba")
        fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"]
    assert not fakes.loader.started()  # no thread took part


def test_named_backend_waits_for_the_background_load(fakes):
    """A call naming numba while it loads in the background waits for that load."""
    fastlinear.warm_up(wait=False)
    result = {}

    def named_call():
        result["Y"] = fastlinear.linear_forward(X, W, backend="numba")

    caller = threading.Thread(target=named_call)
    caller.start()
    caller.join(0.2)
    assert caller.is_alive() and "Y" not in result  # still waiting for the import
    fakes.release.set()
    caller.join(TIMEOUT)
    np.testing.assert_allclose(result["Y"], X @ W)
    assert user_calls(fakes.modules["numba"]) == ["forward"]
    assert fakes.importing == {"numba"}  # imported once, by the loading thread


def test_failed_background_import_is_the_reason(fakes):
    fakes.import_error = ImportError("No module named 'llvmlite'")
    fakes.release.set()
    assert fastlinear.warm_up() == "numpy"
    reason = fastlinear.available_backends()["numba"]
    assert "failed to import" in reason and "llvmlite" in reason
    with pytest.raises(fastlinear.BackendUnavailableError, match="llvmlite"):
        fastlinear.linear_forward(X, W, backend="numba")
    fastlinear.linear_forward(X, W)  # auto stays on numpy for good: no second load
    assert user_calls(fakes.modules["numpy"])[-1:] == ["forward"]
    assert fastlinear.current_backend() == "numpy" and not fakes.loader.loading("numba")


def test_failed_warm_up_call_is_the_reason(fakes):
    fakes.modules["numba"].fail = RuntimeError("LLVM ERROR: out of registers")
    fakes.release.set()
    assert fastlinear.warm_up() == "numpy"
    reason = fastlinear.available_backends()["numba"]
    assert reason == ("backend 'numba' failed in its background load: "
                      "RuntimeError: LLVM ERROR: out of registers")
    with pytest.raises(fastlinear.BackendUnavailableError, match="out of registers"):
        fastlinear.linear_forward(X, W, backend="numba")


def test_sync_mode_loads_in_the_first_call(fakes, monkeypatch):
    fakes.gated.clear()
    monkeypatch.setenv(_warmup.ENV_VAR, " Sync ")
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"]
    assert not fakes.loader.started()


def test_unknown_mode_lists_the_valid_ones(fakes, monkeypatch):
    monkeypatch.setenv(_warmup.ENV_VAR, "later")
    with pytest.raises(ValueError, match="expected one of 'background', 'sync'"):
        fastlinear.linear_forward(X, W)


# ---------------------------------------------------------------------------------------------
# A fresh interpreter, with the real backends.

needs_numba = pytest.mark.skipif(_dispatch.unavailable_reason("numba") is not None,
                                 reason=str(_dispatch.unavailable_reason("numba")))


def run_fresh(code, **env):
    """Run ``code`` in a fresh interpreter from the repository root; return its stdout."""
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("FASTLINEAR_")}
    environ.update(env, PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "Exception" not in done.stderr, done.stderr
    return done.stdout


FIRST_STEP = """
    import sys, threading
    import numpy as np, fastlinear
    X, W, b = np.ones((4, 3)), np.ones((3, 2)), np.ones(2)
    Y = fastlinear.linear_forward(X, W, b)
    fastlinear.linear_backward(np.ones_like(Y), X, W)
    loaders = [t.name for t in threading.enumerate() if t.name.startswith("fastlinear")]
    print(sorted(m for m in ("numba", "scipy", "fastlinear.backends.numba") if m in sys.modules),
          loaders, fastlinear.current_backend())
"""


def test_fresh_process_first_auto_step_imports_no_numba():
    assert run_fresh(FIRST_STEP).split() == ["[]", "[]", "numpy"]


@needs_numba
def test_fresh_process_with_sync_mode_or_a_named_backend_imports_numba_first():
    expected = ["['fastlinear.backends.numba',", "'numba',", "'scipy']", "[]", "numba"]
    assert run_fresh(FIRST_STEP, FASTLINEAR_AUTO_LOAD="sync").split() == expected
    assert run_fresh(FIRST_STEP, FASTLINEAR_BACKEND="numba").split() == expected


@needs_numba
def test_fork_during_the_background_import():
    """The child of a fork made while numba imports in the background can load and run it."""
    out = run_fresh("""
        import os, signal, time
        import numpy as np, fastlinear
        from fastlinear import _warmup
        X, W = np.ones((4, 3)), np.ones((3, 2))
        fastlinear.warm_up(wait=False)
        while not _warmup._step_lock.locked():  # fork during the import, not before it
            time.sleep(0.001)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child dies instead of hanging the test
            try:
                ok = (np.allclose(fastlinear.linear_forward(X, W, backend="numba"), X @ W)
                      and fastlinear.warm_up() == "numba")
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), fastlinear.warm_up())
    """)
    assert out.split() == ["0", "numba"]


@needs_numba
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_exit_while_loading_in_the_background(delay):
    run_fresh(f"""
        import time, fastlinear
        fastlinear.warm_up(wait=False)
        time.sleep({delay})
    """)



def test_asking_for_the_current_backend_is_not_a_call(fakes):
    fastlinear.linear_forward(np.ones((2, 3)), np.ones((3, 4)))  # auto's first, interim choice
    calls = fakes.registry.interim_calls
    for _ in range(5):
        assert fastlinear.current_backend() == "numpy"
    assert fakes.registry.interim_calls == calls


def test_current_backend_is_what_the_next_auto_call_uses(fakes):
    """Issue 18, bug 2: a call naming numba loads it, but auto keeps its interim choice until
    its calls are spent; current_backend says so, and the next call agrees."""
    fakes.gated.clear()
    fastlinear.linear_forward(X, W)  # auto's interim choice: numpy
    fastlinear.linear_forward(X, W, backend="numba")  # loads numba in this thread
    assert fastlinear.current_backend() == "numpy"
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numpy"]) == ["forward"] * 2
    fakes.registry.load_after_calls = fakes.registry.interim_calls + 1  # the next call switches
    assert fastlinear.current_backend() == "numba"
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"] * 2  # the named call and this one


def test_auto_takes_a_backend_loaded_before_its_first_call(fakes):
    fakes.gated.clear()
    fastlinear.linear_forward(X, W, backend="numba")
    assert fastlinear.current_backend() == "numba"
    fastlinear.linear_forward(X, W)
    assert user_calls(fakes.modules["numba"]) == ["forward"] * 2
    assert not fakes.loader.started()


def test_a_call_that_weighs_several_counts_them_toward_the_switch(fakes):
    fastlinear.linear_forward(X, W)  # auto's interim choice serves numpy arrays
    before = fakes.registry.interim_calls
    fakes.registry.count_calls("numpy", 9)
    assert fakes.registry.interim_calls == before + 9
    fakes.registry.count_calls("cupy", 9)  # no interim choice for CuPy arrays: nothing counted
    assert fakes.registry.interim_calls == before + 9
