"""asv benchmarks of fastlinear: forward, backward, a layer step and the demo's training step.

The layer classes are parametrised over ``BACKEND_NAMES`` x ``SHAPES`` x ``DTYPES``, the training
step over backend x batch x dtype. A backend that cannot run on this machine skips in ``setup``
(``NotImplementedError`` with the reason), so the suite runs everywhere. GPU work is synchronised
before a timed call returns.

Shapes, batches and the GFLOP/s timing come from ``python -m fastlinear bench`` itself
(``fastlinear.bench.grid``, ``fastlinear.bench.timing``), so both tools measure the same things
the same way. The default grid is the bench's ``--quick`` grid, small enough for ``asv run
--python=same`` to finish in a few minutes on a 2-core machine; ``FASTLINEAR_ASV_GRID=full``
selects the bench's default grid. GFLOP/s counts 2·N·D·M flops forward and 4·N·D·M backward (dX
and dW; db is free).
"""

import os

import numpy as np

import fastlinear
from fastlinear.bench import timing
from fastlinear.bench.grid import DEFAULT_SHAPES, DTYPES, QUICK_SHAPES, TRAINING_BATCHES, shape_text
from fastlinear.bench.training import step_flops
from fastlinear.demo import LAYER_SIZES, MLP

GRID_ENV_VAR = "FASTLINEAR_ASV_GRID"
GRIDS = {"default": QUICK_SHAPES, "full": DEFAULT_SHAPES}  # the grids of bench --quick and bench
SHAPES = tuple(map(shape_text, GRIDS[os.environ.get(GRID_ENV_VAR, "default").strip().lower()
                                     or "default"]))
BACKEND_NAMES = tuple(fastlinear.BACKENDS)
PARAMS = (list(BACKEND_NAMES), list(SHAPES), list(DTYPES))
PARAM_NAMES = ("backend", "shape", "dtype")


def parse_shape(shape):
    """``"256x1024x1024"`` -> ``(256, 1024, 1024)`` = (N, D, M)."""
    N, D, M = (int(size) for size in shape.split("x"))
    return N, D, M


def skip_if_unavailable(backend):
    """Raise NotImplementedError (asv's skip) with the reason when ``backend`` cannot run here."""
    reason = fastlinear.available_backends()[backend]
    if reason is not None:
        raise NotImplementedError(reason)


def synchronizer(xp):
    """A function that waits for the device to finish queued work (a no-op for NumPy)."""
    return timing.device_timing(xp).get("synchronize") or (lambda: None)


class LayerCase:
    """Shared setup: a ``Linear(D, M)`` on the backend, a random input and upstream gradient."""

    params = PARAMS
    param_names = PARAM_NAMES
    # Few, short samples: the grid, not the sample count, is what costs time here (one process
    # per benchmark and round; min 3, max 10 samples, stop sampling after 2 s).
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.1

    def setup(self, backend, shape, dtype):
        skip_if_unavailable(backend)
        N, D, M = parse_shape(shape)
        self.N, self.D, self.M = N, D, M
        self.layer = fastlinear.Linear(D, M, dtype=dtype, backend=backend, rng=0)
        xp = timing.array_module(self.layer.W)
        self.timing = timing.device_timing(xp)
        rng = np.random.default_rng(1)
        self.X = xp.asarray(rng.standard_normal((N, D)), dtype=dtype)
        self.dY = xp.asarray(rng.standard_normal((N, M)), dtype=dtype)
        self.layer.b[...] = xp.asarray(rng.standard_normal(M), dtype=dtype)
        self.synchronize = synchronizer(xp)
        # Warm up: JIT compilation (numba), kernel loading and BLAS thread start-up (all).
        self.layer.forward(self.X)
        self.layer.backward(self.dY)
        self.synchronize()

    def _gflops(self, step, flops):
        """GFLOP/s of ``step``: median of 5 blocks of >= 20 ms (the bench's timing core)."""
        seconds = timing.median_seconds(step, block_time=0.02, rounds=5, **self.timing)
        return float(f"{flops / seconds / 1e9:.4g}")  # 4 digits; more is noise


class Forward(LayerCase):
    """``Linear.forward(X)``: ``Y = X @ W + b``, every overhead included."""

    def time_forward(self, backend, shape, dtype):
        self.layer.forward(self.X)
        self.synchronize()

    def track_forward_gflops(self, backend, shape, dtype):
        return self._gflops(lambda: self.layer.forward(self.X), 2 * self.N * self.D * self.M)

    track_forward_gflops.unit = "GFLOP/s"


class Backward(LayerCase):
    """``Linear.backward(dY)``: dX, dW and db after one forward."""

    def time_backward(self, backend, shape, dtype):
        self.layer.backward(self.dY)
        self.synchronize()

    def track_backward_gflops(self, backend, shape, dtype):
        return self._gflops(lambda: self.layer.backward(self.dY), 4 * self.N * self.D * self.M)

    track_backward_gflops.unit = "GFLOP/s"


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
        super().setup(backend, shape, dtype)
        if timing.array_module(self.layer.W) is not np:
            raise NotImplementedError("peak host memory says nothing about device allocations")

    def peakmem_forward(self, backend, shape, dtype):
        self.layer.forward(self.X)

    def peakmem_backward(self, backend, shape, dtype):
        self.layer.backward(self.dY)


class TrainingStep:
    """A training step of the demo's network (``fastlinear.demo.MLP``): forward and backward
    through every layer, no optimizer, per backend x batch x dtype."""

    params = (list(BACKEND_NAMES), list(TRAINING_BATCHES), list(DTYPES))
    param_names = ("backend", "batch", "dtype")
    rounds = 1
    repeat = (3, 10, 2.0)
    warmup_time = 0.1

    def setup(self, backend, batch, dtype):
        skip_if_unavailable(backend)
        self.model = MLP(LAYER_SIZES, dtype, backend, rng=0)
        xp = timing.array_module(self.model.layers[0].W)
        rng = np.random.default_rng(1)
        self.X = xp.asarray(rng.standard_normal((batch, LAYER_SIZES[0])), dtype=dtype)
        self.dlogits = xp.asarray(rng.standard_normal((batch, LAYER_SIZES[-1])), dtype=dtype)
        self.timing = timing.device_timing(xp)
        self.synchronize = synchronizer(xp)
        self._step()  # warm up: JIT compilation, kernel loading, thread start-up
        self.synchronize()

    def _step(self):
        self.model.forward(self.X)
        self.model.backward(self.dlogits)

    def time_training_step(self, backend, batch, dtype):
        self._step()
        self.synchronize()

    def track_training_step_gflops(self, backend, batch, dtype):
        seconds = timing.median_seconds(self._step, block_time=0.02, rounds=5, **self.timing)
        return float(f"{step_flops(batch) / seconds / 1e9:.4g}")

    track_training_step_gflops.unit = "GFLOP/s"
