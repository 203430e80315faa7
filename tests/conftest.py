"""Fixtures: one ``backend`` fixture over every registered backend, a clean environment, an rng.

Shared helpers (tolerances, inputs, references) live in ``tests.helpers``.
"""

import numpy as np
import pytest

import fastlinear
from tests.helpers import BACKEND_NAMES, backend_param


@pytest.fixture(params=[backend_param(name) for name in BACKEND_NAMES])
def backend(request):
    """Name of each registered backend; unavailable ones skip with the reason."""
    return request.param


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Tests start with no FASTLINEAR_BACKEND from the caller's shell."""
    monkeypatch.delenv(fastlinear.ENV_VAR, raising=False)


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)
