"""Where the numba training step's time goes beyond its GEMMs, each part timed in a loop inside
one ``@njit`` function (so no Python or dispatch between repetitions), in one process.

Rows: the whole compiled step (``network_call``) and its GEMMs alone (the bench's floor), both
in native loops; the forward pass (products, bias and activation passes); the loss; the
backward pass with and without the SGD update; the update alone; and, from Python, the compiled
step called directly and through ``Sequential.train_step``. The differences say what the passes
cost natively and what the Python boundary adds (issue 17's "step <= 1.3x its GEMMs").

Run: ``python benchmarks/training_step_parts.py [--batch 32] [--rounds 31]`` (float32, the
demo's 64-128-64-10 ReLU network, softmax cross-entropy, momentum 0.9).
"""

import argparse
import os
import time

import numpy as np
from numba import njit

from fastlinear.backends import _numba_network as network
from fastlinear.bench import training
from fastlinear.bench._gemm_floor import step_gemms

SIZES = (64, 128, 64, 10)


@njit
def _steps(k, gemm, int_bits, layout, arenas, X, work, labels, none):
    for _ in range(k):
        network.network_call(2, gemm, int_bits, layout, arenas, X, work, none, labels, none, 0,
                             0.0, 0.9)


@njit
def _gemms(k, gemm, int_bits, layout, params, grads, X, work):
    for _ in range(k):
        step_gemms(gemm, int_bits, layout, params, grads, X, work)


@njit
def _forward(k, gemm, int_bits, layout, arenas, X, work):
    for _ in range(k):
        network._forward_all(gemm, int_bits, layout, arenas[0], X, work)


@njit
def _loss(k, layout, X, work, labels):
    rows, last = X.shape[0], layout.shape[0] - 1
    at, classes = network._offset(layout, rows, last), layout[last, 1]
    out = network._block(work, at, rows, classes)
    grad = network._block(work, at + 2 * rows * classes, rows, classes)
    total = 0.0
    for _ in range(k):
        total += network._cross_entropy(out, labels, grad)
    return total


@njit
def _backward(k, gemm, int_bits, layout, arenas, X, work, none, update):
    for _ in range(k):
        network._backward_all(gemm, int_bits, layout, arenas[0], arenas[1], X, work, none,
                              arenas[2], 0.0, 0.9, update)


@njit
def _update(k, arenas):
    for _ in range(k):
        network._sgd(arenas[0], arenas[2], arenas[1], 0.0, 0.9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--repeats", type=int, default=300, help="steps per native loop")
    args = parser.parse_args()
    params = training.initial_parameters(SIZES, np.float32, 0)
    X, y = training.batch_of(SIZES, args.batch, np.float32, 0)
    net = training.sequential(params, "numba")
    net.train_step(X, y, loss="softmax_cross_entropy", lr=0.0, momentum=0.9)
    native = net._native_call
    g, bits = native.gemm, native.int_bits
    layout, arenas, work = net._layout, net._arenas, net._work
    none = net._no_rows
    floor_params, floor_grads = arenas[0].copy(), arenas[1].copy()
    floor_work = np.zeros_like(work)
    k = args.repeats
    direct = (2, g, bits, layout, arenas, X, work, none, y, none, 0, 0.0, 0.9)
    # (label, call, steps per call); lr 0 keeps the parameters (and so the timings) fixed.
    parts = [
        ("step, native loop", lambda: _steps(k, g, bits, layout, arenas, X, work, y, none), k),
        ("GEMMs, native loop", lambda: _gemms(k, g, bits, layout, floor_params, floor_grads, X,
                                              floor_work), k),
        ("forward", lambda: _forward(k, g, bits, layout, arenas, X, work), k),
        ("loss", lambda: _loss(k, layout, X, work, y), k),
        ("backward + update", lambda: _backward(k, g, bits, layout, arenas, X, work, none,
                                                True), k),
        ("backward", lambda: _backward(k, g, bits, layout, arenas, X, work, none, False), k),
        ("update", lambda: _update(k, arenas), k),
        ("step from Python", lambda: native.network_call(*direct), 1),
        ("train_step", lambda: net.train_step(X, y, loss="softmax_cross_entropy", lr=0.0,
                                              momentum=0.9), 1),
    ]
    for _, call, _ in parts:
        call()
    samples = {label: [] for label, _, _ in parts}
    for _ in range(args.rounds):
        for label, call, per_call in parts:
            calls = 1 if per_call > 1 else k
            start = time.perf_counter()
            for _ in range(calls):
                call()
            samples[label].append((time.perf_counter() - start) / (calls * per_call) * 1e6)
        time.sleep(0.02)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{'-'.join(map(str, SIZES))} batch {args.batch} float32, {args.rounds} rounds, "
          f"load average {load}")
    for label, values in samples.items():
        print(f"  {label:20} median {np.median(values):8.2f} us  min {np.min(values):8.2f} us")


if __name__ == "__main__":
    main()
