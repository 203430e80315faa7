"""The ReLU gradient in place: the network module's own loop (``_output_gradient``, without
bias sums) against the shared ``_numba_activations.activation_grad(code, g, saved, g)`` with
``dy`` and ``g`` the same row, both row by row.

Both are the same select; the shared one's two arguments may alias, which kept its loop from
vectorising. Rounds alternate the order; prints ns per element, median and minimum.

Run: ``flock /work/bench.lock python benchmarks/relu_grad_in_place.py`` (about 30 s).
"""

import os
import time

import numpy as np
from numba import njit

from fastlinear.backends._numba_activations import RELU, activation_grad
from fastlinear.backends._numba_network import _output_gradient


@njit
def own_loop(G, saved, repeats):
    no_sums = G[0, :0]
    for _ in range(repeats):
        for n in range(G.shape[0]):
            _output_gradient(RELU, G[n:n + 1], saved[n:n + 1], no_sums)


@njit
def shared_loop(G, saved, repeats):
    for _ in range(repeats):
        for n in range(G.shape[0]):
            activation_grad(RELU, G[n], saved[n], G[n])


def main(rounds=15):
    rng = np.random.default_rng(0)
    contenders = (("own", own_loop), ("shared", shared_loop))
    for dtype in (np.float32, np.float64):
        for shape in ((32, 128), (256, 128), (128, 512)):
            G = rng.standard_normal(shape).astype(dtype)
            saved = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
            repeats = max(1, int(2e6 // G.size))
            times = {name: [] for name, _ in contenders}
            for _, function in contenders:
                function(G, saved, 1)  # compile
            for index in range(rounds):
                for name, function in contenders[::1 if index % 2 else -1]:
                    start = time.perf_counter()
                    function(G, saved, repeats)
                    times[name].append((time.perf_counter() - start) / repeats / G.size * 1e9)
                time.sleep(0.05)
            cells = [f"{name}: median {np.median(t):.3f}, min {min(t):.3f}"
                     for name, t in times.items()]
            print(f"{np.dtype(dtype).name} {shape}  " + "  ".join(cells) + "  ns/element")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"load average at the end: {load}")


if __name__ == "__main__":
    main()
