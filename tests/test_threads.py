"""Threads: concurrent calls on shared weights are correct, and ``use_backend`` is per thread.

A barrier starts the threads together so their calls really overlap; several iterations each.
Every CPU backend runs here (the GPU backend is for one host thread per device stream).
"""

import concurrent.futures
import contextlib
import contextvars
import threading

import numpy as np
import pytest

import fastlinear
from fastlinear import _dispatch
from tests.helpers import (
    assert_close,
    install_registry,
    make_inputs,
    reference64,
    set_backend_variable,
)

THREADS = 8
ITERATIONS = 5
TIMEOUT = 60  # seconds; a deadlock fails the test instead of hanging CI


def cpu_backend(backend):
    module = _dispatch.load_backend(backend)
    if module.ARRAY_LIBRARIES[0] != "numpy":
        pytest.skip(f"{backend} is not a CPU backend")
    return backend


def run_threads(target, count=THREADS):
    """Run ``target(index, barrier)`` in ``count`` threads; re-raise the first error."""
    barrier = threading.Barrier(count, timeout=TIMEOUT)
    errors = [None] * count

    def runner(index):
        try:
            target(index, barrier)
        except BaseException as exc:  # noqa: BLE001 (reported in the main thread)
            errors[index] = exc
            barrier.abort()

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "a thread is still running: deadlock?"
    raised = [e for e in errors if e is not None]
    # a failing thread aborts the barrier, so the others raise BrokenBarrierError: report it
    raised.sort(key=lambda e: isinstance(e, threading.BrokenBarrierError))
    if raised:
        raise raised[0]


def thread_problems(dtype, shapes):
    """Shared W and b; per-thread X and dY, with their float64 results and bounds."""
    rng = np.random.default_rng(99)
    D, M = shapes[0][1], shapes[0][2]
    W = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype)
    problems = []
    for N, _, _ in shapes:
        X, _, _, dY = make_inputs(rng, N, D, M, dtype)
        problems.append((X, dY, reference64(X, W, b, dY)))
    return W, b, problems


def check_results(results, reference, dtype):
    for name, value in results.items():
        expected, magnitude, terms = reference[name]
        assert_close(value, expected, dtype, terms, magnitude, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concurrent_forward_backward_on_shared_weights(backend, dtype):
    """8 threads, different batch sizes (so skinny and general kernels mix), shared W and b."""
    backend = cpu_backend(backend)
    shapes = [(n, 96, 80) for n in (1, 3, 4, 5, 64, 127, 200, 256)]
    W, b, problems = thread_problems(dtype, shapes)
    W_before, b_before = W.copy(), b.copy()

    def work(index, barrier):
        X, dY, reference = problems[index]
        dW = np.zeros_like(W)
        db = np.zeros_like(b)
        for iteration in range(ITERATIONS):
            barrier.wait()
            Y = fastlinear.linear_forward(X, W, b, backend=backend)
            dX, dW_new, db_new = fastlinear.linear_backward(dY, X, W, backend=backend)
            fastlinear.linear_backward(dY, X, W, need_dX=False, accumulate=True, dW=dW, db=db,
                                       backend=backend)
            check_results({"Y": Y, "dX": dX, "dW": dW_new, "db": db_new}, reference, dtype)
            for name, total in (("dW", dW), ("db", db)):
                expected, magnitude, terms = reference[name]
                count = iteration + 1
                assert_close(total, count * expected, dtype, count * (terms + 1),
                             count * magnitude, f"{name} accumulated {count}x")

    run_threads(work)
    np.testing.assert_array_equal(W, W_before)
    np.testing.assert_array_equal(b, b_before)


def test_concurrent_calls_with_out_buffers(backend):
    """Each thread writes into its own preallocated buffers while the others do the same."""
    backend = cpu_backend(backend)
    W, b, problems = thread_problems(np.float64, [(33, 40, 24)] * THREADS)

    def work(index, barrier):
        X, dY, reference = problems[index]
        out = np.empty((33, 24))
        dX, dW, db = np.empty((33, 40)), np.empty((40, 24)), np.empty(24)
        for _ in range(ITERATIONS):
            out[...] = dX[...] = np.nan
            barrier.wait()
            assert fastlinear.linear_forward(X, W, b, out=out, backend=backend) is out
            fastlinear.linear_backward(dY, X, W, dX=dX, dW=dW, db=db, backend=backend)
            check_results({"Y": out, "dX": dX, "dW": dW, "db": db}, reference, np.float64)

    run_threads(work)


def test_thread_pool_executor(backend):
    """The same through concurrent.futures, more tasks than workers."""
    backend = cpu_backend(backend)
    W, b, problems = thread_problems(np.float32, [(n, 50, 30) for n in range(1, 33)])

    def task(index):
        X, dY, reference = problems[index]
        Y = fastlinear.linear_forward(X, W, b, backend=backend)
        dX, dW, db = fastlinear.linear_backward(dY, X, W, backend=backend)
        check_results({"Y": Y, "dX": dX, "dW": dW, "db": db}, reference, np.float32)
        return index

    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as pool:
        done = list(pool.map(task, range(len(problems)), timeout=TIMEOUT))
    assert done == list(range(len(problems)))


# --- use_backend is per thread -------------------------------------------------------------------

class Recorder:
    """A fake backend that records which thread called it, computing with the reference."""

    def __init__(self, name):
        from fastlinear.backends import numpy as reference

        self.NAME, self.DTYPES = name, reference.DTYPES
        self.ARRAY_LIBRARIES = reference.ARRAY_LIBRARIES
        self.reference = reference
        self.calls = []  # (thread name, call) pairs; list.append is atomic

    def unavailable_reason(self):
        return None

    def forward(self, *args, **kwargs):
        self.calls.append((threading.current_thread().name, "forward"))
        return self.reference.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls.append((threading.current_thread().name, "backward"))
        return self.reference.backward(*args, **kwargs)


@pytest.fixture
def recorders(monkeypatch):
    """Every registered backend replaced by a recorder, all "available"."""
    fakes = {name: Recorder(name) for name in _dispatch.BACKENDS}
    by_path = {path: fakes[name] for name, path in _dispatch.BACKENDS.items()}
    registry = install_registry(monkeypatch, import_module=by_path.__getitem__)
    for name in fakes:
        registry.load(name)
    return fakes


def test_use_backend_does_not_leak_between_threads(recorders, monkeypatch):
    """Each thread picks its own backend (or none) at the same time; each sees only its own."""
    choices = [*_dispatch.BACKENDS, None]  # None: no context, so FASTLINEAR_BACKEND decides
    set_backend_variable(monkeypatch, "numpy")
    X, W = np.ones((2, 3)), np.ones((3, 4))
    expected = {f"worker-{i}": choices[i % len(choices)] or "numpy" for i in range(THREADS)}
    seen = {thread: [] for thread in expected}

    def work(index, barrier):
        thread = threading.current_thread().name = f"worker-{index}"
        mine = choices[index % len(choices)]
        for _ in range(ITERATIONS):
            barrier.wait()
            with fastlinear.use_backend(mine) if mine else contextlib.nullcontext():
                barrier.wait()  # every thread is inside its own context (or none) now
                seen[thread].append(_dispatch.requested_backend())
                fastlinear.linear_forward(X, W)
                fastlinear.linear_backward(np.ones((2, 4)), X, W)
            assert _dispatch.requested_backend() == "numpy"  # context left: the variable again

    run_threads(work)
    for thread, name in expected.items():
        assert seen[thread] == [name] * ITERATIONS
        for backend, fake in recorders.items():
            calls = [call for who, call in fake.calls if who == thread]
            wanted = ["forward", "backward"] * ITERATIONS if backend == name else []
            assert calls == wanted, f"{thread} chose {name}, {backend} got {calls}"


def test_thread_pool_workers_do_not_inherit_or_keep_a_context(recorders):
    """Executor threads run tasks in their own context: the submitter's ``use_backend`` does
    not apply there (pass ``backend=`` or wrap with ``contextvars.copy_context().run``), and a
    task's ``use_backend`` does not outlive the task on its reused worker thread."""

    def choose_then_report(name):
        with fastlinear.use_backend(name):
            inside = _dispatch.requested_backend()
        return inside, _dispatch.requested_backend()

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        with fastlinear.use_backend("numpy"):
            assert pool.submit(_dispatch.requested_backend).result(TIMEOUT) == "auto"
            copied = contextvars.copy_context()
            assert pool.submit(copied.run, _dispatch.requested_backend).result(TIMEOUT) == "numpy"
        names = list(_dispatch.BACKENDS) * 4
        results = list(pool.map(choose_then_report, names, timeout=TIMEOUT))
        assert results == [(name, "auto") for name in names]
        after = [pool.submit(_dispatch.requested_backend) for _ in range(8)]
        assert [f.result(TIMEOUT) for f in after] == ["auto"] * 8


def test_failed_use_backend_in_a_thread_leaves_no_context(recorders):
    """A task that raises inside ``use_backend`` resets its thread's context."""

    def fail_inside(name):
        with fastlinear.use_backend(name):
            raise KeyError(name)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        for name in _dispatch.BACKENDS:
            with pytest.raises(KeyError):
                pool.submit(fail_inside, name).result(TIMEOUT)
            assert pool.submit(_dispatch.requested_backend).result(TIMEOUT) == "auto"
