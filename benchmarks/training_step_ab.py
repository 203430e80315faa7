"""Two versions of the numba ``Sequential.train_step`` and the step's GEMMs, in one process.

On a shared machine the time of a block of steps varies by 1.5x from one second to the next, so
two runs of ``training_step.py`` rarely compare; here each round times the old step, the new
step and the GEMMs floor back to back (rotated each round), and the ratios are taken within each
round before the median. The old version is a copy of the package renamed, so both import side
by side; make it with (BASE: the commit or branch to compare against, e.g. main)::

    BASE=main
    mkdir -p /tmp/ab && git archive "$BASE" fastlinear | tar -x -C /tmp/ab
    mv /tmp/ab/fastlinear /tmp/ab/fastlinear_base
    find /tmp/ab -name '*.py' | xargs sed -i 's/\\bfastlinear\\b/fastlinear_base/g'

Run: ``python benchmarks/training_step_ab.py --base /tmp/ab [--sizes 64,128,64,10 --batch 32]``.
float32, ReLU between layers, softmax cross-entropy, SGD momentum 0.9, both on numba.
"""

import argparse
import importlib
import os
import sys
import time

import numpy as np

import fastlinear
from fastlinear.bench import training


def build(module, params):
    layers = []
    for index, (W, b) in enumerate(params):
        layer = module.Linear(*W.shape, dtype=W.dtype, backend="numba",
                              activation="relu" if index < len(params) - 1 else None)
        layer.W, layer.b = W.copy(), b.copy()
        layers.append(layer)
    return module.Sequential(*layers, backend="numba")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="folder holding fastlinear_base")
    parser.add_argument("--sizes", default="64,128,64,10")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--steps", type=int, default=0, help="steps per block (0: ~2 ms)")
    args = parser.parse_args()
    sys.path.insert(0, args.base)
    base = importlib.import_module("fastlinear_base")
    sizes = tuple(int(s) for s in args.sizes.split(","))
    params = training.initial_parameters(sizes, np.float32, 0)
    X, y = training.batch_of(sizes, args.batch, np.float32, 0)
    old, new = build(base, params), build(fastlinear, params)
    options = {"loss": "softmax_cross_entropy", "lr": 1e-4, "momentum": 0.9}
    calls = {"old": lambda: old.train_step(X, y, **options),
             "new": lambda: new.train_step(X, y, **options),
             "gemms": training.gemm_floor(X, params)}
    for call in calls.values():
        for _ in range(10):
            call()
    start = time.perf_counter()
    calls["new"]()
    steps = args.steps or max(1, int(2e-3 / (time.perf_counter() - start)))
    times = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(args.rounds):
        for name in names[round_ % 3:] + names[:round_ % 3]:
            start = time.perf_counter()
            for _ in range(steps):
                calls[name]()
            times[name].append((time.perf_counter() - start) / steps)
    times = {name: np.array(values) for name, values in times.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"{args.sizes} batch {args.batch}, {args.rounds} rounds x {steps} steps, "
          f"load average {load}")
    for name, values in times.items():
        print(f"  {name:<6} median {np.median(values) * 1e6:9.1f} us  q25 "
              f"{np.quantile(values, 0.25) * 1e6:9.1f}  min {values.min() * 1e6:9.1f} us")
    print(f"  within rounds, median: old/new {np.median(times['old'] / times['new']):.3f}; "
          f"new/GEMMs {np.median(times['new'] / times['gemms']):.3f}; "
          f"old/GEMMs {np.median(times['old'] / times['gemms']):.3f}")


if __name__ == "__main__":
    main()
