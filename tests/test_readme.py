"""Every ```python block of the README runs.

The blocks run in document order in one namespace, as a reader typing them into one session
would (a later block may use the ``X`` or ``layer`` an earlier one made). A block skips, with the
reason, when it imports a module that is not installed, or when an HTML comment on the line
before its fence says so:

    <!-- readme-test: needs-backend=cupy -->     skips unless that backend is available
    <!-- readme-test: skip: why -->               never runs (say why)

Each block is one test, named by its first line in the README.
"""

import ast
import importlib.util
import os
import re

import pytest

import fastlinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_FENCE = re.compile(r"^```python\s*$")
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")


def python_blocks(text):
    """``[(line, code, directive or None)]`` of every ```python block (``line`` 1-based)."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if _FENCE.match(lines[index]):
            start = index + 1
            end = next(i for i in range(start, len(lines)) if lines[i].strip() == "```")
            previous = lines[index - 1] if index else ""
            match = _DIRECTIVE.search(previous)
            blocks.append((start, "\n".join(lines[start:end]) + "\n",
                           match.group(1) if match else None))
            index = end
        index += 1
    return blocks


def missing_modules(code):
    """Top-level modules the block imports that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


def skip_reason(code, directive):
    """Why the block cannot run here, or None."""
    if directive:
        if directive.startswith("skip"):
            return directive.partition(":")[2].strip() or "marked skip in the README"
        if directive.startswith("needs-backend="):
            name = directive.partition("=")[2].strip()
            reason = fastlinear.available_backends().get(name, f"no backend {name!r}")
            if reason is not None:
                return f"needs the {name} backend: {reason}"
        else:
            raise ValueError(f"unknown readme-test directive {directive!r}")
    missing = missing_modules(code)
    if missing:
        return f"needs {', '.join(missing)}, not installed"
    return None


BLOCKS = python_blocks(open(README, encoding="utf-8").read())


class _Session:
    """The namespace the blocks share, and how far through the README it has run."""

    namespace: dict = {}
    ran_through = -1


def _run_block(index):
    line, code, directive = BLOCKS[index]
    exec(compile(code, f"README.md, block at line {line}", "exec"), _Session.namespace)


@pytest.fixture(scope="module")
def session():
    _Session.namespace, _Session.ran_through = {"__name__": "readme"}, -1
    yield _Session
    for value in list(_Session.namespace.values()):  # a dask Client a block left open
        if type(value).__name__ in ("Client", "LocalCluster") and hasattr(value, "close"):
            value.close()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4
    assert all(directive is None or directive.startswith(("skip", "needs-backend="))
               for _, _, directive in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"line{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(session, index, monkeypatch):
    monkeypatch.chdir(ROOT)
    # The blocks before this one first (when it runs alone, e.g. with -k); their own tests
    # report their failures.
    for earlier in range(session.ran_through + 1, index):
        if skip_reason(BLOCKS[earlier][1], BLOCKS[earlier][2]) is None:
            try:
                _run_block(earlier)
            except Exception:
                pass
    session.ran_through = index
    line, code, directive = BLOCKS[index]
    reason = skip_reason(code, directive)
    if reason is not None:
        pytest.skip(f"README block at line {line}: {reason}")
    _run_block(index)


def test_files_the_docs_point_to_exist():
    """Relative links of the README and the paths asv.conf.json's comments name."""
    readme = open(README, encoding="utf-8").read()
    links = re.findall(r"\]\(((?!https?:|#)[^)\s]+)\)", readme)
    asv_conf = open(os.path.join(ROOT, "asv.conf.json"), encoding="utf-8").read()
    links += re.findall(r"\b((?:docs|benchmarks)/[\w./-]+\.md)\b", asv_conf)
    assert "docs/benchmarks.md" in links
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing
