"""fastlinear.backends.cupy_tune without a GPU: the thresholds it derives from a timing table
(a synthetic cost model stands in for CUDA events) and the table it prints."""

import math

from fastlinear.backends import cupy_launch, cupy_tune


def cost_model(own_step_us=1.0, launch_us=5.0, cublas_us=20.0, small_batch_rows=8):
    """Microseconds (returned as ms) per forward call: our kernels pay one launch and a global
    round trip per 16-wide step of D (``own_step_us``, twice as many rows share it in
    small_batch) and their arithmetic at half cuBLAS's rate (small_batch, a GEMV, at cuBLAS's);
    small_batch loses past ``small_batch_rows``; cuBLAS pays a GEMM and an epilogue launch. A
    column-major W costs our kernels' steps four times as much."""
    def time_path(path, n, d, m, w_row_major=True):
        work_us = n * d * m / 2e5
        if path == "cublas":
            return (cublas_us + work_us / 2) / 1e3
        steps = math.ceil(d / 16) * own_step_us * (1.0 if w_row_major else 4.0)
        if path == "small_batch":
            rows_penalty = 0.0 if n <= small_batch_rows else 50.0
            return (launch_us + steps / 2 + rows_penalty + work_us / 2) / 1e3
        return (launch_us + steps + work_us) / 1e3
    return time_path


def test_thresholds_follow_the_table():
    measured = cupy_tune.measure_thresholds(cost_model())
    # own kernels: 5 + d/16 + work against 20 + work/2: win up to D = 128, lose at 256;
    # small_batch wins up to 8 rows; tiled (D = 128) against cuBLAS: wins up to N = M = 128
    assert measured == {"own_kernel_max_inner": 128, "small_batch_max_rows": 8,
                        "tiled_max_work": 128 * 128 * 128}
    try:
        assert cupy_launch.apply_thresholds(measured) == measured
    finally:
        cupy_launch.apply_thresholds(None)


def test_a_gpu_where_our_kernels_never_win_gets_thresholds_below_the_grid():
    measured = cupy_tune.measure_thresholds(cost_model(own_step_us=100.0, launch_us=100.0))
    assert measured["own_kernel_max_inner"] < min(cupy_tune.INNER_CANDIDATES)
    assert measured["tiled_max_work"] < cupy_tune.TILED_SIDES[0] ** 2 * cupy_tune.TILED_INNER
    cupy_launch.apply_thresholds(measured)  # valid values
    cupy_launch.apply_thresholds(None)


def test_path_table_marks_where_the_rule_is_not_the_fastest():
    cupy_launch.apply_thresholds(None)
    rows = cupy_tune.path_table(time_path=cost_model(), sm_count=132)
    assert len(rows) == 2 * len(cupy_tune.CLIFF_SHAPES)
    cliff = next(r for r in rows if (r["N"], r["D"], r["M"], r["W"]) == (16, 2048, 128, "C"))
    assert cliff["rule"] == "cublas" == cliff["fastest"]
    assert "small_batch" in cliff["ms"]
    big = next(r for r in rows if r["N"] == 1 and r["W"] == "F")
    assert big["rule"] == "cublas"
    text = cupy_tune.format_table(rows)
    assert text.splitlines()[0].split()[:4] == ["N", "D", "M", "W"]
    assert len(text.splitlines()) == len(rows) + 1


def test_each_row_is_handed_on_as_it_is_measured():
    timed, seen, shapes = [], [], cupy_tune.CLIFF_SHAPES[:2]

    def timer(*args):
        timed.append(args)
        return cost_model()(*args)

    rows = cupy_tune.path_table(shapes, time_path=timer, sm_count=132,
                                on_row=lambda row: seen.append((row, len(timed))))
    assert [row for row, _ in seen] == rows and len(rows) == 2 * len(shapes)
    assert [count for _, count in seen] == [3, 6, 9, 12]  # after its own three paths


def test_main_prints_rows_as_measured_and_keeps_the_table_in_json(tmp_path, monkeypatch, capsys):
    import json
    import types

    from fastlinear.backends import cupy as cupy_backend

    monkeypatch.setattr(cupy_tune, "cupy_timer", lambda dtype, reps: cost_model())
    monkeypatch.setattr(cupy_backend, "_device_state",
                        lambda: types.SimpleNamespace(sm_count=132))
    written = []
    write_json = cupy_tune._write_json

    def record_and_write(path, result):
        written.append(sorted(result))
        write_json(path, result)

    monkeypatch.setattr(cupy_tune, "_write_json", record_and_write)
    result = cupy_tune.main(["--quick", "--json", str(tmp_path / "paths.json")])
    assert written == [["dtype", "in_force", "table"], ["dtype", "in_force", "measured", "table"]]
    assert json.loads((tmp_path / "paths.json").read_text())["measured"] == result["measured"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == cupy_tune.TABLE_HEADER
    assert lines[2:2 + len(result["table"])] == list(map(cupy_tune.format_row, result["table"]))
