"""The benchmark's PNG: GFLOP/s of single layers per shape, per pass and dtype."""

import math
import re

from fastlinear.bench.contenders import GEMM_LABEL, GPU_GEMM_LABEL, NUMPY_LABEL
from fastlinear.bench.grid import shape_text
from fastlinear.bench.report import PASSES

# What a GEMM row is: a same-shape reference, not a bound a fused layer must stay under.
REFERENCE_NAMES = {
    GEMM_LABEL: "NumPy A @ B, same shape (reference GEMM, no bias)",
    GPU_GEMM_LABEL: "CuPy A @ B, same shape (reference cuBLAS GEMM)",
}


def _styles(labels, palette):
    """Marker style per contender: colours for fastlinear and torch, grey NumPy; the reference
    GEMMs are drawn as black bars across their shape's slot."""
    style = {}
    plain = [x for x in labels if x not in (GEMM_LABEL, GPU_GEMM_LABEL, NUMPY_LABEL)]
    markers = "oD^vP*X"
    for index, label in enumerate(plain):
        style[label] = {"color": palette[index % len(palette)], "marker": markers[index % 7]}
    style[NUMPY_LABEL] = {"color": "0.45", "marker": "s"}
    style[GEMM_LABEL] = {"color": "black", "ls": "--"}
    style[GPU_GEMM_LABEL] = {"color": "black", "ls": ":"}
    return style


def _points(cases, label, pass_name, dtype, positions):
    """``(x, median, q1, q3)`` GFLOP/s per shape of ``label``'s rows (q1/q3 of the rates: the
    rate at the time's third and first quartile)."""
    points = []
    for case in cases:
        if case.dtype != dtype:
            continue
        for r in case.rows:
            if r["label"] == label and r["pass"] == pass_name and r["gflops"]:
                flops = r["gflops"] * r["median_s"]  # GFLOP of one call
                low = flops / r["q3_s"] if r.get("q3_s") else r["gflops"]
                high = flops / r["q1_s"] if r.get("q1_s") else r["gflops"]
                points.append((positions[case.shape], r["gflops"], low, high))
    return sorted(points)


def _draw_panel(ax, matplotlib, cases, pass_name, dtype, shapes, labels, style):
    """One marker per contender and shape (median), dodged within the shape's slot, with the
    interquartile range as whiskers; no lines join shapes (they are unrelated problems)."""
    positions = {shape: index for index, shape in enumerate(shapes)}
    contenders = [label for label in labels if label not in REFERENCE_NAMES]
    width = 0.8 / max(len(contenders), 1)
    for label in labels:
        points = _points(cases, label, pass_name, dtype, positions)
        if not points:
            continue
        xs, ys, lows, highs = (list(v) for v in zip(*points, strict=True))
        if label in REFERENCE_NAMES:
            ax.hlines(ys, [x - 0.45 for x in xs], [x + 0.45 for x in xs], colors="black",
                      linestyles=style[label]["ls"], lw=1.2, label=REFERENCE_NAMES[label],
                      zorder=1)
            continue
        offset = (contenders.index(label) - (len(contenders) - 1) / 2) * width
        ax.errorbar([x + offset for x in xs], ys,
                    yerr=[[y - lo for y, lo in zip(ys, lows, strict=True)],
                          [hi - y for y, hi in zip(ys, highs, strict=True)]],
                    fmt=style[label]["marker"], color=style[label]["color"], markersize=5,
                    capsize=2.5, elinewidth=1.2, linestyle="none", label=label, zorder=3)
    for index in range(1, len(shapes)):
        ax.axvline(index - 0.5, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(True, axis="y", which="major", alpha=0.35)
    ax.grid(True, axis="y", which="minor", alpha=0.12)
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
            f"threads: {', '.join(threads)}\n"
            f"marker: median of the rounds; whiskers: interquartile range (25th-75th percentile)")


def plot(cases, path, header):
    """PNG: GFLOP/s per shape (sorted by problem size), one panel per pass and dtype on one
    y-range, one marker per contender with its interquartile range, the same-shape GEMM as a
    labelled reference bar; only single-layer cases (``case.table == "layer"``) are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [case for case in cases if case.table == "layer"]
    dtypes = list(dict.fromkeys(case.dtype for case in cases))
    shapes = sorted(dict.fromkeys(case.shape for case in cases), key=lambda s: (math.prod(s), s))
    labels = list(dict.fromkeys(r["label"] for case in cases for r in case.rows))
    style = _styles(labels, plt.get_cmap("tab10").colors)
    # One y-range for every panel: a marker's height compares across passes and dtypes.
    figure, axes = plt.subplots(len(PASSES), len(dtypes), figsize=(6.2 * len(dtypes), 8.6),
                                squeeze=False, sharex=True, sharey=True, layout="constrained")
    for row_index, pass_name in enumerate(PASSES):
        for col_index, dtype in enumerate(dtypes):
            ax = axes[row_index][col_index]
            _draw_panel(ax, matplotlib, cases, pass_name, dtype, shapes, labels, style)
            if col_index == 0:
                flop_count = "2·N·D·M" if pass_name == "forward" else "4·N·D·M"
                ax.set_ylabel(f"GFLOP/s ({flop_count} flops / time), log scale,\n"
                              f"same range in every panel")
            if row_index == len(PASSES) - 1:
                ax.set_xlabel("N x D x M, sorted by problem size (forward GFLOP)")
    _legend(figure, axes)
    figure.suptitle(_title(header), fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)
