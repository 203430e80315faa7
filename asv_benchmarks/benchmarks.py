"""asv benchmarks of fastlinear, on its public API only, so that any commit can be timed.

What is timed: ``Linear.forward``, ``Linear.backward`` and a forward+backward step of one layer
per backend x (N, D, M) x dtype; the peak host memory of forward and backward (CPU backends);
the training step of a small MLP (64-128-64-10, ReLU fused) built from ``Linear`` layers; and,
on commits that have it, ``fastlinear.Sequential.train_step`` on the same network.

The suite imports nothing but ``fastlinear``'s public names (``Linear``, ``linear_forward``,
``linear_backward``, ``use_backend``, ``available_backends``, ``Sequential``), so it runs against
commits older than any internal module and survives refactors of them; a case a commit cannot
run (a backend not available here, no ``Sequential`` yet) skips through ``NotImplementedError``
in ``setup``. GPU work is synchronised before a timed call returns.

Sampling (what makes the figures trustworthy): ``setup`` warms up every case (JIT compilation,
kernel loading, BLAS thread start-up, first touch of the outputs); asv then warms up for
``warmup_time``, picks ``number`` (calls per sample) so that a sample lasts ``sample_time``, and
takes ``repeat`` samples in each of ``rounds`` fresh processes, at least ``min_run_count`` in all;
it reports the median and the interquartile range. ``asv run --quick`` skips all of that (one
call, one sample): it checks that the suite runs and its figures mean nothing.

The default grid is small (a tiny, a medium and a one-row layer); ``FASTLINEAR_ASV_GRID=full``
adds the larger shapes of ``python -m fastlinear bench``.
"""

import os

import numpy as np

import fastlinear

GRID_ENV_VAR = "FASTLINEAR_ASV_GRID"
# (N, D, M): tiny (call overhead), medium, one row (a skinny training step); then larger ones.
QUICK_SHAPES = ("32x64x64", "256x1024x1024", "1x4096x4096")
FULL_SHAPES = ("32x64x64", "64x256x256", "256x1024x1024", "1024x1024x1024", "2048x4096x1024",
               "8192x512x512", "1x4096x4096")
GRIDS = {"default": QUICK_SHAPES, "quick": QUICK_SHAPES, "full": FULL_SHAPES}
SHAPES = GRIDS.get(os.environ.get(GRID_ENV_VAR, "").strip().lower() or "default", QUICK_SHAPES)
DTYPES = ("float32", "float64")
BACKEND_NAMES = ("numpy", "numba", "cupy")
TRAINING_BATCHES = (32, 256)
MLP_SIZES = (64, 128, 64, 10)  # the demo's network: 8x8 digits in, 10 classes out


def parse_shape(shape):
    """``"256x1024x1024"`` -> ``(256, 1024, 1024)`` = (N, D, M)."""
    N, D, M = (int(size) for size in shape.split("x"))
    return N, D, M


def skip_if_unavailable(backend):
    """Raise NotImplementedError (asv's skip) with the reason when ``backend`` cannot run here."""
    reason = fastlinear.available_backends().get(backend, f"no backend {backend!r} at this commit")
    if reason is not None:
        raise NotImplementedError(reason)


def array_module(backend):
    """The array library the backend's layers keep their parameters in."""
    if backend == "cupy":
        import cupy

        return cupy
    return np


def synchronizer(xp):
    """A function that waits for the device to finish queued work (a no-op for NumPy)."""
    if xp is np:
        return lambda: None
    return xp.cuda.get_current_stream().synchronize


class Sampling:
    """asv's sampling, shared by every timed class.

    Each sample times ``number`` calls (0: as many as fill ``sample_time``); ``repeat`` is
    (min samples, max samples, max seconds) per process, over ``rounds`` processes (interleaved
    with the other benchmarks, so a burst of load hits one round, not every sample), and at least
    ``min_run_count`` calls of the benchmark in all, warm-up included.
    """

    number = 0
    sample_time = 0.02
    repeat = (5, 15, 4.0)
    rounds = 2
    min_run_count = 10
    warmup_time = 0.3
    timeout = 120


class LayerCase(Sampling):
    """Shared setup: a ``Linear(D, M)`` on the backend, a random input and upstream gradient."""

    params = (list(BACKEND_NAMES), list(SHAPES), list(DTYPES))
    param_names = ("backend", "shape", "dtype")

    def setup(self, backend, shape, dtype):
        skip_if_unavailable(backend)
        N, D, M = parse_shape(shape)
        xp = array_module(backend)
        rng = np.random.default_rng(1)
        self.layer = fastlinear.Linear(D, M, dtype=dtype, backend=backend)
        self.layer.W[...] = xp.asarray(rng.standard_normal((D, M)) * 0.05, dtype=dtype)
        self.layer.b[...] = xp.asarray(rng.standard_normal(M), dtype=dtype)
        self.X = xp.asarray(rng.standard_normal((N, D)), dtype=dtype)
        self.dY = xp.asarray(rng.standard_normal((N, M)), dtype=dtype)
        self.synchronize = synchronizer(xp)
        # Warm up: JIT compilation (numba), kernel loading, BLAS thread start-up, first touch.
        for _ in range(3):
            self.layer.forward(self.X)
            self.layer.backward(self.dY)
        self.synchronize()


class Forward(LayerCase):
    """``Linear.forward(X)``: ``Y = X @ W + b``, every overhead included."""

    def time_forward(self, backend, shape, dtype):
        self.layer.forward(self.X)
        self.synchronize()


class Backward(LayerCase):
    """``Linear.backward(dY)``: dX, dW and db after one forward."""

    def time_backward(self, backend, shape, dtype):
        self.layer.backward(self.dY)
        self.synchronize()


class LayerStep(LayerCase):
    """One training step through the layer: forward then backward."""

    def time_layer_step(self, backend, shape, dtype):
        self.layer.forward(self.X)
        self.layer.backward(self.dY)
        self.synchronize()


class HostMemory(LayerCase):
    """Peak resident memory of a forward or a backward call (CPU backends; host RSS is not
    where a GPU backend allocates, so it skips)."""

    def setup(self, backend, shape, dtype):
        if backend == "cupy":
            raise NotImplementedError("peak host memory says nothing about device allocations")
        super().setup(backend, shape, dtype)

    def peakmem_forward(self, backend, shape, dtype):
        self.layer.forward(self.X)

    def peakmem_backward(self, backend, shape, dtype):
        self.layer.backward(self.dY)


class _NetworkCase(Sampling):
    """The demo's MLP 64-128-64-10 at a batch, with random data and labels."""

    params = (list(BACKEND_NAMES), list(TRAINING_BATCHES), list(DTYPES))
    param_names = ("backend", "batch", "dtype")

    def _data(self, backend, batch, dtype):
        skip_if_unavailable(backend)
        xp = array_module(backend)
        rng = np.random.default_rng(1)
        self.X = xp.asarray(rng.standard_normal((batch, MLP_SIZES[0])), dtype=dtype)
        self.y = xp.asarray(rng.integers(0, MLP_SIZES[-1], batch))
        self.dlogits = xp.asarray(rng.standard_normal((batch, MLP_SIZES[-1])), dtype=dtype)
        self.synchronize = synchronizer(xp)


class TrainingStep(_NetworkCase):
    """Forward and backward through every ``Linear`` of the MLP (ReLU fused), no optimizer."""

    def setup(self, backend, batch, dtype):
        self._data(backend, batch, dtype)
        last = len(MLP_SIZES) - 2
        sizes = zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True)
        self.layers = [fastlinear.Linear(d, m, dtype=dtype, backend=backend,
                                         activation=None if i == last else "relu")
                       for i, (d, m) in enumerate(sizes)]
        for _ in range(3):
            self._step()
        self.synchronize()

    def _step(self):
        H = self.X
        for layer in self.layers:
            H = layer.forward(H)
        grad = self.dlogits
        for layer in reversed(self.layers):
            grad = layer.backward(grad, need_dX=layer is not self.layers[0])

    def time_training_step(self, backend, batch, dtype):
        self._step()
        self.synchronize()


class SequentialStep(_NetworkCase):
    """``fastlinear.Sequential(...).train_step``: forward, softmax cross-entropy, backward and
    an SGD-with-momentum update, on commits that have ``Sequential``."""

    def setup(self, backend, batch, dtype):
        if not hasattr(fastlinear, "Sequential"):
            raise NotImplementedError("fastlinear.Sequential does not exist at this commit")
        self._data(backend, batch, dtype)
        last = len(MLP_SIZES) - 2
        layers = [fastlinear.Linear(d, m, dtype=dtype,
                                    activation=None if i == last else "relu")
                  for i, (d, m) in enumerate(zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True))]
        self.model = fastlinear.Sequential(*layers, backend=backend)
        for _ in range(3):
            self._step()
        self.synchronize()

    def _step(self):
        self.model.train_step(self.X, self.y, loss="softmax_cross_entropy", lr=0.01,
                              momentum=0.9)

    def time_train_step(self, backend, batch, dtype):
        self._step()
        self.synchronize()
