"""The tuning profile: thresholds measured on this machine by ``python -m fastlinear tune``.

One plain JSON file in the user's cache directory (platformdirs), never pickle: a file there
must not run code. It holds one section per backend; a section records the key it was measured
under (CPU model and ISA flags, BLAS, library versions, GPU: whatever its backend names) and the
values. A backend reads its section when it loads; a section whose key is not this machine's
(a stale or foreign profile) is ignored without a word, as is everything under
``FASTLINEAR_TUNE=off``. A file that does not parse, whose checksum does not match its content
(hand-edited), or whose values do not fit the backend's schema is ignored with one warning.

Writes go to a temporary file in the same folder, then ``os.replace``: a reader never sees a
half-written file. A write re-reads the profile and replaces only its own section, under an
exclusive lock on a lock file beside the profile (``flock``; where there is none, Windows,
unlocked), so two ``tune`` processes writing different sections at the same time keep both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "FORMAT", "profile_path", "cpu_key", "read_section", "apply_section",
           "write_section", "int_at_least", "seconds_at_most", "list_of"]

ENV_VAR = "FASTLINEAR_TUNE"
FORMAT = 1
FILE_NAME = "tune-profile.json"
# ISA extensions that change which kernel path is fastest (x86 and Arm names).
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "amx_tile", "asimd", "sve", "sve2")

_warned: set[str] = set()  # paths warned about (one warning per process and file)


def profile_path() -> Path:
    """Where the profile lives: ``<user cache dir>/fastlinear/tune-profile.json``."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("fastlinear")) / FILE_NAME


def disabled() -> bool:
    """``FASTLINEAR_TUNE=off`` (or ``0``, ``no``, ``false``): every profile is ignored."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("off", "0", "no", "false")


def cpu_key() -> dict[str, Any]:
    """The CPU part of a key: model name, machine and the ISA flags that matter."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Hardware") and model in ("", platform.machine(),
                                                                    platform.processor()):
                    model = value.strip()
                elif name in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model name alone
        pass
    return {"cpu": model, "machine": platform.machine(),
            "isa": sorted(flag for flag in _ISA_FLAGS if flag in flags)}


def library_version(name: str) -> str:
    """The installed version of distribution ``name`` (``"unknown"`` when it has no metadata)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _checksum(sections: Mapping[str, Any]) -> str:
    text = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _warn_once(path: Path, why: str) -> None:
    if str(path) not in _warned:
        _warned.add(str(path))
        warnings.warn(f"ignoring the fastlinear tuning profile {path}: {why}; run "
                      f"'python -m fastlinear tune' to measure a new one", stacklevel=3)


def _read_file(path: Path) -> dict[str, Any] | None:
    """The profile's sections, or ``None`` (absent, or unreadable: warned about)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        _warn_once(path, f"it cannot be read ({exc})")
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn_once(path, f"it is not valid JSON ({exc})")
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or not isinstance(data.get("sections"), dict):
        _warn_once(path, f"it is not a format-{FORMAT} profile")
        return None
    if data.get("checksum") != _checksum(data["sections"]):
        _warn_once(path, "its checksum does not match its content (edited by hand?)")
        return None
    return data["sections"]


# A schema maps each threshold's name to its type, or to a check (a predicate on the value).
Schema = Mapping[str, "type | Callable[[Any], bool]"]


def int_at_least(low: int) -> Callable[[Any], bool]:
    """A schema check: an int (not a bool) of at least ``low``."""
    return lambda value: (isinstance(value, int) and not isinstance(value, bool)
                          and value >= low)


def seconds_at_most(high: float) -> Callable[[Any], bool]:
    """A schema check: a number of seconds (int or float, not a bool) from 0 to ``high``."""
    return lambda value: (isinstance(value, (int, float)) and not isinstance(value, bool)
                          and 0 <= value <= high)


def list_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A schema check: a list whose every item passes ``item``."""
    return lambda value: isinstance(value, list) and all(item(entry) for entry in value)


def _valid_values(values: object, schema: Schema) -> bool:
    """Every value names a known threshold and has its type (bool is no int here) or passes
    its check."""
    if not isinstance(values, dict):
        return False
    for name, value in values.items():
        expected = schema.get(name)
        if expected is None:
            return False
        if isinstance(expected, type):
            if isinstance(value, bool) is not (expected is bool) \
                    or not isinstance(value, expected):
                return False
        elif not expected(value):
            return False
    return True


def read_section(name: str, key: Callable[[], Mapping[str, Any]], schema: Schema,
                 path: Path | None = None) -> dict[str, Any]:
    """The values of section ``name`` measured under ``key()`` (asked only when a section is
    there), or ``{}``.

    ``{}`` without a word when there is no profile, it is turned off, or the section was
    measured under another key; ``{}`` with one warning when the file is corrupt or the values
    do not fit ``schema`` (name -> type or check).
    """
    if disabled():
        return {}
    path = profile_path() if path is None else path
    sections = _read_file(path)
    if sections is None:
        return {}
    section = sections.get(name)
    if section is None:
        return {}
    if not isinstance(section, dict) or not _valid_values(section.get("values"), schema):
        _warn_once(path, f"its {name!r} section does not have the expected form")
        return {}
    if section.get("key") != json.loads(json.dumps(dict(key()))):  # as stored: lists
        return {}  # measured elsewhere, or under other versions
    return dict(section["values"])


def apply_section(name: str, key: Callable[[], Mapping[str, Any]], schema: Schema,
                  apply: Callable[[dict[str, Any]], object], path: Path | None = None) -> None:
    """Read section ``name`` and put it in force with ``apply``; a profile never breaks its
    backend: if reading or applying raises, one warning names the file and says the section is
    ignored, and ``apply({})`` keeps the defaults."""
    try:
        path = profile_path() if path is None else path
        apply(read_section(name, key, schema, path))
    except Exception as exc:  # a bad profile must not make a backend fail
        why = f"{type(exc).__name__}: {exc}"
        _warn_once(path or Path(FILE_NAME), f"its {name!r} section cannot be applied ({why}), "
                                            f"so it is ignored and the defaults are used")
        apply({})


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """One writer of ``path`` at a time, across processes: an exclusive ``flock`` on
    ``.<name>.lock`` beside it (kept: removing a lock file races with its next user)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the rename still keeps the file whole
        yield
        return
    with open(path.with_name(f".{path.name}.lock"), "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_section(name: str, key: Mapping[str, Any], values: Mapping[str, Any],
                  path: Path | None = None) -> Path:
    """Store section ``name`` (replacing it; the other sections of a valid profile are kept, as
    they are when this write starts) with a temporary file and a rename; return the path."""
    path = profile_path() if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writing(path):
        sections = (_read_file(path) if path.exists() else None) or {}
        sections[name] = {"key": dict(key), "values": dict(values)}
        _replace(path, {"format": FORMAT, "checksum": _checksum(sections),
                        "sections": sections})
    return path


def _replace(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
