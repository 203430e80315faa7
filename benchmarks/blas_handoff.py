"""The BLAS-thread hand-off as ``python -m fastlinear tune`` measures it, repeated to show its
spread, and the skinny backward timed at delays after a skinny forward (issue 20, item 3).

1. ``--repeats`` times: the spin window (``tune._blas_spin_seconds``: CPU time the BLAS's workers
   burn after a threaded gemv) and the work from which the BLAS's thread count changes a gemm's
   time (``tune._blas_threads_min_work``), with each probe's ratios (one thread over Numba's
   count: of the minimums / of the medians).
2. The skinny backward (1 x SIDE x SIDE) on one thread and in parallel, at delays after a skinny
   forward, in shuffled order, ``--sweep-rounds`` samples each: medians and minimums.

    flock /work/bench.lock python benchmarks/blas_handoff.py
"""

import argparse
import os
import random
import statistics
import time

import numpy as np

from fastlinear import _dispatch, tune
from fastlinear.backends import _numba_blas

DELAYS = (0.0, 0.01, 0.05, 0.09, 0.13, 0.2, 0.3)


def probes(module, repeats):
    import numba

    controllers = _numba_blas.blas_thread_controllers()
    threads = numba.get_num_threads()
    for _ in range(repeats):
        spin = tune._blas_spin_seconds(module)
        work = tune._blas_threads_min_work(15, 0.03)
        ratios = [tune._threads_ratio(controllers, threads, bits, 15, 0.03)
                  for bits in tune.THREADS_PROBE_BITS]
        for controller in controllers:
            controller.set_num_threads(threads)
        print(f"load {os.getloadavg()[0]:.2f}: spin window {spin * 1e3:.0f} ms; thread count "
              f"matters from {work} (2^{work.bit_length() - 1 if work else '-'})", flush=True)
        pairs = zip(tune.THREADS_PROBE_BITS, ratios, strict=True)
        print(f"  ratios 1/{threads} threads, min/median: "
              + " ".join(f"2^{bits}:{a:.2f}/{b:.2f}" for bits, (a, b) in pairs))


def sweep(module, side, rounds):
    rng = np.random.default_rng(0)
    X, W, dY = (rng.standard_normal(s).astype("float32") for s in ((1, side), (side, side),
                                                                   (1, side)))
    b = np.zeros(side, "float32")

    def sample(delay, one_thread):
        module.forward(X, W, b, None)
        time.sleep(delay)
        module.BLAS_SPIN_SECONDS = 1e9 if one_thread else 0.0
        start = time.perf_counter()
        module.backward(dY, X, W, True, True, False, None, None, None)
        return time.perf_counter() - start

    saved = module.BLAS_SPIN_SECONDS
    jobs = [(d, one) for d in DELAYS for one in (True, False)]
    times = {job: [] for job in jobs}
    try:
        for job in jobs:
            sample(*job)
        for _ in range(rounds):
            random.shuffle(jobs)
            for job in jobs:
                times[job].append(sample(*job))
    finally:
        module.BLAS_SPIN_SECONDS = saved
    print(f"skinny backward 1x{side}x{side} float32 after a skinny forward, {rounds} samples, "
          f"load {os.getloadavg()[0]:.2f}")
    print("delay s   one thread ms med/min   parallel ms med/min   parallel/one (medians)")
    for d in DELAYS:
        one, par = times[d, True], times[d, False]
        print(f"{d:7.2f}   {statistics.median(one) * 1e3:8.3f} {min(one) * 1e3:8.3f}   "
              f"{statistics.median(par) * 1e3:8.3f} {min(par) * 1e3:8.3f}   "
              f"{statistics.median(par) / statistics.median(one):6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sides", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--sweep-rounds", type=int, default=8)
    options = parser.parse_args()
    module = _dispatch.load_backend("numba")
    probes(module, options.repeats)
    for side in options.sides:
        sweep(module, side, options.sweep_rounds)


if __name__ == "__main__":
    main()
