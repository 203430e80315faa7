"""``python -m fastlinear info``: backends, availability and why not, versions, threads, devices."""

import argparse
import importlib
import os
import platform

import fastlinear
from fastlinear import _dispatch


def _version(module_name):
    try:
        return importlib.import_module(module_name).__version__
    except Exception:  # not installed, or broken: both are worth a line, not a crash
        return "not installed"


def _blas_lines():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return ["  (pip install threadpoolctl to list BLAS/OpenMP thread pools)"]
    import numpy  # noqa: F401  (load NumPy's BLAS so that it is listed)

    try:
        import scipy.linalg  # noqa: F401  (SciPy bundles its own BLAS, used by the numba backend)
    except ImportError:
        pass
    return [f"  {pool.get('internal_api')} {pool.get('version')}: {pool.get('num_threads')} "
            f"threads ({os.path.basename(pool.get('filepath', ''))})"
            for pool in threadpool_info()]


def _numba_lines():
    try:
        import numba
    except ImportError:
        return []
    layer = "not chosen yet (chosen at the first parallel kernel call)"
    try:
        layer = numba.threading_layer()
    except ValueError:
        pass
    return [f"  numba threads: {numba.get_num_threads()} (threading layer: {layer})"]


def _cuda_lines():
    try:
        import cupy
    except ImportError:
        return ["  cupy: not installed"]
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return [f"  cupy {cupy.__version__}: no CUDA device ({exc})"]
    lines = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        lines.append(f"  GPU {index}: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                     f"sm_{props['major']}{props['minor']}")
    return lines


def main(argv=None):
    argparse.ArgumentParser(prog="python -m fastlinear info", description=__doc__).parse_args(argv)
    print(f"fastlinear {fastlinear.__version__}  Python {platform.python_version()}  "
          f"{platform.machine()}  {os.cpu_count()} CPUs")
    print("versions: " + ", ".join(f"{name} {_version(name)}"
                                   for name in ("numpy", "scipy", "numba", "cupy")))
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
    print("threads:")
    for line in _blas_lines() + _numba_lines():
        print(line)
    print("devices:")
    for line in _cuda_lines():
        print(line)
    return 0
