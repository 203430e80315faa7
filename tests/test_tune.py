"""The tuning profile (fastlinear._profile) and ``python -m fastlinear tune``."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastlinear
from fastlinear import _profile
from tests.helpers import backend_param

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {"limit": int, "names": list}


@pytest.fixture(autouse=True)
def _profiles_on(monkeypatch):
    """conftest turns profiles off for every other test."""
    monkeypatch.delenv(_profile.ENV_VAR, raising=False)


def key():
    return {"cpu": "test", "isa": ["avx2"]}


def test_a_written_section_reads_back_under_its_key(tmp_path):
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 7, "names": ["a"]}, path)
    assert _profile.read_section("numba", key, SCHEMA, path) == {"limit": 7, "names": ["a"]}
    assert json.loads(path.read_text())["format"] == _profile.FORMAT  # plain JSON


def test_sections_are_kept_side_by_side(tmp_path):
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 1}, path)
    _profile.write_section("cupy", {"gpu": "x"}, {"limit": 2}, path)
    assert _profile.read_section("numba", key, SCHEMA, path) == {"limit": 1}
    assert _profile.read_section("cupy", lambda: {"gpu": "x"}, SCHEMA, path) == {"limit": 2}


def test_a_foreign_or_stale_section_is_ignored_silently(tmp_path):
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 7}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _profile.read_section("numba", lambda: {**key(), "cpu": "other"}, SCHEMA,
                                     path) == {}
        assert _profile.read_section("cupy", key, SCHEMA, path) == {}
        assert _profile.read_section("numba", key, SCHEMA, tmp_path / "absent.json") == {}


def test_tune_off_ignores_the_profile(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 7}, path)
    monkeypatch.setenv(_profile.ENV_VAR, "off")
    assert _profile.read_section("numba", key, SCHEMA, path) == {}


@pytest.mark.parametrize("damage", ["truncated", "not json", "edited", "bad value", "unknown"])
def test_a_corrupt_or_edited_profile_is_ignored_with_one_warning(tmp_path, damage):
    path = tmp_path / f"{damage.replace(' ', '-')}.json"
    _profile.write_section("numba", key(), {"limit": 7}, path)
    text = path.read_text()
    data = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "not json":
        path.write_text("pickle would run code here")
    elif damage == "edited":
        data["sections"]["numba"]["values"]["limit"] = 8
        path.write_text(json.dumps(data))
    else:  # a checksum that matches, values that do not fit the schema
        values = {"limit": "7"} if damage == "bad value" else {"limit": 7, "other": 1}
        data["sections"]["numba"]["values"] = values
        data["checksum"] = _profile._checksum(data["sections"])
        path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring the fastlinear tuning profile") as caught:
        assert _profile.read_section("numba", key, SCHEMA, path) == {}
        assert _profile.read_section("numba", key, SCHEMA, path) == {}
    assert len(caught) == 1


def test_concurrent_writers_never_leave_a_half_written_file(tmp_path):
    """Two processes rewrite the profile over and over while this one reads it: every read
    sees a whole, valid profile (temporary file, then rename)."""
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 0, "names": []}, path)
    writer = textwrap.dedent(f"""
        from pathlib import Path
        from fastlinear import _profile
        for i in range(150):
            _profile.write_section("numba", {key()!r}, {{"limit": i, "names": ["x"] * 2000}},
                                   Path({str(path)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", writer], env=env) for _ in range(2)]
    reads = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn file would warn
        while any(p.poll() is None for p in procs):
            values = _profile.read_section("numba", key, SCHEMA, path)
            assert set(values) == {"limit", "names"}
            reads += 1
    assert all(p.wait(60) == 0 for p in procs)
    assert reads > 0
    left = [p.name for p in path.parent.iterdir() if p.name != path.name]
    assert left in ([], [f".{path.name}.lock"])  # no temporary left (the lock file stays)


def test_concurrent_writers_of_different_sections_keep_every_section(tmp_path):
    """Four processes each rewrite their own section over and over at the same time: every
    write re-reads the file under the lock, so the end holds each section's last values (with
    the last writer winning whole files, a section written meanwhile would be lost)."""
    path = tmp_path / "profile.json"
    writer = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from fastlinear import _profile
        for i in range(60):
            _profile.write_section(sys.argv[1], {key()!r}, {{"limit": i}}, Path({str(path)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": ROOT}
    names = [f"section{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", writer, name], env=env) for name in names]
    assert all(p.wait(60) == 0 for p in procs)
    for name in names:
        assert _profile.read_section(name, key, SCHEMA, path) == {"limit": 59}


def test_profile_path_is_in_the_user_cache_directory(monkeypatch, tmp_path):
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert _profile.profile_path() == tmp_path / "fastlinear" / _profile.FILE_NAME
    assert _profile.profile_path().name == _profile.FILE_NAME


def test_cpu_key_names_the_model_and_isa():
    cpu = _profile.cpu_key()
    assert cpu["cpu"] and isinstance(cpu["isa"], list)


numba_param = backend_param("numba")


@pytest.mark.parametrize("name", [numba_param])
def test_numba_reads_its_section_at_load_and_hands_classes_to_numpy(name, tmp_path):
    """A fresh process with a profile for this machine takes its values; with another key, or
    under FASTLINEAR_TUNE=off, the safe defaults (the small-dX path off)."""
    code = textwrap.dedent("""
        import numpy as np
        from fastlinear import _profile
        from fastlinear.backends import numba as nb
        print(nb.ROWS_DOT_ROWS_MAX_WORK, nb.BLAS_SPIN_SECONDS,
              nb._numba_blas.BLAS_THREADS_MIN_WORK, sorted(nb.NUMPY_CLASSES))
        X, W, b = np.ones((3, 4)), np.ones((4, 5)), np.ones(5)
        assert np.allclose(nb.forward(X, W, b, None), X @ W + b)
    """)
    env = {**os.environ, "PYTHONPATH": ROOT, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop(_profile.ENV_VAR, None)

    def run(**extra):
        done = subprocess.run([sys.executable, "-c", code], env={**env, **extra},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split(maxsplit=3)

    from fastlinear.backends import _numba_blas
    from fastlinear.backends import numba as nb

    defaults = ["0", str(nb.BLAS_SPIN_SECONDS), str(_numba_blas.BLAS_THREADS_MIN_WORK), "[]\n"]
    assert run() == defaults  # no profile: the safe defaults
    kind = nb.shape_class("forward", 3, 4, 5, np.float64)
    path = tmp_path / "fastlinear" / _profile.FILE_NAME
    _profile.write_section("numba", nb.profile_key(),
                           {"rows_dot_rows_max_work": 1 << 18, "numpy_classes": [kind],
                            "blas_spin_seconds": 0.113, "blas_threads_min_work": 1 << 19}, path)
    assert run() == [str(1 << 18), "0.113", str(1 << 19), f"['{kind}']\n"]
    assert run(FASTLINEAR_TUNE="off") == defaults
    _profile.write_section("numba", {**nb.profile_key(), "numba": "0.0"},
                           {"rows_dot_rows_max_work": 1 << 18, "blas_spin_seconds": 0}, path)
    assert run() == defaults  # measured under another numba: stale


@pytest.mark.parametrize("name", [numba_param])
def test_a_handed_over_class_computes_the_same(name, monkeypatch, rng):
    from fastlinear.backends import numba as nb

    X, W, b, dY = (rng.standard_normal(s) for s in ((6, 5), (5, 4), (4,), (6, 4)))
    expected = (fastlinear.linear_forward(X, W, b, backend="numba"),
                fastlinear.linear_backward(dY, X, W, backend="numba"))
    for attribute in ("NUMPY_CLASSES", "_numpy_keys"):
        monkeypatch.setattr(nb, attribute, getattr(nb, attribute))  # restored after
    nb.apply_profile({"numpy_classes": [nb.shape_class("forward", 6, 5, 4, X.dtype),
                                        nb.shape_class("backward", 6, 5, 4, X.dtype)]})
    reference = sys.modules["fastlinear.backends.numpy"]
    monkeypatch.setattr(reference, "forward", counting(reference.forward))
    monkeypatch.setattr(reference, "backward", counting(reference.backward))
    np.testing.assert_allclose(fastlinear.linear_forward(X, W, b, backend="numba"),
                               expected[0], rtol=1e-12)
    for got, want in zip(fastlinear.linear_backward(dY, X, W, backend="numba"), expected[1],
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert reference.forward.calls == reference.backward.calls == 1  # NumPy's code ran


def counting(function):
    def counted(*args, **kwargs):
        counted.calls += 1
        return function(*args, **kwargs)

    counted.calls = 0
    return counted


@pytest.mark.parametrize("name", [numba_param])
def test_tune_quick_measures_and_writes_a_profile(name, tmp_path, monkeypatch, capsys):
    from fastlinear import tune
    from fastlinear.backends import numba as nb
    from fastlinear.bench import grid

    monkeypatch.setattr(grid, "QUICK_SHAPES", ((8, 16, 16), (1, 64, 64)))
    monkeypatch.setattr(grid, "DTYPES", ("float32",))
    monkeypatch.setattr(tune, "ROWS_PROBES", ((8, 16, 128),))
    monkeypatch.setattr(tune, "SKINNY_SIDES", (64, 128))
    monkeypatch.setattr(tune, "SPIN_WATCH", 0.05)
    monkeypatch.setattr(tune, "THREADS_PROBE_BITS", (14, 15, 16))
    from fastlinear.backends import _numba_blas

    monkeypatch.setattr(_numba_blas, "BLAS_THREADS_MIN_WORK", _numba_blas.BLAS_THREADS_MIN_WORK)
    from fastlinear.backends import cupy_launch

    for attribute in ("ROWS_DOT_ROWS_MAX_WORK", "ROWS_DOT_ROWS_MIN_M", "SKINNY_MIN_WEIGHTS",
                      "NUMPY_CLASSES", "_numpy_keys", "BLAS_SPIN_SECONDS"):
        monkeypatch.setattr(nb, attribute, getattr(nb, attribute))  # restored after
    path = tmp_path / "profile.json"
    table = tmp_path / "table.txt"
    cupy_before = cupy_launch.current_thresholds()  # tune puts the GPU's in force where one is
    try:
        assert fastlinear.tune.main(["--quick", "--profile", str(path), "--table",
                                     str(table)]) == 0
    finally:
        cupy_launch.apply_thresholds(cupy_before)
    out = capsys.readouterr().out
    values = _profile.read_section("numba", nb.profile_key, nb.PROFILE_SCHEMA, path)
    assert set(values) | {"blas_threads_min_work"} == set(nb.PROFILE_SCHEMA)  # kept if none
    assert values["rows_dot_rows_max_work"] in (0, 1 << 18)
    assert 0 <= values["blas_spin_seconds"] <= tune.SPIN_WATCH
    assert values.get("blas_threads_min_work", 1 << 14) == 1 << 14  # three in a row, or none
    assert "8x16x16" in out and "numpy/numba" in table.read_text()


def test_cupy_puts_its_section_in_force_when_it_loads(tmp_path, monkeypatch):
    """No GPU needed: the device probe and key are stood in for; the thresholds that
    cupy_tune would measure come from the profile when the backend loads."""
    from fastlinear.backends import cupy as cupy_backend
    from fastlinear.backends import cupy_launch

    path = tmp_path / "profile.json"
    gpu = {"gpu": "test GPU", "cuda": 13000}
    measured = {"small_batch_max_rows": 4, "own_kernel_max_inner": 512, "tiled_max_work": 1024}
    _profile.write_section("cupy", gpu, measured, path)
    monkeypatch.setattr(_profile, "profile_path", lambda: path)
    monkeypatch.setattr(cupy_backend, "_probe", lambda: None)
    monkeypatch.setattr(cupy_backend, "profile_key", lambda: gpu)
    cupy_backend.unavailable_reason.cache_clear()
    try:
        assert cupy_backend.unavailable_reason() is None
        assert cupy_launch.current_thresholds() == measured
        cupy_backend.unavailable_reason.cache_clear()
        monkeypatch.setattr(cupy_backend, "profile_key", lambda: {**gpu, "gpu": "another"})
        cupy_backend.unavailable_reason()
        defaults = dataclasses.asdict(cupy_launch.DEFAULT_THRESHOLDS)
        assert defaults != measured
        assert cupy_launch.current_thresholds() == defaults  # a foreign section: the defaults
    finally:
        cupy_launch.apply_thresholds(None)
        cupy_backend.unavailable_reason.cache_clear()


def test_the_schema_checks_items_and_ranges():
    from fastlinear.backends import cupy as cupy_backend
    from fastlinear.backends import numba as nb

    good = nb.shape_class("forward", 6, 5, 4, np.float32)
    assert _profile._valid_values({"numpy_classes": [good], "blas_spin_seconds": 0.11,
                                   "blas_threads_min_work": 1 << 19}, nb.PROFILE_SCHEMA)
    assert _profile._valid_values({"blas_spin_seconds": 0}, nb.PROFILE_SCHEMA)
    for bad in ({"numpy_classes": ["bogus"]}, {"numpy_classes": ["forward:gemm:nodtype:3"]},
                {"numpy_classes": [7]}, {"rows_dot_rows_max_work": -1},
                {"rows_dot_rows_min_m": 0}, {"skinny_min_weights": True},
                {"blas_spin_seconds": -0.1}, {"blas_spin_seconds": True},
                {"blas_spin_seconds": "0.1"}, {"blas_spin_seconds": 11.0},
                {"blas_spin_seconds": float("nan")}, {"blas_threads_min_work": 0},
                {"blas_threads_min_work": 2.0**20}):
        assert not _profile._valid_values(bad, nb.PROFILE_SCHEMA), bad
    assert not _profile._valid_values({"tiled_max_work": 0}, cupy_backend.PROFILE_SCHEMA)


def test_a_section_that_fails_to_apply_is_ignored_with_one_warning(tmp_path):
    path = tmp_path / "profile.json"
    _profile.write_section("numba", key(), {"limit": 7}, path)
    applied = []

    def apply(values):
        applied.append(values)
        if values:
            raise ValueError("not enough values to unpack")

    with pytest.warns(UserWarning, match=r"profile\.json.*'numba'.*ignored"):
        _profile.apply_section("numba", key, SCHEMA, apply, path)
    assert applied == [{"limit": 7}, {}]  # then the defaults


def test_a_bad_numba_section_leaves_the_backend_usable(tmp_path):
    """A section with a valid key and checksum but a class name that does not parse: the
    import warns, names the file and runs on its defaults; ``info`` does not crash."""
    from fastlinear.backends import numba as nb

    cache = tmp_path / "cache"
    path = cache / "fastlinear" / _profile.FILE_NAME
    _profile.write_section("numba", nb.profile_key(), {"numpy_classes": ["bogus"]}, path)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": ROOT}
    env.pop(_profile.ENV_VAR, None)
    code = textwrap.dedent(f"""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            from fastlinear.backends import numba as nb
        assert nb.NUMPY_CLASSES == frozenset(), nb.NUMPY_CLASSES
        messages = [str(w.message) for w in caught]
        assert any({str(path)!r} in m and "ignor" in m for m in messages), messages
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    info = subprocess.run([sys.executable, "-m", "fastlinear", "info"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr


def test_a_cupy_threshold_below_one_is_ignored_and_the_backend_stays_available(tmp_path,
                                                                              monkeypatch):
    from fastlinear.backends import cupy as cupy_backend
    from fastlinear.backends import cupy_launch

    path = tmp_path / "profile.json"
    gpu = {"gpu": "test GPU"}
    _profile.write_section("cupy", gpu, {"tiled_max_work": 0}, path)
    monkeypatch.setattr(_profile, "profile_path", lambda: path)
    monkeypatch.setattr(cupy_backend, "_probe", lambda: None)
    monkeypatch.setattr(cupy_backend, "profile_key", lambda: gpu)
    cupy_backend.unavailable_reason.cache_clear()
    try:
        with pytest.warns(UserWarning, match="profile.json"):
            assert cupy_backend.unavailable_reason() is None
        assert cupy_launch.current_thresholds() == dataclasses.asdict(
            cupy_launch.DEFAULT_THRESHOLDS)
        # a section the schema passes but apply refuses: still available, defaults
        monkeypatch.setattr(cupy_launch, "apply_thresholds", _refuse_then_default(cupy_launch))
        _profile.write_section("cupy", gpu, {"tiled_max_work": 5}, path)
        _profile._warned.discard(str(path))
        cupy_backend.unavailable_reason.cache_clear()
        with pytest.warns(UserWarning, match="ignored"):
            assert cupy_backend.unavailable_reason() is None
    finally:
        cupy_launch.apply_thresholds(None)
        cupy_backend.unavailable_reason.cache_clear()


def _refuse_then_default(cupy_launch):
    original = cupy_launch.apply_thresholds

    def apply(values=None):
        if values:
            raise ValueError("refused")
        return original(values)
    return apply


def test_the_parser_is_built_without_the_profile_path(monkeypatch):
    """`fastlinear tune --help` (and parsing) needs no platformdirs: the profile's path is
    resolved only when a profile is written."""
    from fastlinear import tune

    def no_platformdirs():
        raise ModuleNotFoundError("No module named 'platformdirs'")

    monkeypatch.setattr(_profile, "profile_path", no_platformdirs)
    parser = tune.build_parser()
    assert _profile.FILE_NAME in parser.format_help()
    assert parser.parse_args(["--quick"]).profile is None


class _FakeNumba:
    """What ``ratio_table`` and ``_numpy_classes`` ask of the backend, without compiling."""

    NUMPY_CLASSES = frozenset()

    @staticmethod
    def shape_class(pass_name, N, D, M, dtype):
        return f"{pass_name}:gemm:{dtype}:{(N * D * M).bit_length()}"

    forward = backward = None


def scripted_timings(monkeypatch, script):
    """``tune._block_seconds`` replaced: each call returns the next ``(numba's, NumPy's)``
    seconds per call of ``script`` (as many samples as rounds were asked); the calls' rounds
    and budgets are recorded. No clock is read."""
    from fastlinear import tune

    asked = []

    def fake(calls, rounds, block_time, budget=tune.COMPARISON_BUDGET):
        asked.append((rounds, budget))
        mine, plain = script.pop(0)
        return [[mine] * rounds, [plain] * rounds]

    monkeypatch.setattr(tune, "_block_seconds", fake)
    monkeypatch.setattr(tune._dispatch, "load_backend", lambda name: _FakeNumba)
    return asked


def test_a_cell_below_the_target_is_re_measured_and_reported_by_the_re_measure(monkeypatch):
    from fastlinear import tune

    # forward: 0.90 at first, 1.00 re-measured; backward: 1.00 at once (not re-measured)
    asked = scripted_timings(monkeypatch, [(1.0, 0.9), (1.0, 1.0), (1.0, 1.0)])
    lines = tune.ratio_table(((2, 3, 4),), ("float64",), 5, 0.01)
    assert asked == [(5, tune.COMPARISON_BUDGET),
                     (5 * tune.REMEASURE_FACTOR, tune.REMEASURE_SECONDS),
                     (5, tune.COMPARISON_BUDGET)]
    forward, backward = lines[1:3]
    assert forward.split()[5] == "1.000" and "(re-measured, 15 rounds)" in forward
    assert backward.split()[5] == "1.000" and "re-measured" not in backward
    assert lines[-1].startswith("2 of 2 cells at numpy/numba >= 0.97")


def test_a_cell_still_below_after_the_re_measure_stays_a_miss(monkeypatch):
    from fastlinear import tune

    scripted_timings(monkeypatch, [(1.0, 0.9), (1.0, 0.95), (1.0, 1.1)])
    lines = tune.ratio_table(((2, 3, 4),), ("float64",), 5, 0.01)
    assert lines[1].split()[5] == "0.950" and "(re-measured, 15 rounds)" in lines[1]
    assert lines[-1].startswith("1 of 2 cells at numpy/numba >= 0.97")


def test_re_measures_stop_when_their_time_is_spent(monkeypatch):
    from fastlinear import tune

    asked = scripted_timings(monkeypatch, [(1.0, 0.9), (1.0, 0.9)])
    lines = tune.ratio_table(((2, 3, 4),), ("float64",), 5, 0.01, recheck_seconds=0.0)
    assert len(asked) == 2  # no re-measure: each cell reported by its first figure, a miss
    assert "re-measured" not in lines[1] and lines[-1].startswith("0 of 2 cells")
    asked = scripted_timings(monkeypatch, [(1.0, 0.9), (1.0, 1.0), (1.0, 1.0)])
    tune.ratio_table(((2, 3, 4),), ("float64",), 5, 0.01, recheck_seconds=0.25)
    assert asked[1] == (15, 0.25)  # within what is left of the table's budget


def test_a_class_is_handed_to_numpy_only_when_the_re_measure_confirms(monkeypatch):
    from fastlinear import tune

    # float32: NumPy 10 % faster, then even in the re-measure: handed over. float64: 10 %
    # faster at first, level in the re-measure: kept. Backward: never faster: not re-measured.
    asked = scripted_timings(monkeypatch, [(1.1, 1.0), (1.1, 1.0), (1.0, 1.0),
                                           (1.1, 1.0), (1.0, 1.0), (1.0, 1.0)])
    classes = tune._numpy_classes(_FakeNumba, ((2, 3, 4),), ("float32", "float64"), 5, 0.01)
    assert classes == [_FakeNumba.shape_class("forward", 2, 3, 4, "float32")]
    assert [rounds for rounds, _ in asked] == [5, 15, 5, 5, 15, 5]
    # within the margin (1.01): not re-measured, not handed
    asked = scripted_timings(monkeypatch, [(1.01, 1.0), (1.0, 1.0)])
    assert tune._numpy_classes(_FakeNumba, ((2, 3, 4),), ("float32",), 5, 0.01) == []
    assert len(asked) == 2


def test_block_seconds_stops_its_rounds_when_the_budget_is_spent(monkeypatch):
    """Calls that turn slow after the sizing call (a loaded machine) do not stretch the
    comparison past its budget: a fake clock, advanced by the calls themselves."""
    from fastlinear import tune

    clock = {"now": 0.0, "step": 0.001, "calls": 0}

    def call():
        clock["calls"] += 1
        clock["now"] += clock["step"]
        if clock["calls"] == 4:  # warm-up and sizing of both done: from now on 100x slower
            clock["step"] = 0.1

    monkeypatch.setattr(tune.time, "perf_counter", lambda: clock["now"])
    mine, plain = tune._block_seconds([call, call], 40, 0.01, budget=5.0)
    assert len(mine) == len(plain) == 3  # the budget gone within the first 3 rounds (6 s)
    assert mine == pytest.approx([0.1] * 3) and plain == pytest.approx([0.1] * 3)
