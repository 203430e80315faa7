"""``bench --overhead`` for two versions of fastlinear side by side, in one run.

The version under test is this tree; the one before is any git revision of it (default
``main``), exported with ``git archive`` to a temporary folder. Runs alternate (before, after,
before, after, ...), each a fresh process timing this tree's ``fastlinear/bench/overhead.py``
(the same measurement for both) against its version of the package. Last, for every row, the
median over runs of its overhead before and after.

Run it under the shared timing lock, and on a quiet machine for figures worth quoting::

    flock /work/bench.lock python benchmarks/overhead_before_after.py --before main --runs 3

Each run takes about 30 s (``--quick``: 5 s, noisier).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD = ROOT / "fastlinear" / "bench" / "overhead.py"

# Runs the overhead table of the file named in argv[1] against the fastlinear on sys.path.
_RUNNER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("overhead_under_test", sys.argv[1])
overhead = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = overhead  # dataclasses look their module up there
spec.loader.exec_module(overhead)
print("\\n".join(overhead.run(rounds=int(sys.argv[2]))))
"""

_ROW = re.compile(r"^(?P<label>.+?)\s+(?P<pass>forward|backward)\s+(?P<time>-?[\d.]+)\s+"
                  r"(?P<over>-?[\d.]+)\s+(?P<budget>[\d.]*)")


def _export(revision: str, into: Path) -> Path:
    """The package of ``revision`` in a folder of its own (``git archive``)."""
    archive = into / "before.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(ROOT), "archive", revision, "fastlinear"],
                       stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "before", filter="data")
    return into / "before"


def _run(tree: Path, rounds: int) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(OVERHEAD), str(rounds)],
                          env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the overhead table failed for {tree}:\n{done.stderr}")
    return done.stdout.splitlines()


def _rows(lines: list[str]) -> dict[tuple[str, str], tuple[float, float, str]]:
    """``(label, pass) -> (time us, over us, budget)`` of a table's rows."""
    found = {}
    for line in lines:
        match = _ROW.match(line)
        if match:
            found[match["label"].strip(), match["pass"]] = (
                float(match["time"]), float(match["over"]), match["budget"])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=3, help="runs of each version")
    parser.add_argument("--quick", action="store_true", help="5 rounds a run instead of 30")
    options = parser.parse_args()
    rounds = 5 if options.quick else 30
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"overhead before ({options.before}) and after (this tree), {options.runs} runs each, "
          f"alternating; load average at the start {load}")
    with tempfile.TemporaryDirectory() as folder:
        before = _export(options.before, Path(folder))
        tables: dict[str, list[dict]] = {"before": [], "after": []}
        for index in range(options.runs):
            for name, tree in (("before", before), ("after", ROOT)):
                lines = _run(tree, rounds)
                print(f"-- {name}, run {index + 1}", *lines, sep="\n", flush=True)
                tables[name].append(_rows(lines))
    print(f"\nmedian over runs, us (load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    print(f"{'call':36} {'pass':8} {'time before':>11} {'time after':>10} "
          f"{'over before':>11} {'over after':>10} {'budget':>6}")
    for key, (_, _, budget) in tables["after"][0].items():
        columns = []
        for field in (0, 1):
            for name in ("before", "after"):
                values = [table[key][field] for table in tables[name] if key in table]
                columns.append(f"{statistics.median(values):.2f}" if values else "-")
        print(f"{key[0]:36} {key[1]:8} {columns[0]:>11} {columns[1]:>10} {columns[2]:>11} "
              f"{columns[3]:>10} {budget:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
