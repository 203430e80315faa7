"""The timing core of both benchmark tools: warm-up, blocks of calls, interleaved rounds.

Method, for noisy shared machines: every contender is warmed up first (Numba compiles on its first
call); then rounds interleave the contenders (A B C A B C ...), one block each per round, rotating
the order from round to round; a block repeats the call enough times to last ``block_time`` (tiny
shapes) and the reported time is the median over rounds. Contenders are grouped by the thread
pools they use (NumPy's BLAS, Numba's, PyTorch's, the GPU); between blocks of different groups the
run sleeps ``pause`` seconds, so spinning worker threads of one library do not slow the next.
GPU blocks are timed with CUDA events, never a bare host clock around asynchronous work.
Peak allocation is what ``tracemalloc`` sees during one call: NumPy (and NumPy arrays made by a
backend) are traced, allocations inside Numba-compiled code and PyTorch are not.
"""

import gc
import importlib
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastlinear import _arrays

# Calls in one block never exceed this, however fast the call.
MAX_CALLS_PER_BLOCK = 1 << 20


@dataclass
class Contender:
    """One thing to time: a label (table row), its pass, the thread-pool group it belongs to."""

    label: str
    pass_name: str  # "forward", "backward" or "step" (forward then backward)
    group: str  # contenders of one group share thread pools; the run pauses between groups
    call: Callable[[], Any]
    device: str = "cpu"
    traced: bool = True  # tracemalloc sees its allocations
    synchronize: Callable[[], Any] | None = None  # waits for queued device work (GPU)
    event_timer: Callable[[], Any] | None = None  # cupy.cuda.Event factory for GPU timing
    calls_per_block: int = 1
    samples: list[float] = field(default_factory=list)
    peak_alloc: int | None = None


@dataclass
class Case:
    """Contenders timed against each other in one set of rounds: one block of a table."""

    table: str  # "layer", "training" or "fused"
    name: str  # the row heading: "256x1024x1024", "32" (a batch), "32x64x128 step"
    shape: tuple[int, ...]  # (N, D, M) of a layer; (batch, *layer widths) for a training step
    dtype: str
    flops: dict[str, int]  # pass name -> flops of one call
    contenders: list[Contender]
    output_bytes: dict[str, int] = field(default_factory=dict)  # pass name -> bytes of outputs
    rounds: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per contender, once timed


# The array library of an array: numpy, or cupy for the GPU backend's arrays.
array_module = _arrays.namespace


def device_timing(xp):
    """Contender fields that time work queued on ``xp``'s device: CUDA events for CuPy; none for
    NumPy, whose calls return when their work is done."""
    if xp.__name__ != "cupy":
        return {}
    return {"device": "gpu", "traced": False,
            "synchronize": xp.cuda.get_current_stream().synchronize,
            "event_timer": xp.cuda.Event}


def time_block(contender, calls):
    """Seconds per call over ``calls`` back-to-back calls (device work included)."""
    call = contender.call
    if contender.event_timer is not None:
        start, end = contender.event_timer(), contender.event_timer()
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        cupy = importlib.import_module("cupy")
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls
    start = time.perf_counter()
    for _ in range(calls):
        call()
    if contender.synchronize is not None:
        contender.synchronize()
    return (time.perf_counter() - start) / calls


def measure_peak_alloc(contender):
    """(bytes ``tracemalloc`` sees allocated at the peak of one call, seconds of that call);
    ``(None, None)`` without a call where tracemalloc cannot see the allocations."""
    if not contender.traced:
        return None, None
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        result = contender.call()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return max(0, peak - base), seconds


def warm_up(contender, block_time):
    """Run until JIT compilation and thread start-up are over, record the peak allocation of one
    call, set ``calls_per_block``; return the expected seconds of one block."""
    contender.call()  # compiles (Numba), loads kernels (GPU), starts thread pools
    # The second call shows the peak allocation and, timed, sizes the blocks: tracemalloc costs a
    # little per allocation, a handful per call, so a long call's time stays right; short calls
    # (and device work, which only events time) are timed again without it.
    contender.peak_alloc, single = measure_peak_alloc(contender)
    if single is None or single < block_time:
        single = min(time_block(contender, 1) for _ in range(3))
    contender.calls_per_block = max(1, min(MAX_CALLS_PER_BLOCK,
                                           math.ceil(block_time / max(single, 1e-9))))
    return single * contender.calls_per_block


def thread_pool_groups(contenders):
    """The contenders grouped by ``group``, groups in order of first appearance."""
    groups = {}
    for contender in contenders:
        groups.setdefault(contender.group, []).append(contender)
    return list(groups.values())


def rounds_within_budget(round_time, repeat, min_repeat, budget):
    """Rounds to run: ``repeat``, fewer (at least ``min_repeat``) when they exceed ``budget`` s."""
    if budget and round_time * repeat > budget:
        return max(min_repeat, int(budget // max(round_time, 1e-9)))
    return repeat


def run_rounds(contenders, rounds, pause, progress=None):
    """Time ``rounds`` interleaved rounds of warmed-up contenders into their ``samples``."""
    groups = thread_pool_groups(contenders)
    previous_group = None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            # Rotate the order of groups, and of contenders in a group, from round to round.
            shift = round_index % len(groups)
            for group in groups[shift:] + groups[:shift]:
                if previous_group is not None and previous_group != group[0].group:
                    time.sleep(pause)
                previous_group = group[0].group
                inner = round_index % len(group)
                for contender in group[inner:] + group[:inner]:
                    contender.samples.append(time_block(contender, contender.calls_per_block))
            if progress is not None:
                progress(1 / rounds)
    finally:
        if gc_was_enabled:
            gc.enable()


def warm_up_case(case, block_time):
    """Warm up every contender of ``case``; drop, with a note, those whose backend raises
    NotImplementedError (a backend that cannot do this case yet); return the round's seconds."""
    round_time, kept = 0.0, []
    for contender in case.contenders:
        try:
            round_time += warm_up(contender, block_time)
        except NotImplementedError as exc:
            print(f"note: {contender.label} left out of {case.name} {case.dtype}: {exc}",
                  file=sys.stderr)
        else:
            kept.append(contender)
    case.contenders = kept
    return round_time


def time_case(case, options, progress=None):
    """Warm up, then time the case's contenders in interleaved rounds; set ``case.rounds``."""
    round_time = warm_up_case(case, options.block_time)
    groups = len(thread_pool_groups(case.contenders))
    round_time += groups * options.pause if groups > 1 else 0.0
    case.rounds = rounds_within_budget(round_time, options.repeat, options.min_repeat,
                                       options.case_budget)
    run_rounds(case.contenders, case.rounds, options.pause, progress)
    return case


def median_seconds(call, *, block_time=0.02, rounds=5, **timing):
    """Median seconds of one ``call`` over ``rounds`` blocks of at least ``block_time`` s each:
    the same warm-up and blocks as the side-by-side run, for one contender alone (asv's track_
    benchmarks). ``timing`` are ``device_timing`` fields."""
    contender = Contender("", "", "", call, **{"traced": False, **timing})
    warm_up(contender, block_time)
    run_rounds([contender], rounds, pause=0.0)
    return float(np.median(contender.samples))
