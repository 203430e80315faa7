"""benchmarks/gpu_bench.py without a GPU: its options, and that its PyTorch side computes the
same activations as fastlinear (the timing itself needs CUDA; run it on a GPU machine)."""

import importlib.util
import pathlib

import numpy as np
import pytest

from fastlinear import activations

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options(gpu_bench):
    args = gpu_bench.parse_args(["--quick", "--dtypes", "float32", "--no-paths"])
    assert args.quick and args.no_paths and args.dtypes == ["float32"]
    assert gpu_bench.parse_args([]).dtypes == ("float16", "float32", "float64")
    assert set(gpu_bench.ACTIVATIONS) == {None, *activations.ACTIVATIONS}


@pytest.mark.parametrize("activation", [None, *activations.ACTIVATIONS])
def test_torch_side_computes_fastlinears_activations(gpu_bench, activation):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    import torch.nn.functional as F

    z = np.linspace(-8, 8, 101)
    theirs = gpu_bench.torch_activation(F, torch, activation)(torch.from_numpy(z)).numpy()
    ours = z.copy() if activation is None else activations.apply(activation, z)
    np.testing.assert_allclose(theirs, ours, rtol=1e-12, atol=1e-15)


def test_host_overhead_benchmark_runs_with_cupy_stubbed():
    """benchmarks/gpu_host_overhead.py on any machine (a subprocess: it puts a stub CuPy into
    sys.modules), with every kernel launch held to KERNEL_SIGNATURES and gemmEx's 19 arguments
    checked; the last line is what a tracker reads."""
    import os
    import re
    import subprocess
    import sys

    script = BENCH.with_name("gpu_host_overhead.py")
    root = str(BENCH.parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    result = subprocess.run([sys.executable, str(script), "--rounds", "1", "--calls", "5",
                             "--pause", "0", "--check"], capture_output=True, text=True,
                            timeout=120, env=env, cwd=root)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"forward_us=\d+\.\d\d backward_us=\d+\.\d\d", lines[-1]), lines[-1]
    checked = re.search(r"checked (\d+) launches and (\d+) gemmEx calls", result.stdout)
    assert checked and int(checked.group(1)) > 0 and int(checked.group(2)) > 0
