"""GPU benchmark: fastlinear's cupy backend against PyTorch, with fused activations.

Run from the repository root on a machine with a CUDA GPU, CuPy and PyTorch::

    python benchmarks/gpu_bench.py                       # every shape, dtype and activation
    python benchmarks/gpu_bench.py --quick               # a few shapes, None and relu
    python benchmarks/gpu_bench.py --reps 50 --log my.log

The header names the device, compute capability, driver, CUDA runtime, cuBLAS, NVRTC, Python,
NumPy, CuPy, PyTorch and fastlinear versions and the shape rule's constants. For each dtype
(float16, float32, float64), shape (N, D, M) and activation it times, with CUDA events on the
current stream (the median of ``--reps`` runs after ``--warmup`` runs; host work the GPU waits
for, such as argument checks and launches, counts for both libraries):

* forward ``Y = act(X @ W + b)``: ``fastlinear.linear_forward(..., activation=...)`` (the shape
  rule picks the path; GELUs also store the pre-activation, as training needs) vs
  ``act(F.linear(X, W.T, b))`` (the same memory, shared through DLPack);
* backward ``dX, dW, db``: ``fastlinear.linear_backward(..., activation=..., saved=...)`` vs
  autograd's ``Y.backward(dY)`` through ``act(F.linear(...))`` (the forward that builds the graph
  runs before the start event);
* unless ``--no-paths``: every forward path of the cupy backend forced in turn (``small_batch``,
  ``tiled``, ``cublas``), and, for the bias without an activation, the alternative
  ``cublas+epilogue`` (a beta = 0 GEMM, then the bias added by ``bias_activation_epilogue``)
  against the product's ``fill_rows_with_bias`` + beta = 1 GEMM: the table to set the path
  thresholds (``cupy_launch.PathThresholds``; ``fastlinear.backends.cupy_tune`` measures them)
  and the bias method from.

It reports milliseconds, TFLOP/s (forward 2 N D M flops, backward 4 N D M) and the ratio
torch time / fastlinear time (above 1: fastlinear is faster), plus the largest difference between
the two results relative to the largest |value|. Precision: float32 with TF32 off in both
(torch's ``allow_tf32`` flags off; fastlinear calls cuBLAS with CUBLAS_COMPUTE_32F and CuPy's
default math mode); float16 with float32 accumulation in both (torch's
``allow_fp16_reduced_precision_reduction`` off).
"""

import argparse
import datetime
import pathlib
import platform
import statistics
import subprocess
import sys

# (N, D, M): large GEMMs, batches of 32 and 1, the demo's layer, tall-and-narrow, and the long-D
# shapes that a kernel without a split over D would serve from one block.
SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 1024, 1024), (64, 4096, 4096),
          (32, 4096, 4096), (8, 8192, 8192), (1, 8192, 8192), (32, 64, 128), (256, 128, 64),
          (9, 2**18, 1), (1, 2**18, 32)]
QUICK_SHAPES = [(4096, 4096, 4096), (32, 4096, 4096), (1, 8192, 8192), (32, 64, 128)]
DTYPES = ("float16", "float32", "float64")
ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh", "tanh", "sigmoid")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="timed runs per case (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    parser.add_argument("--quick", action="store_true",
                        help="a few shapes, no activation and relu only")
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
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


def git_commit():
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"


def torch_activation(F, torch, activation):
    """PyTorch's function for a fastlinear activation name (None: identity)."""
    return {
        None: lambda y: y,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }[activation]


def log_header(log, args, stamp, cp, np, torch, fastlinear, cupy_launch):
    from cupy_backends.cuda.libs import cublas

    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    try:
        nvrtc = ".".join(map(str, cp.cuda.nvrtc.getVersion()))
    except Exception as exc:  # the version is informative only
        nvrtc = f"unknown ({exc})"
    log(f"# fastlinear GPU benchmark, {stamp:%Y-%m-%d %H:%M:%S} UTC, host {platform.node()}, "
        f"commit {git_commit()}")
    log(f"# device {device.id}: {name}, compute capability {props['major']}.{props['minor']}, "
        f"{props['multiProcessorCount']} SMs, {props['totalGlobalMem'] / 2**30:.1f} GiB")
    log(f"# CUDA driver {cp.cuda.runtime.driverGetVersion()}, runtime "
        f"{cp.cuda.runtime.runtimeGetVersion()}, cuBLAS "
        f"{cublas.getVersion(cp.cuda.device.get_cublas_handle())}, NVRTC {nvrtc}")
    log(f"# python {platform.python_version()}, numpy {np.__version__}, cupy {cp.__version__}, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), fastlinear "
        f"{fastlinear.__version__}")
    log("# float32: TF32 off in both (torch allow_tf32=False; fastlinear CUBLAS_COMPUTE_32F, "
        "CuPy default math mode). float16: float32 accumulation in both (torch "
        "allow_fp16_reduced_precision_reduction=False).")
    log(f"# median of {args.reps} runs after {args.warmup} warm-up runs, CUDA events; "
        "ratio = torch ms / fastlinear ms (>1: fastlinear faster)")
    limits = cupy_launch.current_thresholds()
    log(f"# shape rule (W rows contiguous only): small_batch for N <= "
        f"{limits['small_batch_max_rows']} with D <= {limits['own_kernel_max_inner']} or >= half "
        f"the SMs busy; tiled for D <= {limits['own_kernel_max_inner']} and N*D*M <= "
        f"{limits['tiled_max_work']}; else cublas")
    log()


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import cupy as cp
    import numpy as np
    import torch
    import torch.nn.functional as F

    import fastlinear
    from fastlinear import activations as fl_activations
    from fastlinear.backends import cupy as cupy_backend
    from fastlinear.backends import cupy_launch

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
    shapes = QUICK_SHAPES if args.quick else SHAPES
    activation_names = (None, "relu") if args.quick else ACTIVATIONS

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

    log_header(log, args, stamp, cp, np, torch, fastlinear, cupy_launch)
    header = (f"{'pass':8} {'dtype':8} {'N':>6} {'D':>6} {'M':>6} {'act':9} {'path':12} "
              f"{'fl ms':>9} {'fl TF/s':>8} {'torch ms':>9} {'torch TF/s':>10} "
              f"{'ratio':>6} {'max rel diff':>12}")
    log(header)
    path_rows = []

    def diff(ours, theirs):
        ours = cp.asarray(ours, dtype=cp.float64)
        theirs = cp.asarray(theirs, dtype=cp.float64)
        scale = max(float(cp.abs(theirs).max()), 1e-30)
        return float(cp.abs(ours - theirs).max() / scale)

    def run_case(dtype_name, N, D, M, activation):
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
        act = torch_activation(F, torch, activation)
        flops = 2.0 * N * D * M
        w_steps = cupy_launch.matrix_steps(W)
        rule = cupy_launch.forward_path(N, D, M, w_steps[1] == 1,
                                        cupy_backend._sm_count(cp.cuda.Device().id))
        act_name = activation or "-"
        saves = fl_activations.saved_for_backward(activation) == "preactivation"

        def ours_forward():
            return fastlinear.linear_forward(X, W, b, activation=activation, backend="cupy",
                                             return_saved=saves)

        ours_ms = time_cupy(ours_forward)
        torch_ms = time_torch(lambda: act(F.linear(Xt, weight, bt)))
        Y, saved = fastlinear.linear_forward(X, W, b, activation=activation, backend="cupy",
                                             return_saved=True)
        rel = diff(Y, cp.from_dlpack(act(F.linear(Xt, weight, bt)).detach()))
        log(f"{'forward':8} {dtype_name:8} {N:6} {D:6} {M:6} {act_name:9} {rule:12} "
            f"{ours_ms:9.3f} {flops / ours_ms / 1e9:8.1f} {torch_ms:9.3f} "
            f"{flops / torch_ms / 1e9:10.1f} {torch_ms / ours_ms:6.2f} {rel:12.2e}")

        ours_ms = time_cupy(lambda: fastlinear.linear_backward(
            dY, X, W, activation=activation, saved=saved, backend="cupy"))
        leaves = {}

        def torch_forward():
            leaves["X"] = Xt.detach().requires_grad_()
            leaves["weight"] = weight.detach().requires_grad_()
            leaves["b"] = bt.detach().requires_grad_()
            leaves["Y"] = act(F.linear(leaves["X"], leaves["weight"], leaves["b"]))

        torch_ms = time_torch(lambda: leaves["Y"].backward(dYt), setup=torch_forward)
        torch_forward()
        leaves["Y"].backward(dYt)
        dX, dW, db = fastlinear.linear_backward(dY, X, W, activation=activation, saved=saved,
                                                backend="cupy")
        rel = max(diff(dX, cp.from_dlpack(leaves["X"].grad)),
                  diff(dW, cp.from_dlpack(leaves["weight"].grad.t().contiguous())),
                  diff(db, cp.from_dlpack(leaves["b"].grad)))
        log(f"{'backward':8} {dtype_name:8} {N:6} {D:6} {M:6} {act_name:9} {'colsum+gemm':12} "
            f"{ours_ms:9.3f} {2 * flops / ours_ms / 1e9:8.1f} {torch_ms:9.3f} "
            f"{2 * flops / torch_ms / 1e9:10.1f} {torch_ms / ours_ms:6.2f} {rel:12.2e}")
        leaves.clear()

        if args.no_paths:
            return
        for path in cupy_launch.FORWARD_PATHS:
            if path == "small_batch" and N > 64:
                continue  # one block row per 8 rows: meant for tiny batches only
            if path != "cublas" and N * D * M > 1 << 34:
                continue  # far slower than cuBLAS there; not worth the minutes
            with cupy_backend.forced_forward_path(path):
                path_ms = time_cupy(ours_forward)
            path_rows.append((dtype_name, N, D, M, act_name, path, path_ms, path == rule))
        if activation is None:
            # The measured alternative for the bias: GEMM (beta = 0), then the epilogue pass.
            Y_alt = cp.empty((N, M), dtype)

            def gemm_then_epilogue():
                cupy_backend._gemm(X, W, Y_alt, beta=0)
                cupy_backend._bias_activation_epilogue(Y_alt, b, None, None)

            path_rows.append((dtype_name, N, D, M, act_name, "cublas+epilogue",
                              time_cupy(gemm_then_epilogue), False))

    for dtype_name in args.dtypes:
        for N, D, M in shapes:
            for activation in activation_names:
                run_case(dtype_name, N, D, M, activation)
                cp.get_default_memory_pool().free_all_blocks()  # the case's arrays are gone
                torch.cuda.empty_cache()

    if path_rows:
        log()
        log("# forward paths of the cupy backend, each forced ('*' = the shape rule's choice; "
            "cublas+epilogue: the bias by an epilogue pass after a beta = 0 GEMM, to compare "
            "with cublas's fill + beta = 1)")
        log(f"{'dtype':8} {'N':>6} {'D':>6} {'M':>6} {'act':9} {'path':16} {'ms':>9} "
            f"{'TF/s':>8}")
        for dtype_name, N, D, M, act_name, path, ms, chosen in path_rows:
            log(f"{dtype_name:8} {N:6} {D:6} {M:6} {act_name:9} {path:16} {ms:9.3f} "
                f"{2.0 * N * D * M / ms / 1e9:8.1f}{' *' if chosen else ''}")
    log()
    log(f"# log written to {log.path}")


if __name__ == "__main__":
    main()
