"""``python -m fastlinear info``, and the machine report the benchmark prints: versions, threads.

One home for "what machine is this": ``python -m fastlinear bench`` puts the same lines in the
header of every results file, so a figure always travels with the machine that produced it.
"""

import importlib
import importlib.util
import os
import platform
import subprocess
import sys

import fastlinear
from fastlinear import _cli, _dispatch, _warmup

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


DESCRIPTION = """\
Print what this machine offers fastlinear: the fastlinear and Python versions, the machine, the
libraries that decide speed (NumPy, Numba, SciPy, CuPy), every backend (available, or why not
and what to install), which backend calls use and when auto switches, the thread pools (BLAS,
Numba) and the CUDA devices. Paste it into a bug report; compare it between two machines whose
figures differ. Takes no options; FASTLINEAR_BACKEND and FASTLINEAR_AUTO_LOAD are reported as
set."""


def backend_choice(status):
    """Lines saying which backend calls on NumPy (and CuPy) arrays use, and when ``auto``
    switches: as a fresh program sees it, not this process (which has loaded every backend to
    report on it)."""
    requested = _dispatch.requested_backend(None)
    if requested != _dispatch.AUTO:
        return [f"every call uses {requested} ({_dispatch.ENV_VAR} asks for it)"]
    lines = []
    for library in ("numpy", "cupy"):
        order = [name for name in _dispatch.AUTO_ORDER.get(library, ()) if status[name] is None]
        if not order:
            lines.append(f"auto, {library} arrays: no backend available")
            continue
        best, fallback = order[0], order[-1]
        after = _dispatch.AUTO_LOAD_AFTER_CALLS
        sync = _warmup.mode() == _warmup.SYNC
        if best == fallback or sync or after <= 0:
            why = f" ({_AUTO_LOAD_VAR}=sync)" if sync and best != fallback else ""
            lines.append(f"auto, {library} arrays: {best} from the first call{why}")
        else:
            lines.append(f"auto, {library} arrays: {fallback} for a program's first {after:,} "
                         f"calls, then {best} (loaded in the background, used once ready); "
                         f"{best} at once after fastlinear.warm_up() or with "
                         f"{_AUTO_LOAD_VAR}=sync")
    return lines


_AUTO_LOAD_VAR = _warmup.ENV_VAR


def main(argv=None):
    _cli.Parser(prog="python -m fastlinear info", description=DESCRIPTION).parse_args(argv)
    print(f"fastlinear {fastlinear.__version__} (git {git_revision() or 'unknown'}), "
          f"Python {platform.python_version()}")
    print(f"machine: {machine_description()}")
    print("versions: " + ", ".join(versions()))
    for name in (_dispatch.ENV_VAR, _AUTO_LOAD_VAR):
        value = os.environ.get(name)
        print(f"{name}={value!r}" if value is not None else f"{name} unset")
    print("backends:")
    status = fastlinear.available_backends()
    for name, reason in status.items():
        print(f"  {name:6s} {'available' if reason is None else 'unavailable: ' + reason}")
    print("which backend:")
    for line in backend_choice(status):
        print(f"  {line}")
    _load_blas_libraries()
    print("threads:")
    for line in thread_pools():
        print(f"  {line}")
    print("devices:")
    for line in cuda_devices():
        print(f"  {line}")
    return 0
