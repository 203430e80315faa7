"""Side-by-side benchmark, ``python -m fastlinear bench``: every backend vs NumPy, PyTorch, BLAS.

In one run, for each shape ``(N, D, M)`` and dtype it times

* forward through ``fastlinear.Linear.forward`` (all overhead included), per available backend;
* backward through ``fastlinear.Linear.backward`` (dX, dW and db), per available backend;
* NumPy's bare ``X @ W + b`` and, for backward, its three products ``dY @ W.T``, ``X.T @ dY``,
  ``dY.sum(0)``;
* PyTorch on the CPU when it is importable: ``torch.nn.functional.linear`` and the autograd
  backward of that call (``torch.autograd.grad``);
* the machine's own GEMM rate, ``A @ B`` at the forward's shape (NumPy's BLAS; CuPy's cuBLAS for
  a GPU backend): the ceiling a forward pass can reach;

then prints a table (median time, GFLOP/s, ratios to NumPy, PyTorch and the GEMM ceiling,
backward/forward, peak allocation), the targets of the Numba backend's issue, and writes a PNG plot
of GFLOP/s against problem size. GFLOP/s counts 2·N·D·M flops forward and 4·N·D·M backward (with
dX; db is not counted), so every contender of a pass is scored on the same count.

Method, for noisy shared machines: every contender is warmed up first (Numba compiles on its first
call); then rounds interleave the contenders (A B C A B C ...), one block each per round, rotating
the order from round to round; a block repeats the call enough times to last ``--block-time``
(tiny shapes) and the reported time is the median over rounds. Contenders are grouped by the thread
pools they use (NumPy's BLAS, Numba's, PyTorch's, the GPU); between blocks of different groups the
run sleeps ``--pause`` seconds, so spinning worker threads of one library do not slow the next.
GPU blocks are timed with CUDA events. Peak allocation is what ``tracemalloc`` sees during one
call: NumPy (and NumPy arrays made by a backend) are traced, allocations inside Numba-compiled code
and PyTorch are not.
"""

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np

import fastlinear

__all__ = ["main", "run_benchmark"]

# (N, D, M) = (batch, in_features, out_features); the grid of the Numba backend's issue.
DEFAULT_SHAPES = ((32, 64, 64), (64, 256, 256), (256, 1024, 1024), (1024, 1024, 1024),
                  (2048, 4096, 1024), (8192, 512, 512), (1, 4096, 4096))
QUICK_SHAPES = ((32, 64, 64), (256, 1024, 1024), (1, 4096, 4096))
DEFAULT_DTYPES = ("float32", "float64")
# A shape is "large" for the targets when N·D·M reaches this (1024³ and up), "skinny" when N == 1.
LARGE_SIZE = 1024**3
# "Allocates only its outputs" allows this much more: Python objects and NumPy's ufunc buffer
# (8192 elements) that a broadcast in-place add such as ``Y += b`` takes.
ALLOC_SLACK = 96 * 1024

# Row labels of the baselines (a fastlinear backend's row is ``backend_label(name)``).
NUMPY_LABEL = "NumPy"
TORCH_LABEL = "torch"
GEMM_LABEL = "GEMM A@B"
GPU_GEMM_LABEL = "cuBLAS A@B"
PASSES = ("forward", "backward")


def backend_label(backend):
    """Row label of a fastlinear backend, e.g. ``fastlinear[numba]``."""
    return f"fastlinear[{backend}]"


@dataclass
class Contender:
    """One thing to time: a label (table row), its pass, the thread-pool group it belongs to."""

    label: str
    pass_name: str  # "forward" or "backward"
    group: str  # contenders of one group share thread pools; the run pauses between groups
    call: object  # callable with no arguments
    device: str = "cpu"
    traced: bool = True  # tracemalloc sees its allocations
    synchronize: object = None  # waits for queued device work (GPU)
    event_timer: object = None  # cupy.cuda.Event factory for GPU timing
    calls_per_block: int = 1
    samples: list = field(default_factory=list)
    peak_alloc: int = None


@dataclass
class CaseResult:
    """Medians of every contender at one shape and dtype."""

    shape: tuple
    dtype: str
    rounds: int
    rows: list  # dicts, one per contender


def parse_shapes(text):
    """``"32x64x64,1x4096x4096"`` -> ``((32, 64, 64), (1, 4096, 4096))``."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().replace("×", "x").split("x")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"a shape is NxDxM (e.g. 256x1024x1024), got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return tuple(shapes)


def parse_names(text):
    """Comma-separated list of names, stripped and lower-cased."""
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def shape_text(shape):
    return "x".join(str(size) for size in shape)


def format_seconds(seconds):
    """Time with a unit that keeps three significant digits readable."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_ratio(value):
    return "-" if value is None else f"{value:.2f}"


# --------------------------------------------------------------------------------------------
# The machine: versions, threads, the exact command
# --------------------------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_revision():
    """Short commit of the fastlinear source tree, with ``+dirty`` for local changes, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def module_version(name):
    """Version of an installed module without importing heavy ones twice; None if absent."""
    module = sys.modules.get(name)
    if module is None:
        if importlib.util.find_spec(name) is None:
            return None
        module = importlib.import_module(name)
    return getattr(module, "__version__", "?")


def thread_report(torch_module):
    """Thread pools in this process: BLAS/OpenMP libraries (threadpoolctl), Numba, PyTorch."""
    pools = []
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pools.append("threadpoolctl not installed (BLAS threads unknown)")
    else:
        for info in threadpool_info():
            # The package that ships the library: ".../site-packages/torch/lib/libgomp.so" -> torch
            path = info.get("filepath", "")
            owner = (path.partition("-packages" + os.sep)[2].split(os.sep)[0]
                     or os.path.basename(path))
            pools.append(f"{info.get('internal_api')} {info.get('version') or ''} [{owner}] "
                         f"{info.get('num_threads')} threads".replace("  ", " "))
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            layer = f"{numba.config.THREADING_LAYER} (not started)"
        pools.append(f"numba {numba.get_num_threads()} threads, layer {layer}")
    if torch_module is not None:
        pools.append(f"torch {torch_module.get_num_threads()} intra-op threads")
    return pools


def machine_report(argv, torch_module, backends_status):
    """Header lines: date, command, machine, versions, thread counts, backends."""
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = [f"python {platform.python_version()}",
                f"fastlinear {fastlinear.__version__} (git {git_revision() or 'unknown'})"]
    for name in ("numpy", "numba", "scipy", "torch", "cupy"):
        version = module_version(name) if name != "torch" or torch_module else None
        if name == "torch" and torch_module is None:
            versions.append("torch not used")
        else:
            versions.append(f"{name} {version or 'not installed'}")
    backends = [f"{name} " + ("ok" if reason is None else f"unavailable ({reason})")
                for name, reason in backends_status.items()]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {
        "date": now,
        "command": shlex.join([sys.executable, "-m", "fastlinear", "bench", *argv]),
        "machine": f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} logical CPUs"
                   f"{memory}{load}",
        "versions": ", ".join(versions),
        "threads": thread_report(torch_module),
        "backends": backends,
    }


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------

def import_torch(wanted):
    """PyTorch when wanted and importable, else None (it is never a dependency)."""
    if not wanted or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def backend_group(backend):
    """Thread-pool group of a fastlinear backend: the NumPy one shares NumPy's BLAS threads."""
    return "numpy" if backend == "numpy" else backend


def make_contenders(shape, dtype, backends, torch_module, rng):
    """Every contender at one shape and dtype, all on the same random data."""
    N, D, M = shape
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype) * (1 / math.sqrt(max(D, 1)))
    b = rng.standard_normal(M).astype(dtype)
    dY = rng.standard_normal((N, M)).astype(dtype)
    contenders = []

    # Baselines on NumPy's BLAS: the bare expressions a user would write, and the GEMM ceiling.
    contenders += [
        Contender(NUMPY_LABEL, "forward", "numpy", lambda: X @ W + b),
        Contender(NUMPY_LABEL, "backward", "numpy",
                  lambda: (dY @ W.T, X.T @ dY, dY.sum(axis=0))),
        Contender(GEMM_LABEL, "forward", "numpy", lambda: X @ W),
    ]

    for backend in backends:
        layer = fastlinear.Linear(D, M, dtype=dtype, backend=backend)
        xp = importlib.import_module(type(layer.W).__module__.partition(".")[0])
        layer.W, layer.b = xp.asarray(W), xp.asarray(b)
        X_b, dY_b = xp.asarray(X), xp.asarray(dY)
        layer.forward(X_b)  # caches X for backward
        if xp is np:
            contenders += [
                Contender(backend_label(backend), "forward", backend_group(backend),
                          lambda layer=layer, X_b=X_b: layer.forward(X_b)),
                Contender(backend_label(backend), "backward", backend_group(backend),
                          lambda layer=layer, dY_b=dY_b: layer.backward(dY_b)),
            ]
        else:  # a GPU backend: CUDA-event timing, and the device's own GEMM as its ceiling
            gpu = {"device": "gpu", "traced": False,
                   "synchronize": xp.cuda.get_current_stream().synchronize,
                   "event_timer": xp.cuda.Event}
            contenders += [
                Contender(backend_label(backend), "forward", backend,
                          lambda layer=layer, X_b=X_b: layer.forward(X_b), **gpu),
                Contender(backend_label(backend), "backward", backend,
                          lambda layer=layer, dY_b=dY_b: layer.backward(dY_b), **gpu),
            ]
            if not any(c.label == GPU_GEMM_LABEL for c in contenders):
                W_b = layer.W
                contenders.append(Contender(GPU_GEMM_LABEL, "forward", backend,
                                            lambda X_b=X_b, W_b=W_b: X_b @ W_b, **gpu))

    if torch_module is not None:
        torch = torch_module
        functional = torch.nn.functional
        X_t, b_t = torch.from_numpy(X), torch.from_numpy(b)
        W_t = torch.from_numpy(np.ascontiguousarray(W.T))  # PyTorch's weight is (M, D) = W.T
        inputs = [t.clone().requires_grad_(True) for t in (X_t, W_t, b_t)]
        Y_graph = functional.linear(*inputs)
        dY_t = torch.from_numpy(dY)
        contenders += [
            # No tensor requires grad here, so no graph is recorded: the bare inference call.
            Contender(TORCH_LABEL, "forward", "torch", lambda: functional.linear(X_t, W_t, b_t),
                      traced=False),
            Contender(TORCH_LABEL, "backward", "torch",
                      lambda: torch.autograd.grad(Y_graph, inputs, dY_t, retain_graph=True),
                      traced=False),
        ]
    return contenders


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

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
    contender.calls_per_block = max(1, min(1 << 20, math.ceil(block_time / max(single, 1e-9))))
    return single * contender.calls_per_block


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


def run_case(shape, dtype, contenders, options, progress):
    """Warm up, then time the contenders in interleaved rounds; return a ``CaseResult``."""
    round_time = sum(warm_up(c, options.block_time) for c in contenders)
    groups = []
    for contender in contenders:
        group = next((g for g in groups if g[0].group == contender.group), None)
        if group is None:
            groups.append([contender])
        else:
            group.append(contender)
    round_time += len(groups) * options.pause if len(groups) > 1 else 0.0
    rounds = options.repeat
    if options.case_budget and round_time * rounds > options.case_budget:
        rounds = max(options.min_repeat, int(options.case_budget // max(round_time, 1e-9)))
    previous_group = None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            # Rotate the order of groups, and of contenders in a group, from round to round.
            shift = round_index % len(groups)
            for group in groups[shift:] + groups[:shift]:
                if previous_group is not None and previous_group != group[0].group:
                    time.sleep(options.pause)
                previous_group = group[0].group
                inner = round_index % len(group)
                for contender in group[inner:] + group[:inner]:
                    contender.samples.append(time_block(contender, contender.calls_per_block))
            progress(1 / rounds)
    finally:
        if gc_was_enabled:
            gc.enable()
    return CaseResult(shape, dtype, rounds, summarize(shape, dtype, contenders))


def summarize(shape, dtype, contenders):
    """One row per contender: median, quartiles, GFLOP/s, ratios, peak allocation."""
    N, D, M = shape
    itemsize = np.dtype(dtype).itemsize
    flops = {"forward": 2 * N * D * M, "backward": 4 * N * D * M}
    output_bytes = {"forward": N * M * itemsize, "backward": (N * D + D * M + M) * itemsize}
    median = {}
    for c in contenders:
        median[c.label, c.pass_name] = float(np.median(c.samples))

    def speedup(reference, label, pass_name):
        ref = median.get((reference, pass_name))
        own = median[label, pass_name]
        return None if ref is None or own <= 0 else ref / own

    rows = []
    for c in contenders:
        q1, q3 = np.percentile(c.samples, [25, 75])
        own = median[c.label, c.pass_name]
        ceiling = GPU_GEMM_LABEL if c.device == "gpu" else GEMM_LABEL
        row = {
            "label": c.label, "pass": c.pass_name, "device": c.device, "group": c.group,
            "shape": list(shape), "dtype": dtype,
            "median_s": own, "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(min(c.samples)),
            "spread": float((q3 - q1) / own) if own > 0 else None,
            "samples_s": [float(s) for s in c.samples], "calls_per_block": c.calls_per_block,
            "gflops": flops[c.pass_name] / own / 1e9 if own > 0 else None,
            "vs_numpy": speedup(NUMPY_LABEL, c.label, c.pass_name),
            "vs_torch": speedup(TORCH_LABEL, c.label, c.pass_name),
            "vs_gemm": speedup(ceiling, c.label, c.pass_name) if c.pass_name == "forward" else None,
            "backward_over_forward": None,
            "peak_alloc_bytes": c.peak_alloc,
            "output_bytes": output_bytes[c.pass_name],
            "extra_alloc_kib": (None if c.peak_alloc is None
                                else (c.peak_alloc - output_bytes[c.pass_name]) / 1024),
            "alloc_over_outputs": (c.peak_alloc / output_bytes[c.pass_name]
                                   if c.peak_alloc is not None and output_bytes[c.pass_name]
                                   else None),
        }
        if c.pass_name == "backward" and (c.label, "forward") in median:
            row["backward_over_forward"] = own / median[c.label, "forward"]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Report: tables, targets, plot
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = {
    "forward": [("median", 9), ("±IQR", 5), ("GFLOP/s", 8), ("xNumPy", 7), ("xtorch", 7),
                ("xGEMM", 6), ("alloc/Y", 8)],
    "backward": [("median", 9), ("±IQR", 5), ("GFLOP/s", 8), ("xNumPy", 7), ("xtorch", 7),
                 ("bwd/fwd", 7), ("alloc/out", 9)],
}
TABLE_TITLES = {
    "forward": "Forward  Y = X @ W + b   (backends: Linear.forward; NumPy: X @ W + b; "
               "torch: F.linear; GEMM: A @ B, the ceiling; 2·N·D·M flops)",
    "backward": "Backward dX, dW, db   (backends: Linear.backward; NumPy: dY @ W.T, X.T @ dY, "
                "dY.sum(0); torch: autograd; 4·N·D·M flops)",
}


def row_cells(row):
    spread = "-" if row["spread"] is None else f"{100 * row['spread']:.0f}%"
    gflops = "-" if row["gflops"] is None else f"{row['gflops']:.3g}"
    alloc = "n/a" if row["alloc_over_outputs"] is None else f"{row['alloc_over_outputs']:.2f}"
    fifth = row["vs_gemm"] if row["pass"] == "forward" else row["backward_over_forward"]
    return [format_seconds(row["median_s"]), spread, gflops, format_ratio(row["vs_numpy"]),
            format_ratio(row["vs_torch"]), format_ratio(fifth), alloc]


def format_tables(cases):
    """The forward and backward tables, one block per dtype, shapes in run order."""
    lines = []
    label_width = max([len(r["label"]) for case in cases for r in case.rows] + [9])
    shape_width = max([len(shape_text(case.shape)) for case in cases] + [11])
    for pass_name in PASSES:
        columns = TABLE_COLUMNS[pass_name]
        header = (f"{'N x D x M':<{shape_width}}  {'contender':<{label_width}}  "
                  + "  ".join(f"{title:>{width}}" for title, width in columns))
        lines += ["", TABLE_TITLES[pass_name]]
        for dtype in dict.fromkeys(case.dtype for case in cases):
            lines += ["", f"[{dtype}]", header, "-" * len(header)]
            for case in (c for c in cases if c.dtype == dtype):
                first = True
                for row in (r for r in case.rows if r["pass"] == pass_name):
                    cells = row_cells(row)
                    lines.append(
                        f"{shape_text(case.shape) if first else '':<{shape_width}}  "
                        f"{row['label']:<{label_width}}  "
                        + "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns,
                                                                          strict=True)))
                    first = False
    lines += ["", "xNumPy, xtorch, xGEMM: speed-ups, the other's median time / this one's (> 1 is "
              "faster; xGEMM is also the fraction of the GEMM ceiling reached). bwd/fwd: this "
              "contender's backward time / its forward time. ±IQR: interquartile range of the "
              "rounds / median. alloc/Y, alloc/out: peak bytes tracemalloc saw allocated during "
              "one call / bytes of the outputs (Y; dX + dW + db); 1.00 = nothing but the "
              "outputs, n/a = not traceable (torch, GPU); Numba-compiled code's own allocations "
              "are invisible to it."]
    return lines


def target_checks(cases, backend):
    """The Numba issue's targets, evaluated for one backend: (text, worst value, where, ok)."""
    def rows(pass_name, which):
        for case in cases:
            N, D, M = case.shape
            if which == "large" and N * D * M < LARGE_SIZE:
                continue
            if which == "skinny" and N != 1:
                continue
            for row in case.rows:
                if row["label"] == backend_label(backend) and row["pass"] == pass_name:
                    yield f"{shape_text(case.shape)} {case.dtype}", row

    specs = [
        ("forward vs NumPy X @ W + b >= 1.00, every shape", "forward", "all", "vs_numpy", 1.00,
         min),
        ("forward vs torch F.linear >= 1.10, large shapes", "forward", "large", "vs_torch", 1.10,
         min),
        ("forward vs GEMM A @ B >= 0.97, large shapes", "forward", "large", "vs_gemm", 0.97, min),
        ("backward / forward <= 2.05, large shapes", "backward", "large",
         "backward_over_forward", 2.05, max),
        ("skinny backward vs NumPy's 3 products >= 4.00", "backward", "skinny", "vs_numpy", 4.00,
         min),
        ("forward allocates only Y (+ <= 96 KiB), KiB", "forward", "all", "extra_alloc_kib",
         ALLOC_SLACK / 1024, max),
        ("backward allocates only dX, dW, db (+ <= 96 KiB), KiB", "backward", "all",
         "extra_alloc_kib", ALLOC_SLACK / 1024, max),
    ]
    checks = []
    for text, pass_name, which, key, bound, worst in specs:
        values = [(row[key], where) for where, row in rows(pass_name, which)
                  if row[key] is not None]
        if not values:
            checks.append((text, None, "not measured", None))
            continue
        value, where = worst(values, key=lambda item: item[0])
        ok = value >= bound if worst is min else value <= bound
        checks.append((text, value, where, ok))
    return checks


def format_targets(cases, backends):
    lines = ["", "Targets (the Numba backend's issue; large = N·D·M >= 1024^3, skinny = N == 1):"]
    for backend in backends:
        lines.append(f"  {backend_label(backend)}:")
        for text, value, where, ok in target_checks(cases, backend):
            verdict = "-" if ok is None else ("ok" if ok else "MISS")
            shown = "-" if value is None else f"{value:.2f}"
            lines.append(f"    {text:<56} worst {shown:>7} at {where:<24} {verdict}")
    return lines


def plot(cases, path, header):
    """PNG: GFLOP/s against problem size, one panel per pass and dtype, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(case.dtype for case in cases))
    shapes = sorted(dict.fromkeys(case.shape for case in cases), key=lambda s: (math.prod(s), s))
    labels = list(dict.fromkeys(r["label"] for case in cases for r in case.rows))
    palette = plt.get_cmap("tab10").colors
    style = {}
    for index, label in enumerate(x for x in labels if x not in (GEMM_LABEL, GPU_GEMM_LABEL,
                                                                 NUMPY_LABEL)):
        style[label] = {"color": palette[index % len(palette)], "marker": "o", "lw": 2}
    style[NUMPY_LABEL] = {"color": "0.45", "marker": "s", "lw": 1.5}
    style[GEMM_LABEL] = {"color": "black", "marker": "", "lw": 1.2, "ls": "--"}
    style[GPU_GEMM_LABEL] = {"color": "black", "marker": "", "lw": 1.2, "ls": ":"}

    figure, axes = plt.subplots(len(PASSES), len(dtypes), figsize=(6.2 * len(dtypes), 8.6),
                                squeeze=False, sharex=True, layout="constrained")
    positions = {shape: index for index, shape in enumerate(shapes)}
    for row_index, pass_name in enumerate(PASSES):
        for col_index, dtype in enumerate(dtypes):
            ax = axes[row_index][col_index]
            for label in labels:
                points = sorted(
                    (positions[case.shape], r["gflops"]) for case in cases
                    if case.dtype == dtype for r in case.rows
                    if r["label"] == label and r["pass"] == pass_name and r["gflops"])
                if points:
                    xs, ys = zip(*points, strict=True)
                    name = f"{label} (ceiling)" if label in (GEMM_LABEL, GPU_GEMM_LABEL) else label
                    ax.plot(xs, ys, label=name, markersize=4, **style[label])
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda value, _: f"{value:g}" if str(f"{value:g}")[0] in "25" else ""))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.grid(True, which="major", alpha=0.35)
            ax.grid(True, which="minor", alpha=0.12)
            flop_count = "2·N·D·M" if pass_name == "forward" else "4·N·D·M"
            ax.set_title(f"{pass_name}, {dtype}", fontsize=11)
            if col_index == 0:
                ax.set_ylabel(f"GFLOP/s ({flop_count} flops / median time)")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{shape_text(s)}\n{2 * math.prod(s) / 1e9:.2g} GF"
                                for s in shapes], rotation=35, ha="right", fontsize=8)
            if row_index == len(PASSES) - 1:
                ax.set_xlabel("N x D x M, sorted by problem size (forward GFLOP)")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # union of the lines of all panels, first appearance order
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6),
                  frameon=False)
    machine = header["machine"].split(", load")[0]
    threads = []
    for pool in header["threads"]:  # "openblas 0.3.31 [numpy.libs] 2 threads" -> "openblas 2"
        count = re.search(r"(\d+) (?:intra-op )?threads", pool)
        owner = re.search(r"\[(.*)\]", pool)
        if count:
            threads.append(f"{pool.split()[0]}{f' ({owner.group(1)})' if owner else ''} "
                           f"{count.group(1)}")
    figure.suptitle(f"fastlinear bench, {header['date']}: {machine}\n{header['versions']}\n"
                    f"threads: {', '.join(threads)}", fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

class _TextProgress:
    """Stand-in for tqdm when it is not installed: one line per finished case on stderr."""

    def __init__(self, total, **_):
        self.total, self.done = total, 0.0

    def update(self, amount):
        self.done += amount

    def set_postfix_str(self, text):
        print(f"  [{self.done:.0f}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self):
        pass


def make_progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextProgress(total)
    if not sys.stderr.isatty():  # a log file: one line per case, not a redrawn bar
        return _TextProgress(total)
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} cases [{elapsed}<{remaining}]{postfix}")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m fastlinear bench",
        description="Time every available fastlinear backend side by side with NumPy's X @ W + b,"
                    " PyTorch (when installed) and the machine's GEMM rate; print a table and "
                    "write a PNG plot.")
    parser.add_argument("--quick", action="store_true",
                        help=f"a few shapes ({', '.join(map(shape_text, QUICK_SHAPES))}), "
                             "fewer rounds, shorter blocks: a smoke test in seconds")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated NxDxM list; default: the Numba issue's grid "
                             f"{','.join(map(shape_text, DEFAULT_SHAPES))}")
    parser.add_argument("--dtypes", type=parse_names, default=DEFAULT_DTYPES,
                        help="comma-separated dtypes; default float32,float64")
    parser.add_argument("--backends", type=parse_names, default=None,
                        help="comma-separated fastlinear backends; default: every available one")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds per case (the median is over rounds); default 7, --quick 3")
    parser.add_argument("--block-time", type=float, default=None,
                        help="seconds a timed block lasts at least (tiny shapes repeat the call); "
                             "default 0.02, --quick 0.005")
    parser.add_argument("--pause", type=float, default=0.3,
                        help="seconds to sleep between blocks of different libraries; "
                             "default 0.3")
    parser.add_argument("--case-budget", type=float, default=None,
                        help="seconds one shape x dtype may take; large shapes get fewer rounds "
                             "(at least 3); default 12, --quick 4, 0 = no limit")
    parser.add_argument("--plot", metavar="PATH", default="bench.png",
                        help="PNG to write, default bench.png ('' for none)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write every sample, median and ratio, with the header, as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs; default 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_options(options):
    """Fill the defaults that depend on --quick."""
    quick = options.quick
    if options.shapes is None:
        options.shapes = QUICK_SHAPES if quick else DEFAULT_SHAPES
    if options.repeat is None:
        options.repeat = 3 if quick else 7
    if options.block_time is None:
        options.block_time = 0.005 if quick else 0.02
    if options.case_budget is None:
        options.case_budget = 4.0 if quick else 12.0
    options.min_repeat = min(3, options.repeat)
    if options.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    for dtype in options.dtypes:
        if dtype not in ("float16", "float32", "float64"):
            raise SystemExit(f"--dtypes: expected float32, float64 (float16 on a GPU), got {dtype}")
    return options


def run_benchmark(options, argv=(), out=None):
    """Run the whole comparison for parsed ``options``; print the report; return it as a dict."""
    out = sys.stdout if out is None else out
    status = fastlinear.available_backends()
    if options.backends is None:
        backends = [name for name, reason in status.items() if reason is None]
    else:
        unknown = [name for name in options.backends if name not in status]
        if unknown:
            raise SystemExit(f"--backends: unknown {unknown}; registered: {list(status)}")
        backends = [name for name in options.backends if status[name] is None]
        for name in options.backends:
            if status[name] is not None:
                print(f"note: skipping backend {name}: {status[name]}", file=sys.stderr)
    torch_module = import_torch(not options.no_torch)

    # A throw-away case per dtype loads every library, starts its threads and compiles the
    # Numba kernels, so the header's thread report is complete and no case pays for it.
    rng = np.random.default_rng(options.seed)
    for dtype in options.dtypes:
        for contender in make_contenders((4, 8, 8), dtype, backends, torch_module, rng):
            contender.call()

    header = machine_report(list(argv), torch_module, status)
    header["method"] = (f"median over up to {options.repeat} interleaved rounds per case "
                        f"(>= {options.min_repeat} when --case-budget {options.case_budget:g} s "
                        f"is short), blocks >= {options.block_time * 1e3:g} ms, "
                        f"{options.pause:g} s pause between libraries")
    print(f"fastlinear bench, {header['date']}", file=out)
    if hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.75 * (os.cpu_count() or 1):
        header["note"] = (f"other processes keep the CPUs busy (load average "
                          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): expect noise, "
                          f"read the ±IQR column")
    for key in ("command", "machine", "versions", "backends", "threads", "method", "note"):
        value = header.get(key)
        if value is None:
            continue
        print(f"{key + ':':<10}{'; '.join(value) if isinstance(value, list) else value}", file=out)
    out.flush()

    cases = []
    total = len(options.shapes) * len(options.dtypes)
    progress = make_progress(total, not options.no_progress)
    try:
        for dtype in options.dtypes:
            for shape in options.shapes:
                if progress is not None:
                    progress.set_postfix_str(f"{shape_text(shape)} {dtype}")
                contenders = make_contenders(shape, dtype, backends, torch_module, rng)
                cases.append(run_case(shape, dtype, contenders, options,
                                      progress.update if progress else (lambda _: None)))
                del contenders
    finally:
        if progress is not None:
            progress.close()

    header["threads"] = thread_report(torch_module)  # as they ended up
    if hasattr(os, "getloadavg"):
        header["load_average_at_end"] = list(os.getloadavg())
    lines = format_tables(cases) + format_targets(cases, backends)
    print("\n".join(lines), file=out)
    report = {
        "header": header,
        "shapes": [list(s) for s in options.shapes],
        "dtypes": list(options.dtypes),
        "backends": backends,
        "cases": [{"shape": list(c.shape), "dtype": c.dtype, "rounds": c.rounds, "rows": c.rows}
                  for c in cases],
        "targets": {backend: [{"target": text, "worst": value, "at": where, "ok": ok}
                              for text, value, where, ok in target_checks(cases, backend)]
                    for backend in backends},
    }
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"\nJSON written to {options.json}", file=out)
    if options.plot:
        try:
            plot(cases, options.plot, header)
        except ImportError:
            print('\nno plot: matplotlib is missing (pip install "fastlinear[bench]")', file=out)
        else:
            print(f"{'' if options.json else chr(10)}plot written to {options.plot}", file=out)
    return report


def main(argv=None):
    """``python -m fastlinear bench [options]``; ``--help`` lists them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = resolve_options(build_parser().parse_args(argv))
    run_benchmark(options, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
