"""Fixtures: one ``backend`` fixture over every registered backend, a clean environment, an rng.

Shared helpers (tolerances, inputs, references) live in ``tests.helpers``.
"""

import collections

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


def pytest_terminal_summary(terminalreporter):
    """Skips, one line per reason with its count and files (pyproject's ``-r`` leaves them out
    of pytest's own summary, which repeats a reason for every test location)."""
    reasons = collections.defaultdict(collections.Counter)
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):
            path, _, reason = report.longrepr
        else:
            path, reason = report.nodeid.partition("::")[0], str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason][path.rpartition("/")[2].partition(":")[0]] += 1
    if not reasons:
        return
    terminalreporter.section("skipped, by reason")
    for reason, files in sorted(reasons.items(), key=lambda item: -sum(item[1].values())):
        where = ", ".join(sorted(files))
        terminalreporter.line(f"SKIPPED [{sum(files.values())}] {reason} ({where})")
