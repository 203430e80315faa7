"""Backend resolution: argument > use_backend context > FASTLINEAR_BACKEND > auto; clear errors."""

import os
import signal
import threading

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch
from tests.helpers import install_registry, set_backend_variable

X = np.ones((2, 3))
W = np.ones((3, 4))


class Recorder:
    """A fake backend module that records that it was called and delegates to the reference."""

    def __init__(self, name):
        from fastlinear.backends import numpy as ref

        self.NAME, self.DTYPES, self.ARRAY_LIBRARIES = name, ref.DTYPES, ref.ARRAY_LIBRARIES
        self._ref, self.calls = ref, []

    def unavailable_reason(self):
        return None

    def forward(self, *args, **kwargs):
        self.calls.append("forward")
        return self._ref.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls.append("backward")
        return self._ref.backward(*args, **kwargs)


@pytest.fixture
def fakes(monkeypatch):
    """A registry whose backends are recorders, all loaded, so resolution is observable without
    numba/cupy."""
    recorders = {name: Recorder(name) for name in _dispatch.BACKENDS}
    by_path = {path: recorders[name] for name, path in _dispatch.BACKENDS.items()}
    registry = install_registry(monkeypatch, import_module=by_path.__getitem__)
    for name in recorders:
        registry.load(name)
    return recorders


def used(fakes):
    names = [name for name, fake in fakes.items() if fake.calls]
    for fake in fakes.values():
        fake.calls.clear()
    return names


def test_precedence_argument_context_environment_auto(fakes, monkeypatch):
    fastlinear.linear_forward(X, W)
    assert used(fakes) == [_dispatch.AUTO_ORDER["numpy"][0]]
    set_backend_variable(monkeypatch, "numpy")
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]
    with fastlinear.use_backend("cupy"):
        fastlinear.linear_forward(X, W)
        assert used(fakes) == ["cupy"]
        fastlinear.linear_forward(X, W, backend="numba")
        assert used(fakes) == ["numba"]
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]


def test_environment_variable_is_read_once_at_first_use(fakes, monkeypatch):
    """As NumPy and Numba read theirs: a change after the first call is not seen until
    ``set_backend(None)`` asks for the variable again."""
    monkeypatch.setenv(fastlinear.ENV_VAR, "numba")
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numba"]
    monkeypatch.setenv(fastlinear.ENV_VAR, "cupy")
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numba"]
    fastlinear.set_backend(None)
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["cupy"]


def test_set_backend_is_the_process_default(fakes, monkeypatch):
    set_backend_variable(monkeypatch, "numba")
    fastlinear.set_backend("cupy")  # over the variable
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["cupy"]
    with fastlinear.use_backend("numpy"):  # the context over the default
        fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]
    fastlinear.linear_forward(X, W, backend="numpy")  # the argument over both
    assert used(fakes) == ["numpy"]
    assert fastlinear.current_backend() == "cupy"
    fastlinear.set_backend(None)  # back to the variable
    assert fastlinear.current_backend() == "numba"


def test_set_backend_refuses_what_cannot_run_and_keeps_the_default(monkeypatch):
    registry = install_registry(monkeypatch, backends={**_dispatch.BACKENDS,
                                                       "missing": "fastlinear_no_such_module"})
    with pytest.raises(fastlinear.BackendUnavailableError, match="missing"):
        fastlinear.set_backend("missing")
    with pytest.raises(ValueError, match="expected one of"):
        fastlinear.set_backend("bogus")
    assert registry.default() == "auto"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_reads_the_variable_again(fakes, monkeypatch):
    set_backend_variable(monkeypatch, "numpy")
    assert fastlinear.current_backend() == "numpy"  # read here, in the parent
    monkeypatch.setenv(fastlinear.ENV_VAR, "numba")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own read of the variable
        signal.alarm(30)  # a hung child dies instead of hanging the test
        os.write(write, fastlinear.current_backend().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "numba"
    assert fastlinear.current_backend() == "numpy"  # the parent keeps its own


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_does_not_wait_for_a_load_lock_held_at_fork(monkeypatch):
    registry = install_registry(monkeypatch, backends={**_dispatch.BACKENDS,
                                                       "missing": "fastlinear_no_such_module"})
    lock = registry._lock_for("missing")
    read, write = os.pipe()
    with lock:  # as a background load in another thread would hold it
        pid = os.fork()
        if pid == 0:  # the child: that thread is gone, the lock would never be released
            signal.alarm(30)  # a hung child dies instead of hanging the test
            reason = registry.unavailable_reason("missing") or ""
            os.write(write, b"answered" if "missing" in reason else b"wrong")
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        assert pipe.read() == "answered"


def test_a_backend_whose_load_raises_is_cached_as_unavailable(monkeypatch):
    class Broken:
        calls = 0

        def unavailable_reason(self):
            Broken.calls += 1
            raise ValueError("not enough values to unpack")

    broken = Broken()
    registry = install_registry(monkeypatch, import_module=lambda path: broken)
    for _ in range(2):
        with pytest.raises(fastlinear.BackendUnavailableError, match="ValueError: not enough"):
            registry.load("numba")
    assert Broken.calls == 1


@pytest.mark.parametrize("raw", [" NumPy ", "NUMPY", "numpy\n"])
def test_names_ignore_case_and_surrounding_space(fakes, monkeypatch, raw):
    set_backend_variable(monkeypatch, raw)
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]
    fastlinear.linear_forward(X, W, backend=raw)
    assert used(fakes) == ["numpy"]


@pytest.mark.parametrize("raw", ["", "   "])
def test_blank_environment_variable_means_unset(fakes, monkeypatch, raw):
    set_backend_variable(monkeypatch, raw)
    assert _dispatch.requested_backend() == "auto"


@pytest.mark.parametrize("bad", ["torch", "np", "", "num py"])
def test_unknown_names_list_the_valid_ones(bad, monkeypatch):
    expected = r"expected one of 'numpy', 'numba', 'cupy', 'auto'"
    with pytest.raises(ValueError, match=expected):
        fastlinear.linear_forward(X, W, backend=bad)
    with pytest.raises(ValueError, match=expected):
        with fastlinear.use_backend(bad):
            pass
    if bad.strip():
        set_backend_variable(monkeypatch, bad)
        with pytest.raises(ValueError, match="FASTLINEAR_BACKEND value"):
            fastlinear.linear_forward(X, W)
        with pytest.raises(ValueError, match="FASTLINEAR_BACKEND value"):  # not cached
            fastlinear.linear_forward(X, W)


def test_non_string_name_is_a_type_error():
    with pytest.raises(TypeError, match="must be a str"):
        fastlinear.linear_forward(X, W, backend=1)


def test_unavailable_backend_by_name_raises_with_reason(monkeypatch):
    class Missing:
        NAME = "numba"

        @staticmethod
        def unavailable_reason():
            return 'numba is not installed: pip install "fastlinear[numba]"'

    install_registry(monkeypatch, import_module=lambda path: Missing)
    for call in (
        lambda: fastlinear.linear_forward(X, W, backend="numba"),
        lambda: fastlinear.use_backend("numba").__enter__(),
    ):
        with pytest.raises(fastlinear.BackendUnavailableError,
                           match=r"backend 'numba' is not available: .*fastlinear\[numba\]"):
            call()
    set_backend_variable(monkeypatch, "numba")
    with pytest.raises(fastlinear.BackendUnavailableError, match="fastlinear\\[numba\\]"):
        fastlinear.linear_forward(X, W)


def test_auto_skips_unavailable_backends(monkeypatch):
    """With only the reference available, auto still works and picks it (no silent errors)."""
    class Missing:
        @staticmethod
        def unavailable_reason():
            return "test"

    def only_numpy(path):
        return Missing if path != _dispatch.BACKENDS["numpy"] else real_import(path)

    real_import = __import__("importlib").import_module
    install_registry(monkeypatch, import_module=only_numpy)
    assert fastlinear.current_backend() == "numpy"
    assert fastlinear.warm_up() == "numpy"
    np.testing.assert_allclose(fastlinear.linear_forward(X, W), X @ W)


def test_auto_never_picks_cupy_for_numpy_arrays():
    assert "cupy" not in _dispatch.AUTO_ORDER["numpy"]
    assert fastlinear.current_backend("numpy") != "cupy"


def test_available_backends_reports_every_backend():
    report = fastlinear.available_backends()
    assert set(report) == set(fastlinear.BACKENDS)
    assert report["numpy"] is None
    for name, reason in report.items():
        assert reason is None or (isinstance(reason, str) and name in reason)


def test_context_is_per_thread(fakes):
    """One thread's use_backend never leaks into another thread."""
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def worker():
        with fastlinear.use_backend("cupy"):
            entered.set()
            release.wait(5)
            seen["worker"] = _dispatch.requested_backend()

    thread = threading.Thread(target=worker)
    thread.start()
    entered.wait(5)
    seen["main"] = _dispatch.requested_backend()
    release.set()
    thread.join()
    assert seen == {"worker": "cupy", "main": "auto"}


def test_context_restores_on_exception(fakes):
    with pytest.raises(KeyError):
        with fastlinear.use_backend("numpy"):
            raise KeyError
    assert _dispatch.requested_backend() == "auto"


def test_context_nests():
    with fastlinear.use_backend("numpy"):
        with fastlinear.use_backend("auto"):
            assert _dispatch.requested_backend() == "auto"
        assert _dispatch.requested_backend() == "numpy"


# --- backends by name: unavailable ones from every source ---------------------------------------

def unavailable_backends():
    return [name for name, reason in fastlinear.available_backends().items() if reason]

SPELLINGS = {"plain": str, "spaces": lambda n: f" {n} ", "tab": lambda n: f"{n}\t",
             "upper": str.upper, "title": str.title}

@pytest.mark.parametrize("spelling", SPELLINGS)
def test_unavailable_backend_from_every_source(monkeypatch, spelling):
    names = unavailable_backends()
    if not names:
        pytest.skip("every registered backend is available here")
    for name in names:
        raw = SPELLINGS[spelling](name)
        match = rf"backend '{name}' (is not available|failed to import)"
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.linear_forward(X, W, backend=raw)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            with fastlinear.use_backend(raw):
                pass
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.Linear(3, 2, backend=raw)
        set_backend_variable(monkeypatch, raw)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.linear_forward(X, W)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.Linear(3, 2).forward(X)
        set_backend_variable(monkeypatch, None)

@pytest.mark.parametrize("bad", ["", " ", "numpy2", "cuda", "NUM PY"])
def test_layer_with_unknown_backend_name(bad):
    with pytest.raises(ValueError, match=r"unknown backend .*expected one of 'numpy', 'numba'"):
        fastlinear.Linear(3, 2, backend=bad)

def test_bad_environment_value_fails_the_layer_call_not_silently(monkeypatch):
    layer = fastlinear.Linear(3, 2, rng=0)
    set_backend_variable(monkeypatch, "Tensorflow ")
    with pytest.raises(ValueError, match=r"unknown FASTLINEAR_BACKEND value 'Tensorflow '"):
        layer.forward(X)
    assert layer.X is None


def test_plain_and_general_calls_resolve_and_count_alike(fakes):
    """The public functions answer plain calls (2-D NumPy operands) from the registry's dict of
    usual answers and send the rest through ``Registry.resolve``: both follow one precedence,
    and both count toward auto's switch, one call each."""
    registry = _dispatch.registry
    registry._auto.clear()
    registry.for_numpy.pop(_dispatch.AUTO, None)
    registry._interim["numpy"] = fakes["numpy"]
    registry.for_numpy[_dispatch.AUTO], registry.renting_for_numpy = fakes["numpy"], True
    registry.interim_calls, registry.load_after_calls = 0, 1 << 40
    dY = np.ones((2, 4))
    fastlinear.linear_forward(X, W)  # plain
    fastlinear.linear_forward(X[0], W)  # one sample: the general branch
    fastlinear.linear_backward(dY, X, W)  # plain
    fastlinear.linear_backward(dY[0], X[0], W)  # general
    fastlinear.linear_forward(X, W, activation="ReLU")  # another spelling: general
    assert registry.interim_calls == 5
    assert used(fakes) == ["numpy"]
    fastlinear.linear_forward(X, W, backend="numba")  # named: nothing counted
    with fastlinear.use_backend("cupy"):
        fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numba", "cupy"] and registry.interim_calls == 5


def test_plain_call_never_runs_a_backend_that_takes_no_numpy_arrays(monkeypatch):
    """A backend named for NumPy arrays that takes only another library's arrays is refused
    with the general branch's error, not handed the NumPy arrays."""
    device_only = Recorder("cupy")
    device_only.ARRAY_LIBRARIES = ("cupy",)
    modules = {path: (device_only if name == "cupy" else Recorder(name))
               for name, path in _dispatch.BACKENDS.items()}
    install_registry(monkeypatch, import_module=modules.__getitem__)
    for name in ("linear_forward", "linear_backward"):
        args = (X, W) if name == "linear_forward" else (np.ones((2, 4)), X, W)
        with pytest.raises(TypeError, match="the 'cupy' backend takes cupy arrays"):
            getattr(fastlinear, name)(*args, backend="cupy")
    assert device_only.calls == []
