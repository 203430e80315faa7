"""Where the numba train_step's batch-row split pays: split vs one call, interleaved.

Contenders on one ReLU MLP, float32, softmax cross-entropy, SGD momentum 0.9:

* ``numpy``: the leanest NumPy step (in-place updates), NumPy's default BLAS threads;
* ``one call``: ``Sequential.train_step`` with the split off (``ROW_SPLIT_MIN_WORK`` huge);
* ``split``: the same with the split forced (``ROW_SPLIT_MIN_WORK = 0``);
* ``one call, 1 BLAS thr``: one call inside ``one_blas_thread()``.

Rounds rotate the order; ``--pause`` seconds between blocks. Medians and minimums per contender.
Sets ``sequential.ROW_SPLIT_MIN_WORK`` (the gate in ``fastlinear/sequential.py``).

Run: ``python benchmarks/row_split.py --sizes 784,512,256,10 --batch 128 [--rounds 121]``
"""

import argparse
import os
import time

import numpy as np

import fastlinear
from fastlinear import sequential
from fastlinear.backends import _numba_blas


def make_layers(sizes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    layers = []
    for d, m in zip(sizes[:-1], sizes[1:], strict=True):
        layer = fastlinear.Linear(d, m, activation="relu" if m != sizes[-1] else None,
                                  dtype=dtype)
        layer.W = (rng.standard_normal((d, m)) * np.sqrt(2 / d)).astype(dtype)
        layer.b = (rng.standard_normal(m) * 0.3).astype(dtype)
        layers.append(layer)
    return layers


def numpy_step(params, velocity, X, y, lr, momentum):
    """Forward, softmax cross-entropy, backward and SGD over (W, b) pairs, ReLU between."""
    activations = [X]
    for index in range(0, len(params), 2):
        H = activations[-1] @ params[index]
        H += params[index + 1]
        if index + 2 < len(params):
            np.maximum(H, 0, out=H)
        activations.append(H)
    Z = activations.pop()
    Z -= Z.max(1, keepdims=True)
    np.exp(Z, out=Z)
    Z /= Z.sum(1, keepdims=True)
    Z[np.arange(len(y)), y] -= 1
    Z /= len(y)
    grads = []
    G = Z
    for index in range(len(params) - 2, -1, -2):
        A = activations.pop()
        grads = [A.T @ G, G.sum(0), *grads]
        if index:
            G = G @ params[index].T
            G *= A > 0
    for p, v, g in zip(params, velocity, grads, strict=True):
        v *= momentum
        v += g
        p -= lr * v


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="784,512,256,10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=121)
    parser.add_argument("--reps", type=int, default=2, help="steps per block")
    parser.add_argument("--pause", type=float, default=0.02)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    dtype = np.float32
    rng = np.random.default_rng(0)
    X = rng.standard_normal((args.batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], args.batch)
    net = fastlinear.Sequential(*make_layers(sizes, dtype), backend="numba")
    params = [a.copy() for layer in make_layers(sizes, dtype) for a in (layer.W, layer.b)]
    velocity = [np.zeros_like(p) for p in params]

    def step(threshold):
        sequential.ROW_SPLIT_MIN_WORK = threshold
        net.train_step(X, y, loss="softmax_cross_entropy", lr=0.01, momentum=0.9)

    def one_blas_thread():
        with _numba_blas.one_blas_thread():
            step(1 << 62)

    contenders = {"numpy": lambda: numpy_step(params, velocity, X, y, 0.01, 0.9),
                  "one call": lambda: step(1 << 62), "split": lambda: step(0),
                  "one call, 1 BLAS thr": one_blas_thread}
    for function in contenders.values():
        function()
        function()
    times = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(args.rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(args.reps):
                contenders[name]()
            times[name].append((time.perf_counter() - start) / args.reps)
            time.sleep(args.pause)
    print(f"{'-'.join(map(str, sizes))}, batch {args.batch}, {args.rounds} rounds, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    median0, min0 = np.median(times["numpy"]), min(times["numpy"])
    for name, values in times.items():
        print(f"  {name:<22} median {np.median(values) * 1e6:9.1f} us  min "
              f"{min(values) * 1e6:9.1f} us  xNumPy {median0 / np.median(values):.2f} "
              f"({min0 / min(values):.2f})")


if __name__ == "__main__":
    main()
