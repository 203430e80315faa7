#!/usr/bin/env bash
# The cupy backend's first contact with a GPU, in one command (issue 19).
#
# Runs from a source checkout on a GPU machine with no network (CuPy, PyTorch, pytest and
# hypothesis installed there): PYTHONPATH is the repository root. Every log lands in $OUT
# (default ./first_contact): eight files, a device session's limit of files brought back.
#
#   OUT=/some/dir bash benchmarks/gpu_first_contact.sh
#
# Steps, each time-boxed with `timeout` (a hung step is killed, the next one runs) inside one
# overall budget (FIRST_CONTACT_BUDGET_S, default 460 s: the whole run ends within 8 minutes):
#   00_env.log        versions, nvidia-smi, `python3 -m fastlinear check`
#   10_paths.log      the forced-path table over the cliff shapes, measured thresholds
#                     (python3 -m fastlinear.backends.cupy_tune; JSON in 11_paths.json)
#   20_pytest_gpu.log pytest -m gpu --maxfail=20 (the sanitizer tests run in the next step)
#   30_sanitizer.log  compute-sanitizer memcheck (every path) and racecheck (our kernels alone)
#                     of tests/gpu_sanitizer_smoke.py
#   40_gpu_bench.log  benchmarks/gpu_bench.py --quick (against PyTorch)
#   50_tune.log       python3 -m fastlinear tune, when that subcommand exists
#   summary.txt       one line per step: name, exit status (124: timed out), seconds
# The exit status is 0 when every step passed, else 1; the summary is printed last.
# shellcheck disable=SC2317  # versions and tune_if_there run through `bash -c` (see below)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-$PWD/first_contact}
PY=${PYTHON:-python3}
BUDGET_S=${FIRST_CONTACT_BUDGET_S:-460}
RESERVE_S=${FIRST_CONTACT_RESERVE_S:-10}  # kept back for each later step (and timeout's kill)
MAX_STEP_S=${FIRST_CONTACT_MAX_STEP_S:-600}  # no step longer (a dry run sets a few seconds)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"
START=$SECONDS
FAILED=0
STEPS_LEFT=8  # the run_step calls at the end

# run_step LOG NAME CAP_S COMMAND...: run COMMAND with its output appended to $OUT/LOG, for at
# most CAP_S seconds and what the budget leaves after the later steps' reserve.
run_step() {
    local log=$OUT/$1 name=$2 cap=$3
    shift 3
    STEPS_LEFT=$((STEPS_LEFT - 1))
    local left=$((BUDGET_S - (SECONDS - START) - STEPS_LEFT * RESERVE_S))
    local limit=$((cap < left ? cap : left))
    limit=$((limit < MAX_STEP_S ? limit : MAX_STEP_S))
    local began=$SECONDS status
    echo "=== $name: $* (limit ${limit}s, $(date -u +%H:%M:%SZ))" >>"$log"
    if ((limit < 3)); then
        echo "=== $name: skipped, no time left in the ${BUDGET_S}s budget" >>"$log"
        status=125
    else
        timeout -k 5 "$limit" "$@" >>"$log" 2>&1 </dev/null
        status=$?
    fi
    local took=$((SECONDS - began))
    echo "=== $name: exit $status after ${took}s" >>"$log"
    printf '%-22s exit %3d  %4ds\n' "$name" "$status" "$took" >>"$OUT/summary.txt"
    if ((status != 0)); then
        FAILED=1
    fi
    return 0
}

versions() {
    uname -a
    "$PY" --version
    "$PY" -c 'import numpy, cupy, sys; print("numpy", numpy.__version__, "cupy", cupy.__version__)'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(cupy|numpy|torch|pytest|hypothesis|numba|nvidia-)' || true
    nvcc --version 2>&1 | tail -n 2 || true
    compute-sanitizer --version 2>&1 | head -n 3 || true
    nvidia-smi
}

tune_if_there() {
    if "$PY" -m fastlinear tune --help >/dev/null 2>&1; then
        "$PY" -m fastlinear tune
    else
        echo "python3 -m fastlinear tune does not exist in this checkout: nothing to run"
    fi
}

# timeout runs programs, not shell functions: the functions run in a child bash
export PY
export -f versions tune_if_there

run_step 00_env.log versions 30 bash -c versions
run_step 00_env.log check 60 "$PY" -m fastlinear check
run_step 10_paths.log paths 60 "$PY" -m fastlinear.backends.cupy_tune --json "$OUT/11_paths.json"
run_step 20_pytest_gpu.log pytest_gpu 170 "$PY" -m pytest -m gpu --maxfail=20 -q \
    -p no:cacheprovider -k "not compute_sanitizer" tests
run_step 30_sanitizer.log memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" tests/gpu_sanitizer_smoke.py
run_step 30_sanitizer.log racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PY" tests/gpu_sanitizer_smoke.py --own-kernels-only
run_step 40_gpu_bench.log gpu_bench 100 "$PY" benchmarks/gpu_bench.py --quick \
    --log "${TMPDIR:-/tmp}/fastlinear_gpu_bench.log"
run_step 50_tune.log tune 45 bash -c tune_if_there
echo "total $((SECONDS - START))s of a ${BUDGET_S}s budget; logs in $OUT" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$FAILED"
