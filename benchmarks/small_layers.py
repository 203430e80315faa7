"""Small layers (N*D*M up to 2**22) side by side: which way is fastest on this machine.

Contenders, each a fused ReLU layer ``relu(X @ W + b)`` and its backward (dX, dW, db):

* ``numpy``: ``np.maximum(X @ W + b, 0)``; ``G = dY * (Y > 0)``, ``G @ W.T``, ``X.T @ G``,
  ``G.sum(0)`` (NumPy's OpenBLAS, as the reference backend does it).
* ``blas-njit``: the numba backend as shipped: one compiled call around NumPy's OpenBLAS, bias
  and activation in its epilogue, ``G`` and ``db`` in one pass before the two gemms.
* ``rank1-njit``: an ``@njit`` kernel with no BLAS: 4 rows of ``Y`` at a time, each row of ``W``
  streamed once per 4 rows as rank-1 updates of those rows (in L1), bias and ReLU in the
  epilogue. Backward: the numba backend's skinny kernel (dot products over M for dX, rank-1
  updates of dW's rows) on the calling thread, for any N.
* ``dX-gemm`` and ``dX-rows`` (backward): the shipped backward with dX = G @ W.T by OpenBLAS's
  gemm, or by the register-blocked ``_rows_dot_rows`` (4 x 4 blocks of dot products in
  registers); ``blas-njit`` chooses between them by ``ROWS_DOT_ROWS_*``.

Timings are medians of interleaved rounds (A B C A B C ...), microseconds per call, backend
entry points called directly (no dispatcher). Also the demo MLP's training step (64-128-64-10,
ReLU, batch 32) against plain NumPy: through the public API, and through the numba backend's
entry points (the part of the step the dispatcher does not add).

Run: ``python benchmarks/small_layers.py [--rounds 31] [--dtype float32]``; prints a table.
Numbers from a busy machine are noisy: rerun on a quiet one before choosing thresholds.
"""

import argparse
import os
import platform
import time

import numba
import numpy as np
from numba import njit

import fastlinear
from fastlinear.backends import _numba_blas, _numba_layer
from fastlinear.backends import numba as nb

SHAPES = [(32, 64, 10), (32, 64, 64), (32, 64, 128), (32, 128, 64), (64, 64, 64),
          (64, 128, 128), (128, 128, 128), (256, 256, 64)]


@njit(cache=True, fastmath={"contract"})
def rank1_forward(X, W, b, Y):
    """``Y = relu(X @ W + b)`` (all C-contiguous): 4 rows of Y updated per row of W."""
    N, D = X.shape
    M = W.shape[1]
    for i0 in range(0, N, 4):
        rows = min(4, N - i0)
        for r in range(rows):
            y = Y[i0 + r]
            for j in range(M):
                y[j] = b[j]
        if rows == 4:
            y0, y1, y2, y3 = Y[i0], Y[i0 + 1], Y[i0 + 2], Y[i0 + 3]
            for k in range(D):
                w = W[k]
                x0, x1, x2, x3 = X[i0, k], X[i0 + 1, k], X[i0 + 2, k], X[i0 + 3, k]
                for j in range(M):
                    wj = w[j]
                    y0[j] += x0 * wj
                    y1[j] += x1 * wj
                    y2[j] += x2 * wj
                    y3[j] += x3 * wj
        else:
            for r in range(rows):
                y = Y[i0 + r]
                for k in range(D):
                    w = W[k]
                    x = X[i0 + r, k]
                    for j in range(M):
                        y[j] += x * w[j]
        for r in range(rows):
            y = Y[i0 + r]
            for j in range(M):
                if y[j] < 0:
                    y[j] = 0


def median_times(contenders, rounds, min_seconds=0.02):
    """Median microseconds per call of each ``name -> function``, interleaved by round."""
    reps = {}
    for name, function in contenders.items():
        function()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds:
            function()
            count += 1
        reps[name] = max(count, 1)
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, function in contenders.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                function()
            samples[name].append((time.perf_counter() - start) / reps[name] * 1e6)
    return {name: float(np.median(values)) for name, values in samples.items()}


def layer_contenders(N, D, M, dtype):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    dY = rng.standard_normal((N, M)).astype(dtype)
    Y = nb.forward(X, W, b, None, activation="relu")
    Y_rank1 = np.empty_like(Y)
    rank1_forward(X, W, b, Y_rank1)
    assert np.allclose(Y, Y_rank1, rtol=1e-3, atol=1e-3)
    skinny = _numba_layer.compile_function(("skinny_backward", np.dtype(dtype), True, True, True))
    relu = 1  # _numba_activations.RELU

    def numpy_backward():
        G = dY * (Y > 0)
        return G @ W.T, X.T @ G, G.sum(0)

    def blas_backward():
        return nb.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False, dX=None,
                           dW=None, db=None, activation="relu", saved=Y)

    blas = _numba_blas.blas_routines(np.dtype(dtype))
    backward_function = _numba_layer.compile_function(
        ("backward", np.dtype(dtype), True, True, True))

    def blas_backward_dX_by(rows):
        def run():
            dX, dW, db = np.empty_like(X), np.empty_like(W), np.empty_like(b)
            backward_function(blas.gemm, blas.int_bits, dY, X, W, dX, dW, db, False, relu, Y,
                              rows)
            return dX, dW, db
        return run

    def rank1_backward():
        dX, dW, db = np.empty_like(X), np.empty_like(W), np.empty_like(b)
        nb._run_on_one_thread(skinny, dY, X, W, dX, dW, db, False, relu, Y)
        return dX, dW, db

    forward = {"numpy": lambda: np.maximum(X @ W + b, 0),
               "blas-njit": lambda: nb.forward(X, W, b, None, activation="relu"),
               "rank1-njit": lambda: rank1_forward(X, W, b, np.empty_like(Y))}
    backward = {"numpy": numpy_backward, "blas-njit": blas_backward,
                "dX-gemm": blas_backward_dX_by(False), "dX-rows": blas_backward_dX_by(True),
                "rank1-njit": rank1_backward}
    reference = numpy_backward()
    for contender in backward.values():
        for got, want in zip(contender(), reference, strict=True):
            assert np.allclose(got, want, rtol=1e-3, atol=1e-3)
    return forward, backward


def mlp_contenders(dtype, batch=32, sizes=(64, 128, 64, 10)):
    """The demo network's training step (no optimizer): fastlinear against plain NumPy."""
    rng = np.random.default_rng(1)
    Ws = [(rng.standard_normal((i, o)) / np.sqrt(i)).astype(dtype)
          for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    bs = [rng.standard_normal(o).astype(dtype) for o in sizes[1:]]
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    dOut = rng.standard_normal((batch, sizes[-1])).astype(dtype)
    acts = ["relu"] * (len(Ws) - 1) + [None]

    def numpy_step():
        inputs, outputs = [X], []
        for W, b, act in zip(Ws, bs, acts, strict=True):
            Z = inputs[-1] @ W + b
            outputs.append(np.maximum(Z, 0) if act else Z)
            inputs.append(outputs[-1])
        grad = dOut
        for layer in reversed(range(len(Ws))):
            if acts[layer]:
                grad = grad * (outputs[layer] > 0)
            _ = inputs[layer].T @ grad, grad.sum(0)
            if layer:
                grad = grad @ Ws[layer].T

    def fastlinear_step():
        inputs, saved = [X], []
        for W, b, act in zip(Ws, bs, acts, strict=True):
            Y, s = fastlinear.linear_forward(inputs[-1], W, b, activation=act,
                                             return_saved=True)
            inputs.append(Y)
            saved.append(s)
        grad = dOut
        for layer in reversed(range(len(Ws))):
            grad, _, _ = fastlinear.linear_backward(
                grad, inputs[layer], Ws[layer], activation=acts[layer], saved=saved[layer],
                need_dX=layer > 0)

    def backend_step():
        inputs, saved = [X], []
        for W, b, act in zip(Ws, bs, acts, strict=True):
            Y = nb.forward(inputs[-1], W, b, None, activation=act)
            inputs.append(Y)
            saved.append(Y)
        grad = dOut
        for layer in reversed(range(len(Ws))):
            grad, _, _ = nb.backward(grad, inputs[layer], Ws[layer], has_bias=True,
                                     need_dX=layer > 0, accumulate=False, dX=None, dW=None,
                                     db=None, activation=acts[layer], saved=saved[layer])

    return {"numpy": numpy_step, "fastlinear": fastlinear_step, "backend": backend_step}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS and Numba threads (default: as they are)")
    args = parser.parse_args()
    if args.threads:
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")
    dtype = np.dtype(args.dtype)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"numpy {np.__version__}, numba {numba.__version__}, "
          f"threads {numba.get_num_threads()}, {dtype}, ReLU, medians of "
          f"{args.rounds} interleaved rounds, us per call (GFLOP/s)")
    for N, D, M in SHAPES:
        forward, backward = layer_contenders(N, D, M, dtype)
        for label, contenders, flops in (("forward", forward, 2 * N * D * M),
                                         ("backward", backward, 4 * N * D * M)):
            times = median_times(contenders, args.rounds)
            cells = "  ".join(f"{name} {value:.2f} ({flops / value / 1e3:.0f})"
                              for name, value in times.items())
            print(f"{f'{N}x{D}x{M}':>13} {label:>8}: {cells}; fastest {min(times, key=times.get)}")
    with fastlinear.use_backend("numba"):
        times = median_times(mlp_contenders(dtype), args.rounds)
    print(f"MLP 64-128-64-10 batch 32 training step: numpy {times['numpy']:.1f} us; fastlinear "
          f"(numba) {times['fastlinear']:.1f} us ({times['numpy'] / times['fastlinear']:.2f}x); "
          f"numba backend without the dispatcher {times['backend']:.1f} us "
          f"({times['numpy'] / times['backend']:.2f}x)")


if __name__ == "__main__":
    main()
