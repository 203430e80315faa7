#!/usr/bin/env bash
# The cupy backend's first contact with a GPU, in one command (issue 19).
#
# Runs from a source checkout on a GPU machine with no network (CuPy, PyTorch, pytest and
# hypothesis installed there): PYTHONPATH is the repository root. Every log lands in $OUT
# (default ./first_contact): seven files (a device session brings back eight at most).
#
#   OUT=/some/dir bash benchmarks/gpu_first_contact.sh      # device tool: run, timeout_s=540
#
# Steps, most valuable first (a run cut short still leaves the earlier logs), each time-boxed
# with `timeout` (a hung step is killed, the next one runs) inside one overall budget
# (FIRST_CONTACT_BUDGET_S, default 460 s: the whole run ends within 8 minutes). The steps' caps
# (seconds, below) add up to 420, so each gets its whole cap; the last step, paths, gets what
# the budget leaves (at least about 35 s, more when earlier steps end early).
#   00_env.log        versions, nvidia-smi, `fastlinear info` (30), `fastlinear check --backend
#                     cupy` (40)
#   10_pytest_gpu.log pytest -m gpu --maxfail=300 --tb=short (170), one line per test:
#                     test_cupy_backend.py first, then every backend-generic test through cupy
#                     (the sanitizer tests run in their own step; a CPU-only module that fails to
#                     import stops nothing); a test past 50 s has every thread's stack dumped
#                     (faulthandler_timeout: also inside a CUDA call that released the GIL)
#   20_gpu_bench.log  benchmarks/gpu_bench.py --quick (against PyTorch, with the forced paths) (75)
#   30_sanitizer.log  compute-sanitizer memcheck (every path) (55) and racecheck (our kernels
#                     alone) (50) of tests/gpu_sanitizer_smoke.py; where compute-sanitizer
#                     refuses the device (gVisor: "Device not supported") the step exits 77 and
#                     the summary says "unsupported", not a finding
#   40_paths.log      the forced-path table over the cliff shapes, a row printed as measured,
#                     then the measured thresholds (python3 -m fastlinear.backends.cupy_tune
#                     --quick; JSON in 41_paths.json, written after the table and again after the
#                     thresholds) (the rest)
#   summary.txt       one line per step: name, exit status (124: timed out), seconds
# The exit status is 0 when every step passed (or was unsupported), else 1; the summary is
# printed last. `fastlinear tune` is not run: its GPU part is the paths step's measurement.
#
# A follow-up on the still-warm machine (send it at once; a later call starts a fresh one):
# pytest's cache is kept (.pytest_cache in the checkout), so the failures rerun with full
# tracebacks by
#   python3 -m pytest -m gpu --lf --tb=long -q -o faulthandler_timeout=50 tests/
# shellcheck disable=SC2317  # the functions below run through `bash -c` (see below)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-$PWD/first_contact}
PY=${PYTHON:-python3}
BUDGET_S=${FIRST_CONTACT_BUDGET_S:-460}
RESERVE_S=${FIRST_CONTACT_RESERVE_S:-10}  # kept back for each later step (and timeout's kill)
MAX_STEP_S=${FIRST_CONTACT_MAX_STEP_S:-600}  # no step longer (a dry run sets a few seconds)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastlinear_first_contact.XXXXXX")
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"
START=$SECONDS
FAILED=0
STEPS_LEFT=7  # the run_step calls at the end
UNSUPPORTED=77  # a step's exit status for "this machine cannot run it" (not a finding)
PROBE_S=20  # the longest an import probe may take

# fastlinear needs platformdirs (the tuning profile's folder); a source run installs nothing, so
# where it is missing a stand-in with its one function used here goes on the path.
if ! timeout -k 2 "$PROBE_S" "$PY" -c 'import platformdirs' >/dev/null 2>&1; then
    mkdir -p "$SCRATCH/shim"
    cat >"$SCRATCH/shim/platformdirs.py" <<'EOF'
"""Stand-in for platformdirs (gpu_first_contact.sh): the user cache directory only."""
import os


def user_cache_dir(appname=None, *args, **kwargs):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, appname or "")
EOF
    export PYTHONPATH=$PYTHONPATH:$SCRATCH/shim
    echo "platformdirs is not installed: a stand-in ($SCRATCH/shim) gives its user_cache_dir" \
        >>"$OUT/00_env.log"
fi

# compute-sanitizer from PATH, else from the CUDA toolkit's folders.
SANITIZER=$(command -v compute-sanitizer)
for candidate in /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    if [[ -z $SANITIZER && -x $candidate ]]; then
        SANITIZER=$candidate
    fi
done
SANITIZER=${SANITIZER:-compute-sanitizer}

# pytest-timeout (where installed) turns one hung test into a failure instead of losing the
# whole step to its time box; its signal cannot interrupt a CUDA call that released the GIL,
# so faulthandler_timeout (below) dumps every thread's stack first, at 50 s.
PYTEST_TIMEOUT=()
if timeout -k 2 "$PROBE_S" "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
    PYTEST_TIMEOUT=(--timeout=60)
fi

# The cupy backend's own tests first (pytest orders a directory by name, so files are listed).
PYTEST_FILES=(tests/test_cupy_backend.py)
for file in tests/test_*.py; do
    if [[ $file != tests/test_cupy_backend.py ]]; then
        PYTEST_FILES+=("$file")
    fi
done

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
    local took=$((SECONDS - began)) note=""
    case $status in
        0) ;;
        124) note="  timed out" ;;
        125) note="  skipped" ;;
        "$UNSUPPORTED") note="  unsupported here (not a finding)" ;;
        *) note="  failed" ;;
    esac
    echo "=== $name: exit $status after ${took}s$note" >>"$log"
    printf '%-22s exit %3d  %4ds%s\n' "$name" "$status" "$took" "$note" >>"$OUT/summary.txt"
    if ((status != 0 && status != UNSUPPORTED)); then
        FAILED=1
    fi
    return 0
}

versions() {
    uname -a
    "$PY" --version
    "$PY" -c 'import numpy, cupy; print("numpy", numpy.__version__, "cupy", cupy.__version__)'
    "$PY" -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(cupy|numpy|torch|pytest|hypothesis|numba|nvidia-)' || true
    nvcc --version 2>&1 | tail -n 2 || true
    "$SANITIZER" --version 2>&1 | head -n 3 || true
    nvidia-smi
    "$PY" -m fastlinear info
}

# sanitize TOOL ARGS...: compute-sanitizer's TOOL on the smoke script; exit $UNSUPPORTED where
# the sanitizer refuses the device ("Device not supported", then error 999 on gVisor), so the
# summary does not read that as a finding.
sanitize() {
    local tool=$1 status
    shift
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" tests/gpu_sanitizer_smoke.py "$@" 2>&1 |
        tee "$SCRATCH/$tool.out"
    status=${PIPESTATUS[0]}
    if ((status != 0)) && grep -qi "not supported" "$SCRATCH/$tool.out"; then
        echo "=== compute-sanitizer does not support this device or runtime (uname -r in 00_env.log)"
        return "$UNSUPPORTED"
    fi
    return "$status"
}

# timeout runs programs, not shell functions: the functions run in a child bash
export PY SANITIZER SCRATCH UNSUPPORTED
export -f versions sanitize

# caps: 30 + 40 + 170 + 75 + 55 + 50 = 420 s of the 460 s budget; paths takes the rest
run_step 00_env.log versions 30 bash -c versions
run_step 00_env.log check 40 "$PY" -m fastlinear check --backend cupy
run_step 10_pytest_gpu.log pytest_gpu 170 "$PY" -m pytest -m gpu --maxfail=300 --tb=short -v \
    -o faulthandler_timeout=50 --continue-on-collection-errors --durations=15 \
    "${PYTEST_TIMEOUT[@]}" -k "not compute_sanitizer" "${PYTEST_FILES[@]}"
run_step 20_gpu_bench.log gpu_bench 75 "$PY" benchmarks/gpu_bench.py --quick \
    --log "$SCRATCH/gpu_bench.log"
run_step 30_sanitizer.log memcheck 55 bash -c 'sanitize "$@"' sanitize memcheck
run_step 30_sanitizer.log racecheck 50 bash -c 'sanitize "$@"' sanitize racecheck \
    --own-kernels-only
run_step 40_paths.log paths "$BUDGET_S" "$PY" -m fastlinear.backends.cupy_tune --quick \
    --json "$OUT/41_paths.json"
echo "total $((SECONDS - START))s of a ${BUDGET_S}s budget; logs in $OUT" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
rm -rf "$SCRATCH"
exit "$FAILED"
