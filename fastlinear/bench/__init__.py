"""Side-by-side benchmark, ``python -m fastlinear bench``: every backend vs NumPy, PyTorch, BLAS.

In one run, for each case and dtype it times, on the same random data,

* single layers at each shape ``(N, D, M)``: forward through ``fastlinear.Linear.forward`` and
  backward through ``Linear.backward`` (dX, dW, db) per available backend; NumPy's bare
  ``X @ W + b`` and its three backward products; PyTorch's ``F.linear`` and its autograd backward
  when PyTorch is importable; the machine's GEMM ``A @ B`` (cuBLAS for a GPU backend), the ceiling
  a forward pass can reach (``contenders``);
* the demo's network, a training step (forward and backward through every layer), beside the same
  math by hand in NumPy and in PyTorch eager autograd (``training``);
* fused linear + ReLU layers: a small layer's forward and backward, and a large forward beside the
  bare GEMM (``contenders``);

then prints tables (median time, GFLOP/s, speed-ups over NumPy, PyTorch and the GEMM ceiling,
backward/forward, peak allocation) under a header of machine, versions and thread counts
(``fastlinear.info``), and writes JSON and a PNG plot. The shapes are in ``grid``; how each
contender is timed is in ``timing``, the core the asv suite (``asv_benchmarks/``) uses too.
"""

from fastlinear.bench.cli import main, run_benchmark

__all__ = ["main", "run_benchmark"]
