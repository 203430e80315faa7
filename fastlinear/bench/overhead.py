"""What fastlinear adds to a small layer's call: its time beside the plain NumPy expression.

At a small layer (32x64x64 by default) the product takes a few microseconds, so the checks,
conversions and dispatch around it show. Each row is timed beside the expression it replaces,
``X @ W + b`` forward and ``dY @ W.T, X.T @ dY, dY.sum(0)`` backward, in interleaved rounds
(the row's block, then the expression's, then the next row's ...); the overhead is the median
over rounds of the difference within a round, so the machine's drift cancels. The default path
(no backend named) is timed twice: while ``auto`` serves numpy, before its switch, and after it
(numba where it can run), there beside the expression and, for scale, beside that backend's own
function called directly (what the dispatcher adds to the kernel it calls; no budget). A
minimal wrapper (type and shape checks, then the expression) is timed too, for scale, and the
expression against itself, the method's zero (a separately written copy of the same lambda).

Blocks are timed in the thread's CPU time (``time.thread_time``) with the BLAS on one thread, so
that time the process spends descheduled on a busy machine, and BLAS threads waking, are not
counted: what is left is the work of the call itself.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import fastlinear
from fastlinear import _dispatch

SHAPE = (32, 64, 64)
DTYPE = "float32"
# The budget (microseconds over the plain expression, numpy backend): forward, backward.
BUDGET_US = {"functional": (1.0, 1.5), "Linear": (1.5, 2.0)}


@dataclass
class Row:
    """One way to make the call, timed against its baseline in the same rounds."""

    label: str
    pass_name: str
    call: Callable[[], Any]
    baseline: Callable[[], Any]
    baseline_label: str
    registry: _dispatch.Registry | None = None  # the registry the call resolves through
    differences: list[float] = field(default_factory=list)  # seconds per call, per round
    times: list[float] = field(default_factory=list)


def _block(call: Callable[[], Any], calls: int) -> float:
    start = time.thread_time()
    for _ in range(calls):
        call()
    return (time.thread_time() - start) / calls


def _minimal_forward(X: Any, W: Any, b: Any = None, *, backend: str | None = None) -> Any:
    """The least a checked wrapper does: type and shape checks, then the expression."""
    if type(X) is not np.ndarray or type(W) is not np.ndarray or X.ndim != 2 \
            or X.shape[1] != W.shape[0]:
        raise TypeError("X and W must be NumPy matrices of matching shapes")
    return X @ W + b


def _minimal_backward(dY: Any, X: Any, W: Any, *, backend: str | None = None) -> Any:
    if type(X) is not np.ndarray or type(W) is not np.ndarray or X.ndim != 2 \
            or X.shape[1] != W.shape[0] or dY.shape != (X.shape[0], W.shape[1]):
        raise TypeError("dY, X and W must be NumPy matrices of matching shapes")
    return dY @ W.T, X.T @ dY, dY.sum(0)


def _one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _inputs(shape: tuple[int, int, int], dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    N, D, M = shape
    return {name: rng.standard_normal(size).astype(dtype)
            for name, size in (("X", (N, D)), ("W", (D, M)), ("b", (M,)), ("dY", (N, M)))}


def _registries() -> tuple[_dispatch.Registry, _dispatch.Registry, str]:
    """A registry whose ``auto`` serves numpy (before the switch), one that has switched, and
    the backend it switched to."""
    before = _dispatch.Registry(load_after_calls=1 << 62)
    after = _dispatch.Registry()
    switched = after.warm_up()
    return before, after, switched


def rows(shape: tuple[int, int, int] = SHAPE, dtype: str = DTYPE) -> list[Row]:
    """The rows of the table: functional and Linear on the numpy backend, and the default
    path before and after ``auto``'s switch."""
    a = _inputs(shape, dtype)
    X, W, b, dY = a["X"], a["W"], a["b"], a["dY"]
    plain = {"forward": lambda: X @ W + b,
             "backward": lambda: (dY @ W.T, X.T @ dY, dY.sum(0))}
    expression = "the plain NumPy expression"
    layer = fastlinear.Linear(shape[1], shape[2], dtype=dtype, backend="numpy", rng=0)
    default_layer = fastlinear.Linear(shape[1], shape[2], dtype=dtype, rng=0)
    before, after, switched = _registries()
    module = after.load(switched)
    # positional, as a plan calls it (keywords would add their own cost to the baseline)
    direct = {"forward": lambda: module.forward(X, W, b, None),
              "backward": lambda: module.backward(dY, X, W, True, True, False, None, None, None)}
    made: list[Row] = []
    for pass_name in ("forward", "backward"):
        functional = ((lambda: fastlinear.linear_forward(X, W, b, backend="numpy"))
                      if pass_name == "forward"
                      else (lambda: fastlinear.linear_backward(dY, X, W, backend="numpy")))
        default = ((lambda: fastlinear.linear_forward(X, W, b)) if pass_name == "forward"
                   else (lambda: fastlinear.linear_backward(dY, X, W)))
        layer_call = _layer_call(layer, X, dY, pass_name)
        default_layer_call = _layer_call(default_layer, X, dY, pass_name)
        minimal = ((lambda: _minimal_forward(X, W, b, backend="numpy"))
                   if pass_name == "forward"
                   else (lambda: _minimal_backward(dY, X, W, backend="numpy")))
        same = ((lambda: X @ W + b) if pass_name == "forward"
                else (lambda: (dY @ W.T, X.T @ dY, dY.sum(0))))
        made += [
            Row("the expression itself (zero)", pass_name, same, plain[pass_name], expression),
            Row("minimal wrapper (for scale)", pass_name, minimal, plain[pass_name], expression),
            Row("functional", pass_name, functional, plain[pass_name], expression),
            Row("Linear", pass_name, layer_call, plain[pass_name], expression),
            Row("default, before auto's switch", pass_name, default, plain[pass_name],
                expression, before),
            Row("Linear default, before the switch", pass_name, default_layer_call,
                plain[pass_name], expression, before),
            Row(f"default, after the switch ({switched})", pass_name, default,
                plain[pass_name], expression, after),
            Row(f"  the same, over {switched}'s own function", pass_name, default,
                direct[pass_name], f"the {switched} backend's own function", after),
        ]
    return made


def _layer_call(layer: fastlinear.Linear, X: Any, dY: Any, pass_name: str) -> Callable[[], Any]:
    layer.forward(X)
    if pass_name == "forward":
        return lambda: layer.forward(X)
    return lambda: layer.backward(dY)


def measure(table: list[Row], rounds: int = 30, block_time: float = 0.002) -> list[Row]:
    """Time every row beside its baseline, interleaved, ``rounds`` times."""
    saved = _dispatch.registry
    with _one_blas_thread():
        _measure(table, rounds, block_time, saved)
    return table


def _measure(table: list[Row], rounds: int, block_time: float,
             saved: _dispatch.Registry) -> None:
    try:
        calls = {}
        for row in table:  # warm up, and size the blocks
            _dispatch.registry = row.registry or saved
            row.call()
            row.baseline()
            calls[row.label, row.pass_name] = max(1, int(block_time / max(
                _block(row.baseline, 50), 1e-8)))
        for _ in range(rounds):
            for row in table:
                _dispatch.registry = row.registry or saved
                n = calls[row.label, row.pass_name]
                _block(row.call, max(1, n // 8))  # untimed: the caches hold this row's data
                base = _block(row.baseline, n)
                mine = _block(row.call, n)
                # A B A: the mean of the baseline either side, so that a drift cancels. (Not
                # the lesser of the two: a minimum of two blocks beside one block is biased;
                # the zero row, the expression against itself, showed +0.1 us with it.)
                base = (base + _block(row.baseline, n)) / 2
                row.times.append(mine)
                row.differences.append(mine - base)
    finally:
        _dispatch.registry = saved


def _budget(row: Row) -> str:
    """The budget of a row, in microseconds ('' where none applies)."""
    kind = "Linear" if row.label.startswith("Linear") else "functional"
    if row.label.startswith(("minimal", "the expression", "  ")):
        return ""  # for scale: the budget is over the plain expression
    return f"{BUDGET_US[kind][row.pass_name == 'backward']:.1f}"


def format_table(table: list[Row]) -> list[str]:
    """The overhead table: the row's time per call, the median difference from its baseline in
    the same rounds, and the budget."""
    lines = ["call overhead at a small layer, thread CPU time per call, BLAS on one thread",
             f"{'call':36} {'pass':8} {'time us':>8} {'over us':>8} {'budget':>7}  over what"]
    for row in table:
        lines.append(f"{row.label:36} {row.pass_name:8} "
                     f"{statistics.median(row.times) * 1e6:8.2f} "
                     f"{statistics.median(row.differences) * 1e6:8.2f} {_budget(row):>7}  "
                     f"{row.baseline_label}")
    return lines


def run(shape: tuple[int, int, int] = SHAPE, dtype: str = DTYPE, rounds: int = 30,
        block_time: float = 0.002) -> list[str]:
    """Measure and format the overhead table."""
    return format_table(measure(rows(shape, dtype), rounds, block_time))
