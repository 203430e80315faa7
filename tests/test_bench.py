"""Tests of the benchmark tooling: ``python -m fastlinear bench`` on a tiny grid, the asv suite."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch, bench
from fastlinear.backends import numpy as numpy_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny and fast: no pauses, short blocks, two rounds.
TINY_ARGS = ["--shapes", "8x16x16,1x32x32", "--dtypes", "float32,float64", "--repeat", "2",
             "--block-time", "0.0002", "--pause", "0", "--no-torch", "--no-progress"]


def run_bench(args, capsys):
    assert bench.main(args) == 0
    return capsys.readouterr().out


def test_tiny_grid_prints_table_and_writes_json_and_png(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run_bench([*TINY_ARGS, "--json", str(json_path), "--plot", str(png_path)], capsys)

    for heading in ("command:", "machine:", "versions:", "threads:", "Forward", "Backward",
                    "Targets"):
        assert heading in out
    assert "-m fastlinear bench --shapes 8x16x16,1x32x32" in out
    for label in ("NumPy", "GEMM A@B", "fastlinear[numpy]"):
        assert label in out

    report = json.loads(json_path.read_text())
    assert [case["shape"] for case in report["cases"]] == [[8, 16, 16], [1, 32, 32]] * 2
    assert [case["dtype"] for case in report["cases"]] == ["float32"] * 2 + ["float64"] * 2
    rows = report["cases"][0]["rows"]
    labelled = {(row["label"], row["pass"]): row for row in rows}
    assert set(labelled) >= {("NumPy", "forward"), ("NumPy", "backward"),
                             ("GEMM A@B", "forward"), ("fastlinear[numpy]", "forward"),
                             ("fastlinear[numpy]", "backward")}
    for row in rows:
        assert len(row["samples_s"]) == 2
        assert row["median_s"] > 0 and row["gflops"] > 0
    assert labelled["NumPy", "forward"]["vs_numpy"] == pytest.approx(1.0)
    assert labelled["GEMM A@B", "forward"]["vs_gemm"] == pytest.approx(1.0)
    assert labelled["fastlinear[numpy]", "backward"]["backward_over_forward"] > 0
    # tracemalloc sees at least the outputs a NumPy call allocates.
    forward = labelled["fastlinear[numpy]", "forward"]
    assert forward["peak_alloc_bytes"] >= forward["output_bytes"] == 8 * 16 * 4

    if importlib.util.find_spec("matplotlib") is None:
        assert "no plot" in out
    else:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flop_counts_and_ratios_follow_the_medians():
    shape = (2, 3, 5)
    contenders = [bench.Contender("NumPy", "forward", "numpy", None, samples=[2.0, 4.0, 3.0]),
                  bench.Contender("GEMM A@B", "forward", "numpy", None, samples=[1.5]),
                  bench.Contender("fastlinear[x]", "forward", "x", None, samples=[1.0]),
                  bench.Contender("fastlinear[x]", "backward", "x", None, samples=[2.5])]
    rows = {(r["label"], r["pass"]): r for r in bench.summarize(shape, "float64", contenders)}
    assert rows["NumPy", "forward"]["median_s"] == 3.0
    assert rows["fastlinear[x]", "forward"]["gflops"] == pytest.approx(2 * 30 / 1.0 / 1e9)
    assert rows["fastlinear[x]", "backward"]["gflops"] == pytest.approx(4 * 30 / 2.5 / 1e9)
    assert rows["fastlinear[x]", "forward"]["vs_numpy"] == pytest.approx(3.0)
    assert rows["fastlinear[x]", "forward"]["vs_gemm"] == pytest.approx(1.5)
    assert rows["fastlinear[x]", "backward"]["backward_over_forward"] == pytest.approx(2.5)
    assert rows["fastlinear[x]", "forward"]["vs_torch"] is None


@pytest.mark.parametrize("text", ["8x16", "8x16x", "axbxc", "8*16*16"])
def test_bad_shapes_are_refused(text):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", text])


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit, match="registered"):
        bench.main(["--backends", "nosuch", "--plot", ""])


@pytest.fixture
def second_backend(monkeypatch):
    """A second CPU backend ("echo": the NumPy reference under another name), to run the bench
    with two thread-pool groups (pauses, interleaving) whatever backends this machine has."""
    module = types.ModuleType("fastlinear_test_echo_backend")
    for name in ("DTYPES", "ARRAY_LIBRARIES", "forward", "backward"):
        setattr(module, name, getattr(numpy_backend, name))
    module.NAME = "echo"
    module.unavailable_reason = lambda: None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(_dispatch.BACKENDS, "echo", module.__name__)
    monkeypatch.setattr(_dispatch, "VALID_NAMES", (*_dispatch.VALID_NAMES, "echo"))
    monkeypatch.setattr(_dispatch, "_modules", dict(_dispatch._modules))
    return "echo"


def test_two_backends_are_interleaved_and_checked_against_targets(second_backend, tmp_path,
                                                                  capsys):
    json_path = tmp_path / "bench.json"
    args = [*TINY_ARGS, "--backends", f"numpy,{second_backend}", "--pause", "0.001",
            "--json", str(json_path), "--plot", ""]
    out = run_bench(args, capsys)
    assert "fastlinear[echo]" in out
    report = json.loads(json_path.read_text())
    assert report["backends"] == ["numpy", "echo"]
    assert len(report["targets"]["echo"]) == 7
    groups = {row["label"]: row["group"] for row in report["cases"][0]["rows"]}
    assert groups["fastlinear[numpy]"] == groups["NumPy"] == "numpy"
    assert groups["fastlinear[echo]"] == "echo"


# --------------------------------------------------------------------------------------------
# The asv suite: imports, parameters consistent, every benchmark runs on the smallest case
# --------------------------------------------------------------------------------------------

@pytest.fixture
def asv_suite(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    return importlib.import_module("asv_benchmarks.benchmarks")


def benchmark_classes(suite):
    return [value for value in vars(suite).values()
            if isinstance(value, type) and any(name.startswith(("time_", "peakmem_", "track_"))
                                               for name in dir(value))]


def test_asv_suite_parameters_are_consistent(asv_suite):
    classes = benchmark_classes(asv_suite)
    kinds = {name.partition("_")[0] for cls in classes for name in dir(cls)
             if name.startswith(("time_", "peakmem_", "track_"))}
    assert kinds == {"time", "peakmem", "track"}
    for cls in classes:
        assert len(cls.params) == len(cls.param_names)
        backends, shapes, dtypes = cls.params
        assert backends == list(fastlinear.BACKENDS)
        assert all(len(asv_suite.parse_shape(shape)) == 3 for shape in shapes)
        assert set(dtypes) <= {"float32", "float64"}


def test_asv_benchmarks_run_or_skip_on_the_smallest_case(asv_suite):
    shape = min(asv_suite.SHAPES, key=lambda s: np.prod(asv_suite.parse_shape(s)))
    for cls in benchmark_classes(asv_suite):
        for backend, reason in fastlinear.available_backends().items():
            instance = cls()
            if reason is not None:
                with pytest.raises(NotImplementedError):
                    instance.setup(backend, shape, "float32")
                continue
            try:
                instance.setup(backend, shape, "float32")
            except NotImplementedError:  # e.g. host memory of a GPU backend
                continue
            for name in dir(cls):
                if name.startswith(("time_", "peakmem_", "track_")):
                    value = getattr(instance, name)(backend, shape, "float32")
                    if name.startswith("track_"):
                        assert value > 0


@pytest.mark.skipif(importlib.util.find_spec("asv") is None,
                    reason='asv is not installed (pip install "fastlinear[bench]")')
def test_asv_check_finds_no_problems():
    """``asv check`` imports the suite in this environment the way asv runs it."""
    # asv drops PYTHONPATH; ASV_PYTHONPATH makes this source tree importable also uninstalled.
    env = {**os.environ, "ASV_PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout
