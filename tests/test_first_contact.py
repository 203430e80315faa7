"""benchmarks/gpu_first_contact.sh without a GPU: it parses, passes shellcheck where installed,
and a dry run with stand-ins for python3, nvidia-smi, nvcc and compute-sanitizer writes every
log under $OUT, kills a hung step at its time box, runs the steps after it, and ends within its
budget."""

import os
import pathlib
import shutil
import stat
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first_contact.sh"
LOGS = ("00_env.log", "10_paths.log", "11_paths.json", "20_pytest_gpu.log", "30_sanitizer.log",
        "40_gpu_bench.log", "50_tune.log", "summary.txt")
STEPS = ("versions", "check", "paths", "pytest_gpu", "memcheck", "racecheck", "gpu_bench", "tune")

# The stand-in python3: pytest hangs (to be killed), `fastlinear tune --help` fails as it does
# where the subcommand does not exist, cupy_tune writes its JSON; everything else echoes.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in
  *"-m pytest"*) echo "collecting..."; exec sleep 300 ;;
  *"fastlinear tune --help"*) exit 2 ;;
  *cupy_tune*) echo '{}' > "${@: -1}"; echo "fake table" ;;
  *) echo "fake python $*" ;;
esac
"""
FAKE_TOOL = """#!/usr/bin/env bash
echo "fake $(basename "$0") $*"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_writes_every_log_and_time_boxes_a_hung_step(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = _executable(bin_dir / "fake-python3", FAKE_PYTHON)
    for tool in ("nvidia-smi", "nvcc", "compute-sanitizer"):
        _executable(bin_dir / tool, FAKE_TOOL)
    out = tmp_path / "out"
    budget = 40
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FIRST_CONTACT_BUDGET_S": str(budget), "FIRST_CONTACT_RESERVE_S": "3",
           "FIRST_CONTACT_MAX_STEP_S": "3"}
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=budget + 30)
    took = time.monotonic() - start
    assert took < 3 + 8 * 2, f"took {took:.1f}s: one hung step of 3 s, the others quick"
    assert result.returncode == 1  # the hung pytest step failed
    summary = (out / "summary.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(LOGS), summary  # 8 files come back
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: int(line.split()[2]) for line in summary.splitlines()
              if line.split()[0] in STEPS}
    assert list(status) == list(STEPS)
    assert status.pop("pytest_gpu") == 124  # killed by its time box
    assert set(status.values()) == {0}, summary
    assert "logs in" in summary and summary in result.stdout
    env_log = (out / "00_env.log").read_text()
    assert "fake nvidia-smi" in env_log and "fake python -m fastlinear check" in env_log
    sanitizer_log = (out / "30_sanitizer.log").read_text()
    assert "--tool memcheck" in sanitizer_log and "--own-kernels-only" in sanitizer_log
    assert "does not exist in this checkout" in (out / "50_tune.log").read_text()
    assert "-m gpu --maxfail=20" in (out / "20_pytest_gpu.log").read_text()
