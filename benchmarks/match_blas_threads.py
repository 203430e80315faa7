"""The cost of ``_numba_blas.match_blas_threads()`` when nothing changed (issue 20, item 3).

Every numba call of at least ``BLAS_THREADS_MIN_WORK`` multiply-adds makes it. Each source tree
given is timed in its own child process (``PYTHONPATH`` = the tree), the trees in turns, round
by round (A B A B ...), so a shared machine's load falls on all alike; per child the minimum and
median over 15 repeats of 20,000 calls; the table gives the minimum and median over rounds.

    flock /work/bench.lock python benchmarks/match_blas_threads.py /work/main .
"""

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import statistics, timeit
from fastlinear.backends import _numba_blas
print(_numba_blas.__file__)
_numba_blas.match_blas_threads()
times = [t / 20000 for t in timeit.repeat(_numba_blas.match_blas_threads, number=20000,
                                          repeat=15)]
print(min(times), statistics.median(times))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help="source trees to compare")
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    results = {os.path.abspath(tree): [] for tree in options.trees}
    for _ in range(options.rounds):
        for tree in options.trees:
            tree = os.path.abspath(tree)  # the child's cwd too: ``-c`` puts it first on the path
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, cwd=tree,
                                 capture_output=True, text=True).stdout.split()
            assert out[0] == os.path.join(tree, "fastlinear", "backends", "_numba_blas.py")
            results[tree].append(tuple(map(float, out[1:])))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'tree':40} {'min us':>8} {'median us':>10}  (per call, {options.rounds} rounds)")
    for tree, rows in results.items():
        print(f"{tree:40} {min(r[0] for r in rows) * 1e6:8.3f} "
              f"{statistics.median(r[1] for r in rows) * 1e6:10.3f}")


if __name__ == "__main__":
    main()
