"""The narrow last layer's three products (issue 17): OpenBLAS against plain numba loops.

For a layer of D inputs and M outputs, M small (64 -> 10 in the 64-128-64-10 network), batch N:
forward ``H = A @ W + b`` (N x D x M), ``dW = A.T @ G`` and ``dA = G @ W.T``. ``_numba_network``
calls gemm for each (~1.3 us warm at M = 10); the idea tested was plain loops inside the step.
Loops, all in one ``@njit`` call of ``repeats`` products, as the step would run them:

* forward ``axpy``: per row, ``H[n] += A[n, k] * W[k]``, inner loop over the M outputs;
* forward ``dot``: ``W`` transposed into a scratch (M, D), then dot products of length D
  (``fastmath`` reassoc/contract, so the sums vectorise);
* backward ``fused``: G read once, per (n, k) the dot ``G[n] . W[k]`` and ``dW[k] += A[n, k] G[n]``,
  inner loops over the M outputs;
* backward ``transposed``: ``W`` and ``dW`` transposed (M, D), per (n, j) ``dA[n] += G[n, j]
  W.T[j]`` and ``dW.T[j] += G[n, j] A[n]``, inner loops of length D, contiguous;
* backward ``split``: the same two loops one after the other (``fastmath``).

Prints us per layer (forward: bias + product; backward: both products), median / minimum of
interleaved rounds. Run: ``flock /work/bench.lock python benchmarks/narrow_layer_loops.py``
(about 20 s).
"""

import os
import time

import numpy as np
from numba import njit

from fastlinear.backends._numba_blas import blas_routines
from fastlinear.backends._numba_network import _product

FAST = {"reassoc", "contract"}


@njit
def blas_forward(gemm, int_bits, A, W, b, H, repeats):
    for _ in range(repeats):
        for n in range(H.shape[0]):
            for j in range(H.shape[1]):
                H[n, j] = b[j]
        _product(gemm, int_bits, A, False, W, False, H, 1.0)


@njit
def blas_backward(gemm, int_bits, A, G, W, dW, dA, repeats):
    for _ in range(repeats):
        _product(gemm, int_bits, A, True, G, False, dW, 0.0)
        _product(gemm, int_bits, G, False, W, True, dA, 0.0)


@njit
def _transposed(W):
    D, M = W.shape
    WT = np.empty((M, D), W.dtype)
    for k in range(D):
        for j in range(M):
            WT[j, k] = W[k, j]
    return WT


@njit
def axpy_forward(A, W, b, H, repeats):
    for _ in range(repeats):
        for n in range(H.shape[0]):
            row, a = H[n], A[n]
            for j in range(H.shape[1]):
                row[j] = b[j]
            for k in range(A.shape[1]):
                ak, w = a[k], W[k]
                for j in range(H.shape[1]):
                    row[j] += ak * w[j]


@njit(fastmath=FAST)
def dot_forward(A, W, b, H, repeats):
    for _ in range(repeats):
        WT = _transposed(W)
        for n in range(H.shape[0]):
            a = A[n]
            for j in range(H.shape[1]):
                w, s = WT[j], b[j]
                for k in range(A.shape[1]):
                    s += a[k] * w[k]
                H[n, j] = s


@njit
def fused_backward(A, G, W, dW, dA, repeats):
    for _ in range(repeats):
        dW[:] = 0
        for n in range(G.shape[0]):
            g, a = G[n], A[n]
            for k in range(A.shape[1]):
                w, dw, ak = W[k], dW[k], a[k]
                s = g.dtype.type(0)
                for j in range(G.shape[1]):
                    s += g[j] * w[j]
                    dw[j] += ak * g[j]
                dA[n, k] = s


@njit
def transposed_backward(A, G, W, dW, dA, repeats):
    for _ in range(repeats):
        WT = _transposed(W)
        dWT = np.zeros_like(WT)
        for n in range(G.shape[0]):
            g, a, d = G[n], A[n], dA[n]
            d[:] = 0
            for j in range(G.shape[1]):
                gj, w, dw = g[j], WT[j], dWT[j]
                for k in range(A.shape[1]):
                    d[k] += gj * w[k]
                    dw[k] += gj * a[k]
        dW[:] = dWT.T


@njit(fastmath=FAST)
def split_backward(A, G, W, dW, dA, repeats):
    for _ in range(repeats):
        WT = _transposed(W)
        dWT = np.zeros_like(WT)
        for n in range(G.shape[0]):
            g, d = G[n], dA[n]
            d[:] = 0
            for j in range(G.shape[1]):
                gj, w = g[j], WT[j]
                for k in range(A.shape[1]):
                    d[k] += gj * w[k]
        for n in range(G.shape[0]):
            g, a = G[n], A[n]
            for j in range(G.shape[1]):
                gj, dw = g[j], dWT[j]
                for k in range(A.shape[1]):
                    dw[k] += gj * a[k]
        dW[:] = dWT.T


def compare(rows, inputs, outputs, dtype=np.float32, repeats=200, rounds=60):
    blas = blas_routines(dtype)
    rng = np.random.default_rng(0)
    A, G = (rng.standard_normal(shape).astype(dtype) for shape in
            ((rows, inputs), (rows, outputs)))
    W, b = rng.standard_normal((inputs, outputs)).astype(dtype), rng.standard_normal(
        outputs).astype(dtype)
    H, dW, dA = np.empty((rows, outputs), dtype), np.empty_like(W), np.empty_like(A)
    forward = {"blas": lambda r: blas_forward(blas.gemm, blas.int_bits, A, W, b, H, r),
               "axpy": lambda r: axpy_forward(A, W, b, H, r),
               "dot": lambda r: dot_forward(A, W, b, H, r)}
    backward = {"blas": lambda r: blas_backward(blas.gemm, blas.int_bits, A, G, W, dW, dA, r),
                "fused": lambda r: fused_backward(A, G, W, dW, dA, r),
                "transposed": lambda r: transposed_backward(A, G, W, dW, dA, r),
                "split": lambda r: split_backward(A, G, W, dW, dA, r)}
    for call in forward.values():  # compile, and check against NumPy
        call(1)
        np.testing.assert_allclose(H, A @ W + b, rtol=1e-4, atol=1e-4)
    for call in backward.values():
        call(1)
        np.testing.assert_allclose(dW, A.T @ G, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dA, G @ W.T, rtol=1e-4, atol=1e-4)
    calls = {**{f"F {k}": v for k, v in forward.items()},
             **{f"B {k}": v for k, v in backward.items()}}
    times = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name](repeats)
            times[name].append((time.perf_counter() - start) / repeats * 1e6)
            time.sleep(0.001)
    print(f"N {rows} D {inputs} M {outputs}: " + "  ".join(
        f"{name} {np.median(t):.2f}/{min(t):.2f}" for name, t in times.items()))


def main():
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; us median/min")
    for outputs in (4, 8, 10, 16):
        compare(32, 64, outputs)
    compare(128, 256, 10)


if __name__ == "__main__":
    main()
