"""The command line: ``python -m fastlinear info`` and the demo (the project's main job)."""

import subprocess
import sys

import pytest

from fastlinear import __main__ as cli


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "numba", "cupy"):
        assert f"  {name} " in out or f"  {name}  " in out
    assert "numpy  available" in out
    assert "default backend for NumPy arrays:" in out


def test_demo_reaches_95_percent(capsys):
    pytest.importorskip("sklearn", reason='the demo needs scikit-learn ("fastlinear[demo]")')
    assert cli.main(["demo", "--epochs", "12"]) == 0
    out = capsys.readouterr().out
    assert "epoch  12" in out
    accuracy = float(out.rsplit("final test accuracy ", 1)[1].split("%")[0])
    assert accuracy >= 95.0


def test_demo_backend_option_and_environment(monkeypatch, capsys):
    pytest.importorskip("sklearn", reason='the demo needs scikit-learn ("fastlinear[demo]")')
    cli.main(["demo", "--epochs", "1", "--backend", "numpy"])
    assert "backend 'numpy'" in capsys.readouterr().out
    monkeypatch.setenv("FASTLINEAR_BACKEND", "numpy")
    cli.main(["demo", "--epochs", "1"])
    assert "backend 'numpy'" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fastlinear", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends:" in result.stdout


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_check_passes_every_available_backend_and_lists_the_others(capsys):
    from fastlinear import _dispatch

    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "all available backends agree with the NumPy reference" in out
    for name, reason in _dispatch.available_backends().items():
        if reason is None:
            assert f"\n{name:8} cpu" in out or f"\n{name:8} " in out
            assert "FAIL" not in out
        else:
            assert f"{name:8} unavailable: {reason}" in out


def test_check_fails_on_a_backend_that_is_off(monkeypatch, capsys):
    """An activation computed slightly wrong makes the check exit non-zero and say where."""
    from fastlinear.backends import numpy as numpy_backend

    real_forward = numpy_backend.forward

    def off_by_a_little(X, W, b, out, *, activation=None, preactivation=None):
        Y = real_forward(X, W, b, out, activation=activation, preactivation=preactivation)
        if activation == "sigmoid":
            Y *= Y.dtype.type(1.001)
        return Y

    monkeypatch.setattr(numpy_backend, "forward", off_by_a_little)
    assert cli.main(["check", "--backend", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "'sigmoid'" in out and "MISMATCH" in out
