"""The cupy backend's own host work per call, measured with CuPy stubbed out (no GPU needed).

Run from the repository root (any machine; CuPy need not be installed)::

    python benchmarks/gpu_host_overhead.py                  # the default small layer
    python benchmarks/gpu_host_overhead.py --root /tmp/old  # another checkout's fastlinear
    python benchmarks/gpu_host_overhead.py --check          # also hold every kernel launch to
                                                            # KERNEL_SIGNATURES (slower)

CuPy is replaced by a stub whose every call does next to nothing: arrays are shape/stride
records, kernels and cuBLAS calls return at once. What is left is the Python work of
``fastlinear.backends.cupy.forward`` and ``backward`` themselves (device checks, path choice,
launch shapes, argument lists, cuBLAS argument mapping, mode handling), plus the stub's floor
(printed), per call at a small layer. CuPy's own work (allocation, argument packing, the
driver's launch) comes on top on a GPU machine. Medians over ``--rounds`` rounds of ``--calls``
calls each; the cases are interleaved round by round. The last line reads
``forward_us=F backward_us=B`` (forward: bias, no activation, the shape rule's path;
backward: dX, dW and db, no activation).
"""

import argparse
import functools
import importlib
import math
import statistics
import sys
import time
import types

import numpy as np

# The small layer: the demo's (N, D, M), float32, with a bias.
LAYER = (32, 64, 128)


class StubArray:
    """A cupy.ndarray as the backend sees it: shape, strides, dtype, a device pointer."""

    __module__ = "cupy._core.core"
    __slots__ = ("shape", "strides", "dtype", "itemsize", "size", "ndim", "data", "device",
                 "_transpose")

    def __init__(self, shape, dtype, strides=None, ptr=4096, device=None):
        dtype = _DTYPES.get(dtype) or np.dtype(dtype)
        if strides is None:
            strides, size = _contiguous(shape, dtype.itemsize)
        else:
            size = math.prod(shape)
        self.shape, self.strides, self.dtype = shape, strides, dtype
        self.itemsize, self.ndim, self.size = dtype.itemsize, len(shape), size
        self.device = device or _DEVICE_0
        self.data = _Pointer(ptr, self.device.id)
        self._transpose = None

    @property
    def T(self):
        """The transposed view (made once per array: the stub should cost next to nothing)."""
        if self._transpose is None:
            self._transpose = StubArray(self.shape[::-1], self.dtype, self.strides[::-1],
                                        self.data.ptr, self.device)
        return self._transpose

    def __getitem__(self, key):
        """Basic slices with unit steps (the backend's GEMM chunks)."""
        key = key if isinstance(key, tuple) else (key,)
        shape, ptr = list(self.shape), self.data.ptr
        for axis, part in enumerate(key):
            start, stop, step = part.indices(self.shape[axis])
            assert step == 1, "the stub takes unit steps only"
            shape[axis] = max(stop - start, 0)
            ptr += start * self.strides[axis]
        return StubArray(tuple(shape), self.dtype, self.strides, ptr, self.device)

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        return StubArray(tuple(shape), self.dtype, None, self.data.ptr, self.device)

    def fill(self, value):
        pass

    def __setitem__(self, key, value):
        pass


_DEVICE_0 = types.SimpleNamespace(id=0)
_DTYPES = {np.float32: np.dtype(np.float32), np.float16: np.dtype(np.float16),
           np.float64: np.dtype(np.float64)}


class _Pointer:
    """A cupy.cuda.MemoryPointer: the address and the device it is on."""

    __slots__ = ("ptr", "device_id")

    def __init__(self, ptr, device_id=0):
        self.ptr, self.device_id = ptr, device_id


@functools.cache
def _contiguous(shape, itemsize):
    """``(strides, size)`` of a C-ordered array (cached: the stub should cost next to nothing)."""
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.insert(0, step)
        step *= max(extent, 1)
    return tuple(strides), math.prod(shape)


class StubFunction:
    """A compiled kernel: ``function(grid, block, args)`` returns at once (or checks ``args``
    against ``KERNEL_SIGNATURES`` when ``check`` is set)."""

    check = False
    launches = 0

    def __init__(self, name):
        self.name = name

    def __call__(self, grid, block, args):
        if StubFunction.check:
            _check_launch(self.name, grid, block, args)
            StubFunction.launches += 1


def _check_launch(name, grid, block, args):
    from fastlinear.backends import cupy_launch

    signature = cupy_launch.KERNEL_SIGNATURES[name.rpartition("_")[0]]
    assert isinstance(args, tuple) and len(args) == len(signature), (name, len(args))
    assert type(grid) is tuple and type(block) is tuple  # CuPy's Function takes tuples
    assert len(grid) == 3 and len(block) == 3 and block[0] * block[1] * block[2] <= 1024
    for index, (kind, value) in enumerate(zip(signature, args, strict=True)):
        expected = {"ptr": (StubArray,), "i64": (int, np.int64), "i32": (np.int32,)}[kind]
        assert type(value) in expected, f"{name} argument {index}: {kind}, got {type(value)}"


class StubRawModule:
    def __init__(self, code, options=()):
        self.code, self.options = code, options

    def get_function(self, name):
        return StubFunction(name)


def _cublas_stub():
    """``cupy_backends.cuda.libs.cublas``: handle modes kept in a dict, gemmEx does nothing."""
    modes = {"pointer": 0, "math": 0}
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.CUBLAS_POINTER_MODE_HOST, cublas.CUBLAS_POINTER_MODE_DEVICE = 0, 1
    cublas.CUBLAS_DEFAULT_MATH = 0
    cublas.CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION = 16
    cublas.getPointerMode = lambda handle: modes["pointer"]
    cublas.setPointerMode = lambda handle, mode: modes.__setitem__("pointer", mode)
    cublas.getMathMode = lambda handle: modes["math"]
    cublas.setMathMode = lambda handle, mode: modes.__setitem__("math", mode)
    cublas.gemms = 0

    def gemmEx(*args):
        if StubFunction.check:
            assert len(args) == 19, len(args)  # cublasGemmEx takes 19 arguments
            cublas.gemms += 1

    cublas.gemmEx = gemmEx
    cublas.getVersion = lambda handle: 0
    cublas.modes = modes
    return cublas


class _StubDevice:
    def __init__(self, device_id=0):
        self.id = device_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def install_cupy_stub():
    """Put the stub CuPy (and ``cupy_backends.cuda.libs.cublas``) into ``sys.modules``."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = StubArray
    made = {}

    def empty(shape, dtype=np.float64, order="C"):
        """A new array; the same record for the same shape and dtype (nothing reads its data)."""
        array = made.get((shape, dtype))
        if array is None:
            array = made[(shape, dtype)] = StubArray(
                shape if isinstance(shape, tuple) else (shape,), dtype)
        return array

    cupy.empty = cupy.zeros = empty
    cupy.asarray = lambda a, dtype=None: a if isinstance(a, StubArray) else StubArray(
        tuple(np.shape(a)), dtype or np.asarray(a).dtype)
    cupy.ascontiguousarray = lambda a: StubArray(a.shape, a.dtype)
    cupy.asnumpy = lambda a, out=None: np.empty(a.shape, a.dtype) if out is None else out
    cupy.RawModule = StubRawModule
    stream = types.SimpleNamespace(ptr=0)
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1,
                                      getDeviceProperties=lambda device_id: {
                                          "multiProcessorCount": 132}),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
        Device=_StubDevice, get_current_stream=lambda: stream)
    cublas = _cublas_stub()
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    modules = {"cupy": cupy, "cupy_backends": types.ModuleType("cupy_backends"),
               "cupy_backends.cuda": types.ModuleType("cupy_backends.cuda"),
               "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas}
    sys.modules.update(modules)
    return cupy, cublas


def cases(backend, N, D, M, dtype=np.float32):
    """``{name: call}``: the backend's forward and backward at an (N, D, M) layer."""
    X, W, b = StubArray((N, D), dtype), StubArray((D, M), dtype), StubArray((M,), dtype)
    dY, Z = StubArray((N, M), dtype), StubArray((N, M), dtype)

    def forward():
        return backend.forward(X, W, b, None)

    def forward_cublas_gelu():
        with backend.forced_forward_path("cublas"):
            return backend.forward(X, W, b, None, activation="gelu", preactivation=Z)

    def backward():
        return backend.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False,
                                dX=None, dW=None, db=None)

    def backward_gelu():
        return backend.backward(dY, X, W, has_bias=True, need_dX=True, accumulate=False,
                                dX=None, dW=None, db=None, activation="gelu", saved=Z)

    return {"forward": forward, "forward_cublas_gelu": forward_cublas_gelu,
            "backward": backward, "backward_gelu": backward_gelu}


def stub_floor(N, D, M, dtype=np.float32):
    """The stub's own share of a forward: one output allocation, one kernel call."""
    import cupy

    def kernel(grid, block, args):
        pass

    args = (StubArray((N, D), dtype), 0, 0) * 5 + (np.int32(0),)

    def floor():
        cupy.empty((N, M), dtype)
        kernel((1, 1, 1), (16, 16, 1), args)

    return floor


def per_call_us(call, calls, clock=time.thread_time_ns):
    """Microseconds per call. The default clock is this thread's CPU time, which a busy shared
    machine does not inflate by descheduling it (``--wall`` uses the wall clock)."""
    start = clock()
    for _ in range(calls):
        call()
    return (clock() - start) / calls / 1e3


def measure(named_calls, rounds, calls, pause, clock=time.thread_time_ns):
    """``{name: [us per call, one per round]}``, the cases interleaved in every round."""
    for call in named_calls.values():  # warm-up: caches, compiled paths
        for _ in range(min(calls, 200)):
            call()
    times = {name: [] for name in named_calls}
    for _ in range(rounds):
        for name, call in named_calls.items():
            times[name].append(per_call_us(call, calls, clock))
            time.sleep(pause)
    return times


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="rounds (median over them)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and case")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between blocks")
    parser.add_argument("--root", default=None,
                        help="import fastlinear from this checkout (default: this one)")
    parser.add_argument("--layer", default="x".join(map(str, LAYER)),
                        help="N x D x M of the layer (default %(default)s)")
    parser.add_argument("--wall", action="store_true",
                        help="time with the wall clock instead of the thread's CPU time")
    parser.add_argument("--check", action="store_true",
                        help="hold every launch to KERNEL_SIGNATURES and count them")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.root:
        sys.path.insert(0, args.root)
    install_cupy_stub()
    backend = importlib.import_module("fastlinear.backends.cupy")
    N, D, M = (int(part) for part in args.layer.lower().split("x"))
    StubFunction.check = args.check
    named = cases(backend, N, D, M)
    named["stub_floor"] = stub_floor(N, D, M)
    clock = time.perf_counter_ns if args.wall else time.thread_time_ns
    times = measure(named, args.rounds, args.calls, args.pause, clock)
    print(f"# cupy backend host work per call, CuPy stubbed; layer N={N} D={D} M={M} float32; "
          f"{'wall' if args.wall else 'thread CPU'} time, median (min) of {args.rounds} rounds "
          f"x {args.calls} calls; python "
          f"{sys.version.split()[0]}, numpy {np.__version__}; fastlinear from "
          f"{backend.__file__}")
    for name, values in times.items():
        print(f"{name:22} {statistics.median(values):8.2f} us  ({min(values):.2f})")
    if args.check:
        print(f"# checked {StubFunction.launches} launches and "
              f"{sys.modules['cupy_backends.cuda.libs.cublas'].gemms} gemmEx calls")
    print(f"forward_us={statistics.median(times['forward']):.2f} "
          f"backward_us={statistics.median(times['backward']):.2f}")


if __name__ == "__main__":
    main()
