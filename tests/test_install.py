"""Installation: the wheel works outside the source tree; missing extras and caches fail clearly.

* The wheel is built from a copy of the project's files, installed into a fresh virtual
  environment and used from a temporary working directory, so nothing is imported from the
  checkout. The environment reuses the running interpreter's NumPy through a ``.pth`` file
  instead of downloading it; the build runs offline where hatchling is installed (else pip
  fetches it). About 5 s in all.
* A missing optional dependency (simulated in a subprocess with ``sys.modules[name] = None``,
  which makes ``import name`` raise ImportError) gives an error naming the pip extra.
* Numba's cache directory pointing somewhere that cannot be created still computes correctly.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastlinear"
TIMEOUT = 300


def clean_env(**extra):
    """The environment for a subprocess: no PYTHONPATH (so the checkout is not importable)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", fastlinear.ENV_VAR)}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def run(args, cwd, env=None):
    result = subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, (f"{args} failed ({result.returncode}):\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def kernel_sources_in_checkout():
    return sorted(path.name for path in (ROOT / "kernels").glob("*.cu"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with the wheel of this checkout installed: ``(python, wheel, workdir)``."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    # The files the build reads (sdist's include list minus the tests); copying keeps build
    # output out of the checkout. A partial checkout may lack README.md or kernels/ (both are
    # required by pyproject.toml): stand-ins let the wheel build, and the checks below say so.
    shutil.copy2(ROOT / "pyproject.toml", source)
    shutil.copytree(PACKAGE, source / "fastlinear",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if (ROOT / "kernels").is_dir():
        shutil.copytree(ROOT / "kernels", source / "kernels")
    else:
        (source / "kernels").mkdir()
    if (ROOT / "README.md").is_file():
        shutil.copy2(ROOT / "README.md", source)
    else:
        (source / "README.md").write_text("fastlinear (README.md absent from this checkout)\n")

    dist = tmp / "dist"
    try:  # with hatchling at hand, build offline; else pip fetches it (PyPI, a few seconds)
        import hatchling  # noqa: F401
        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
         "-w", str(dist), str(source)], cwd=tmp)
    (wheel,) = dist.glob("fastlinear-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
               cwd=tmp).stdout.strip()
    # NumPy from the running interpreter, appended after the venv's own site-packages
    numpy_dir = pathlib.Path(np.__file__).resolve().parents[1]
    pathlib.Path(site, "_fastlinear_test_numpy.pth").write_text(f"{numpy_dir}\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)], cwd=tmp)
    workdir = tmp / "work"
    workdir.mkdir()
    return python, wheel, workdir


INSTALLED_SCRIPT = textwrap.dedent("""
    import json, pathlib, sys
    import numpy as np
    import fastlinear
    from fastlinear import _kernels

    rng = np.random.default_rng(0)
    X, W, b, dY = (rng.standard_normal(s) for s in ((5, 4), (4, 3), 3, (5, 3)))
    report = {"file": fastlinear.__file__, "prefix": sys.prefix,
              "available": fastlinear.available_backends()}
    for backend in ("numpy", "auto"):
        Y = fastlinear.linear_forward(X, W, b, backend=backend)
        dX, dW, db = fastlinear.linear_backward(dY, X, W, backend=backend)
        layer = fastlinear.Linear(4, 3, rng=1)
        layer.forward(X)
        layer.backward(dY)
        report[backend] = bool(
            np.allclose(Y, X @ W + b) and np.allclose(dX, dY @ W.T)
            and np.allclose(dW, X.T @ dY) and np.allclose(db, dY.sum(0))
            and np.allclose(layer.dW, X.T @ dY))
    try:
        report["kernels"] = [str(p) for p in _kernels.kernel_sources()]
    except FileNotFoundError as exc:
        report["kernels"] = str(exc)
    print(json.dumps(report))
""")


def test_wheel_installs_and_runs_outside_the_source_tree(installed):
    python, wheel, workdir = installed
    result = run([str(python), "-c", INSTALLED_SCRIPT], cwd=workdir)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    package_dir = pathlib.Path(report["file"]).parent
    assert pathlib.Path(report["prefix"]) in package_dir.parents, (
        f"fastlinear was imported from {package_dir}, not from the fresh environment")
    assert ROOT not in package_dir.parents and package_dir != PACKAGE
    assert report["numpy"] and report["auto"], report
    assert report["available"]["numpy"] is None

    expected = kernel_sources_in_checkout()
    with zipfile.ZipFile(wheel) as archive:
        shipped = sorted(pathlib.PurePosixPath(name).name for name in archive.namelist()
                         if name.startswith("fastlinear/kernels/") and name.endswith(".cu"))
    assert shipped == expected, "the wheel must ship exactly the checkout's kernels/*.cu"
    if not expected:
        assert "kernels/*.cu" in report["kernels"], report["kernels"]  # a clear error
        pytest.skip("no kernels/*.cu in this checkout yet: installed kernel lookup not checked "
                    "(the wheel build and the install run were)")
    found = [pathlib.Path(path) for path in report["kernels"]]
    assert sorted(path.name for path in found) == expected
    for path in found:
        assert path.parent == package_dir / "kernels", f"{path} is not inside the installed package"


def pyproject():
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_wheel_metadata_declares_the_extras(installed):
    _, wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    project = pyproject()
    for extra in project["optional-dependencies"]:
        assert f"Provides-Extra: {extra}" in metadata
    assert "Requires-Dist: numpy" in metadata


# --- missing optional dependencies ---------------------------------------------------------------

def extra_providing(library):
    """The pip extra of pyproject.toml whose requirements include ``library`` (e.g. cupy-cuda13x
    for cupy), so the test follows the project's own declaration."""
    extras = pyproject()["optional-dependencies"]
    for extra, requirements in extras.items():
        if extra != "dev" and any(req.lower().startswith(library) for req in requirements):
            return extra
    raise AssertionError(f"no extra in pyproject.toml provides {library}")


MISSING_SCRIPT = textwrap.dedent("""
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # import name -> ImportError, as if not installed
    import numpy as np
    import fastlinear
    X, W = np.ones((2, 3)), np.ones((3, 4))
    reason = fastlinear.available_backends()[{backend!r}]
    print("REASON:", reason)
    for attempt in ("argument", "context", "layer"):
        try:
            if attempt == "argument":
                fastlinear.linear_forward(X, W, backend={backend!r})
            elif attempt == "context":
                with fastlinear.use_backend({backend!r}):
                    pass
            else:
                fastlinear.Linear(3, 4, backend={backend!r})
        except fastlinear.BackendUnavailableError as exc:
            print(attempt.upper() + ":", exc)
        else:
            print(attempt.upper() + ": no error")
    assert np.allclose(fastlinear.linear_forward(X, W), X @ W)  # auto still works
    print("AUTO:", fastlinear.current_backend())
""")


@pytest.mark.parametrize("backend,blocked", [
    ("numba", ["numba"]), ("numba", ["scipy", "scipy.linalg"]), ("numba", ["llvmlite"]),
    ("cupy", ["cupy"]),
])
def test_missing_optional_dependency_names_the_extra(backend, blocked):
    if not (PACKAGE / "backends" / f"{backend}.py").is_file():
        pytest.skip(f"fastlinear/backends/{backend}.py is not in this checkout yet")
    library = {"numba": "numba", "cupy": "cupy"}[backend]
    extra = extra_providing(library)
    script = MISSING_SCRIPT.format(blocked=blocked, backend=backend)
    result = run([sys.executable, "-c", script], cwd=ROOT,
                 env=clean_env(PYTHONPATH=str(ROOT)))
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    hint = f"fastlinear[{extra}]"
    assert hint in lines["REASON"], lines["REASON"]
    for attempt in ("ARGUMENT", "CONTEXT", "LAYER"):
        assert f"backend '{backend}'" in lines[attempt] and hint in lines[attempt], lines
    assert lines["AUTO"] != backend


# --- numba's cache directory ---------------------------------------------------------------------

NUMBA_SCRIPT = textwrap.dedent("""
    import numpy as np
    import fastlinear
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        X, W, b, dY = (rng.standard_normal(s).astype(dtype)
                       for s in ((7, 5), (5, 3), 3, (7, 3)))
        Y = fastlinear.linear_forward(X, W, b, backend="numba")
        dX, dW, db = fastlinear.linear_backward(dY, X, W, backend="numba")
        tol = 1e-4 if dtype == np.float32 else 1e-12
        assert np.allclose(Y, X @ W + b, rtol=tol, atol=tol)
        assert np.allclose(dX, dY @ W.T, rtol=tol, atol=tol)
        assert np.allclose(dW, X.T @ dY, rtol=tol, atol=tol)
        assert np.allclose(db, dY.sum(0), rtol=tol, atol=tol)
    print("OK")
""")


def test_numba_with_a_cache_dir_that_cannot_be_created(tmp_path):
    """NUMBA_CACHE_DIR under a regular file cannot be created, even by root."""
    reason = _dispatch.unavailable_reason("numba")
    if reason:
        pytest.skip(reason)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache_dir = blocker / "numba-cache"
    result = run([sys.executable, "-c", NUMBA_SCRIPT], cwd=tmp_path,
                 env=clean_env(PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache_dir)))
    assert result.stdout.strip().endswith("OK")
    assert "Traceback" not in result.stderr, result.stderr
    assert not cache_dir.exists()


def test_cuda_extra_brings_the_cuda_toolkit_pieces_cupy_compiles_with():
    """CuPy compiles RawModules only with CUDA's headers and NVRTC at hand, which its ctk extra
    installs (issue 12): the plain cupy-cuda13x wheel is not enough."""
    requirements = pyproject()["optional-dependencies"]["cuda"]
    assert any(req.replace(" ", "").startswith("cupy-cuda13x[ctk]") for req in requirements), \
        requirements


def test_cuda_extra_asks_for_a_cupy_that_has_the_ctk_extra():
    """cupy-cuda13x 13.6 exists, has no ctk extra (pip would ignore it with a warning) and
    accepts NumPy 1.x; the extra starts at CuPy 14 (issue 19)."""
    (requirement,) = [req.replace(" ", "") for req in pyproject()["optional-dependencies"]["cuda"]
                      if req.replace(" ", "").startswith("cupy-cuda13x")]
    lower = re.fullmatch(r"cupy-cuda13x\[ctk\]>=(\d+)(?:\.\d+)*", requirement)
    assert lower and int(lower.group(1)) >= 14, requirement
