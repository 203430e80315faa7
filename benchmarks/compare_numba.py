"""Side-by-side timings of the numba backend against NumPy (and PyTorch CPU when importable).

Interleaved rounds (every candidate once per round, a short sleep between blocks), medians of
the per-call times. Run from the repository root:

    PYTHONPATH=. python benchmarks/compare_numba.py --dtype float32 --rounds 9
"""

import argparse
import platform
import statistics
import time

import numpy as np

import fastlinear

GRID = ((32, 64, 64), (64, 256, 256), (256, 1024, 1024), (1024, 1024, 1024),
        (2048, 4096, 1024), (8192, 512, 512), (1, 4096, 4096))


def per_call(fn, target_s=0.02):
    """Seconds per call of ``fn``, repeated to fill about ``target_s``."""
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    reps = max(1, min(2000, int(target_s / max(once, 1e-7))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def candidates(N, D, M, dtype, rng):
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    dY = rng.standard_normal((N, M)).astype(dtype)
    layer = fastlinear.Linear(D, M, dtype=dtype, backend="numba")
    layer.W, layer.b = W, b
    layer.forward(X)
    found = {
        "np_fwd": lambda: X @ W + b,
        "gemm": lambda: X @ W,
        "fl_fwd": lambda: layer.forward(X),
        "np_bwd": lambda: (dY @ W.T, X.T @ dY, dY.sum(0)),
        "fl_bwd": lambda: layer.backward(dY),
    }
    try:
        import torch
    except ImportError:
        return found
    tX, tW, tb, tdY = (torch.from_numpy(a) for a in (X, np.ascontiguousarray(W.T), b, dY))
    found["torch_fwd"] = lambda: torch.nn.functional.linear(tX, tW, tb)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", default=None, help="indices into the grid, e.g. 0,1,6")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    shapes = GRID if args.shapes is None else [GRID[int(i)] for i in args.shapes.split(",")]
    try:
        import torch

        torch.set_num_threads(2)
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    import numba
    from threadpoolctl import threadpool_info

    print(f"# {platform.processor() or platform.machine()}, numpy {np.__version__}, numba "
          f"{numba.__version__} ({numba.get_num_threads()} threads), torch {torch_version}, "
          f"BLAS threads {[i['num_threads'] for i in threadpool_info()]}, dtype {dtype}")
    rng = np.random.default_rng(0)
    header = ("N", "D", "M", "np_fwd", "gemm", "fl_fwd", "fwd/np", "fwd/gemm", "np_bwd",
              "fl_bwd", "bwd/fwd", "bwd vs np", "torch", "vs torch", "stat")
    print(" ".join(f"{h:>9}" for h in header))
    for N, D, M in shapes:
        fns = candidates(N, D, M, dtype, rng)
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(per_call(fn))
                time.sleep(0.05)
            time.sleep(0.3)
        for label, summary in (("median", statistics.median), ("min", min)):
            med = {name: summary(t) for name, t in times.items()}
            torch_t = med.get("torch_fwd")
            row = [N, D, M] + [f"{med[k] * 1e6:.1f}" for k in ("np_fwd", "gemm", "fl_fwd")] + [
                f"{med['np_fwd'] / med['fl_fwd']:.2f}", f"{med['gemm'] / med['fl_fwd']:.2f}",
                f"{med['np_bwd'] * 1e6:.1f}", f"{med['fl_bwd'] * 1e6:.1f}",
                f"{med['fl_bwd'] / med['fl_fwd']:.2f}", f"{med['np_bwd'] / med['fl_bwd']:.2f}",
                "-" if torch_t is None else f"{torch_t * 1e6:.1f}",
                "-" if torch_t is None else f"{torch_t / med['fl_fwd']:.2f}", label]
            print(" ".join(f"{v:>9}" for v in row), flush=True)
    print("# times in microseconds (median, then minimum, of rounds); fwd/np, fwd/gemm, "
          "bwd vs np, vs torch: speed ratios (>1: fastlinear faster); bwd/fwd: time ratio")


if __name__ == "__main__":
    main()
