"""The benchmark's results: one row per contender (medians, GFLOP/s, ratios), tables, header."""

import math

import numpy as np

from fastlinear.bench.contenders import (
    FLOOR_LABEL,
    GEMM_LABEL,
    GPU_GEMM_LABEL,
    JAX_LABEL,
    NUMPY_LABEL,
    TORCH_LABEL,
)

PASSES = ("forward", "backward")


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
# Rows
# --------------------------------------------------------------------------------------------

def _alloc_fields(peak_alloc, output_bytes):
    """Peak allocation against the bytes of the outputs (None where either is unknown)."""
    return {
        "peak_alloc_bytes": peak_alloc,
        "output_bytes": output_bytes,
        "extra_alloc_kib": (None if peak_alloc is None or output_bytes is None
                            else (peak_alloc - output_bytes) / 1024),
        "alloc_over_outputs": (peak_alloc / output_bytes
                               if peak_alloc is not None and output_bytes else None),
    }


def _speedup(medians, reference, contender):
    ref = medians.get((reference, contender.pass_name))
    own = medians[contender.label, contender.pass_name]
    return None if ref is None or own <= 0 else ref / own


def _row(case, contender, medians):
    own = medians[contender.label, contender.pass_name]
    q1, q3 = np.percentile(contender.samples, [25, 75])
    ceiling = GPU_GEMM_LABEL if contender.device == "gpu" else GEMM_LABEL
    flops = case.flops[contender.pass_name]
    row = {
        "label": contender.label, "pass": contender.pass_name, "device": contender.device,
        "group": contender.group, "shape": list(case.shape), "dtype": case.dtype,
        "median_s": own, "q1_s": float(q1), "q3_s": float(q3),
        "min_s": float(min(contender.samples)),
        "spread": float((q3 - q1) / own) if own > 0 else None,
        "samples_s": [float(s) for s in contender.samples],
        "calls_per_block": contender.calls_per_block,
        "gflops": flops / own / 1e9 if own > 0 else None,
        "vs_numpy": _speedup(medians, NUMPY_LABEL, contender),
        "vs_torch": _speedup(medians, TORCH_LABEL, contender),
        "vs_gemm": (_speedup(medians, ceiling, contender)
                    if contender.pass_name == "forward" else None),
        "backward_over_forward": None,
        "vs_jax": _speedup(medians, JAX_LABEL, contender),
        "vs_floor": _speedup(medians, FLOOR_LABEL, contender),
    }
    if contender.pass_name == "backward" and (contender.label, "forward") in medians:
        row["backward_over_forward"] = own / medians[contender.label, "forward"]
    row.update(_alloc_fields(contender.peak_alloc, case.output_bytes.get(contender.pass_name)))
    return row


def summarize(case):
    """Set ``case.rows``: one dict per contender with its median, quartiles, GFLOP/s, speed-ups
    over NumPy, PyTorch and the GEMM ceiling (forward), backward/forward and peak allocation."""
    medians = {(c.label, c.pass_name): float(np.median(c.samples)) for c in case.contenders}
    case.rows = [_row(case, c, medians) for c in case.contenders]
    return case.rows


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

def _spread(row):
    return "-" if row["spread"] is None else f"{100 * row['spread']:.0f}%"


def _gflops(row):
    return "-" if row["gflops"] is None else f"{row['gflops']:.3g}"


def _alloc(row):
    return "n/a" if row["alloc_over_outputs"] is None else f"{row['alloc_over_outputs']:.2f}"


# (title, width, cell) per column; the first five are common to every table.
COMMON_COLUMNS = [("median", 9, lambda r: format_seconds(r["median_s"])), ("±IQR", 5, _spread),
                  ("GFLOP/s", 8, _gflops), ("xNumPy", 7, lambda r: format_ratio(r["vs_numpy"])),
                  ("xtorch", 7, lambda r: format_ratio(r["vs_torch"]))]
GEMM_COLUMN = ("xGEMM", 6, lambda r: format_ratio(r["vs_gemm"]))
TABLES = {
    # table key: (title, heading of the case column, columns, passes shown)
    "forward": (
        "Forward  Y = X @ W + b   (backends: Linear.forward; NumPy: X @ W + b; torch: F.linear; "
        "GEMM: A @ B, the ceiling; 2·N·D·M flops)",
        "N x D x M", [*COMMON_COLUMNS, GEMM_COLUMN, ("alloc/Y", 8, _alloc)], ("forward",)),
    "backward": (
        "Backward dX, dW, db   (backends: Linear.backward; NumPy: dY @ W.T, X.T @ dY, dY.sum(0); "
        "torch: autograd; 4·N·D·M flops)",
        "N x D x M", [*COMMON_COLUMNS,
                      ("bwd/fwd", 7, lambda r: format_ratio(r["backward_over_forward"])),
                      ("alloc/out", 9, _alloc)], ("backward",)),
    "training": (
        "Full training step of the MLP {sizes} (ReLU, softmax cross-entropy, SGD momentum 0.9)   "
        "(backends: Sequential.train_step; NumPy: the leanest NumPy step, in place; NumPy per "
        "layer: the notebook's layer classes; torch: nn.Sequential + CrossEntropyLoss + "
        "optim.SGD, eager; jax.jit: the step jitted; GEMMs @njit: the step's products alone from "
        "one @njit call, the floor; GFLOP/s of the products: 2·N·D·M per layer forward, 4·N·D·M "
        "backward)",
        "batch", [*COMMON_COLUMNS, ("xjax", 6, lambda r: format_ratio(r["vs_jax"])),
                  ("xGEMMs", 6, lambda r: format_ratio(r["vs_floor"]))], ("step",)),
    "fused": (
        "Fused linear + ReLU   (step: forward + backward, 6·N·D·M flops; forward: 2·N·D·M; "
        "backends: Linear(activation='relu'); NumPy: np.maximum(X @ W + b, 0) and its backward "
        "by hand; torch: relu(F.linear), autograd; GEMM: A @ B)",
        "case", [*COMMON_COLUMNS, GEMM_COLUMN], ("step", "forward")),
}
FOOTNOTE = (
    "xNumPy, xtorch, xGEMM: speed-ups, the other's median time / this one's (> 1 is faster; "
    "xGEMM is also the fraction of the GEMM ceiling reached; xjax against jax.jit; xGEMMs: the "
    "step's GEMMs alone / this step, the fraction of the floor reached). bwd/fwd: this "
    "contender's backward time / its forward time. ±IQR: interquartile range of the rounds / "
    "median. alloc/Y, "
    "alloc/out: peak bytes tracemalloc saw allocated during one call / bytes of the outputs (Y; "
    "dX + dW + db); 1.00 = nothing but the outputs, n/a = not traceable (torch, GPU); "
    "Numba-compiled code's own allocations are invisible to it.")


def _case_lines(case, passes, columns, name_width, label_width):
    lines = []
    for row in (r for r in case.rows if r["pass"] in passes):
        cells = "  ".join(f"{cell(row):>{width}}" for _, width, cell in columns)
        name = case.name if not lines else ""
        lines.append(f"{name:<{name_width}}  {row['label']:<{label_width}}  {cells}")
    return lines


def format_table(key, cases, **title_fields):
    """One table (``TABLES[key]``), a block per dtype, cases in run order."""
    title, heading, columns, passes = TABLES[key]
    label_width = max([len(r["label"]) for case in cases for r in case.rows] + [9])
    name_width = max([len(case.name) for case in cases] + [11])
    header = (f"{heading:<{name_width}}  {'contender':<{label_width}}  "
              + "  ".join(f"{title:>{width}}" for title, width, _ in columns))
    lines = ["", title.format(**title_fields)]
    for dtype in dict.fromkeys(case.dtype for case in cases):
        lines += ["", f"[{dtype}]", header, "-" * len(header)]
        for case in (c for c in cases if c.dtype == dtype):
            lines += _case_lines(case, passes, columns, name_width, label_width)
    return lines


def format_tables(cases, layer_sizes=()):
    """Every table that has cases: forward and backward of single layers, the training step,
    the fused layers; then the footnote."""
    lines = []
    layer = [c for c in cases if c.table == "layer"]
    if layer:
        lines += format_table("forward", layer) + format_table("backward", layer)
    for key in ("training", "fused"):
        chosen = [c for c in cases if c.table == key]
        if chosen:
            lines += format_table(key, chosen, sizes="-".join(map(str, layer_sizes)))
    return lines + ["", FOOTNOTE]


# --------------------------------------------------------------------------------------------
# Header and JSON
# --------------------------------------------------------------------------------------------

HEADER_KEYS = ("command", "machine", "versions", "backends", "threads", "method", "note")


def header_lines(header):
    """``key:     value`` lines of the run's header, lists joined with ``; ``."""
    lines = []
    for key in HEADER_KEYS:
        value = header.get(key)
        if value is not None:
            lines.append(f"{key + ':':<10}{'; '.join(value) if isinstance(value, list) else value}")
    return lines


def case_record(case):
    """A timed case as JSON: the layer cases keep their (N, D, M) shape as their key."""
    record = {"shape": list(case.shape), "dtype": case.dtype, "rounds": case.rounds,
              "rows": case.rows}
    if case.table != "layer":
        record = {"case": case.name, **record}
    return record
