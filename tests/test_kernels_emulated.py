"""The cupy backend's kernels and launch plumbing, run on the CPU (no GPU needed).

kernels/*.cu is compiled with g++ against ``kernel_host_emulation.cpp`` (every block's threads
run as CPU threads meeting at real barriers), NumPy stands in for CuPy, and cuBLAS is replaced by
an emulator that checks its argument rules. What runs is the backend's own code from the path
choice to the kernel arguments: ``_forward_device``, ``_backward_device``, ``_launch``. Not
covered here: CuPy and cuBLAS themselves, NVRTC, and blocks running concurrently.
"""

import numpy as np
import pytest

from fastlinear.backends import cupy as cupy_backend
from tests.gpu_emulation import (
    HostKernel,
    assert_backward_matches,
    assert_matches,
    backend_gemm,
    build_host_kernels,
    make_layout,
)
from tests.helpers import make_inputs, reference64

DTYPES = (np.float16, np.float32, np.float64)


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    host = build_host_kernels(tmp_path_factory.mktemp("host_kernels"))
    if host is None:
        pytest.skip("g++ is not on PATH: cannot run the CUDA kernels on the CPU")
    return host


class NumpyAsCupy:
    """NumPy under the name of CuPy: the few functions the backend calls, ``asnumpy`` included."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asnumpy(array, out=None):
        if out is None:
            return array.copy()
        out[...] = array
        return out


@pytest.fixture
def backend(host_kernels, monkeypatch):
    """The cupy backend computing on NumPy arrays: CPU kernels, emulated cuBLAS, 4 SMs."""
    monkeypatch.setattr(cupy_backend, "_cupy", NumpyAsCupy)
    monkeypatch.setattr(cupy_backend, "_kernel",
                        lambda name, device_id: HostKernel(host_kernels, name))
    monkeypatch.setattr(cupy_backend, "_device_id", lambda: 0)
    monkeypatch.setattr(cupy_backend, "_sm_count", lambda device_id: 4)
    monkeypatch.setattr(cupy_backend, "_gemm", backend_gemm)
    monkeypatch.setattr(cupy_backend, "COLSUM_MIN_ROWS_PER_SPLIT", 4)  # split small inputs
    return cupy_backend


@pytest.mark.parametrize("N, D, M", [(1, 1, 1), (3, 300, 31), (9, 17, 65), (65, 15, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", (None, *cupy_backend.FORWARD_PATHS))
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("x_layout, w_layout", [("C", "C"), ("every_other_col", "reversed")])
def test_forward(backend, rng, N, D, M, dtype, path, has_bias, x_layout, w_layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype, bias=has_bias)
    reference = reference64(X, W, b, dY)
    if b is not None:  # a strided bias
        b = np.repeat(b, 2)[::2]
    with backend.forced_forward_path(path):
        Y = backend._forward_device(make_layout(np, X, x_layout), make_layout(np, W, w_layout),
                                    b, None)
    assert Y.shape == (N, M) and Y.flags.c_contiguous
    assert_matches(Y, "Y", reference, dtype, f"Y via {path or 'the shape rule'}")


def test_forward_writes_into_out(backend, rng):
    X, W, b, dY = make_inputs(rng, 5, 7, 3, np.float32)
    out = np.full((5, 3), np.nan, np.float32)
    assert backend._forward_device(X, W, b, out) is out
    assert_matches(out, "Y", reference64(X, W, b, dY), np.float32, "Y")


@pytest.mark.parametrize("N, D, M", [(5, 3, 2), (70, 33, 40)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("need_dX", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("layout", ["C", "every_other_col"])
def test_backward(backend, rng, N, D, M, dtype, has_bias, need_dX, accumulate, layout):
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    reference = reference64(X, W, b, dY)
    dW0 = rng.standard_normal((D, M)).astype(dtype) if accumulate else None
    db0 = rng.standard_normal(M).astype(dtype) if accumulate and has_bias else None
    dX, dW, db = backend._backward_device(
        make_layout(np, dY, layout), make_layout(np, X, layout), make_layout(np, W, layout),
        has_bias, need_dX, accumulate, None,
        None if dW0 is None else dW0.copy(), None if db0 is None else db0.copy())
    assert_backward_matches((dX, dW, db), reference, dtype, need_dX, has_bias, dW0, db0)


def test_column_sums_splits_rows_when_asked(backend, rng):
    grid, _, rows_per_split = backend.column_sum_launch(70, 40, 4)
    assert grid == (2, 8, 1) and rows_per_split == 9
    dY = rng.standard_normal((70, 40))
    db = np.empty(40)
    backend._column_sums(dY, db, accumulate=False)
    np.testing.assert_allclose(db, dY.sum(0), rtol=1e-13)


def test_public_functions_round_trip_host_arrays(backend, rng):
    """forward/backward with NumPy arrays: moved 'to the device' and back into the buffers."""
    X, W, b, dY = make_inputs(rng, 12, 9, 20, np.float32)
    reference = reference64(X, W, b, dY)
    out = np.full((12, 20), np.nan, np.float32)
    assert backend.forward(X, W, b, out) is out
    assert_matches(out, "Y", reference, np.float32, "Y")
    dW0 = rng.standard_normal((9, 20)).astype(np.float32)
    db0 = rng.standard_normal(20).astype(np.float32)
    dX_buffer, dW, db = np.empty((12, 9), np.float32), dW0.copy(), db0.copy()
    dX, dW_out, db_out = backend.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=True,
                                          dX=dX_buffer, dW=dW, db=db)
    assert dX is dX_buffer and dW_out is dW and db_out is db
    assert_matches(dX, "dX", reference, np.float32, "dX")
    assert_matches(dW, "dW", reference, np.float32, "dW", previous=dW0)
    assert_matches(db, "db", reference, np.float32, "db", previous=db0)
