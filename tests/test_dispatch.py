"""Backend resolution: argument > use_backend context > FASTLINEAR_BACKEND > auto; clear errors."""

import threading

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch

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


@pytest.fixture
def fakes(monkeypatch):
    """Replace every backend by a recorder, so resolution is observable without numba/cupy."""
    recorders = {name: Recorder(name) for name in _dispatch.BACKENDS}
    monkeypatch.setattr(_dispatch, "_modules", dict(recorders))
    monkeypatch.setattr(_dispatch, "_unavailable", {})
    monkeypatch.setattr(_dispatch, "_auto_choice", {})
    return recorders


def used(fakes):
    names = [name for name, fake in fakes.items() if fake.calls]
    for fake in fakes.values():
        fake.calls.clear()
    return names


def test_precedence_argument_context_environment_auto(fakes, monkeypatch):
    fastlinear.linear_forward(X, W)
    assert used(fakes) == [_dispatch.AUTO_ORDER["numpy"][0]]
    monkeypatch.setenv(fastlinear.ENV_VAR, "numpy")
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]
    with fastlinear.use_backend("cupy"):
        fastlinear.linear_forward(X, W)
        assert used(fakes) == ["cupy"]
        fastlinear.linear_forward(X, W, backend="numba")
        assert used(fakes) == ["numba"]
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]


def test_environment_variable_is_read_at_call_time(fakes, monkeypatch):
    for name in ("numba", "numpy", "cupy"):
        monkeypatch.setenv(fastlinear.ENV_VAR, name)
        fastlinear.linear_forward(X, W)
        assert used(fakes) == [name]


@pytest.mark.parametrize("raw", [" NumPy ", "NUMPY", "numpy\n"])
def test_names_ignore_case_and_surrounding_space(fakes, monkeypatch, raw):
    monkeypatch.setenv(fastlinear.ENV_VAR, raw)
    fastlinear.linear_forward(X, W)
    assert used(fakes) == ["numpy"]
    fastlinear.linear_forward(X, W, backend=raw)
    assert used(fakes) == ["numpy"]


@pytest.mark.parametrize("raw", ["", "   "])
def test_blank_environment_variable_means_unset(fakes, monkeypatch, raw):
    monkeypatch.setenv(fastlinear.ENV_VAR, raw)
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
        monkeypatch.setenv(fastlinear.ENV_VAR, bad)
        with pytest.raises(ValueError, match="FASTLINEAR_BACKEND value"):
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

    monkeypatch.setattr(_dispatch, "_modules", {})
    monkeypatch.setattr(_dispatch, "_unavailable", {})
    monkeypatch.setattr(_dispatch.importlib, "import_module", lambda path: Missing)
    for call in (
        lambda: fastlinear.linear_forward(X, W, backend="numba"),
        lambda: fastlinear.use_backend("numba").__enter__(),
    ):
        with pytest.raises(fastlinear.BackendUnavailableError,
                           match=r"backend 'numba' is not available: .*fastlinear\[numba\]"):
            call()
    monkeypatch.setenv(fastlinear.ENV_VAR, "numba")
    with pytest.raises(fastlinear.BackendUnavailableError, match="fastlinear\\[numba\\]"):
        fastlinear.linear_forward(X, W)


def test_auto_skips_unavailable_backends(monkeypatch):
    """With only the reference available, auto still works and picks it (no silent errors)."""
    real_load = _dispatch._load

    def only_numpy(name):
        if name != "numpy":
            raise fastlinear.BackendUnavailableError(f"backend {name!r} is not available: test")
        return real_load(name)

    monkeypatch.setattr(_dispatch, "_load", only_numpy)
    monkeypatch.setattr(_dispatch, "_auto_choice", {})
    assert fastlinear.current_backend() == "numpy"
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
        monkeypatch.setenv(fastlinear.ENV_VAR, raw)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.linear_forward(X, W)
        with pytest.raises(fastlinear.BackendUnavailableError, match=match):
            fastlinear.Linear(3, 2).forward(X)
        monkeypatch.delenv(fastlinear.ENV_VAR)

@pytest.mark.parametrize("bad", ["", " ", "numpy2", "cuda", "NUM PY"])
def test_layer_with_unknown_backend_name(bad):
    with pytest.raises(ValueError, match=r"unknown backend .*expected one of 'numpy', 'numba'"):
        fastlinear.Linear(3, 2, backend=bad)

def test_bad_environment_value_fails_the_layer_call_not_silently(monkeypatch):
    layer = fastlinear.Linear(3, 2, rng=0)
    monkeypatch.setenv(fastlinear.ENV_VAR, "Tensorflow ")
    with pytest.raises(ValueError, match=r"unknown FASTLINEAR_BACKEND value 'Tensorflow '"):
        layer.forward(X)
    assert layer.X is None
