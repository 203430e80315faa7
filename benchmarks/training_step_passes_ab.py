"""The numba training step's native module against an older version of it, in one process.

The step of two versions of ``fastlinear/backends/_numba_network.py`` (this tree's, and the one
at git revision ``--base``, with its ``_numba_activations.py``, loaded side by side under other
names) is timed in native loops (``@njit``, no Python between steps) and through
``Sequential.train_step`` (one network object, its compiled call swapped), beside the step's
GEMMs alone (the bench's floor). The steps cycle through ``--batches`` batches. Each round
times every contender back to back, in an order shuffled each round (a rotation keeps each
contender's neighbour, whose leftovers in caches and predictors alone moved a block by 3-4 us);
the report is the median of the per-round differences new - base (paired: a process runs "fast"
or "slow" for its whole life, and the machine's speed drifts from second to second, so only
times taken side by side compare) and of the ratios to the GEMMs. A difference the A-A
controls (the base timed twice) also show is noise.

Run (under the shared timing lock): ``python benchmarks/training_step_passes_ab.py
[--base step7] [--batch 32] [--rounds 200]``. float32, 64-128-64-10 ReLU, softmax
cross-entropy, SGD momentum 0.9. The base's compiled code is cached under
``~/.cache/fastlinear_passes_ab/<commit>``, so a rerun compiles nothing.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from fastlinear.backends import _numba_network
from fastlinear.bench import training

SIZES = (64, 128, 64, 10)
_MODULES = ("_numba_network", "_numba_activations")


def load_base(revision):
    """The network module at git ``revision`` (with its activations module), imported as
    ``_base_numba_network``; its compiled code is cached beside it, per commit."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", revision], cwd=root, check=True,
                            capture_output=True, text=True).stdout.strip()
    folder = Path.home() / ".cache" / "fastlinear_passes_ab" / commit
    folder.mkdir(parents=True, exist_ok=True)
    for name in _MODULES:
        text = subprocess.run(["git", "show", f"{commit}:fastlinear/backends/{name}.py"],
                              cwd=root, check=True, capture_output=True, text=True).stdout
        for other in _MODULES:
            text = text.replace(f"fastlinear.backends.{other}", f"_base{other}")
        target = folder / f"_base{name}.py"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("_base_numba_network"), commit[:10]


def native_loop(module):
    """``steps(k, ...)``: ``k`` training steps of ``module.network_call`` in one native loop."""
    call = module.network_call

    @njit
    def steps(k, gemm, int_bits, layout, arenas, batches, work, labels, none):
        total = 0.0
        for i in range(k):
            which = i % batches.shape[0]
            total += call(2, gemm, int_bits, layout, arenas, batches[which], work, none,
                          labels[which], none, 0, 0.0, 0.9)
        return total

    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="step7", help="git revision to compare against")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=40, help="steps per timed block")
    parser.add_argument("--batches", type=int, default=8,
                        help="distinct batches the steps cycle through (so that branch "
                             "predictors cannot learn one batch's signs)")
    args = parser.parse_args()
    base, commit = load_base(args.base)
    params = training.initial_parameters(SIZES, np.float32, 0)
    data = [training.batch_of(SIZES, args.batch, np.float32, seed)
            for seed in range(args.batches)]
    X, y = data[0]
    batches = np.stack([X for X, _ in data])
    labels = np.stack([y for _, y in data])
    # lr 0 keeps the parameters, so every round times the same arithmetic.
    options = {"loss": "softmax_cross_entropy", "lr": 0.0, "momentum": 0.9}
    # One network for every contender (two networks' arenas lie at other addresses, which
    # alone moved train_step by 3-4 us here), its compiled call swapped before each block.
    net = training.sequential(params, "numba")
    net.train_step(X, y, **options)
    native = net._native_call
    variants = {}
    for name, module in (("base", base), ("new", _numba_network)):
        swap = {"network_call": module.network_call}
        if "checked_call" in native._fields:  # train_step's direct call of the compiled step
            swap["checked_call"] = module.network_call
        net._native_call = native._replace(**swap)
        for _ in range(2):  # the second call finds the compiled step: train_step keeps it
            net.train_step(X, y, **options)
        variants[name] = net._native_call
        assert variants[name].network_call is module.network_call
    k = args.repeats
    shared = (native.gemm, native.int_bits, net._layout)
    loops = {"base": native_loop(base), "new": native_loop(_numba_network)}
    floor = training.gemm_floor(X, params)
    steps = {name: (lambda loop=loop: loop(k, *shared, net._arenas, batches, net._work,
                                           labels, net._no_rows))
             for name, loop in loops.items()}

    def train_steps(variant):
        net._native_call = variants[variant]
        for i in range(k):
            net.train_step(*data[i % len(data)], **options)

    calls = {"native base": steps["base"], "native base'": steps["base"],
             "native new": steps["new"], "GEMMs": lambda: [floor() for _ in range(k)],
             "train_step base": lambda: train_steps("base"),
             "train_step base'": lambda: train_steps("base"),
             "train_step new": lambda: train_steps("new")}
    losses = {name: loop(len(data), *shared, net._arenas, batches, net._work, labels,
                         net._no_rows) for name, loop in loops.items()}
    if losses["base"] != losses["new"]:
        print(f"note: the losses differ: base {losses['base']!r}, new {losses['new']!r}")
    for call in calls.values():
        call()
    names = list(calls)
    times = {name: [] for name in names}
    order = np.random.default_rng(0)
    for round_ in range(args.rounds):
        for name in order.permutation(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) / k * 1e6)
        if round_ % 20 == 19:
            time.sleep(0.3)
    times = {name: np.array(values) for name, values in times.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{'-'.join(map(str, SIZES))} batch {args.batch} float32; base {args.base} "
          f"({commit}); {args.rounds} rounds x {k} steps; load average {load}")
    for name, values in times.items():
        print(f"  {name:16} median {np.median(values):7.2f} us  min {values.min():7.2f} us  "
              f"/GEMMs {np.median(values / times['GEMMs']):.3f}")
    for new, old in (("native new", "native base"), ("native base'", "native base"),
                     ("train_step new", "train_step base"),
                     ("train_step base'", "train_step base")):
        diff = times[new] - times[old]
        q25, q50, q75 = np.percentile(diff, [25, 50, 75])
        print(f"  {new} - {old}: median {q50:+6.2f} us [q25 {q25:+.2f}, q75 {q75:+.2f}]")


if __name__ == "__main__":
    main()
