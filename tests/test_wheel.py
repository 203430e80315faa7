"""The wheel ships kernels/*.cu as fastlinear/kernels, and an installed copy finds them there.

The wheel is built with ``pip wheel --no-deps --no-build-isolation`` (hatchling must be in the
test environment: it is in the ``test`` extra) from a copy of the project's build inputs, so the
checkout stays clean; the wheel is then unpacked and imported from a fresh interpreter that does
not see the checkout, as a non-editable install would.
"""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None,
    reason='hatchling is not installed: pip install "fastlinear[test]" (or pip install hatchling)')


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    project = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "pyproject.toml", project)
    for directory in ("fastlinear", "kernels"):
        shutil.copytree(ROOT / directory, project / directory,
                        ignore=shutil.ignore_patterns("__pycache__"))
    readme = ROOT / "README.md"
    if readme.exists():
        shutil.copy(readme, project)
    else:  # pyproject names a readme; the checkout may not have one yet
        (project / "README.md").write_text("fastlinear\n")
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(project)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("fastlinear-*.whl")
    return built


def test_wheel_contains_every_kernel_source(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted((ROOT / "kernels").glob("*.cu"))
    assert sources
    for source in sources:
        assert f"fastlinear/kernels/{source.name}" in names


def test_installed_copy_finds_its_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import fastlinear._kernels as k, fastlinear.backends.cupy_launch as c; "
            "print(k.kernel_dir()); print(c.kernel_source().splitlines()[0])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kernel_dir, first_line = result.stdout.splitlines()
    assert pathlib.Path(kernel_dir) == site / "fastlinear" / "kernels"
    assert first_line.startswith(f'#line 1 "{site / "fastlinear" / "kernels"}')
