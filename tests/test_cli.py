"""The command line: ``python -m fastlinear info`` and the demo (the project's main job)."""

import importlib
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
    assert "which backend:\n  auto, numpy arrays: " in out


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
    captured = capsys.readouterr()
    out = captured.out
    assert "all available backends agree with the NumPy reference" in out
    assert "checking numpy float64: 288 cases" in captured.err  # progress, row by row
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


# --- errors: one line, exit 2 for a user's mistake, 1 for what cannot run here ------------------

def _one_line(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command", [["demo"], ["check"], ["info"], ["bench", "--plot", ""]])
def test_bogus_environment_backend_is_one_line_and_exit_2(monkeypatch, capsys, command):
    monkeypatch.setenv("FASTLINEAR_BACKEND", "bogus")
    assert cli.main(command) == 2
    line = _one_line(capsys.readouterr().err)
    assert "FASTLINEAR_BACKEND='bogus' is not a backend: set it to one of" in line


def test_bogus_auto_load_mode_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("FASTLINEAR_AUTO_LOAD", "later")
    assert cli.main(["demo"]) == 2
    assert "FASTLINEAR_AUTO_LOAD='later' is not a mode" in _one_line(capsys.readouterr().err)


def test_environment_check_accepts_what_the_calls_accept(monkeypatch):
    """The check asks the registry and _warmup themselves, so it cannot drift from them."""
    from fastlinear import _cli, _warmup

    monkeypatch.setenv("FASTLINEAR_BACKEND", " NumPy ")
    monkeypatch.setenv("FASTLINEAR_AUTO_LOAD", " SYNC ")
    _cli.check_environment()  # no UsageError
    assert _warmup.mode() == "sync"
    monkeypatch.setattr(_warmup, "MODES", ("background",))
    with pytest.raises(_cli.UsageError, match="FASTLINEAR_AUTO_LOAD=' SYNC ' is not a mode"):
        _cli.check_environment()


def test_unknown_backend_option_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--backend", "nosuch"])
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert "unknown backend 'nosuch'" in line and "--help" in line


def test_unavailable_backend_is_one_line_and_exit_1(monkeypatch, capsys):
    from tests.helpers import install_registry

    class NoGPU:
        @staticmethod
        def unavailable_reason():
            return 'no GPU in this test; pip install "fastlinear[cuda]"'

    install_registry(monkeypatch, import_module=lambda path: (
        NoGPU if path.endswith(".cupy") else importlib.import_module(path)))
    assert cli.main(["demo", "--backend", "cupy", "--epochs", "1"]) == 1
    assert "pip install" in _one_line(capsys.readouterr().err)
    assert cli.main(["check", "--backend", "cupy"]) == 1
    assert "(nothing checked)" in _one_line(capsys.readouterr().err)


def test_info_into_a_closed_pipe_ends_quietly():
    """``python -m fastlinear info | head -2``: the reader is gone before info writes."""
    process = subprocess.Popen([sys.executable, "-m", "fastlinear", "info"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def _help(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_texts_are_plain_and_say_the_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    for command in ([], ["info"], ["check"], ["demo"], ["bench"]):
        assert "``" not in _help(capsys, command), command
    assert "bug report" in _help(capsys, ["info"])
    demo_help = _help(capsys, ["demo"])
    for option in ("--backend", "--epochs", "--batch-size", "--lr", "--momentum", "--dtype",
                   "--seed"):
        text = demo_help.split(f"  {option} ", 1)[1].split("\n  --", 1)[0]
        assert "default" in text, option
    from fastlinear.bench import grid

    words = " ".join(_help(capsys, ["bench"]).split()).replace(",", " ").split()
    for shape in grid.DEFAULT_SHAPES:  # not wrapped in the middle of a shape
        assert grid.shape_text(shape) in words
