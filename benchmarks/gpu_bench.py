"""GPU benchmark: fastlinear's cupy backend against PyTorch's ``torch.nn.functional.linear``.

Run from the repository root on a machine with a CUDA GPU, CuPy and PyTorch::

    python benchmarks/gpu_bench.py                       # all shapes, float32 and float16
    python benchmarks/gpu_bench.py --reps 50 --log my.log

For each shape (N, D, M) and dtype it times, with CUDA events on the default stream (the
median of ``--reps`` runs after ``--warmup`` runs; host work the GPU waits for, such as argument
checks and launches, counts for both libraries):

* forward  ``Y = X @ W + b``: ``fastlinear.linear_forward(..., backend="cupy")`` (the shape rule
  picks the path) vs ``F.linear(X, W.T, b)`` (the same memory, shared through DLPack);
* backward ``dX, dW, db``: ``fastlinear.linear_backward(..., backend="cupy")`` vs autograd's
  ``Y.backward(dY)`` (the forward that builds the graph runs before the start event);
* every forward path of the cupy backend forced in turn (``cublas_beta``, ``cublas_epilogue``,
  ``tiled``, ``small_batch`` where the shape allows), to set the shape rule's thresholds.

It reports milliseconds, TFLOP/s (forward 2 N D M flops, backward 4 N D M) and the ratio
torch time / fastlinear time (above 1: fastlinear is faster), plus the largest relative
difference between the two results. Precision: float32 with TF32 off in both (torch's
``allow_tf32`` flags off; fastlinear calls cuBLAS with CUBLAS_COMPUTE_32F and CuPy's default
math mode); float16 with float32 accumulation in both (torch's
``allow_fp16_reduced_precision_reduction`` off). The header names the device and versions.
"""

import argparse
import datetime
import pathlib
import platform
import statistics
import sys

SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (32, 4096, 4096), (1, 8192, 8192),
          (16384, 1024, 1024)]
DTYPES = ("float32", "float16")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--log", type=pathlib.Path, default=None,
                        help="log file (default benchmarks/results/gpu_bench-<UTC time>.log)")
    parser.add_argument("--no-paths", action="store_true",
                        help="skip the table of forced forward paths")
    return parser.parse_args(argv)


class Log:
    """Print and append to the log file."""

    def __init__(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, line=""):
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def median_ms(run, record_start, record_end, elapsed_ms, reps, warmup, setup=None):
    """Median milliseconds of ``run()`` between two CUDA events (``setup()`` runs untimed)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        run()
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        start = record_start()
        run()
        end = record_end()
        times.append(elapsed_ms(start, end))
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cupy as cp
    import numpy as np
    import torch
    import torch.nn.functional as F

    import fastlinear
    from fastlinear.backends import cupy as cupy_backend

    if not torch.cuda.is_available():
        sys.exit("PyTorch sees no CUDA device")
    reason = fastlinear.available_backends()["cupy"]
    if reason:
        sys.exit(reason)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    stamp = datetime.datetime.now(datetime.timezone.utc)
    log = Log(args.log or ROOT / "benchmarks" / "results"
              / f"gpu_bench-{stamp:%Y%m%d-%H%M%S}.log")

    # cupy events for fastlinear, torch events for torch: each on its library's current stream.
    def cupy_event():
        event = cp.cuda.Event()
        event.record()
        return event

    def cupy_elapsed(start, end):
        end.synchronize()
        return cp.cuda.get_elapsed_time(start, end)

    def torch_event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def torch_elapsed(start, end):
        end.synchronize()
        return start.elapsed_time(end)

    def time_cupy(run, setup=None):
        return median_ms(run, cupy_event, cupy_event, cupy_elapsed, args.reps, args.warmup, setup)

    def time_torch(run, setup=None):
        return median_ms(run, torch_event, torch_event, torch_elapsed, args.reps, args.warmup,
                         setup)

    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    from cupy_backends.cuda.libs import cublas

    log(f"# fastlinear GPU benchmark, {stamp:%Y-%m-%d %H:%M:%S} UTC, host {platform.node()}")
    log(f"# device {device.id}: {name}, compute capability {props['major']}.{props['minor']}, "
        f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.1f} GiB")
    log(f"# CUDA driver {cp.cuda.runtime.driverGetVersion()}, runtime "
        f"{cp.cuda.runtime.runtimeGetVersion()}, cuBLAS "
        f"{cublas.getVersion(cp.cuda.device.get_cublas_handle())}")
    log(f"# python {platform.python_version()}, numpy {np.__version__}, cupy {cp.__version__}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), fastlinear "
        f"{fastlinear.__version__}")
    log("# float32: TF32 off in both (torch allow_tf32=False; fastlinear CUBLAS_COMPUTE_32F, "
        "CuPy default math mode). float16: float32 accumulation in both (torch "
        "allow_fp16_reduced_precision_reduction=False).")
    log(f"# median of {args.reps} runs after {args.warmup} warm-up runs, CUDA events; "
        "ratio = torch ms / fastlinear ms (>1: fastlinear faster)")
    log(f"# shape rule: small_batch for N <= {cupy_backend.SMALL_BATCH_MAX_ROWS}, tiled for "
        f"N*D*M <= {cupy_backend.TILED_MAX_WORK}, else cublas_beta")
    log()
    header = (f"{'pass':8} {'dtype':8} {'N':>6} {'D':>6} {'M':>6} {'path':16} "
              f"{'fl ms':>9} {'fl TF/s':>8} {'torch ms':>9} {'torch TF/s':>10} "
              f"{'ratio':>6} {'max rel diff':>12}")
    log(header)
    path_rows = []

    def run_case(dtype_name, N, D, M):
        """Log the forward and backward rows of one case; collect its forced-path rows."""
        dtype = np.dtype(dtype_name)
        rng = cp.random.default_rng(0)
        X = rng.standard_normal((N, D), dtype=np.float32).astype(dtype)
        W = (rng.standard_normal((D, M), dtype=np.float32) / np.sqrt(D)).astype(dtype)
        b = rng.standard_normal(M, dtype=np.float32).astype(dtype)
        dY = rng.standard_normal((N, M), dtype=np.float32).astype(dtype)
        Xt = torch.from_dlpack(X)
        weight = torch.from_dlpack(W).t()  # (M, D), PyTorch's layout, same memory
        bt, dYt = torch.from_dlpack(b), torch.from_dlpack(dY)
        flops = 2.0 * N * D * M
        w_steps = cupy_backend.element_strides(W)
        rule = cupy_backend.forward_path(N, D, M, w_steps[1] == 1)

        def diff(ours, theirs):
            ours = cp.asarray(ours, dtype=cp.float64)
            theirs = cp.asarray(theirs, dtype=cp.float64)
            return float(cp.abs(ours - theirs).max() / max(float(cp.abs(theirs).max()),
                                                            1e-30))

        # forward
        ours_ms = time_cupy(lambda: fastlinear.linear_forward(X, W, b, backend="cupy"))
        torch_ms = time_torch(lambda: F.linear(Xt, weight, bt))
        rel = diff(fastlinear.linear_forward(X, W, b, backend="cupy"),
                   cp.from_dlpack(F.linear(Xt, weight, bt).detach()))
        log(f"{'forward':8} {dtype_name:8} {N:6} {D:6} {M:6} {rule:16} {ours_ms:9.3f} "
            f"{flops / ours_ms / 1e9:8.1f} {torch_ms:9.3f} {flops / torch_ms / 1e9:10.1f} "
            f"{torch_ms / ours_ms:6.2f} {rel:12.2e}")

        # backward (dX, dW, db)
        ours_ms = time_cupy(lambda: fastlinear.linear_backward(dY, X, W, backend="cupy"))
        leaves = {}

        def torch_forward():
            leaves["X"] = Xt.detach().requires_grad_()
            leaves["weight"] = weight.detach().requires_grad_()
            leaves["b"] = bt.detach().requires_grad_()
            leaves["Y"] = F.linear(leaves["X"], leaves["weight"], leaves["b"])

        torch_ms = time_torch(lambda: leaves["Y"].backward(dYt), setup=torch_forward)
        torch_forward()
        leaves["Y"].backward(dYt)
        dX, dW, db = fastlinear.linear_backward(dY, X, W, backend="cupy")
        rel = max(diff(dX, cp.from_dlpack(leaves["X"].grad)),
                  diff(dW, cp.from_dlpack(leaves["weight"].grad.t().contiguous())),
                  diff(db, cp.from_dlpack(leaves["b"].grad)))
        log(f"{'backward':8} {dtype_name:8} {N:6} {D:6} {M:6} {'cublas+colsum':16} "
            f"{ours_ms:9.3f} {2 * flops / ours_ms / 1e9:8.1f} {torch_ms:9.3f} "
            f"{2 * flops / torch_ms / 1e9:10.1f} {torch_ms / ours_ms:6.2f} {rel:12.2e}")
        leaves.clear()

        if not args.no_paths:
            for path in cupy_backend.FORWARD_PATHS:
                if path == "small_batch" and N > 64:
                    continue  # one block row per 8 rows: meant for tiny batches only
                if path == "tiled" and N * D * M > 1 << 34:
                    continue  # far slower than cuBLAS there; not worth the minutes
                with cupy_backend.forced_forward_path(path):
                    path_ms = time_cupy(
                        lambda: fastlinear.linear_forward(X, W, b, backend="cupy"))
                path_rows.append((dtype_name, N, D, M, path, path_ms, flops / path_ms / 1e9,
                                  path == rule))

    for dtype_name in DTYPES:
        for N, D, M in SHAPES:
            run_case(dtype_name, N, D, M)
            cp.get_default_memory_pool().free_all_blocks()  # the case's arrays are gone
            torch.cuda.empty_cache()

    if path_rows:
        log()
        log("# forward paths of the cupy backend, each forced ('*' = the shape rule's choice)")
        log(f"{'dtype':8} {'N':>6} {'D':>6} {'M':>6} {'path':16} {'ms':>9} {'TF/s':>8}")
        for dtype_name, N, D, M, path, ms, tflops, chosen in path_rows:
            log(f"{dtype_name:8} {N:6} {D:6} {M:6} {path:16} {ms:9.3f} {tflops:8.1f}"
                f"{' *' if chosen else ''}")
    log()
    log(f"# log written to {log.path}")


if __name__ == "__main__":
    main()
