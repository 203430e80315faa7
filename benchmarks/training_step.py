"""Issue 17's targets, measured side by side: ``Sequential.train_step`` against every other way.

Cases (float32, ReLU MLP, softmax cross-entropy, SGD with momentum 0.9):

* 64-128-64-10, batch 32 and batch 256 (the demo's network);
* 784-512-256-10, batch 128 (MNIST-sized), with the BLAS's default threads.

Contenders are those of ``python -m fastlinear bench``'s training table
(``fastlinear.bench.training``): Sequential per backend, the leanest NumPy step, the notebook's
per-layer step, torch eager, jax.jit, and the step's GEMMs from one ``@njit`` call (the floor).
Interleaved rounds (A B C ... rotated each round) with a pause between libraries, the timing
core of the bench (``fastlinear.bench.timing``); medians and minimums per contender.

Run: ``python benchmarks/training_step.py [--rounds 21] [--cases 0,2] [--out FILE]``; prints
the table and the targets' ratios (and writes them to FILE). ``--cases`` picks rows of ``CASES``
by index (0: batch 32, 1: batch 256, 2: 784-512-256-10).
"""

import argparse
import datetime
import os
import platform
import sys
import types

import numpy as np

import fastlinear
from fastlinear import info
from fastlinear.bench import contenders, report, timing, training

CASES = (((64, 128, 64, 10), 32), ((64, 128, 64, 10), 256), ((784, 512, 256, 10), 128))
# (case index, contender, baseline, wanted baseline time / contender time, what) of issue 17.
TARGETS = (
    (0, "fastlinear[numba]", contenders.NUMPY_LABEL, 1.5, "numba >= 1.5x leanest NumPy (aim 2x)"),
    (0, "fastlinear[numba]", contenders.JAX_LABEL, 1.5, "numba >= 1.5x jax.jit"),
    (0, "fastlinear[numba]", contenders.FLOOR_LABEL, 1 / 1.3,
     "step <= 1.3x its GEMMs from @njit (GEMMs time / step time >= 0.77)"),
    (1, "fastlinear[numba]", contenders.NUMPY_LABEL, 1.5, "batch 256: numba >= 1.5x NumPy"),
    (2, "fastlinear[numba]", contenders.NUMPY_LABEL, 1.2,
     "784-512-256-10 batch 128: numba >= 1.2x NumPy"),
)


def header():
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    versions = ", ".join([f"python {platform.python_version()}",
                          f"fastlinear (git {info.git_revision() or 'unknown'})",
                          *info.versions(("numpy", "numba", "torch", "jax"))])
    return [f"date:     {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"command:  {' '.join([sys.executable, *sys.argv])}",
            f"machine:  {info.machine_description()}, load average {load}",
            f"versions: {versions}",
            f"threads:  {info.thread_pools(None)}"]


def run(rounds, block_time, pause, dtype, selected=None):
    torch = contenders.import_torch(True)
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    backends = [name for name, reason in fastlinear.available_backends().items()
                if reason is None]
    options = types.SimpleNamespace(repeat=rounds, min_repeat=rounds, block_time=block_time,
                                    pause=pause, case_budget=0)
    cases = []
    for index, (sizes, batch) in enumerate(CASES):
        if selected is not None and index not in selected:
            cases.append(None)
            continue
        case = training.training_case(batch, dtype, backends, torch, seed=0, sizes=sizes)
        timing.time_case(case, options)
        report.summarize(case)
        case.contenders = []
        cases.append(case)
    return cases


def table(cases):
    lines = []
    for case in cases:
        if case is None:
            continue
        sizes = "-".join(map(str, case.shape[1:]))
        lines += ["", f"{sizes}, batch {case.shape[0]}, {case.dtype}, {case.rounds} rounds",
                  f"{'contender':<20} {'median':>9} {'min':>9} {'xNumPy':>7} {'xjax':>6} "
                  f"{'xGEMMs':>7} {'GFLOP/s':>8}"]
        for row in case.rows:
            lines.append(f"{row['label']:<20} {report.format_seconds(row['median_s']):>9} "
                         f"{report.format_seconds(row['min_s']):>9} "
                         f"{report.format_ratio(row['vs_numpy']):>7} "
                         f"{report.format_ratio(row['vs_jax']):>6} "
                         f"{report.format_ratio(row['vs_floor']):>7} {row['gflops']:>8.3g}")
    return lines


def targets(cases):
    lines = ["", "issue 17 targets (ratio of medians; of minimums, and the median of the ratios "
                 "within each round, in brackets):"]
    for index, label, baseline, wanted, what in TARGETS:
        if cases[index] is None:
            continue
        rows = {row["label"]: row for row in cases[index].rows}
        if label not in rows or baseline not in rows:
            lines.append(f"  {what}: not measured ({label} or {baseline} missing)")
            continue
        median = rows[baseline]["median_s"] / rows[label]["median_s"]
        minimum = rows[baseline]["min_s"] / rows[label]["min_s"]
        # Within a round the two ran seconds apart (the rest of the machine as it was then), so
        # this ratio does not drift with the load as the ratio of whole-run medians can.
        paired = float(np.median(np.divide(rows[baseline]["samples_s"],
                                           rows[label]["samples_s"])))
        verdict = "met" if median >= wanted else "NOT met"
        lines.append(f"  {what}: {median:.2f} ({minimum:.2f}; within rounds {paired:.2f}) "
                     f"{verdict}")
    return lines


def case_indices(text):
    """``--cases``: comma-separated indices of ``CASES``; argparse reports anything else."""
    try:
        indices = {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    outside = sorted(index for index in indices if not 0 <= index < len(CASES))
    if outside:
        raise argparse.ArgumentTypeError(f"no case {outside}: CASES has indices 0 to "
                                         f"{len(CASES) - 1}")
    return indices


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--block-time", type=float, default=0.05)
    parser.add_argument("--pause", type=float, default=0.3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cases", default=None, type=case_indices,
                        help="comma-separated indices of CASES to run (default: all), e.g. 0,2")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    lines = header()
    print("\n".join(lines), flush=True)
    cases = run(args.rounds, args.block_time, args.pause, np.dtype(args.dtype).name, args.cases)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    body = [*table(cases), *targets(cases), "", f"load average at the end: {load}"]
    print("\n".join(body))
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines + body) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
