"""Measure the cupy backend's forward path thresholds on this GPU, from a forced-path table.

The shape rule (``cupy_launch.forward_path``) picks ``small_batch``, ``tiled`` or ``cublas`` by
three numbers (``cupy_launch.PathThresholds``). This module times each path forced on a grid of
shapes (CUDA events around repeated calls, medians) and returns the numbers the table supports;
``cupy_launch.apply_thresholds`` puts them in force. The interface for a tuning profile::

    from fastlinear.backends import cupy_launch, cupy_tune
    values = cupy_tune.measure_thresholds()      # {name: int}; needs CuPy and a CUDA GPU
    cupy_launch.apply_thresholds(values)         # later, e.g. from a stored profile

From the command line (the table of issue 19's cliff shapes, then the measured thresholds)::

    python -m fastlinear.backends.cupy_tune [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable

import numpy as np

from fastlinear.backends import cupy_launch

__all__ = ["measure_thresholds", "path_table", "CLIFF_SHAPES"]

# A timing function: (path, N, D, M, W row-major?) -> milliseconds of one forward call.
PathTimer = Callable[[str, int, int, int, bool], float]

# Few blocks walking a long D (the cliff of issue 19), the same with a short D, a column-major
# W, the demo's layer and a GEMV.
CLIFF_SHAPES = ((16, 2048, 128), (32, 2048, 64), (8, 2048, 32), (16, 256, 128), (32, 256, 64),
                (8, 256, 32), (32, 64, 128), (1, 8192, 8192))
# The probes of each threshold: (N, M) pairs with few blocks for the inner-dimension limit
# (N <= 8 runs small_batch, larger N tiled), batch sizes for small_batch, N = M for tiled's work.
INNER_FAMILIES = ((16, 128), (32, 64), (64, 64), (8, 32), (1, 256))
INNER_CANDIDATES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SMALL_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
SMALL_BATCH_PROBES = ((256, 256), (256, 4096))  # (D, M)
TILED_SIDES = (64, 128, 256, 512, 1024, 2048)
TILED_INNER = 128


def cupy_timer(dtype: str = "float32", reps: int = 15, inner: int = 10,
               warmup: int = 3) -> PathTimer:
    """A ``PathTimer`` on the current CUDA device: the backend's ``forward`` with a bias into a
    preallocated output, ``inner`` calls between two CUDA events, the median of ``reps``.

    The inputs of one shape are made once and kept while the timer is asked for that shape
    (the paths and W layouts of a table row in turn); a new shape replaces them."""
    import cupy

    from fastlinear.backends import cupy as cupy_backend

    inputs: dict[tuple, tuple] = {}

    def arrays(n: int, d: int, m: int, w_row_major: bool) -> tuple:
        key = (n, d, m, w_row_major)
        if key not in inputs:
            row_major = inputs.get((n, d, m, True)) or inputs.get((n, d, m, False))
            inputs.clear()
            if row_major is None:
                rng = np.random.default_rng(0)
                row_major = (cupy.asarray(rng.standard_normal((n, d), np.float32).astype(dtype)),
                             cupy.asarray(rng.standard_normal((d, m), np.float32).astype(dtype)),
                             cupy.asarray(rng.standard_normal(m, np.float32).astype(dtype)),
                             cupy.empty((n, m), dtype))
            X, W, b, Y = row_major
            W = cupy.ascontiguousarray(W) if w_row_major else cupy.asfortranarray(W)
            inputs[key] = (X, W, b, Y)
        return inputs[key]

    def time_path(path: str, n: int, d: int, m: int, w_row_major: bool = True) -> float:
        X, W, b, Y = arrays(n, d, m, w_row_major)
        with cupy_backend.forced_forward_path(path):
            for _ in range(warmup):
                cupy_backend.forward(X, W, b, Y)
            times = []
            for _ in range(reps):
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                for _ in range(inner):
                    cupy_backend.forward(X, W, b, Y)
                end.record()
                end.synchronize()
                times.append(cupy.cuda.get_elapsed_time(start, end) / inner)
        return statistics.median(times)

    return time_path


def _own_path(n: int) -> str:
    return "small_batch" if n <= cupy_launch.SMALL_BATCH_ROWS else "tiled"


def _longest_prefix(candidates: Iterable[int], wins: Callable[[int], bool]) -> int | None:
    """The last candidate of the run, from the first, for which ``wins`` holds (None: none)."""
    best = None
    for candidate in candidates:
        if not wins(candidate):
            break
        best = candidate
    return best


def measure_thresholds(time_path: PathTimer | None = None, *, reps: int = 15) -> dict[str, int]:
    """``{name: int}`` for ``cupy_launch.apply_thresholds``, measured on the current GPU.

    Each threshold is the longest run of the probe grid, from its smallest value, over which our
    kernel is at least as fast as the alternatives for every probe: ``own_kernel_max_inner``
    (few-block shapes, our kernel against cuBLAS), ``small_batch_max_rows`` (``small_batch``
    against ``tiled`` and cuBLAS at short D), ``tiled_max_work`` (``tiled`` against cuBLAS,
    N = M, D = 128). Where our kernel never wins, the threshold is set below the grid. Needs
    CuPy and a CUDA device unless ``time_path`` (a ``PathTimer``) is given; ``reps`` timings
    per point (median) with the default timer, float32 (the thresholds serve every dtype).
    About 150 timings of a few milliseconds each (an estimate: not yet run on a GPU).
    """
    time_path = time_path or cupy_timer(reps=reps)

    def own_wins_at_inner(d: int) -> bool:
        return all(time_path(_own_path(n), n, d, m, True) <= time_path("cublas", n, d, m, True)
                   for n, m in INNER_FAMILIES)

    def small_batch_wins(n: int) -> bool:
        return all(time_path("small_batch", n, d, m, True)
                   <= min(time_path(path, n, d, m, True) for path in ("tiled", "cublas"))
                   for d, m in SMALL_BATCH_PROBES)

    def tiled_wins(side: int) -> bool:
        return time_path("tiled", side, TILED_INNER, side, True) <= time_path(
            "cublas", side, TILED_INNER, side, True)

    inner = _longest_prefix(INNER_CANDIDATES, own_wins_at_inner)
    rows = _longest_prefix(SMALL_BATCH_CANDIDATES, small_batch_wins)
    side = _longest_prefix(TILED_SIDES, tiled_wins)
    return {
        "small_batch_max_rows": rows or 1,
        "own_kernel_max_inner": inner or INNER_CANDIDATES[0] // 2,
        "tiled_max_work": (side * TILED_INNER * side if side
                           else TILED_SIDES[0] * TILED_INNER * TILED_SIDES[0] // 2),
    }


def path_table(shapes: Iterable[tuple[int, int, int]] = CLIFF_SHAPES,
               time_path: PathTimer | None = None, sm_count: int | None = None,
               on_row: Callable[[dict], object] | None = None) -> list[dict]:
    """One row per shape and W layout: each path forced (ms), the rule's choice, the fastest.

    ``small_batch`` is timed for N <= 64 only (one block row per 8 rows). ``sm_count`` (default:
    the current device's) feeds the rule's choice. ``on_row(row)`` is called as each row is
    measured (a run cut short keeps the rows printed so far).
    """
    if time_path is None or sm_count is None:
        from fastlinear.backends import cupy as cupy_backend

        time_path = time_path or cupy_timer()
        sm_count = sm_count or cupy_backend._device_state().sm_count
    rows = []
    for n, d, m in shapes:
        for w_row_major in (True, False):
            paths = [p for p in cupy_launch.FORWARD_PATHS if p != "small_batch" or n <= 64]
            times = {path: time_path(path, n, d, m, w_row_major) for path in paths}
            rows.append({"N": n, "D": d, "M": m, "W": "C" if w_row_major else "F",
                         "ms": times, "fastest": min(times, key=times.__getitem__),
                         "rule": cupy_launch.forward_path(n, d, m, w_row_major, sm_count)})
            if on_row is not None:
                on_row(rows[-1])
    return rows


TABLE_HEADER = (f"{'N':>6} {'D':>6} {'M':>6} W {'small_batch':>12} {'tiled':>9} {'cublas':>9} "
                f"{'fastest':12} rule")


def format_row(row: dict) -> str:
    cells = " ".join(f"{row['ms'][path]:{width}.4f}" if path in row["ms"] else f"{'-':>{width}}"
                     for path, width in (("small_batch", 12), ("tiled", 9), ("cublas", 9)))
    flag = "" if row["rule"] == row["fastest"] else "  <- rule differs"
    return (f"{row['N']:6} {row['D']:6} {row['M']:6} {row['W']} {cells} "
            f"{row['fastest']:12} {row['rule']}{flag}")


def format_table(rows: list[dict]) -> str:
    return "\n".join([TABLE_HEADER, *map(format_row, rows)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions per timing")
    parser.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    timer = cupy_timer(args.dtype, reps=5 if args.quick else 15)
    print(f"# forced forward paths, {args.dtype}, ms per call (median); rule = the shape rule's "
          f"choice under {cupy_launch.current_thresholds()}")
    print(TABLE_HEADER, flush=True)
    result: dict = {"dtype": args.dtype, "in_force": cupy_launch.current_thresholds()}
    result["table"] = path_table(time_path=timer,
                                 on_row=lambda row: print(format_row(row), flush=True))
    _write_json(args.json, result)  # the table kept should the thresholds be cut short
    result["measured"] = measure_thresholds(timer)
    print(f"# measured thresholds: {result['measured']}")
    print(f"# in force:            {cupy_launch.current_thresholds()}", flush=True)
    _write_json(args.json, result)
    return result


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
