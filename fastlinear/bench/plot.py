"""The benchmark's PNG: GFLOP/s of single layers against problem size, per pass and dtype."""

import math
import re

from fastlinear.bench.contenders import GEMM_LABEL, GPU_GEMM_LABEL, NUMPY_LABEL
from fastlinear.bench.grid import shape_text
from fastlinear.bench.report import PASSES


def _styles(labels, palette):
    """Line style per contender: colours for fastlinear and torch, grey NumPy, black ceilings."""
    style = {}
    plain = [x for x in labels if x not in (GEMM_LABEL, GPU_GEMM_LABEL, NUMPY_LABEL)]
    for index, label in enumerate(plain):
        style[label] = {"color": palette[index % len(palette)], "marker": "o", "lw": 2}
    style[NUMPY_LABEL] = {"color": "0.45", "marker": "s", "lw": 1.5}
    style[GEMM_LABEL] = {"color": "black", "marker": "", "lw": 1.2, "ls": "--"}
    style[GPU_GEMM_LABEL] = {"color": "black", "marker": "", "lw": 1.2, "ls": ":"}
    return style


def _draw_panel(ax, matplotlib, cases, pass_name, dtype, shapes, labels, style):
    positions = {shape: index for index, shape in enumerate(shapes)}
    for label in labels:
        points = sorted((positions[case.shape], r["gflops"]) for case in cases
                        if case.dtype == dtype for r in case.rows
                        if r["label"] == label and r["pass"] == pass_name and r["gflops"])
        if points:
            xs, ys = zip(*points, strict=True)
            name = f"{label} (ceiling)" if label in (GEMM_LABEL, GPU_GEMM_LABEL) else label
            ax.plot(xs, ys, label=name, markersize=4, **style[label])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.set_title(f"{pass_name}, {dtype}", fontsize=11)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([f"{shape_text(s)}\n{2 * math.prod(s) / 1e9:.2g} GF" for s in shapes],
                       rotation=35, ha="right", fontsize=8)


def _legend(figure, axes):
    """One legend for the figure: the union of the lines of all panels, in order of appearance."""
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6),
                  frameon=False)


def _title(header):
    machine = header["machine"].split(", load")[0]
    threads = []
    for pool in header["threads"]:  # "openblas 0.3.31 [numpy.libs] 2 threads" -> "openblas 2"
        count = re.search(r"(\d+) (?:intra-op )?threads", pool)
        owner = re.search(r"\[(.*)\]", pool)
        if count:
            threads.append(f"{pool.split()[0]}{f' ({owner.group(1)})' if owner else ''} "
                           f"{count.group(1)}")
    return (f"fastlinear bench, {header['date']}: {machine}\n{header['versions']}\n"
            f"threads: {', '.join(threads)}")


def plot(cases, path, header):
    """PNG: GFLOP/s against problem size, one panel per pass and dtype, one line per contender;
    only single-layer cases (``case.table == "layer"``) are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [case for case in cases if case.table == "layer"]
    dtypes = list(dict.fromkeys(case.dtype for case in cases))
    shapes = sorted(dict.fromkeys(case.shape for case in cases), key=lambda s: (math.prod(s), s))
    labels = list(dict.fromkeys(r["label"] for case in cases for r in case.rows))
    style = _styles(labels, plt.get_cmap("tab10").colors)
    figure, axes = plt.subplots(len(PASSES), len(dtypes), figsize=(6.2 * len(dtypes), 8.6),
                                squeeze=False, sharex=True, layout="constrained")
    for row_index, pass_name in enumerate(PASSES):
        for col_index, dtype in enumerate(dtypes):
            ax = axes[row_index][col_index]
            _draw_panel(ax, matplotlib, cases, pass_name, dtype, shapes, labels, style)
            if col_index == 0:
                flop_count = "2·N·D·M" if pass_name == "forward" else "4·N·D·M"
                ax.set_ylabel(f"GFLOP/s ({flop_count} flops / median time)")
            if row_index == len(PASSES) - 1:
                ax.set_xlabel("N x D x M, sorted by problem size (forward GFLOP)")
    _legend(figure, axes)
    figure.suptitle(_title(header), fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
