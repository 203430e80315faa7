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
from fastlinear import _cli, _dispatch, bench, demo
from fastlinear.backends import numpy as numpy_backend
from fastlinear.bench import report, training
from fastlinear.bench.timing import Case, Contender

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny and fast: no pauses, short blocks, two rounds.
TINY_ARGS = ["--shapes", "8x16x16,1x32x32", "--dtypes", "float32,float64", "--repeat", "2",
             "--block-time", "0.0002", "--pause", "0", "--no-torch", "--no-progress",
             "--cases", "layers"]


def run_bench(args, capsys):
    assert bench.main(args) == 0
    return capsys.readouterr().out


def test_tiny_grid_prints_table_and_writes_json_and_png(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run_bench([*TINY_ARGS, "--json", str(json_path), "--plot", str(png_path)], capsys)

    for heading in ("command:", "machine:", "versions:", "threads:", "Forward", "Backward"):
        assert heading in out
    assert "Training step" not in out and "Targets" not in out
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
    contenders = [Contender("NumPy", "forward", "numpy", None, samples=[2.0, 4.0, 3.0]),
                  Contender("GEMM A@B", "forward", "numpy", None, samples=[1.5]),
                  Contender("fastlinear[x]", "forward", "x", None, samples=[1.0]),
                  Contender("fastlinear[x]", "backward", "x", None, samples=[2.5])]
    case = Case("layer", "2x3x5", shape, "float64", {"forward": 60, "backward": 120}, contenders)
    rows = {(r["label"], r["pass"]): r for r in report.summarize(case)}
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
    with pytest.raises(_cli.UsageError, match="registered"):
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


def test_two_backends_are_interleaved_in_their_own_groups(second_backend, tmp_path, capsys):
    json_path = tmp_path / "bench.json"
    args = [*TINY_ARGS, "--backends", f"numpy,{second_backend}", "--pause", "0.001",
            "--json", str(json_path), "--plot", ""]
    out = run_bench(args, capsys)
    assert "fastlinear[echo]" in out
    report = json.loads(json_path.read_text())
    assert report["backends"] == ["numpy", "echo"]
    assert "targets" not in report
    groups = {row["label"]: row["group"] for row in report["cases"][0]["rows"]}
    assert groups["fastlinear[numpy]"] == groups["NumPy"] == "numpy"
    assert groups["fastlinear[echo]"] == "echo"


def test_training_step_and_fused_cases(tmp_path, capsys):
    """The training step of the demo's network and the fused ReLU layers, quick as in CI."""
    json_path = tmp_path / "bench.json"
    args = ["--cases", "training,fused", "--batches", "4", "--dtypes", "float32", "--repeat", "1",
            "--block-time", "0.0002", "--pause", "0", "--no-torch", "--no-progress",
            "--json", str(json_path), "--plot", str(tmp_path / "bench.png")]
    out = run_bench(args, capsys)
    assert "Full training step of the MLP 64-128-64-10" in out
    assert "Fused linear + ReLU" in out and "no plot" in out
    report = json.loads(json_path.read_text())
    assert report["cases"] == []
    steps = report["training_step"]
    assert steps["layer_sizes"] == list(demo.LAYER_SIZES)
    (case,) = steps["cases"]
    rows = {row["label"]: row for row in case["rows"]}
    assert {"NumPy", "NumPy per layer", "fastlinear[numpy]"} <= set(rows)
    assert rows["NumPy"]["vs_numpy"] == pytest.approx(1.0)
    if "fastlinear[numba]" in rows:
        assert rows["GEMMs @njit"]["vs_floor"] == pytest.approx(1.0)
    assert all(row["pass"] == "step" and row["gflops"] > 0 for row in rows.values())
    assert [(c["case"], c["rows"][0]["pass"]) for c in report["fused_relu"]] == [
        ("32x64x128 step", "step"), ("1024x1024x1024 forward", "forward")]
    forward_rows = {row["label"]: row for row in report["fused_relu"][1]["rows"]}
    assert forward_rows["GEMM A@B"]["vs_gemm"] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_step_contenders_compute_the_same_steps(dtype):
    """Every contender of the training-step case trains the same network the same way
    (Sequential's NumPy reference is the yardstick), so the case compares like with like."""
    sizes, tol = (6, 8, 5, 3), 2e-5 if dtype == "float32" else 1e-12
    params = training.initial_parameters(sizes, dtype, seed=3)
    X, y = training.batch_of(sizes, 7, dtype, seed=3)
    net = training.sequential(params, "numpy")
    reference = [net.train_step(X, y, loss="softmax_cross_entropy", lr=training.LEARNING_RATE,
                                momentum=training.MOMENTUM) for _ in range(3)]
    lean, (arena, _) = training.lean_numpy_step(X, y, params)
    notebook, layers = training.notebook_step(X, y, params)
    steps = {"lean": lean, "notebook": notebook}
    torch = importlib.import_module("torch") if importlib.util.find_spec("torch") else None
    if torch is not None:
        steps["torch"], model = training.torch_step(torch, X, y, params)
    jax_contender = training.jax_step(X, y, params)
    if jax_contender is not None:
        steps["jax"], state = jax_contender
    for name, step in steps.items():
        losses_seen = [step() for _ in range(3)]
        np.testing.assert_allclose(losses_seen, reference, rtol=tol, err_msg=name)
    np.testing.assert_allclose(arena, net._params, rtol=tol, atol=tol)
    for layer, mine in zip(layers, net.layers, strict=True):
        np.testing.assert_allclose(layer.W, mine.W, rtol=tol, atol=tol)
    if torch is not None:
        np.testing.assert_allclose(model[0].weight.detach().numpy().T, net.layers[0].W,
                                   rtol=tol, atol=tol)
    if jax_contender is not None:
        np.testing.assert_allclose(np.asarray(state[0][0][0]), net.layers[0].W, rtol=10 * tol,
                                   atol=10 * tol)


def test_gemm_floor_runs_the_steps_products():
    if fastlinear.available_backends()["numba"] is not None:
        pytest.skip("the floor is timed with the numba backend only")
    sizes = (4, 6, 3)
    params = training.initial_parameters(sizes, "float64", seed=5)
    X, _ = training.batch_of(sizes, 5, "float64", seed=5)
    training.gemm_floor(X, params)()  # runs; its products are Sequential's (tests/test_sequential)


def test_step_flops_count_every_product():
    # 64-128-64-10 at batch 1: forward 2·(8192 + 8192 + 640), backward 4·(8192 + 640) + 2·8192
    assert training.step_flops(1) == 2 * 17024 + 4 * 8832 + 2 * 8192


@pytest.mark.parametrize("text", ["8x16", "nosuch"])
def test_bad_cases_and_batches_are_refused(text):
    with pytest.raises((SystemExit, _cli.UsageError)):
        bench.main(["--cases", text, "--plot", ""])
    with pytest.raises(SystemExit):
        bench.main(["--batches", text, "--plot", ""])


def test_a_backend_without_activations_is_left_out_of_those_cases(second_backend, monkeypatch,
                                                                   tmp_path, capsys):
    """A backend that raises NotImplementedError for a case (the GPU backend before its fused
    activations) loses its rows there, with a note; the run goes on."""
    def forward(X, W, b, out, *, activation=None, preactivation=None):
        if activation is not None:
            raise NotImplementedError("echo: no activations")
        return numpy_backend.forward(X, W, b, out)

    monkeypatch.setattr(sys.modules["fastlinear_test_echo_backend"], "forward", forward)
    json_path = tmp_path / "bench.json"
    assert bench.main(["--cases", "layers,fused", "--shapes", "8x16x16", "--dtypes", "float32",
                       "--repeat", "1", "--block-time", "0.0002", "--pause", "0", "--no-torch",
                       "--no-progress", "--backends", f"numpy,{second_backend}", "--plot", "",
                       "--json", str(json_path)]) == 0
    assert "fastlinear[echo] left out of 32x64x128 step float32" in capsys.readouterr().err
    report = json.loads(json_path.read_text())
    assert "fastlinear[echo]" in {row["label"] for row in report["cases"][0]["rows"]}
    for case in report["fused_relu"]:
        assert {row["label"] for row in case["rows"]} >= {"NumPy", "fastlinear[numpy]"}
        assert "fastlinear[echo]" not in {row["label"] for row in case["rows"]}


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
    assert kinds == {"time", "peakmem"}
    assert asv_suite.TrainingStep in classes and asv_suite.SequentialStep in classes
    for cls in classes:
        assert len(cls.params) == len(cls.param_names)
        backends, sizes, dtypes = cls.params
        assert backends == list(fastlinear.BACKENDS)
        # figures to trust: warmed up, several samples in several processes
        assert cls.warmup_time > 0 and cls.repeat[0] >= 5 and cls.rounds >= 2
        assert cls.min_run_count >= cls.repeat[0] * cls.rounds
        if not issubclass(cls, asv_suite._NetworkCase):
            assert all(len(asv_suite.parse_shape(shape)) == 3 for shape in sizes)
        assert set(dtypes) <= {"float32", "float64"}


def test_asv_suite_uses_only_the_public_api():
    """Old commits and refactors of internals must not break the history: the suite imports
    fastlinear alone and uses only its public names."""
    import ast

    public = {"Linear", "linear_forward", "linear_backward", "use_backend",
              "available_backends", "Sequential"}
    tree = ast.parse(open(os.path.join(ROOT, "asv_benchmarks", "benchmarks.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("fastlinear"), ast.unparse(node)
        if isinstance(node, ast.Import):
            assert all(alias.name in ("os", "numpy", "fastlinear", "cupy")
                       for alias in node.names), ast.unparse(node)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "fastlinear":
            assert node.attr in public, node.attr


def test_asv_benchmarks_run_or_skip_on_the_smallest_case(asv_suite):
    smallest = min(asv_suite.SHAPES, key=lambda s: np.prod(asv_suite.parse_shape(s)))
    for cls in benchmark_classes(asv_suite):
        shape = min(cls.params[1]) if issubclass(cls, asv_suite._NetworkCase) else smallest
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


def test_plot_draws_markers_with_iqr_whiskers_on_one_y_range(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlinear.bench import plot as plot_module
    from fastlinear.bench.contenders import GEMM_LABEL

    def row(label, pass_name, median, q1, q3, flops=1e9):
        return {"label": label, "pass": pass_name, "gflops": flops / median / 1e9,
                "median_s": median, "q1_s": q1, "q3_s": q3}

    cases = [Case(table="layer", name=str(shape), shape=shape, dtype=dtype, flops={},
                  contenders=[], rows=[row("fastlinear[numpy]", "forward", 1.0, 0.8, 1.25),
                                       row("fastlinear[numpy]", "backward", 2.0, 1.9, 2.1),
                                       row(GEMM_LABEL, "forward", 0.9, 0.9, 0.9)])
             for shape in ((4, 8, 8), (1, 64, 64)) for dtype in ("float32", "float64")]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at it
    header = {"machine": "m", "versions": "v", "threads": [], "date": "today"}
    plot_module.plot(cases, tmp_path / "bench.png", header)
    assert (tmp_path / "bench.png").stat().st_size > 0
    axes = figures[0].axes
    assert len({ax.get_ylim() for ax in axes}) == 1  # one y-range
    forward = axes[0]
    joined = [(line.get_xdata(), line.get_linestyle()) for line in forward.get_lines()
              if len(set(line.get_xdata())) > 1
              and line.get_linestyle() not in ("None", "none", "")]
    assert not joined  # no line joins two shapes
    names = forward.get_legend_handles_labels()[1]
    assert any("reference GEMM" in name for name in names)
    assert not any("ceiling" in name for name in names)
    x, median, low, high = plot_module._points(cases, "fastlinear[numpy]", "forward", "float32",
                                               {(4, 8, 8): 0, (1, 64, 64): 1})[0]
    assert low == pytest.approx(0.8) and median == pytest.approx(1.0) \
        and high == pytest.approx(1.25)  # rates at the time's third and first quartiles
