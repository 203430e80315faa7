"""kernels/*.cu compile with nvcc and NVRTC, warning-free, and export what the backend launches.

No GPU is needed: nvcc compiles for sm_80 (A100) and sm_90 (H100) on any machine. Warnings are
errors here: nvcc's own (``-Werror all-warnings``), the host compiler's, and ptxas's, including
register spills (``-warn-spills``), which would silently cost the kernels their speed. None is
accepted at present; accept one by adding its suppression flag to ``NVCC_FLAGS`` with a reason.
Every compile gets the block shapes and activation constants as ``-D`` defines from
``cupy_launch.compile_options()``, as the backend hands them to NVRTC.
"""

import ctypes
import ctypes.util
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from fastlinear import _kernels
from fastlinear.backends import cupy_launch

NVCC = shutil.which("nvcc")
ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ("-std=c++17", "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror",
              "-Xptxas", "-Werror,-warn-spills")
PTX_PARAM_TYPES = {"ptr": "u64", "i64": "u64", "i32": "u32"}

needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc is not on PATH: install the CUDA toolkit to compile-check kernels/")

SOURCES = _kernels.kernel_sources()


def _nvcc(*args, defines=True):
    options = cupy_launch.compile_options() if defines else ()
    return subprocess.run([NVCC, *NVCC_FLAGS, *options, *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_source_compiles_without_warnings(source, arch, tmp_path):
    result = _nvcc(f"-arch={arch}", "--cubin", "-o", tmp_path / "kernels.cubin", source)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"nvcc failed for {source.name} ({arch}):\n{output}"
    assert not output, f"nvcc printed diagnostics for {source.name} ({arch}):\n{output}"


@pytest.fixture(scope="module")
def module_ptx(tmp_path_factory):
    """PTX of exactly the source the backend hands to NVRTC (``#line`` prefixes included)."""
    directory = tmp_path_factory.mktemp("ptx")
    source = directory / "module.cu"
    source.write_text(cupy_launch.kernel_source())
    result = _nvcc("-arch=sm_90", "--ptx", "-o", directory / "module.ptx", source)
    assert result.returncode == 0, result.stderr
    return (directory / "module.ptx").read_text()


def _ptx_entries(ptx):
    """``{kernel name: (param type, ...)}`` of the PTX's visible entry points."""
    entries = {}
    for match in re.finditer(r"\.visible\s+\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.DOTALL):
        entries[match.group(1)] = tuple(re.findall(r"\.param\s+\.(\w+)", match.group(2)))
    return entries


@needs_nvcc
def test_module_exports_every_launched_kernel_with_its_argument_types(module_ptx):
    entries = _ptx_entries(module_ptx)
    expected = {}
    for kernel, signature in cupy_launch.KERNEL_SIGNATURES.items():
        for suffix in cupy_launch.DTYPE_SUFFIXES.values():
            expected[f"{kernel}_{suffix}"] = tuple(PTX_PARAM_TYPES[kind] for kind in signature)
    assert entries == expected


def test_block_shapes_are_defined_only_in_python():
    """The shapes and activation codes live in cupy_launch; the .cu files only use them."""
    for source in SOURCES:
        text = source.read_text()
        for name in cupy_launch.kernel_defines():
            assert not re.search(rf"^\s*#\s*define\s+{name}\b", text, re.M), (source, name)


@needs_nvcc
def test_source_without_the_defines_stops_with_a_clear_error(tmp_path):
    result = _nvcc("-arch=sm_90", "--ptx", "-o", tmp_path / "k.ptx", SOURCES[0], defines=False)
    assert result.returncode != 0
    assert "compile with the -D defines of fastlinear.backends.cupy_launch" in result.stderr


@needs_nvcc
def test_line_prefix_points_compiler_errors_at_the_real_file(tmp_path):
    broken = tmp_path / "broken_kernel.cu"
    broken.write_text('// line 1\n// line 2\nextern "C" __global__ void k() { undeclared = 1; }\n')
    combined = tmp_path / "combined.cu"
    combined.write_text("// unrelated first line\n" + cupy_launch.kernel_source([broken]))
    result = _nvcc("-arch=sm_90", "--ptx", "-o", tmp_path / "combined.ptx", combined)
    assert result.returncode != 0
    assert re.search(r"broken_kernel\.cu\(3\)", result.stderr), result.stderr


def _find_nvrtc():
    """NVRTC, the compiler CuPy's RawModule uses: $FASTLINEAR_NVRTC, the loader's search path,
    pip's nvidia-cuda-nvrtc wheels, or the toolkit next to nvcc. None if there is none."""
    candidates = [os.environ.get("FASTLINEAR_NVRTC"), ctypes.util.find_library("nvrtc")]
    for entry in sys.path:
        candidates += sorted(pathlib.Path(entry).glob("nvidia/*/lib/libnvrtc.so*"))
    if NVCC:
        candidates += sorted((pathlib.Path(NVCC).resolve().parents[1] / "lib64").glob(
            "libnvrtc.so*"))
    for candidate in candidates:
        if candidate:
            try:
                return _load_nvrtc(candidate)
            except OSError:
                continue
    return None


def _load_nvrtc(path, load=ctypes.CDLL):
    """libnvrtc at ``path``, after the ``libnvrtc-builtins`` beside it, loaded globally.

    NVRTC dlopens its builtins by soname at the first compile; a pip-installed libnvrtc 13.0
    has no RPATH to find them beside it, so without ``LD_LIBRARY_PATH`` that compile failed
    ("failed to open libnvrtc-builtins.so.13.0"). A library already loaded under that soname is
    what the dynamic loader returns, so loading it first from the same folder is enough.
    """
    path = pathlib.Path(path)
    if path.parent != pathlib.Path("."):  # a bare name from find_library: the loader's path
        for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
            try:
                load(str(builtins), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
    return load(str(path))


NVRTC = _find_nvrtc()


def test_nvrtc_loads_its_builtins_from_its_own_folder_first(tmp_path):
    """The pip wheel's layout: libnvrtc.so.13 beside libnvrtc-builtins.so.13.0 (issue 19)."""
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0", "libnvrtc-builtins.alt.so.13.0"):
        (tmp_path / name).touch()
    loaded = []

    def load(name, mode=None):
        loaded.append((pathlib.Path(name).name, mode))
        return name

    assert _load_nvrtc(tmp_path / "libnvrtc.so.13", load) == str(tmp_path / "libnvrtc.so.13")
    assert loaded == [("libnvrtc-builtins.so.13.0", ctypes.RTLD_GLOBAL),
                      ("libnvrtc.so.13", None)]
    loaded.clear()
    _load_nvrtc("libnvrtc.so.13", load)  # a bare soname (find_library): nothing beside it
    assert loaded == [("libnvrtc.so.13", None)]


def _nvrtc_compile(source, name, options):
    """Compile ``source`` with NVRTC; return (status, log, ptx)."""
    program = ctypes.c_void_p()
    status = NVRTC.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0,
                                      None, None)
    assert status == 0, f"nvrtcCreateProgram failed ({status})"
    try:
        encoded = [option.encode() for option in options]
        status = NVRTC.nvrtcCompileProgram(program, len(encoded),
                                           (ctypes.c_char_p * len(encoded))(*encoded))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(program, log)
        ptx = ""
        if status == 0:
            NVRTC.nvrtcGetPTXSize(program, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            NVRTC.nvrtcGetPTX(program, buffer)
            ptx = buffer.value.decode()
        return status, log.value.decode().strip(), ptx
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(program))


needs_nvrtc = pytest.mark.skipif(
    NVRTC is None, reason="no libnvrtc found (CuPy's runtime compiler); set "
    "FASTLINEAR_NVRTC=/path/to/libnvrtc.so or pip install nvidia-cuda-nvrtc")
# What CuPy's RawModule hands NVRTC: our options, then its own -ftz=true (CuPy's
# _compile_with_cache_cuda appends it to every compile).
CUPY_NVRTC_OPTIONS = (*cupy_launch.compile_options(), "-ftz=true")


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
def test_module_compiles_with_nvrtc_as_cupy_compiles_it(arch):
    """NVRTC includes no CUDA headers implicitly, unlike nvcc: the source must not need them."""
    status, log, ptx = _nvrtc_compile(cupy_launch.kernel_source(), "fastlinear_kernels.cu",
                                      [f"-arch={arch}", *CUPY_NVRTC_OPTIONS])
    assert status == 0, f"NVRTC failed ({arch}):\n{log}"
    assert not log, f"NVRTC printed diagnostics ({arch}):\n{log}"
    assert set(_ptx_entries(ptx)) == {f"{kernel}_{suffix}"
                                      for kernel in cupy_launch.KERNEL_SIGNATURES
                                      for suffix in cupy_launch.DTYPE_SUFFIXES.values()}


@needs_nvrtc
def test_products_and_sums_keep_float32_subnormals_under_cupys_ftz():
    """CuPy appends -ftz=true after our options (NVRTC's last -ftz wins), which flushes float32
    subnormals in plain arithmetic (NumPy keeps them). The layer's multiply-adds and sums use
    __fmaf_ieee_rn, which ignores the flag, so every float32 kernel has IEEE fma.rn.f32 (not
    .ftz), the forward kernels at least as many as one unrolled step of their product loop."""
    status, log, ptx = _nvrtc_compile(cupy_launch.kernel_source(), "fastlinear_kernels.cu",
                                      ["-arch=sm_90", *CUPY_NVRTC_OPTIONS])
    assert status == 0, log
    assert ".ftz.f32" in ptx  # the flag is on: the activation functions' arithmetic flushes
    bodies = dict(re.findall(r"\.visible\s+\.entry\s+(\w+)(.*?)\n}", ptx, re.DOTALL))
    micro = cupy_launch.TILE_ROWS // cupy_launch.TILE_THREADS
    # at least: one unrolled step of the product loop; the epilogue; one addition
    expected = {"linear_forward_tiled": cupy_launch.TILE_DEPTH * micro * micro,
                "linear_forward_small_batch": cupy_launch.SMALL_BATCH_ROWS
                * cupy_launch.SMALL_BATCH_SLICES,
                "gradient_column_sums": 1, "bias_activation_epilogue": 1}
    for kernel, minimum in expected.items():
        for suffix in ("f16", "f32"):
            count = len(re.findall(r"\bfma\.rn\.f32\b", bodies[f"{kernel}_{suffix}"]))
            assert count >= minimum, f"{kernel}_{suffix}: {count} IEEE fma.rn.f32"
