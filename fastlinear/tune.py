"""``python -m fastlinear tune``: measure this machine's crossovers and store them as its profile.

Thresholds hand-set on one machine misfire on another (a register-blocked kernel that pays with
AVX-512 loses on an AVX2-only CPU), so, as FFTW's wisdom and cuDNN's benchmark mode do, the
numbers are measured where they run, once, and remembered per machine (``fastlinear._profile``):

* numba, the small-dX path: ``dX = G @ W.T`` as register-blocked dot products against the BLAS,
  at small backward calls; stored only where it wins at every probe.
* numba, the skinny path: the fused one-sweep backward for N <= ``SKINNY_ROWS`` rows against
  the BLAS path, over growing weight counts: the smallest count from which it wins.
* the BLAS-thread hand-off, by what the BLAS's threads do (timings of the kernels around them
  are noise on a shared machine): how long its workers spin after a threaded call (the CPU time
  they burn), within which numba's skinny backward runs on one thread; and the gemm work from
  which the BLAS's thread count changes its time, from which numba calls give it Numba's count.
* numba against NumPy per shape class: at every shape of the bench's grid, each pass and dtype,
  the backend's kernels against the plain NumPy expression; a class where NumPy is faster, in
  median and minimum alike, runs the NumPy reference from then on.
* cupy (with CuPy and a GPU): the forward path thresholds, from the forced-path table.

Each comparison interleaves its contenders (A B A B ...) and takes medians of wall-clock
blocks. Finally every grid shape is timed again with the profile in force, and the table of
ratios printed. A grid cell whose first figure would decide something (a class handed to NumPy,
a cell below the table's target) is timed again with three times the rounds, within a time
budget, and that figure decides (and is reported, marked as re-measured): this machine's load
moves a short median by several per cent, so one short measure is not a verdict.
``--quick`` (tests, CI) times three shapes briefly and stores nothing unless ``--profile PATH``
names where.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fastlinear import _dispatch, _profile
from fastlinear.bench import grid

__all__ = ["main", "tune_numba", "ratio_table"]

# Small backward calls where the register-blocked dX path would run (work <= 2**18, M >= 96).
ROWS_PROBES = ((32, 64, 128), (16, 128, 128), (8, 64, 256), (32, 32, 256))
# Skinny backward probes: N = SKINNY_ROWS rows, D = M, weight counts from 2**14 to 2**22.
SKINNY_SIDES = (128, 256, 512, 1024, 2048)
# NumPy must be faster by this factor before a class is handed to it (noise is not a reason).
HAND_OVER = 1.02


# The spin window: after a gemv of SPIN_SIDE x SPIN_SIDE (threaded by OpenBLAS), the process's
# CPU time is watched for SPIN_WATCH seconds in SPIN_SLICE slices; a slice counts as spinning
# when it burnt more than SPIN_BUSY of a core (asleep: ~0.01; spinning under load: >= 0.5).
SPIN_SIDE = 1024
SPIN_WATCH = 0.5
SPIN_SLICE = 0.005
SPIN_BUSY = 0.1
# BLAS threads: square gemm probes of 2**bits multiply-adds; the count "matters" from a time
# ratio of THREADS_MATTER between one thread and Numba's count.
THREADS_PROBE_BITS = tuple(range(14, 26))
THREADS_MATTER = 1.1
THREADS_IN_A_ROW = 3

# Seconds one comparison may take: large shapes get fewer rounds (never fewer than 3).
COMPARISON_BUDGET = 3.0
# The table's target: numba at least this fraction of the plain expression's speed (medians).
TARGET = 0.97
# A cell whose first figure misses (the table's target, or the hand-over margin) is timed again,
# once, with REMEASURE_FACTOR times the rounds, in at most REMEASURE_SECONDS, and that figure
# counts; re-measures stop when the table (or the hand-over decision) has spent REMEASURE_TOTAL
# seconds on them. This machine's load moves a 15-round median by 3-5 % either way.
REMEASURE_FACTOR = 3
REMEASURE_SECONDS = 8.0
REMEASURE_TOTAL = 20.0


def _median_seconds(calls: list[Callable[[], Any]], rounds: int,
                    block_time: float) -> list[float]:
    """Median seconds per call of each of ``calls``, timed in interleaved blocks."""
    return [statistics.median(s) for s in _block_seconds(calls, rounds, block_time)]


def _block_seconds(calls: list[Callable[[], Any]], rounds: int, block_time: float,
                   budget: float = COMPARISON_BUDGET) -> list[list[float]]:
    """Seconds per call of each of ``calls`` in each of its interleaved blocks: ``rounds``
    rounds, fewer where they would take more than ``budget`` seconds (never fewer than 3). The
    budget holds on the clock too: under load a 2-thread BLAS call can take 25 times what the
    sizing call took, so the rounds stop once ``budget`` seconds have passed."""
    for call in calls:  # warm up (compile, caches), then size the blocks
        call()
    counts, round_seconds = [], 0.0
    for call in calls:
        start = time.perf_counter()
        call()
        seconds = max(time.perf_counter() - start, 1e-7)
        counts.append(max(1, int(block_time / seconds)))
        round_seconds += counts[-1] * seconds
    rounds = max(3, min(rounds, int(budget / round_seconds)))
    samples: list[list[float]] = [[] for _ in calls]
    started = time.perf_counter()
    for round_index in range(rounds):
        if round_index >= 3 and time.perf_counter() - started > budget:
            break
        order = list(range(len(calls)))
        if round_index % 2:
            order.reverse()
        for i in order:
            start = time.perf_counter()
            for _ in range(counts[i]):
                calls[i]()
            samples[i].append((time.perf_counter() - start) / counts[i])
    return samples


def _inputs(shape: tuple[int, int, int], dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    N, D, M = shape
    return {name: rng.standard_normal(size).astype(dtype)
            for name, size in (("X", (N, D)), ("W", (D, M)), ("b", (M,)), ("dY", (N, M)))}


def _numba_call(module: Any, pass_name: str, a: dict[str, np.ndarray]) -> Callable[[], Any]:
    X, W, b, dY = a["X"], a["W"], a["b"], a["dY"]
    if pass_name == "forward":
        return lambda: module.forward(X, W, b, None)
    return lambda: module.backward(dY, X, W, True, True, False, None, None, None)


def _plain_call(pass_name: str, a: dict[str, np.ndarray]) -> Callable[[], Any]:
    X, W, b, dY = a["X"], a["W"], a["b"], a["dY"]
    if pass_name == "forward":
        return lambda: X @ W + b
    return lambda: (dY @ W.T, X.T @ dY, dY.sum(0))


@contextmanager
def _thresholds(module: Any, **values: Any) -> Iterator[None]:
    """The numba backend's module thresholds set to ``values`` within the block."""
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _rows_dot_rows_pays(module: Any, dtypes: tuple[str, ...], rounds: int,
                        block_time: float) -> bool:
    """Whether the register-blocked dX path beats the BLAS at every probe and dtype."""
    for shape in ROWS_PROBES:
        for dtype in dtypes:
            a = _inputs(shape, dtype)
            backward = _numba_call(module, "backward", a)

            def with_rows(backward: Callable[[], Any] = backward) -> Any:
                with _thresholds(module, ROWS_DOT_ROWS_MAX_WORK=1 << 18, ROWS_DOT_ROWS_MIN_M=96):
                    return backward()

            by_rows, by_blas = _median_seconds([with_rows, backward], rounds, block_time)
            if by_rows >= by_blas:
                return False
    return True


def _skinny_min_weights(module: Any, rounds: int, block_time: float) -> int:
    """The smallest weight count from which the skinny backward wins at every larger probe."""
    wins = []
    for side in SKINNY_SIDES:
        a = _inputs((module.SKINNY_ROWS, side, side), "float32")
        backward = _numba_call(module, "backward", a)

        def skinny_path(backward: Callable[[], Any] = backward) -> Any:
            with _thresholds(module, SKINNY_MIN_WEIGHTS=1):
                return backward()

        def blas_path(backward: Callable[[], Any] = backward) -> Any:
            with _thresholds(module, SKINNY_MIN_WEIGHTS=1 << 62):
                return backward()

        skinny, blas = _median_seconds([skinny_path, blas_path], rounds, block_time)
        wins.append(skinny < blas)
    first = len(wins)
    while first > 0 and wins[first - 1]:
        first -= 1
    return SKINNY_SIDES[first] ** 2 if first < len(SKINNY_SIDES) else 1 << 62


def _blas_spin_seconds(module: Any, repeats: int = 3) -> float:
    """How long the BLAS's workers spin after a threaded call (a skinny forward, gemv): the
    process's CPU time over wall time, watched in slices of a sleep after the call; the end of
    the last slice that burnt more than ``SPIN_BUSY`` of a core, the longest of ``repeats``.

    CPU time, not timings of the backward itself: what the workers burn is this process's own,
    so other processes' load (a shared machine) slows it but does not hide it.
    """
    a = _inputs((1, SPIN_SIDE, SPIN_SIDE), "float32")
    longest = 0.0
    for _ in range(repeats):  # each call after the last one's watch: its workers asleep
        module.forward(a["X"], a["W"], a["b"], None)
        start = last = time.perf_counter()
        cpu = time.process_time()
        busy_until = 0.0
        while last - start < SPIN_WATCH:
            time.sleep(SPIN_SLICE)
            now, now_cpu = time.perf_counter(), time.process_time()
            if now_cpu - cpu > SPIN_BUSY * (now - last):
                busy_until = now - start
            last, cpu = now, now_cpu
        longest = max(longest, busy_until)
    return round(min(longest, SPIN_WATCH), 3)  # still spinning at the end: the watch's length


def _threads_ratio(controllers: list[Any], threads: int, bits: int, rounds: int,
                   block_time: float) -> tuple[float, float]:
    """A square gemm of about ``2**bits`` multiply-adds (float64, NumPy's BLAS): the time on one
    BLAS thread over that on ``threads``, timed in interleaved blocks: ``(of the minimums, of
    the medians)``."""
    side = round(2 ** (bits / 3))
    rng = np.random.default_rng(0)
    A, B, out = rng.standard_normal((side, side)), rng.standard_normal((side, side)), \
        np.empty((side, side))

    def block(count: int, calls: int) -> float:
        for controller in controllers:
            controller.set_num_threads(count)
        start = time.perf_counter()
        for _ in range(calls):
            np.matmul(A, B, out=out)
        return (time.perf_counter() - start) / calls

    seconds = block(1, 1) + block(threads, 1)
    calls = max(1, int(block_time / max(seconds / 2, 1e-7)))
    rounds = max(3, min(rounds, int(COMPARISON_BUDGET / (calls * seconds))))
    samples: dict[int, list[float]] = {1: [], threads: []}
    for round_index in range(rounds):
        for count in ((1, threads) if round_index % 2 else (threads, 1)):
            samples[count].append(block(count, calls))
    return min(samples[1]) / min(samples[threads]), \
        statistics.median(samples[1]) / statistics.median(samples[threads])


def _blas_threads_min_work(rounds: int, block_time: float) -> int | None:
    """The smallest gemm work (N * D * M) from which the BLAS's thread count changes its time,
    minimum and median alike, by ``THREADS_MATTER`` either way (threads pay on an idle machine,
    cost on a loaded one), at ``THREADS_IN_A_ROW`` probes in a row (at load 5, two small probes
    in a row differed once in 13 runs; on a half-loaded machine a larger probe's ratio may pass
    through 1). Below it OpenBLAS runs one thread whatever its count, so matching the count
    there costs without effect. ``None`` when Numba has one thread (nothing to match) or no
    probes in a row differ."""
    import numba

    from fastlinear.backends import _numba_blas

    threads = numba.get_num_threads()
    controllers = _numba_blas.blas_thread_controllers()
    if threads < 2 or not controllers:
        return None
    before = [c.get_num_threads() for c in controllers]
    differs = []
    try:
        for bits in THREADS_PROBE_BITS:
            ratios = _threads_ratio(controllers, threads, bits, rounds, block_time)
            differs.append(all(not 1 / THREADS_MATTER < r < THREADS_MATTER for r in ratios))
    finally:
        for controller, count in zip(controllers, before, strict=True):
            controller.set_num_threads(count)
    for index in range(len(differs) - THREADS_IN_A_ROW + 1):
        if all(differs[index:index + THREADS_IN_A_ROW]):
            return 1 << THREADS_PROBE_BITS[index]
    return None


class Cell(NamedTuple):
    """One grid cell's timings: seconds per call of each interleaved block, numba's and the
    plain expression's; ``remeasured``: the rounds of the re-measure they come from (0: none)."""

    shape: tuple[int, int, int]
    dtype: str
    pass_name: str
    mine: list[float]
    plain: list[float]
    remeasured: int = 0


def _ratios(mine: list[float], plain: list[float]) -> tuple[float, float]:
    """``plain / numba`` of the medians and of the minimums (above 1: numba faster)."""
    return statistics.median(plain) / statistics.median(mine), min(plain) / min(mine)


def _misses_target(mine: list[float], plain: list[float]) -> bool:
    return _ratios(mine, plain)[0] < TARGET


def _numpy_faster(mine: list[float], plain: list[float]) -> bool:
    """NumPy faster by ``HAND_OVER``, in median and in minimum alike (a shared machine's load
    moves medians both ways; where both make the same BLAS call, only both together say more
    than noise)."""
    return max(_ratios(mine, plain)) * HAND_OVER < 1.0


def _against_plain(module: Any, shapes: tuple[tuple[int, int, int], ...],
                   dtypes: tuple[str, ...], rounds: int, block_time: float,
                   recheck: Callable[[list[float], list[float]], bool],
                   recheck_seconds: float) -> Iterator[Cell]:
    """Every shape, dtype and pass, numba's kernels and the plain NumPy expression timed
    interleaved; a cell where ``recheck(mine, plain)`` holds is timed again with
    ``REMEASURE_FACTOR`` times the rounds (while ``recheck_seconds`` last), and yielded so."""
    for shape in shapes:
        for dtype in dtypes:
            a = _inputs(shape, dtype)
            for pass_name in ("forward", "backward"):
                calls = [_numba_call(module, pass_name, a), _plain_call(pass_name, a)]
                mine, plain = _block_seconds(calls, rounds, block_time)
                cell = Cell(shape, dtype, pass_name, mine, plain)
                if recheck(mine, plain) and recheck_seconds > 0:
                    started = time.perf_counter()
                    mine, plain = _block_seconds(calls, rounds * REMEASURE_FACTOR, block_time,
                                                 min(REMEASURE_SECONDS, recheck_seconds))
                    recheck_seconds -= time.perf_counter() - started
                    cell = cell._replace(mine=mine, plain=plain, remeasured=len(mine))
                yield cell


def _numpy_classes(module: Any, shapes: tuple[tuple[int, int, int], ...],
                   dtypes: tuple[str, ...], rounds: int, block_time: float,
                   recheck_seconds: float = REMEASURE_TOTAL) -> list[str]:
    """Shape classes where the plain NumPy expression beat the backend's kernels by
    ``HAND_OVER`` in median and minimum (``_numpy_faster``), in a re-measure too."""
    return sorted({module.shape_class(cell.pass_name, *cell.shape, cell.dtype)
                   for cell in _against_plain(module, shapes, dtypes, rounds, block_time,
                                              _numpy_faster, recheck_seconds)
                   if _numpy_faster(cell.mine, cell.plain)})


def tune_numba(shapes: tuple[tuple[int, int, int], ...], dtypes: tuple[str, ...],
               rounds: int, block_time: float, log: Callable[[str], None],
               recheck_seconds: float = REMEASURE_TOTAL) -> dict[str, Any]:
    """Measure the numba backend's thresholds; return them (``PROFILE_SCHEMA``'s names).
    ``recheck_seconds``: the time the hand-over decision may spend re-measuring."""
    module = _dispatch.load_backend("numba")
    module.apply_profile({"rows_dot_rows_max_work": 0, "numpy_classes": []})  # measure bare
    rows = _rows_dot_rows_pays(module, dtypes, rounds, block_time)
    log(f"numba small-dX register-blocked path: {'pays' if rows else 'does not pay'} here")
    skinny = _skinny_min_weights(module, rounds, block_time)
    log(f"numba skinny backward from {skinny} weights" if skinny < 1 << 62
        else "numba skinny backward: never (the BLAS path wins)")
    spin = _blas_spin_seconds(module, repeats=1 if rounds < 5 else 3)
    log(f"BLAS workers spin {spin * 1e3:.0f} ms after a threaded call")
    threads_work = _blas_threads_min_work(rounds, block_time)
    log(f"BLAS thread count matters from {threads_work} multiply-adds"
        if threads_work is not None else "BLAS thread count: no difference measured (kept "
        f"{module._numba_blas.BLAS_THREADS_MIN_WORK})")
    handoff = {"blas_spin_seconds": spin}
    if threads_work is not None:
        handoff["blas_threads_min_work"] = threads_work
    module.apply_profile({"rows_dot_rows_max_work": (1 << 18) if rows else 0,
                          "skinny_min_weights": skinny, **handoff})
    classes = _numpy_classes(module, shapes, dtypes, rounds, block_time, recheck_seconds)
    log(f"shape classes handed to NumPy: {', '.join(classes) or 'none'}")
    values = {"rows_dot_rows_max_work": (1 << 18) if rows else 0, "rows_dot_rows_min_m": 96,
              "skinny_min_weights": skinny, "numpy_classes": classes, **handoff}
    module.apply_profile(values)  # in force for the rest of this process
    return values


def tune_cupy(log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(key, thresholds)`` measured on the GPU (``cupy_tune``'s forced-path table), or
    ``None`` where the cupy backend cannot run here."""
    if _dispatch.unavailable_reason("cupy") is not None:
        return None
    from fastlinear.backends import cupy_launch, cupy_tune

    module = _dispatch.load_backend("cupy")
    values = cupy_tune.measure_thresholds()
    cupy_launch.apply_thresholds(values)
    log(f"cupy path thresholds: {values}")
    return module.profile_key(), values


def ratio_table(shapes: tuple[tuple[int, int, int], ...], dtypes: tuple[str, ...],
                rounds: int, block_time: float,
                recheck_seconds: float = REMEASURE_TOTAL) -> list[str]:
    """numba's time over the plain NumPy expression's, at every shape, pass and dtype, with the
    profile in force: ``plain / numba`` (above 1: numba faster). A cell below ``TARGET`` is
    re-measured (``_against_plain``) and reported by the re-measure, marked so; the last line
    counts the cells at the target."""
    module = _dispatch.load_backend("numba")
    lines = [f"{'shape':16} {'dtype':8} {'pass':8} {'numba ms':>9} {'numpy ms':>9} "
             f"{'numpy/numba':>11} {'of minimums':>11}  class"]
    met = total = remeasured = 0
    for cell in _against_plain(module, shapes, dtypes, rounds, block_time, _misses_target,
                               recheck_seconds):
        kind = module.shape_class(cell.pass_name, *cell.shape, cell.dtype)
        notes = " (NumPy)" if kind in module.NUMPY_CLASSES else ""
        if cell.remeasured:
            notes += f" (re-measured, {cell.remeasured} rounds)"
            remeasured += 1
        median, of_minimums = _ratios(cell.mine, cell.plain)
        total += 1
        met += median >= TARGET
        lines.append(f"{grid.shape_text(cell.shape):16} {cell.dtype:8} {cell.pass_name:8} "
                     f"{statistics.median(cell.mine) * 1e3:9.4f} "
                     f"{statistics.median(cell.plain) * 1e3:9.4f} "
                     f"{median:11.3f} {of_minimums:11.3f}  {kind}{notes}")
    lines.append(f"{met} of {total} cells at numpy/numba >= {TARGET} (medians); {remeasured} "
                 f"re-measured ({REMEASURE_FACTOR}x the rounds) after a first figure below it")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastlinear tune",
        description="Measure this machine's crossovers (numba's small-dX and skinny paths, "
                    "numba against NumPy per shape class, the cupy path thresholds on a GPU) "
                    "and store them as the profile the backends read when they load. "
                    "FASTLINEAR_TUNE=off ignores any profile.")
    parser.add_argument("--quick", action="store_true",
                        help="three shapes, few rounds (seconds, for tests and CI); stores "
                             "nothing unless --profile names a file")
    parser.add_argument("--profile", metavar="PATH", default=None,
                        help=f"the profile to write; default fastlinear/{_profile.FILE_NAME} "
                             f"in the user cache directory (resolved when written)")
    parser.add_argument("--table", metavar="PATH", default=None,
                        help="also write the final ratio table to this text file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlinear tune [--quick] [--profile PATH] [--table PATH]``."""
    options = build_parser().parse_args(argv)
    reason = _dispatch.unavailable_reason("numba")
    if reason is not None:
        print(f"tune: nothing to measure on the CPU: {reason}", file=sys.stderr)
        return 1
    shapes = grid.QUICK_SHAPES if options.quick else grid.DEFAULT_SHAPES
    rounds, block_time = (3, 0.005) if options.quick else (15, 0.03)
    recheck_seconds = 0.5 if options.quick else REMEASURE_TOTAL

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    values = tune_numba(shapes, grid.DTYPES, rounds, block_time, log, recheck_seconds)
    path = None
    if not options.quick or options.profile:
        module = _dispatch.load_backend("numba")
        path = _profile.write_section("numba", module.profile_key(), values,
                                      Path(options.profile) if options.profile else None)
    cupy = tune_cupy(log)
    if cupy is not None and path is not None:
        _profile.write_section("cupy", cupy[0], cupy[1], path)
    table = ratio_table(shapes, grid.DTYPES, rounds, block_time, recheck_seconds)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = _profile.cpu_key()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    header = [f"fastlinear tune, {stamp}, {time.perf_counter() - started:.0f} s",
              f"machine: {cpu['cpu']} ({os.cpu_count()} cores; ISA {' '.join(cpu['isa'])}); "
              f"load average at the end {' '.join(f'{x:.1f}' for x in load)}",
              "ratios: medians (and minimums) of interleaved wall-clock blocks, numba "
              "backend's function against the plain NumPy expression, the profile in force",
              f"profile: {path if path is not None else 'not stored (--quick)'}"]
    print("\n".join(header + table))
    if options.table:
        Path(options.table).write_text("\n".join(header + table) + "\n", encoding="utf-8")
    return 0
