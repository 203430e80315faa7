"""Locate the CUDA C sources (``kernels/*.cu``) in a wheel install or a source checkout.

A wheel ships them as ``fastlinear/kernels`` (see ``pyproject.toml``); an editable install or a
plain checkout leaves them at the repository root, next to the package.
"""

import pathlib

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def kernel_dir():
    """The directory that holds the ``.cu`` sources; raise FileNotFoundError if none does."""
    for candidate in (_PACKAGE_DIR / "kernels", _PACKAGE_DIR.parent / "kernels"):
        if any(candidate.glob("*.cu")):
            return candidate
    raise FileNotFoundError(
        f"fastlinear's CUDA sources (kernels/*.cu) are neither in {_PACKAGE_DIR / 'kernels'} "
        f"nor in {_PACKAGE_DIR.parent / 'kernels'}; reinstall fastlinear"
    )


def kernel_sources():
    """Sorted list of the paths of all ``.cu`` sources."""
    return sorted(kernel_dir().glob("*.cu"))
