"""asv benchmarks of fastlinear: forward, backward and a layer step per backend x shape x dtype.

Every class is parametrised over ``BACKEND_NAMES`` x ``SHAPES`` x ``DTYPES``. A backend that cannot
run on this machine skips in ``setup`` (``NotImplementedError`` with the reason), so the suite runs
everywhere. GPU work is synchronised before a timed call returns.

The default grid is small enough for ``asv run --python=same`` to finish in a few minutes on a
2-core machine. ``FASTLINEAR_ASV_GRID=full`` selects the larger grid of ``python -m fastlinear
bench``. GFLOP/s counts 2·N·D·M flops forward and 4·N·D·M backward (dX and dW; db is free).
"""

import importlib
import os
import time

import numpy as np

import fastlinear

GRID_ENV_VAR = "FASTLINEAR_ASV_GRID"
GRIDS = {
    # (N, D, M) = (batch, in_features, out_features): tiny (call overhead), medium, skinny (N=1).
    "default": ("32x64x64", "256x1024x1024", "1x4096x4096"),
    "full": ("32x64x64", "64x256x256", "256x1024x1024", "1024x1024x1024", "2048x4096x1024",
             "8192x512x512", "1x4096x4096"),
}
SHAPES = GRIDS[os.environ.get(GRID_ENV_VAR, "default").strip().lower() or "default"]
DTYPES = ("float32", "float64")
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


def array_module(layer):
    """The array library the layer's parameters live in (numpy, or cupy for the GPU backend)."""
    return importlib.import_module(type(layer.W).__module__.partition(".")[0])


def synchronizer(xp):
    """A function that waits for the device to finish queued work (a no-op for NumPy)."""
    if xp.__name__ == "cupy":
        return xp.cuda.get_current_stream().synchronize
    return lambda: None


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
        xp = array_module(self.layer)
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
        """GFLOP/s of ``step``: median of 5 samples of enough calls to last >= 20 ms each."""
        calls = 1
        while True:
            start = time.perf_counter()
            for _ in range(calls):
                step()
            self.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= 0.02 or calls >= 1 << 20:
                break
            calls *= 4
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                step()
            self.synchronize()
            samples.append((time.perf_counter() - start) / calls)
        return float(f"{flops / np.median(samples) / 1e9:.4g}")  # 4 digits; more is noise


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
        if array_module(self.layer).__name__ != "numpy":
            raise NotImplementedError("peak host memory says nothing about device allocations")

    def peakmem_forward(self, backend, shape, dtype):
        self.layer.forward(self.X)

    def peakmem_backward(self, backend, shape, dtype):
        self.layer.backward(self.dY)
