"""Out-of-core gradient with dask: one full-batch gradient over .npy chunks, 1 vs 2 workers.

The data set is the example's (``examples/dask_out_of_core.py``, written if absent). One
gradient is the example's step without the update: read every chunk, ``Y = X W + b``, the loss,
``dW``, ``db`` (no ``dX``), one dask graph. Each configuration is a ``LocalCluster`` of worker
processes with one thread each (``NUMBA_NUM_THREADS=1``). A baseline streams the same chunks
through fastlinear in this process, one thread, without dask, and the same graph runs on dask's
synchronous scheduler in this process (the graph's own cost, without distributed's). All
configurations are started first and timed in turns, round by round (the first round warms up:
Numba compilation, page cache), so that the varying load of a shared machine falls on all of
them alike.

    python benchmarks/dask_bench.py --out benchmarks/results/dask_bench_DATE
"""

import argparse
import json
import os
import pathlib
import platform
import runpy
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = runpy.run_path(str(ROOT / "examples" / "dask_out_of_core.py"))


def gradient_graph(X, T, W, b):
    """The loss and (dW, db) of L = sum((X W + b - T)**2) / (2 N), lazily."""
    import fastlinear

    R = fastlinear.linear_forward(X, W, b) - T
    loss = (R ** 2).sum() / (2 * X.shape[0])
    _, dW, db = fastlinear.linear_backward(R / X.shape[0], X, W, need_dX=False)
    return loss, dW, db


def time_interleaved(configurations, X, T, W, b, directory, description, repeat, memory_limit,
                     backend):
    """Seconds per gradient of each configuration: the streaming loop (``"stream"``), dask's
    synchronous scheduler in this process (``"sync"``) and LocalClusters of ``n`` workers, all
    started first and then timed round by round, so that the load of a shared machine drifts
    over all of them alike."""
    import contextlib

    import dask
    from distributed import Client, LocalCluster

    import fastlinear

    with contextlib.ExitStack() as stack:
        stack.enter_context(fastlinear.use_backend(backend))
        runs = {}
        for workers in configurations:
            if workers == "stream":
                runs[workers] = lambda: stream_gradient(directory, description, W, b, backend)
                continue
            if workers == "sync":
                runs[workers] = lambda: dask.compute(*gradient_graph(X, T, W, b), scheduler="sync")
                continue
            cluster = stack.enter_context(LocalCluster(
                n_workers=workers, threads_per_worker=1, memory_limit=memory_limit,
                dashboard_address=None, env={"NUMBA_NUM_THREADS": "1"}))
            client = stack.enter_context(Client(cluster, set_as_default=False))
            runs[workers] = (lambda client=client: client.gather(
                client.compute(list(gradient_graph(X, T, W, b)))))
        times = {workers: [] for workers in configurations}
        for i in range(repeat + 1):
            for workers, run in runs.items():
                start = time.perf_counter()
                run()
                if i:  # the first round warms up (Numba compilation, page cache)
                    times[workers].append(time.perf_counter() - start)
    return times


def stream_gradient(directory, description, W, b, backend):
    """One process, one thread, no dask: the chunks loaded and reduced one after the other."""
    import fastlinear

    rows, chunk_rows = description["rows"], description["chunk_rows"]
    dW, db = np.zeros_like(W), np.zeros_like(b)
    for c, _ in enumerate(range(0, rows, chunk_rows)):
        X = np.load(directory / f"X-{c:05d}.npy")
        R = fastlinear.linear_forward(X, W, b, backend=backend) - np.load(
            directory / f"T-{c:05d}.npy")
        fastlinear.linear_backward(R / rows, X, W, need_dX=False, backend=backend,
                                   accumulate=True, dW=dW, db=db)
    return dW, db


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    import dask
    import distributed
    import numba

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "fastlinear commit": commit,
            "load average before": os.getloadavg()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fastlinear-dask-data", type=pathlib.Path)
    parser.add_argument("--rows", type=int, default=2_400_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory-limit", default="512MiB")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="write OUT.txt and OUT.json")
    args = parser.parse_args(argv)

    description = EXAMPLE["write_dataset"](args.data, args.rows, 128, 4, 65_536, 0)
    X, T = EXAMPLE["load_dataset"](args.data, description)
    rng = np.random.default_rng(1)
    W = (0.01 * rng.standard_normal((X.shape[1], T.shape[1]))).astype(np.float32)
    b = np.zeros(T.shape[1], np.float32)
    N, D = X.shape
    M = T.shape[1]
    gbytes = (X.nbytes + T.nbytes) / 1e9
    flops = 4 * N * D * M  # forward 2NDM + dW 2NDM
    info = machine()
    import numba

    numba.set_num_threads(1)  # the streaming loop: one thread, as each worker
    times = time_interleaved(("stream", "sync", 1, 2), X, T, W, b, args.data, description,
                             args.repeat, args.memory_limit, args.backend)
    results = {"streaming, 1 process, 1 thread (no dask)": times["stream"],
               "dask synchronous scheduler, this process": times["sync"],
               "LocalCluster, 1 worker x 1 thread": times[1],
               "LocalCluster, 2 workers x 1 thread": times[2]}
    info["load average after"] = os.getloadavg()

    lines = [f"# fastlinear: out-of-core gradient with dask, {time.strftime('%Y-%m-%d %H:%M')}",
             f"# command: python {' '.join(sys.argv)}",
             *(f"# {key}: {value}" for key, value in info.items()),
             f"# data: X {N} x {D}, T {N} x {M}, float32, {gbytes:.2f} GB in "
             f"{X.numblocks[0]} .npy chunks of {description['chunk_rows']} rows; worker memory "
             f"limit {args.memory_limit}; backend {args.backend}; NUMBA_NUM_THREADS=1",
             f"# one gradient: read all chunks, forward, loss, dW, db: {flops / 1e9:.2f} GFLOP",
             f"{'configuration':48s} {'median s':>9s} {'min s':>7s} {'GB/s':>6s} {'GFLOP/s':>8s}"
             f" {'speed-up':>8s}"]
    base = None
    for name, times in results.items():
        median = float(np.median(times))
        if name.startswith("LocalCluster, 1"):
            base = median
        speedup = f"{base / median:8.2f}" if base and name.startswith("LocalCluster") else " " * 8
        lines.append(f"{name:48s} {median:9.3f} {min(times):7.3f} {gbytes / median:6.2f} "
                     f"{flops / median / 1e9:8.2f} {speedup}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.with_suffix(".txt").write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            {"machine": info, "rows": N, "features": D, "outputs": M, "gbytes": gbytes,
             "flops": flops, "memory_limit": args.memory_limit, "backend": args.backend,
             "seconds": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
