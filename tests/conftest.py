"""Fixtures: one ``backend`` fixture over every registered backend, a clean environment, an rng.

Shared helpers (tolerances, inputs, references) live in ``tests.helpers``.
"""

import os

import numpy as np
import pytest

# The tests pin the backends' default thresholds: a tuning profile in this user's cache
# directory (python -m fastlinear tune) must not change which paths they take. Set before any
# backend is imported; tests/test_tune.py turns it back on where it tests the profile.
os.environ["FASTLINEAR_TUNE"] = "off"

import fastlinear
from tests.helpers import BACKEND_NAMES, backend_param, install_registry


@pytest.fixture(params=[backend_param(name) for name in BACKEND_NAMES])
def backend(request):
    """Name of each registered backend; unavailable ones skip with the reason."""
    return request.param


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Tests start with no FASTLINEAR_BACKEND from the caller's shell, and a backend registry of
    their own (what one test loads or chooses does not decide another's)."""
    monkeypatch.delenv(fastlinear.ENV_VAR, raising=False)
    return install_registry(monkeypatch)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)
