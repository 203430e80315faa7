"""Full-batch gradient descent on a dataset larger than a dask worker's memory, with fastlinear.

The example writes a linear-regression data set to disk as .npy chunks (by default 1.27 GB =
1.18 GiB of float32 data, more than twice one worker's 512 MiB memory limit, in the system's
temporary folder, where a second run finds and reuses it), starts a
``distributed.LocalCluster`` of 2 worker processes, and trains a ``fastlinear.Linear`` layer on
all rows at every step. Each step is one dask graph: every row chunk is read from disk, goes
through ``layer.forward`` and ``layer.backward`` on a worker, and only the (D, M) gradients and
the loss come back; dask's progress bar shows the tasks.

    pip install -e ".[dask,numba]"
    python examples/dask_out_of_core.py                   # local cluster, 2 worker processes
    python examples/dask_out_of_core.py --rows 200000     # a small, fast run

On a real cluster, pass the scheduler's address; nothing else changes (the data directory must be
visible to every worker under the same path, e.g. a shared file system):

    python examples/dask_out_of_core.py --scheduler tcp://scheduler-host:8786 --data /shared/d

The backend (``--backend``) is resolved here, in the client, and travels with every task: the
workers' own ``FASTLINEAR_BACKEND`` is not consulted.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

# In the system's temporary folder, not the working directory (a checkout stays clean).
DEFAULT_DATA = pathlib.Path(tempfile.gettempdir()) / "fastlinear-dask-data"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, type=pathlib.Path,
                        help="directory of the .npy chunks, written if absent or different "
                             "(default: %(default)s)")
    parser.add_argument("--rows", type=int, default=2_400_000, help="rows N of the data set")
    parser.add_argument("--features", type=int, default=128, help="in_features D")
    parser.add_argument("--outputs", type=int, default=4, help="out_features M")
    parser.add_argument("--chunk-rows", type=int, default=65_536, help="rows per chunk file")
    parser.add_argument("--steps", type=int, default=8, help="gradient descent steps")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate")
    parser.add_argument("--backend", default="auto", help="numpy, numba, cupy or auto")
    parser.add_argument("--scheduler", default=None,
                        help="address of a running dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--memory-limit", default="512MiB", help="LocalCluster memory per worker")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_dataset(directory, rows, features, outputs, chunk_rows, seed):
    """Write X (rows, features) and T = X @ W_true + b_true + noise as float32 .npy chunks.

    One chunk at a time, so this process never holds more than one chunk. Skipped when the
    directory already holds the same data set (same description in ``dataset.json``).
    """
    description = dict(rows=rows, features=features, outputs=outputs, chunk_rows=chunk_rows,
                       seed=seed, dtype="float32")
    manifest = directory / "dataset.json"
    if manifest.exists() and json.loads(manifest.read_text()) == description:
        return description
    directory.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    W_true = rng.standard_normal((features, outputs)) / np.sqrt(features)
    b_true = rng.standard_normal(outputs)
    for i, start in enumerate(range(0, rows, chunk_rows)):
        n = min(chunk_rows, rows - start)
        X = rng.standard_normal((n, features), dtype=np.float32)
        noise = 0.1 * rng.standard_normal((n, outputs))
        np.save(directory / f"X-{i:05d}.npy", X)
        np.save(directory / f"T-{i:05d}.npy", (X @ W_true + b_true + noise).astype(np.float32))
    manifest.write_text(json.dumps(description))
    return description


def load_dataset(directory, description):
    """The chunks as two lazy dask arrays, X (N, D) and T (N, M): one read task per file."""
    import dask
    import dask.array as da

    rows, chunk_rows = description["rows"], description["chunk_rows"]
    load = dask.delayed(np.load, pure=True)
    arrays = []
    for name, width in (("X", description["features"]), ("T", description["outputs"])):
        blocks = [da.from_delayed(load(str(directory / f"{name}-{i:05d}.npy")),
                                  shape=(min(chunk_rows, rows - start), width), dtype=np.float32)
                  for i, start in enumerate(range(0, rows, chunk_rows))]
        arrays.append(da.concatenate(blocks))
    return arrays


def train(client, X, T, steps, lr, backend):
    """Full-batch gradient descent on L = sum((X W + b - T)**2) / (2 N); returns the losses."""
    from distributed import progress

    import fastlinear

    N, D = X.shape
    layer = fastlinear.Linear(D, T.shape[1], dtype=np.float32, rng=0)
    losses = []
    with fastlinear.use_backend(backend):  # resolved here, sent to the workers with each task
        for step in range(steps):
            R = layer.forward(X) - T                         # lazy, one task per row chunk
            loss = (R ** 2).sum() / (2 * N)
            layer.backward(R / N, need_dX=False)             # stores lazy dW, db (tree sums)
            futures = client.compute([loss, layer.dW, layer.db])
            progress(futures)                                # dask's progress bar
            loss, layer.dW, layer.db = client.gather(futures)
            for param, grad in layer.parameters():
                param -= lr * grad
            losses.append(float(loss))
            print(f"  step {step + 1}/{steps}: loss {loss:.6f}", flush=True)
    return losses


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        sys.exit('this example needs dask.distributed: pip install "fastlinear[dask]"')

    description = write_dataset(args.data, args.rows, args.features, args.outputs,
                                 args.chunk_rows, args.seed)
    X, T = load_dataset(args.data, description)
    nbytes = X.nbytes + T.nbytes
    if args.scheduler:
        cluster, client = None, Client(args.scheduler)
        where = f"scheduler {args.scheduler}"
    else:
        # threads_per_worker=1: one task per process, one core each; NUMBA_NUM_THREADS=1 so
        # that each worker's kernels use one thread (the nanny starts workers with spawn)
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1,
                               memory_limit=args.memory_limit, dashboard_address=None,
                               env={"NUMBA_NUM_THREADS": "1"})
        client = Client(cluster)
        where = f"LocalCluster of {args.workers} worker processes, {args.memory_limit} each"
    print(f"data: {X.shape[0]} x {X.shape[1]} features -> {T.shape[1]} outputs, float32, "
          f"{nbytes / 1e9:.2f} GB = {nbytes / 2**30:.2f} GiB on disk in {X.numblocks[0]} chunks "
          f"({args.data})")
    print(f"on: {where}; backend {args.backend}")
    try:
        start = time.perf_counter()
        losses = train(client, X, T, args.steps, args.lr, args.backend)
        print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f} in {len(losses)} steps, "
              f"{time.perf_counter() - start:.1f} s")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return losses


if __name__ == "__main__":
    main()
