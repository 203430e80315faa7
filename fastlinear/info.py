"""``python -m fastlinear info``, and the machine report the benchmark prints: versions, threads.

One home for "what machine is this": ``python -m fastlinear bench`` puts the same lines in the
header of every results file, so a figure always travels with the machine that produced it.
"""

import argparse
import importlib
import importlib.util
import os
import platform
import subprocess
import sys

import fastlinear
from fastlinear import _dispatch

# Libraries whose versions decide the figures (the BLAS comes with NumPy and SciPy); the
# benchmark adds torch, which ``info`` leaves alone because importing it takes seconds.
REPORTED_LIBRARIES = ("numpy", "numba", "scipy", "cupy")


def module_version(name):
    """Version of module ``name``, importing it only if it is installed and not loaded; None if
    it is absent or fails to import (a broken install is worth a line, not a crash)."""
    module = sys.modules.get(name)
    if module is None:
        if importlib.util.find_spec(name) is None:
            return None
        try:
            module = importlib.import_module(name)
        except Exception:
            return None
    return getattr(module, "__version__", "?")


def versions(names=REPORTED_LIBRARIES, skip=()):
    """``["numpy 2.4.0", "numba 0.61.0", ..., "cupy not installed"]``; ``skip`` names libraries
    left out on purpose (reported as "not used")."""
    lines = []
    for name in names:
        if name in skip:
            lines.append(f"{name} not used")
        else:
            lines.append(f"{name} {module_version(name) or 'not installed'}")
    return lines


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description():
    """Platform, CPU model, logical CPUs and RAM on one line."""
    memory = ""
    try:
        memory = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        pass
    return f"{platform.platform()}, {cpu_model()}, {os.cpu_count()} logical CPUs{memory}"


def git_revision():
    """Short commit of the fastlinear source tree, with ``+dirty`` for local changes, or None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True).stdout
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.strip() + ("+dirty" if dirty.strip() else "")


def _blas_pools():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["threadpoolctl not installed (BLAS threads unknown)"]
    pools = []
    for pool in threadpool_info():
        # The package that ships the library: ".../site-packages/torch/lib/libgomp.so" -> torch
        path = pool.get("filepath", "")
        owner = path.partition("-packages" + os.sep)[2].split(os.sep)[0] or os.path.basename(path)
        pools.append(f"{pool.get('internal_api')} {pool.get('version') or ''} [{owner}] "
                     f"{pool.get('num_threads')} threads".replace("  ", " "))
    return pools


def thread_pools(torch_module=None):
    """Thread pools loaded in this process: BLAS/OpenMP libraries (threadpoolctl), Numba's, and
    PyTorch's when ``torch_module`` is given. Only libraries already imported are listed."""
    pools = _blas_pools()
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            layer = f"{numba.config.THREADING_LAYER} (not started)"
        pools.append(f"numba {numba.get_num_threads()} threads, layer {layer}")
    if torch_module is not None:
        pools.append(f"torch {torch_module.get_num_threads()} intra-op threads")
    return pools


def cuda_devices():
    """One line per CUDA device CuPy sees, or one line saying why there is none."""
    try:
        import cupy
    except ImportError:
        return ["cupy: not installed"]
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return [f"cupy {cupy.__version__}: no CUDA device ({exc})"]
    lines = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        memory = props["totalGlobalMem"] / 2**30
        lines.append(f"GPU {index}: {device_name(cupy, index)}, {memory:.1f} GiB, "
                     f"sm_{props['major']}{props['minor']}")
    return lines


def device_name(cupy, index):
    """The name of CUDA device ``index`` (CuPy gives it as bytes or str, by version)."""
    name = cupy.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else name


def _load_blas_libraries():
    """Import what brings a BLAS into the process, so that ``thread_pools`` lists it."""
    import numpy  # noqa: F401

    try:
        import scipy.linalg  # noqa: F401  (SciPy bundles its own BLAS, used by the numba backend)
    except ImportError:
        pass


def main(argv=None):
    argparse.ArgumentParser(prog="python -m fastlinear info", description=__doc__).parse_args(argv)
    print(f"fastlinear {fastlinear.__version__} (git {git_revision() or 'unknown'}), "
          f"Python {platform.python_version()}")
    print(f"machine: {machine_description()}")
    print("versions: " + ", ".join(versions()))
    env = os.environ.get(_dispatch.ENV_VAR)
    print(f"{_dispatch.ENV_VAR}={env!r}" if env is not None else f"{_dispatch.ENV_VAR} unset")
    print("backends:")
    for name, reason in fastlinear.available_backends().items():
        print(f"  {name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
    try:
        chosen = fastlinear.current_backend()
    except Exception as exc:
        chosen = f"error: {exc}"
    print(f"default backend for NumPy arrays: {chosen}")
    _load_blas_libraries()
    print("threads:")
    for line in thread_pools():
        print(f"  {line}")
    print("devices:")
    for line in cuda_devices():
        print(f"  {line}")
    return 0
