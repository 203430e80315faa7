"""dask arrays on a real ``distributed.LocalCluster`` of 2 worker processes, against the reference.

One cluster serves the module. Its workers run with ``FASTLINEAR_BACKEND`` set to a name that
does not exist: a task that consulted the worker's own environment instead of the backend the
client sent would fail, so every computing test here also checks that the backend travels.
Errors in the arguments are raised when the graph is built, in the client; they need no cluster.
"""

import math
import os
import pathlib
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

import fastlinear
from fastlinear import _dask, _dispatch, activations
from tests.helpers import (
    CPU_DTYPES,
    assert_matches_reference,
    backend_param,
    install_registry,
    make_inputs,
    reference64,
)

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

CPU_BACKENDS = [backend_param(name) for name in ("numpy", "numba")]
GPU_REASON = _dispatch.unavailable_reason("cupy")
EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "dask_out_of_core.py"


@pytest.fixture(scope="module")
def client():
    """A client of 2 spawned worker processes, one thread each, whose environment names no
    backend that exists."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  env={fastlinear.ENV_VAR: "not-a-backend",
                                       "NUMBA_NUM_THREADS": "1"}) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


def compute(client, *collections):
    return dask.compute(*collections, scheduler=client)


def chunked(array, rows, cols):
    return da.from_array(array, chunks=(rows, cols))


# --- results on the cluster -------------------------------------------------------------------

def test_workers_are_other_processes_started_by_spawn(client):
    pids = client.run(os.getpid)
    assert len(pids) == 2 and os.getpid() not in pids.values()
    methods = client.run(lambda: __import__("multiprocessing").get_start_method())
    assert set(methods.values()) == {"spawn"}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_and_backward_match_reference(client, backend, dtype, rng):
    N, D, M = 97, 13, 7
    X, W, b, dY = make_inputs(rng, N, D, M, dtype)
    # uneven row chunks, the feature axis split (rechunked to one chunk), dY chunked unlike X
    Xd, dYd = chunked(X, 20, 5), chunked(dY, 31, 3)
    Y = fastlinear.linear_forward(Xd, W, b, backend=backend)
    dX, dW, db = fastlinear.linear_backward(dYd, Xd, W, backend=backend)
    assert Y.chunks == (Xd.chunks[0], (M,)) and dX.chunks == (Xd.chunks[0], (D,))
    assert dW.chunks == ((D,), (M,)) and db.chunks == ((M,),)
    Y, dX, dW, db = compute(client, Y, dX, dW, db)  # one graph
    assert all(type(a) is np.ndarray and a.dtype == dtype for a in (Y, dX, dW, db))
    assert_matches_reference(dict(Y=Y, dX=dX, dW=dW, db=db), reference64(X, W, b, dY), dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_many_batch_dims(client, backend, rng):
    """Leading axes past the letters "d" and "m" of the blockwise indices (a 6-D X)."""
    lead = (2, 1, 3, 1, 2)
    X, W, b, dY = make_inputs(rng, math.prod(lead), 4, 3, np.float64)
    Xd = da.from_array(X.reshape(*lead, 4), chunks=(1, 1, 2, 1, 1, 4))
    dYd = da.from_array(dY.reshape(*lead, 3), chunks=(1, 1, 2, 1, 1, 3))
    dX, dW, db = fastlinear.linear_backward(dYd, Xd, W, backend=backend)
    dX, dW, db = compute(client, dX, dW, db)
    assert dX.shape == (*lead, 4)
    ref = reference64(X, W, b, dY)
    assert_matches_reference(dict(dX=dX.reshape(-1, 4), dW=dW, db=db), ref, np.float64)


def test_batch_dims_no_bias_and_no_dX(client, backend, rng):
    X, W, _, dY = make_inputs(rng, 4 * 9, 6, 5, np.float64, bias=False)
    Xd = da.from_array(X.reshape(4, 9, 6), chunks=(3, 4, 6))
    dYd = da.from_array(dY.reshape(4, 9, 5), chunks=(2, 5, 5))
    Y = fastlinear.linear_forward(Xd, W, backend=backend)
    dX, dW, db = fastlinear.linear_backward(dYd, Xd, W, has_bias=False, backend=backend)
    none_dX, dW_only, db_only = fastlinear.linear_backward(dYd, Xd, W, need_dX=False,
                                                           backend=backend)
    assert db is None and none_dX is None
    Y, dX, dW, dW_only, db_only = compute(client, Y, dX, dW, dW_only, db_only)
    assert Y.shape == (4, 9, 5) and dX.shape == (4, 9, 6)
    ref = reference64(X, W, None, dY)
    assert_matches_reference(dict(Y=Y.reshape(-1, 5), dX=dX.reshape(-1, 6), dW=dW), ref,
                             np.float64)
    assert_matches_reference(dict(dW=dW_only, db=db_only), ref, np.float64)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activation_saved_and_backward(client, backend, activation, rng):
    X, W, b, dY = make_inputs(rng, 41, 9, 6, np.float64)
    Xd, dYd = chunked(X, 10, 9), chunked(dY, 10, 6)
    Y, saved = fastlinear.linear_forward(Xd, W, b, activation=activation, backend=backend,
                                         return_saved=True)
    grads = fastlinear.linear_backward(dYd, Xd, W, activation=activation, saved=saved,
                                       backend=backend)
    Y, saved, dX, dW, db = compute(client, Y, saved, *grads)
    ref = reference64(X, W, b, dY)
    if activation == "gelu":  # saved is the pre-activation X @ W + b
        assert_matches_reference(dict(Y=saved), ref, np.float64)
        # the activation's own rounding: 1 + erf(z / sqrt 2) cancels to an error of u |z|
        slack = 16 * np.finfo(np.float64).eps * (1 + np.abs(saved))
        assert np.all(np.abs(Y - activations.apply("gelu", saved)) <= slack)
    else:  # relu is 1-Lipschitz and exact: Y within the pre-activation's bound
        expected, magnitude, terms = ref["Y"]
        ref["Y"] = (np.maximum(expected, 0), magnitude, terms)
        assert_matches_reference(dict(Y=Y), ref, np.float64)
        assert saved is not None and np.array_equal(saved, Y)
    # the backward's reference: the products of G = dY * act'(z), z from the saved array
    G = activations.grad(activation, dY, saved)
    assert_matches_reference(dict(dX=dX, dW=dW, db=db), reference64(X, W, b, G), np.float64)


def test_promotion_scalar_bias_and_cast_in_the_client(client, rng):
    X, W, _, dY = make_inputs(rng, 25, 5, 4, np.float32)
    W64 = W.astype(np.float64)
    Xd = chunked(X, 10, 5)  # float32 chunks, float64 W: the call computes in float64
    Y = fastlinear.linear_forward(Xd, W64, 0.5)
    dX, dW, db = fastlinear.linear_backward(chunked(dY, 10, 4), Xd, W64)
    assert Y.dtype == dX.dtype == dW.dtype == db.dtype == np.float64
    Y, dX, dW, db = compute(client, Y, dX, dW, db)
    b = np.full(4, 0.5)
    assert_matches_reference(dict(Y=Y, dX=dX, dW=dW, db=db), reference64(X, W64, b, dY),
                             np.float64)


def test_layer_stores_lazy_gradients(client, rng):
    X, W, b, dY = make_inputs(rng, 30, 4, 3, np.float32)
    layer = fastlinear.Linear(4, 3, dtype=np.float32)  # auto, resolved in the client
    layer.W[...], layer.b[...] = W, b
    Y = layer.forward(chunked(X, 8, 4))
    dX = layer.backward(chunked(dY, 8, 3))
    assert all(_dask.is_dask(a) for a in (Y, dX, layer.dW, layer.db))
    Y, dX, layer.dW, layer.db = compute(client, Y, dX, layer.dW, layer.db)
    assert_matches_reference(dict(Y=Y, dX=dX, dW=layer.dW, db=layer.db),
                             reference64(X, W, b, dY), np.float32)
    layer.dW = da.ones((4, 3), dtype=np.float32)
    layer.zero_grad()  # a lazy gradient is replaced, not zeroed lazily
    assert type(layer.dW) is np.ndarray and not layer.dW.any()
    with pytest.raises(TypeError, match="accumulate= is not supported with dask"):
        layer.backward(chunked(dY, 8, 3), accumulate=True)


def test_W_and_b_are_one_graph_key_each(client, rng):
    X, W, b, dY = make_inputs(rng, 64, 100, 100, np.float64)
    Xd, dYd = chunked(X, 8, 100), chunked(dY, 8, 100)  # 8 row chunks, W is 80 kB
    Y = fastlinear.linear_forward(Xd, W, b)
    grads = fastlinear.linear_backward(dYd, Xd, W)
    graph = {}
    for collection in (Y, *grads):
        graph.update(collection.__dask_graph__())
    names = [key[0] if isinstance(key, tuple) else key for key in graph]
    assert sum(n.startswith("fastlinear-W-") for n in names) == 1  # forward and backward share it
    assert sum(n.startswith("fastlinear-b-") for n in names) == 1
    assert sum(n.startswith("fastlinear-backward-") for n in names) == 8
    # the tasks refer to W's key: the whole graph holds W's bytes about once, not per task
    tasks = {key: task for key, task in graph.items() if not str(key).startswith(
        ("('array-", "array-"))}
    assert len(pickle.dumps(tasks)) < 2 * W.nbytes


def test_one_compute_runs_each_chunk_task_once(monkeypatch, rng):
    """dask's graph optimisation fuses blockwise tasks; it must not copy a chunk's forward or
    backward into each of its consumers (dX, dW, db, a loss)."""
    calls = {"forward": 0, "backward": 0}

    def counting(name, task):
        def run(*args, **kwargs):
            calls[name] += 1
            return task(*args, **kwargs)
        return run

    monkeypatch.setattr(_dask, "_forward_chunk", counting("forward", _dask._forward_chunk))
    monkeypatch.setattr(_dask, "_backward_chunk", counting("backward", _dask._backward_chunk))
    X, W, b, T = make_inputs(rng, 50, 4, 3, np.float64)
    Xd, Td = chunked(X, 10, 4), chunked(T, 10, 3)
    R = fastlinear.linear_forward(Xd, W, b, backend="numpy") - Td
    grads = fastlinear.linear_backward(R / 50, Xd, W, backend="numpy")
    dask.compute((R ** 2).sum(), *grads, scheduler="sync")  # in this process: calls counted
    assert calls == {"forward": 5, "backward": 5}


def test_W_updated_in_place_after_building_does_not_change_result(client, rng):
    X, W, b, _ = make_inputs(rng, 20, 5, 4, np.float64)
    Y = fastlinear.linear_forward(chunked(X, 7, 5), W, b, backend="numpy")
    expected = X @ W + b
    W += 1.0
    (Y,) = compute(client, Y)
    np.testing.assert_allclose(Y, expected, rtol=1e-13)


def test_fastlinear_never_imports_dask_for_other_arrays():
    code = ("import sys, numpy as np, fastlinear\n"
            "X = np.ones((3, 2)); W = np.ones((2, 4))\n"
            "Y = fastlinear.linear_forward(X, W, np.ones(4), backend='numpy')\n"
            "fastlinear.linear_backward(Y, X, W, backend='numpy')\n"
            "fastlinear.linear_forward(X.tolist(), W, backend='numpy')\n"
            "assert not any(m == 'dask' or m.startswith('dask.') for m in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- how the backend reaches the workers -----------------------------------------------------

def test_context_and_environment_travel_to_workers(client, monkeypatch, rng):
    X, W, b, _ = make_inputs(rng, 12, 3, 2, np.float64)
    Xd = chunked(X, 5, 3)
    monkeypatch.setenv(fastlinear.ENV_VAR, "numpy")  # the workers' own value is not a backend
    from_env = fastlinear.linear_forward(Xd, W, b)
    with fastlinear.use_backend("numpy"):
        from_context = fastlinear.linear_forward(Xd, W, b)
    for Y in compute(client, from_env, from_context):
        np.testing.assert_allclose(Y, X @ W + b, rtol=1e-13)


def test_auto_is_resolved_in_the_client():
    here = _dispatch.current_backend("numpy")
    assert _dask._concrete_backend(None, "numpy", np.dtype(np.float32)) == here
    assert _dask._concrete_backend("NumPy ", "numpy", np.dtype(np.float32)) == "numpy"
    # CuPy chunks: cupy whether or not this client can run it (the workers may)
    assert _dask._concrete_backend("auto", "cupy", np.dtype(np.float16)) == "cupy"


def test_resolving_auto_for_a_graph_counts_no_call(monkeypatch):
    registry = install_registry(monkeypatch)
    for _ in range(registry.load_after_calls + 2):
        name = _dask._concrete_backend(None, "numpy", np.dtype(np.float64))
    assert registry.interim_calls == 0  # no call made: auto's interim phase is where it was
    assert name == registry.current("numpy")


class DeviceWeights:
    """A CuPy array as the graph builder sees it; pickling it (a device-to-host copy for a real
    one) is counted."""

    __module__ = "cupy._core.core"
    pickled = 0

    def __init__(self):
        self.shape, self.ndim, self.dtype = (3, 2), 2, np.dtype(np.float32)

    def copy(self):
        return DeviceWeights()

    def __reduce__(self):
        DeviceWeights.pickled += 1
        return (DeviceWeights, ())


def test_device_weights_enter_the_graph_unpickled(monkeypatch):
    """dask's tokenize has no CuPy handler and would pickle W to name its key (issue 19): W and
    b that are not NumPy arrays get a unique name instead; NumPy ones keep a content name."""
    monkeypatch.setattr(DeviceWeights, "pickled", 0)
    first, second = (_dask._graph_constant(dask, DeviceWeights(), "W") for _ in range(2))
    assert DeviceWeights.pickled == 0
    assert first.key != second.key and first.key.startswith("fastlinear-W-")
    W = np.arange(6.0).reshape(3, 2)
    assert _dask._graph_constant(dask, W, "W").key == _dask._graph_constant(dask, W.copy(),
                                                                              "W").key


@pytest.mark.skipif(GPU_REASON is None, reason="the cupy backend runs here")
def test_worker_that_cannot_run_the_backend_says_why(client, rng):
    X, W, b, _ = make_inputs(rng, 10, 3, 2, np.float32)
    Y = fastlinear.linear_forward(chunked(X, 5, 3), W, b, backend="cupy")  # built in the client
    with pytest.raises(fastlinear.BackendUnavailableError,
                       match=r"on dask worker tcp://.*backend 'cupy' is not available"):
        compute(client, Y)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs CuPy and a CUDA device: {GPU_REASON}")
def test_cupy_chunks(client, rng):
    import cupy

    X, W, b, dY = make_inputs(rng, 50, 8, 6, np.float32)
    Xd = da.from_array(cupy.asarray(X), chunks=(16, 8))
    dYd = da.from_array(cupy.asarray(dY), chunks=(16, 6))
    Wc, bc = cupy.asarray(W), cupy.asarray(b)
    Y = fastlinear.linear_forward(Xd, Wc, bc)  # auto: cupy for CuPy chunks
    grads = fastlinear.linear_backward(dYd, Xd, Wc)
    results = compute(client, Y, *grads)
    assert all(type(a).__module__.startswith("cupy") for a in results)
    names = ("Y", "dX", "dW", "db")
    assert_matches_reference({name: a.get() for name, a in zip(names, results, strict=True)},
                             reference64(X, W, b, dY), np.float32)


# --- the example ------------------------------------------------------------------------------

def test_example_loss_falls_on_the_cluster(client, tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    losses = main(["--data", str(tmp_path), "--rows", "3000", "--features", "6", "--outputs",
                   "2", "--chunk-rows", "700", "--steps", "4", "--backend", "numpy",
                   "--scheduler", client.scheduler.address])
    assert len(losses) == 4 and all(a > b for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.2 * losses[0]
    assert "Completed" in capsys.readouterr().out  # dask's progress bar


# --- bad input: clear errors, raised in the client when the graph is built ---------------------

@pytest.fixture
def inputs(rng):
    X, W, b, dY = make_inputs(rng, 10, 4, 3, np.float64)
    return chunked(X, 5, 4), W, b, chunked(dY, 5, 3)


@pytest.mark.parametrize("make_call, error, message", [
    (lambda X, W, b, dY: fastlinear.linear_backward(dY.compute(), X, W), TypeError,
     "dY must be a dask.array.Array like the other batch operands, got numpy.ndarray"),
    (lambda X, W, b, dY: fastlinear.linear_backward(dY, X.compute(), W), TypeError,
     "X must be a dask.array.Array like the other batch operands, got numpy.ndarray"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X, da.from_array(W), b), TypeError,
     r"W must be a NumPy or CuPy array \(each worker holds it whole\)"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X, W, da.from_array(b)), TypeError,
     r"b must be a NumPy or CuPy array \(each worker holds it whole\)"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X.astype(np.float32), W, casting="no"),
     TypeError, "X has dtype float32 but the call computes in float64, and casting='no'"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X.astype(np.int64), W.astype(np.int64)),
     TypeError, "fastlinear computes in floating point"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X[:, :3], W), ValueError,
     "X has 3 features but 4 were expected"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X, W, b[:2]), ValueError,
     r"b must broadcast to \(3,\)"),
    (lambda X, W, b, dY: fastlinear.linear_backward(dY[:4], X, W), ValueError,
     "dY must have the shape of the forward output"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X, W, out=np.empty((10, 3))), TypeError,
     "out= is not supported with dask arrays"),
    (lambda X, W, b, dY: fastlinear.linear_backward(dY, X, W, dW=np.empty((4, 3))), TypeError,
     "dW= is not supported with dask arrays"),
    (lambda X, W, b, dY: fastlinear.linear_backward(dY, X, W, activation="relu"), ValueError,
     "needs saved="),
    (lambda X, W, b, dY: fastlinear.linear_forward(dask.delayed(X.compute()), W), TypeError,
     "X must be a dask.array.Array like the other batch operands, got dask.delayed.Delayed"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X, W, backend="torch"), ValueError,
     "unknown backend 'torch'"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X[0], W), ValueError,
     r"X must be \(N, 4\) or \(\*, 4\) as a dask array"),
    (lambda X, W, b, dY: fastlinear.linear_forward(
        X.astype(np.float16), W.astype(np.float16), backend="numba"), TypeError,
     "the 'numba' backend computes in float32, float64"),
    (lambda X, W, b, dY: fastlinear.linear_forward(X[X[:, 0] > 0], W), ValueError,
     "chunks of unknown size"),
])
def test_bad_input_is_refused_when_building(inputs, make_call, error, message):
    with pytest.raises(error, match=message):
        make_call(*inputs)
