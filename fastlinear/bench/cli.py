"""``python -m fastlinear bench``: options, the run from cases to table, JSON and plot."""

import datetime
import json
import os
import platform
import shlex
import sys

import numpy as np

import fastlinear
from fastlinear import _cli, info
from fastlinear.bench import contenders, grid, report, timing, training
from fastlinear.bench.plot import plot
from fastlinear.demo import LAYER_SIZES

CASE_KINDS = ("layers", "training", "fused")
# The versions in the header: fastlinear's own libraries and the baselines.
BENCH_LIBRARIES = ("numpy", "numba", "scipy", "torch", "cupy")


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
    shapes = ", ".join(map(grid.shape_text, grid.DEFAULT_SHAPES))  # wraps between shapes
    fused = ", ".join(f"{grid.shape_text(s)} {p}" for s, p in grid.FUSED_CASES)
    parser = _cli.Parser(
        prog="python -m fastlinear bench",
        description="Time every available fastlinear backend side by side with NumPy, PyTorch "
                    "(when installed) and the machine's GEMM rate: single layers, the demo's "
                    "training step, fused linear + ReLU layers; print tables and write a PNG "
                    "plot.")
    add = parser.add_argument
    add("--quick", action="store_true",
        help=f"three layer shapes ({', '.join(map(grid.shape_text, grid.QUICK_SHAPES))}), fewer "
             "rounds, shorter blocks: every table in about a minute")
    add("--shapes", type=grid.parse_shapes, default=None,
        help=f"comma-separated NxDxM list of single layers; default {shapes}")
    add("--dtypes", type=grid.parse_names, default=grid.DTYPES,
        help="comma-separated dtypes; default float32,float64")
    add("--backends", type=grid.parse_names, default=None,
        help="comma-separated fastlinear backends; default: every available one")
    add("--cases", type=grid.parse_names, default=CASE_KINDS,
        help="which tables: layers (forward and backward of single layers, --shapes), training "
             "(the demo MLP's training step, --batches), fused (linear + ReLU: "
             f"{fused}); default all three")
    add("--batches", type=grid.parse_sizes, default=grid.TRAINING_BATCHES,
        help="batch sizes of the training step; default "
             f"{','.join(map(str, grid.TRAINING_BATCHES))}")
    add("--no-torch", action="store_true", help="leave PyTorch out")
    add("--repeat", type=int, default=None,
        help="rounds per case (the median is over rounds); default 7, --quick 3")
    add("--block-time", type=float, default=None,
        help="seconds a timed block lasts at least (tiny shapes repeat the call); default 0.02, "
             "--quick 0.005")
    add("--pause", type=float, default=0.3,
        help="seconds to sleep between blocks of different libraries; default 0.3")
    add("--case-budget", type=float, default=None,
        help="seconds one case may take; large shapes get fewer rounds (at least 3); default 12, "
             "--quick 4, 0 = no limit")
    add("--plot", metavar="PATH", default="bench.png",
        help="PNG to write, default bench.png ('' for none)")
    add("--json", metavar="PATH", default=None,
        help="write every sample, median and ratio, with the header, as JSON")
    add("--seed", type=int, default=0, help="seed of the random inputs; default 0")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_options(options):
    """Fill the defaults that depend on --quick; refuse values that cannot run."""
    quick = options.quick
    if options.shapes is None:
        options.shapes = grid.QUICK_SHAPES if quick else grid.DEFAULT_SHAPES
    if options.repeat is None:
        options.repeat = 3 if quick else 7
    if options.block_time is None:
        options.block_time = 0.005 if quick else 0.02
    if options.case_budget is None:
        options.case_budget = 4.0 if quick else 12.0
    options.min_repeat = min(3, options.repeat)
    if options.repeat < 1:
        raise _cli.UsageError("--repeat must be at least 1")
    for dtype in options.dtypes:
        if dtype not in ("float16", "float32", "float64"):
            raise _cli.UsageError(f"--dtypes: expected float32, float64 (float16 on a GPU), "
                                  f"got {dtype}")
    unknown = [kind for kind in options.cases if kind not in CASE_KINDS]
    if unknown:
        raise _cli.UsageError(f"--cases: unknown {unknown}; expected some of "
                              f"{', '.join(CASE_KINDS)}")
    return options


def choose_backends(requested):
    """The fastlinear backends to time: the requested ones that can run, else every one that can;
    a requested one that cannot run is skipped with a note."""
    status = fastlinear.available_backends()
    if requested is None:
        return [name for name, reason in status.items() if reason is None], status
    unknown = [name for name in requested if name not in status]
    if unknown:
        raise _cli.UsageError(f"--backends: unknown {unknown}; registered: {list(status)}")
    for name in requested:
        if status[name] is not None:
            print(f"note: skipping backend {name}: {status[name]}", file=sys.stderr)
    return [name for name in requested if status[name] is None], status


def case_plan(options, backends, torch_module, rng):
    """``(label, build)`` per case in run order; ``build()`` makes its contenders."""
    # float16 is a GPU dtype: the CPU-only cases (NumPy baselines of the MLP) leave it out.
    cpu_dtypes = [d for d in options.dtypes if d != "float16"]
    plan = []
    if "layers" in options.cases:
        plan += [(f"{grid.shape_text(shape)} {dtype}",
                  lambda s=shape, d=dtype: contenders.layer_case(s, d, backends, torch_module, rng))
                 for dtype in options.dtypes for shape in options.shapes]
    if "training" in options.cases:
        plan += [(f"training step, batch {batch} {dtype}",
                  lambda n=batch, d=dtype: training.training_case(n, d, backends, torch_module,
                                                                  options.seed))
                 for dtype in cpu_dtypes for batch in options.batches]
    if "fused" in options.cases:
        plan += [(f"relu {grid.shape_text(shape)} {pass_name} {dtype}",
                  lambda s=shape, p=pass_name, d=dtype: contenders.fused_case(
                      s, p, d, backends, torch_module, rng))
                 for dtype in options.dtypes for shape, pass_name in grid.FUSED_CASES]
    return plan


def warm_libraries(dtypes, backends, torch_module, rng):
    """Load every library, start its threads and compile the Numba kernels on a throw-away case
    per dtype, so the header's thread report is complete and no case pays for it."""
    for dtype in dtypes:
        for contender in contenders.layer_case((4, 8, 8), dtype, backends, torch_module,
                                               rng).contenders:
            contender.call()


def make_header(argv, options, torch_module, status):
    """Date, command, machine, versions, thread counts, backends and method of this run."""
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    versions = [f"python {platform.python_version()}",
                f"fastlinear {fastlinear.__version__} (git {info.git_revision() or 'unknown'})",
                *info.versions(BENCH_LIBRARIES, skip=() if torch_module else ("torch",))]
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join([sys.executable, "-m", "fastlinear", "bench", *argv]),
        "machine": info.machine_description() + load,
        "versions": ", ".join(versions),
        "threads": info.thread_pools(torch_module),
        "backends": [f"{name} " + ("ok" if reason is None else f"unavailable ({reason})")
                     for name, reason in status.items()],
        "method": (f"median over up to {options.repeat} interleaved rounds per case "
                   f"(>= {options.min_repeat} when --case-budget {options.case_budget:g} s is "
                   f"short), blocks >= {options.block_time * 1e3:g} ms, {options.pause:g} s pause "
                   "between libraries"),
    }
    if hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.75 * (os.cpu_count() or 1):
        header["note"] = (f"other processes keep the CPUs busy (load average "
                          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs): expect noise, "
                          f"read the ±IQR column")
    return header


def time_cases(plan, options):
    """Build, time and summarize every case of ``plan`` in turn (one case's arrays at a time)."""
    cases = []
    progress = make_progress(len(plan), not options.no_progress)
    try:
        for label, build in plan:
            if progress is not None:
                progress.set_postfix_str(label)
            case = timing.time_case(build(), options, progress.update if progress else None)
            report.summarize(case)
            case.contenders = []  # free the inputs before the next case
            cases.append(case)
    finally:
        if progress is not None:
            progress.close()
    return cases


def write_outputs(report_data, cases, header, options, out):
    """The JSON file and the plot, when asked for."""
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(report_data, handle, indent=1)
        print(f"\nJSON written to {options.json}", file=out)
    if not options.plot:
        return
    if not any(case.table == "layer" for case in cases):
        print("\nno plot: it draws single layers (--cases layers)", file=out)
        return
    try:
        plot(cases, options.plot, header)
    except ImportError:
        print('\nno plot: matplotlib is missing (pip install "fastlinear[bench]")', file=out)
    else:
        print(f"{'' if options.json else chr(10)}plot written to {options.plot}", file=out)


def run_benchmark(options, argv=(), out=None):
    """Run the whole comparison for parsed ``options``; print the report; return it as a dict."""
    out = sys.stdout if out is None else out
    backends, status = choose_backends(options.backends)
    torch_module = contenders.import_torch(not options.no_torch)
    rng = np.random.default_rng(options.seed)
    warm_libraries(options.dtypes, backends, torch_module, rng)

    header = make_header(list(argv), options, torch_module, status)
    print(f"fastlinear bench, {header['date']}", file=out)
    print("\n".join(report.header_lines(header)), file=out)
    out.flush()

    cases = time_cases(case_plan(options, backends, torch_module, rng), options)

    header["threads"] = info.thread_pools(torch_module)  # as they ended up
    if hasattr(os, "getloadavg"):
        header["load_average_at_end"] = list(os.getloadavg())
    print("\n".join(report.format_tables(cases, LAYER_SIZES)), file=out)
    by_table = {kind: [report.case_record(c) for c in cases if c.table == kind]
                for kind in ("layer", "training", "fused")}
    report_data = {
        "header": header,
        "shapes": [list(s) for s in options.shapes] if "layers" in options.cases else [],
        "dtypes": list(options.dtypes),
        "backends": backends,
        "cases": by_table["layer"],
        "training_step": {"layer_sizes": list(LAYER_SIZES), "cases": by_table["training"]},
        "fused_relu": by_table["fused"],
    }
    write_outputs(report_data, cases, header, options, out)
    return report_data


def main(argv=None):
    """``python -m fastlinear bench [options]``; ``--help`` lists them."""
    argv = sys.argv[1:] if argv is None else list(argv)
    options = resolve_options(build_parser().parse_args(argv))
    run_benchmark(options, argv)
    return 0
