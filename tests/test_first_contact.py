"""benchmarks/gpu_first_contact.sh without a GPU: it parses, passes shellcheck where installed,
and a dry run with stand-ins for python3, nvidia-smi, nvcc and compute-sanitizer writes every
log under $OUT, in the order of their value, kills a hung step at its time box, runs the steps
after it, records a sanitizer that refuses the device as unsupported (not a finding), and ends
within its budget. The stand-in python checks that every script the steps
run exists and every module they run with ``-m`` is importable (a wrong path fails the step)."""

import os
import pathlib
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_first_contact.sh"
LOGS = ("00_env.log", "10_pytest_gpu.log", "20_gpu_bench.log", "30_sanitizer.log",
        "40_paths.log", "41_paths.json", "summary.txt")
STEPS = ("versions", "check", "pytest_gpu", "gpu_bench", "memcheck", "racecheck", "paths")
UNSUPPORTED = 77

# The stand-in python3: pytest hangs (to be killed); cupy_tune writes its JSON; `-m MODULE`
# must name a module the real Python finds, a script must exist; `-c` (the probes for
# platformdirs and pytest_timeout) fails, as where neither is installed.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
  -c) exit 1 ;;
  -m) "$REAL_PYTHON" -c 'import importlib.util, sys
sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$2" || { echo "no module $2"; exit 3; } ;;
  --version) echo "Python 3.fake"; exit 0 ;;
  *) [ -f "$1" ] || { echo "no script $1"; exit 3; } ;;
esac
case "$*" in
  *"-m pytest"*) echo "collecting..."; exec sleep 300 ;;
  *cupy_tune*) echo '{}' > "${@: -1}"; echo "fake table" ;;
  *) echo "fake python $*" ;;
esac
"""
# The stand-in tools; compute-sanitizer refuses the device for racecheck, as on gVisor.
FAKE_TOOL = """#!/usr/bin/env bash
echo "fake $(basename "$0") $*"
case "$*" in
  *"--tool racecheck"*) echo "========= Error: Device not supported"; exit 1 ;;
  *--tool*) shift 4; exec "$@" ;;
esac
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
    env = {**os.environ, "OUT": str(out), "PYTHON": str(python), "REAL_PYTHON": sys.executable,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FIRST_CONTACT_BUDGET_S": str(budget), "FIRST_CONTACT_RESERVE_S": "3",
           "FIRST_CONTACT_MAX_STEP_S": "3"}
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=budget + 30)
    took = time.monotonic() - start
    assert took < 3 + len(STEPS) * 2, f"took {took:.1f}s: one hung step of 3 s, the others quick"
    assert result.returncode == 1  # the hung pytest step failed
    summary = (out / "summary.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(LOGS), summary  # <= 8 come back
    summary = (out / "summary.txt").read_text()
    status = {line.split()[0]: int(line.split()[2]) for line in summary.splitlines()
              if line.split()[0] in STEPS}
    assert list(status) == list(STEPS)
    assert status.pop("pytest_gpu") == 124  # killed by its time box
    assert status.pop("racecheck") == UNSUPPORTED
    assert "racecheck" in next(line for line in summary.splitlines() if "unsupported" in line)
    assert set(status.values()) == {0}, summary
    assert "logs in" in summary and summary in result.stdout
    env_log = (out / "00_env.log").read_text()
    assert "fake nvidia-smi" in env_log and "fastlinear info" in env_log
    assert "fake python -m fastlinear check --backend cupy" in env_log
    assert "platformdirs is not installed: a stand-in" in env_log
    pytest_log = (out / "10_pytest_gpu.log").read_text()
    command = next(line for line in pytest_log.splitlines() if line.startswith("=== pytest_gpu"))
    for option in ("-m gpu", "--maxfail=300", "--tb=short", "faulthandler_timeout=50",
                   "--continue-on-collection-errors", "-k not compute_sanitizer"):
        assert option in command, option
    files = [word for word in command.split() if word.startswith("tests/test_")]
    assert files[0] == "tests/test_cupy_backend.py" and files.count(files[0]) == 1
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_*.py"))
    sanitizer_log = (out / "30_sanitizer.log").read_text()
    assert "--tool memcheck" in sanitizer_log and "--own-kernels-only" in sanitizer_log
    assert "tests/gpu_sanitizer_smoke.py" in sanitizer_log
    assert "does not support this device" in sanitizer_log
    assert "fake python benchmarks/gpu_bench.py --quick" in (out / "20_gpu_bench.log").read_text()
    assert (out / "41_paths.json").read_text().strip() == "{}"
    assert "cupy_tune --quick" in (out / "40_paths.log").read_text()


def test_pytest_m_gpu_selects_the_backend_generic_tests_through_cupy():
    from tests.helpers import backend_param

    assert "gpu" in {mark.name for mark in backend_param("cupy").marks}
    assert "gpu" not in {mark.name for mark in backend_param("numpy").marks}


def test_step_caps_fit_the_default_budget_with_time_left_for_the_last_step():
    import re

    text = SCRIPT.read_text()
    budget = int(re.search(r"BUDGET_S=\$\{FIRST_CONTACT_BUDGET_S:-(\d+)\}", text).group(1))
    steps = re.findall(r"^run_step \S+ (\S+) (\S+) ", text, re.MULTILINE)
    assert [name for name, _ in steps] == list(STEPS)
    *capped, (_, last_cap) = steps
    assert last_cap == '"$BUDGET_S"'  # paths takes what the budget leaves
    assert sum(int(cap) for _, cap in capped) + 30 <= budget <= 540 - 60  # run(timeout_s=540)
