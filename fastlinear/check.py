"""``python -m fastlinear check``: every available backend against the NumPy reference.

A self-test to run after installing an extra (and the first thing to run on a GPU machine). For
each available backend and each of its dtypes it runs a small grid of forward and backward calls
(memory layouts, with and without bias, every activation, accumulate, need_dX), compares every
result with the float64 reference math of ``fastlinear.activations`` against an error bound, and
prints one line per backend and dtype: the number of cases and the worst error as a fraction of
its bound (at most 1 passes). Unavailable backends are listed with the reason. Exit status 1 on
any mismatch or error.
"""

import itertools
import sys

import numpy as np

from fastlinear import _arrays, _cli, _dispatch, activations
from fastlinear.functional import linear_backward, linear_forward

# Small enough for seconds; on the GPU the shape rule sends them to small_batch, tiled and cuBLAS.
SHAPES = ((1, 7, 5), (9, 33, 17), (70, 65, 40), (257, 130, 129))
LAYOUTS = ("C", "F", "strided")
ACTIVATIONS = (None, *activations.ACTIVATIONS)
# (accumulate, need_dX): the plain call, and a gradient-accumulating first layer.
BACKWARD_MODES = ((False, True), (True, False))
# Largest |act'(z)|: how far an error in the pre-activation moves the output.
_LIPSCHITZ = 1.2


def _layout(xp, a, layout):
    if layout == "C":
        return xp.ascontiguousarray(a)
    if layout == "F":
        return xp.asfortranarray(a)
    big = xp.zeros((a.shape[0], 2 * a.shape[1]), dtype=a.dtype)
    big[:, ::2] = a
    return big[:, ::2]


def _bound(magnitude, terms, compute_eps, storage_eps, tiny):
    """Rounding bound of a sum of ``terms`` products of total ``magnitude`` (Higham 3.5, with a
    factor 2 for the reference's own rounding), plus one rounding to the stored dtype."""
    return (terms + 1) * compute_eps * magnitude + storage_eps * magnitude + tiny


def _reference(X, W, b, dY, activation, saved, dtype):
    """Float64 expected values and error bounds of ``Y`` and the gradients."""
    compute_eps = np.finfo(np.float32 if dtype == np.float16 else dtype).eps
    storage_eps, tiny = np.finfo(dtype).eps, np.finfo(dtype).tiny
    X64, W64, dY64 = (np.asarray(a, dtype=np.float64) for a in (X, W, dY))
    b64 = np.zeros(W.shape[1]) if b is None else np.asarray(b, dtype=np.float64)
    N, D = X.shape
    Z = X64 @ W64 + b64
    z_bound = _bound(np.abs(X64) @ np.abs(W64) + np.abs(b64), D + 1, compute_eps, storage_eps,
                     tiny)
    with np.errstate(all="ignore"):
        Y = activations.apply(activation, Z)
    y_bound = (_LIPSCHITZ * z_bound + 8 * compute_eps * (np.abs(Z) + np.abs(Y))
               + storage_eps * np.abs(Y))
    if activation is None:
        G, g_bound = dY64, np.zeros_like(dY64)
    else:
        saved64 = np.asarray(saved, dtype=np.float64)
        G = activations.grad(activation, dY64, saved64)
        g_bound = (16 * compute_eps * np.abs(dY64) * (1 + np.abs(saved64))
                   + storage_eps * np.abs(G) + tiny)
    absG, absX, absW = np.abs(G), np.abs(X64), np.abs(W64)
    return {
        "Y": (Y, y_bound),
        "dX": (G @ W64.T, _bound(absG @ absW.T, W.shape[1], compute_eps, storage_eps, tiny)
               + g_bound @ absW.T),
        "dW": (X64.T @ G, _bound(absX.T @ absG, N, compute_eps, storage_eps, tiny)
               + absX.T @ g_bound),
        "db": (G.sum(0), _bound(absG.sum(0), N, compute_eps, storage_eps, tiny)
               + g_bound.sum(0)),
    }


def _worst_ratio(actual, expected, bound, previous=None):
    """Largest |actual - expected| / bound (inf for a NaN or an infinity out of place).

    ``previous``: the buffer's values before an accumulating call; their sum with the new
    gradient is rounded once more to the buffer's dtype.
    """
    if previous is not None:
        eps = np.finfo(previous.dtype).eps
        previous = np.asarray(previous, dtype=np.float64)
        expected = expected + previous
        bound = bound + 2 * eps * (np.abs(previous) + np.abs(expected))
    actual = np.asarray(actual, dtype=np.float64)
    if actual.shape != expected.shape:
        return np.inf
    err = np.abs(actual - expected)
    if not np.all(np.isfinite(err)):
        return np.inf
    return float(np.max(err / bound, initial=0.0))


def _check_case(name, xp, rng, dtype, shape, layout, has_bias, activation, mode):
    """Worst error/bound of one forward + backward case on backend ``name``."""
    N, D, M = shape
    accumulate, need_dX = mode
    X = rng.standard_normal((N, D)).astype(dtype)
    W = rng.standard_normal((D, M)).astype(dtype)
    b = rng.standard_normal(M).astype(dtype) if has_bias else None
    dY = rng.standard_normal((N, M)).astype(dtype)
    dW0 = rng.standard_normal((D, M)).astype(dtype)
    db0 = rng.standard_normal(M).astype(dtype) if has_bias else None
    dev = {key: None if a is None else _layout(xp, xp.asarray(a), layout if a.ndim == 2 else "C")
           for key, a in (("X", X), ("W", W), ("dY", dY))}
    b_dev = None if b is None else xp.asarray(b)
    Y, saved = linear_forward(dev["X"], dev["W"], b_dev, activation=activation, backend=name,
                              return_saved=True)
    saved_host = None if saved is None else _arrays.to_numpy(saved)
    dW = xp.asarray(dW0.copy()) if accumulate else None
    db = xp.asarray(db0.copy()) if accumulate and has_bias else None
    dX, dW, db = linear_backward(dev["dY"], dev["X"], dev["W"], activation=activation,
                                 saved=saved, has_bias=has_bias, need_dX=need_dX,
                                 accumulate=accumulate, dW=dW, db=db, backend=name)
    reference = _reference(X, W, b, dY, activation, saved_host, dtype)
    ratios = [_worst_ratio(_arrays.to_numpy(Y), *reference["Y"]),
              _worst_ratio(_arrays.to_numpy(dW), *reference["dW"], dW0 if accumulate else None)]
    if need_dX:
        ratios.append(_worst_ratio(_arrays.to_numpy(dX), *reference["dX"]))
    elif dX is not None:
        ratios.append(np.inf)
    if has_bias:
        ratios.append(_worst_ratio(_arrays.to_numpy(db), *reference["db"],
                                   db0 if accumulate else None))
    return max(ratios)


def _device(name):
    if name != "cupy":
        return "cpu"
    import cupy

    from fastlinear.info import device_name

    return device_name(cupy, cupy.cuda.runtime.getDevice())


def _array_module(name):
    """The backend module ``name`` and the array library it computes on."""
    return _dispatch._load(name), _dispatch.array_module(name)


def _progress(cases, label):
    """``cases``, with progress on stderr: tqdm's bar on a terminal, else one line per row."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        return tqdm(cases, desc=f"checking {label}", unit="case", leave=False, file=sys.stderr)
    print(f"checking {label}: {len(cases)} cases ...", file=sys.stderr, flush=True)
    return cases


def run(backends=None, out=None):
    """Run the grid on ``backends`` (default: every registered one), printing to ``out``
    (default ``sys.stdout``); return the exit status."""
    out = sys.stdout if out is None else out
    names = list(_dispatch.BACKENDS) if backends is None else list(backends)
    status = 0
    out.write(f"{'backend':8} {'device':24} {'dtype':8} {'cases':>6} {'worst/bound':>12}  "
              f"result\n")
    unavailable = []
    for name in names:
        reason = _dispatch.unavailable_reason(name)
        if reason is not None:
            unavailable.append((name, reason))
            continue
        module, xp = _array_module(name)
        device = _device(name)
        for dtype in module.DTYPES:
            rng = np.random.default_rng(20261125)
            worst, cases, failures = 0.0, 0, []
            grid = list(itertools.product(SHAPES, LAYOUTS, (True, False), ACTIVATIONS,
                                          BACKWARD_MODES))
            for case in _progress(grid, f"{name} {np.dtype(dtype).name}"):
                cases += 1
                try:
                    ratio = _check_case(name, xp, rng, dtype, *case)
                except Exception as exc:  # a crash is a failed case, reported with its cause
                    failures.append(f"{case}: {type(exc).__name__}: {exc}")
                    continue
                worst = max(worst, ratio)
                if not ratio <= 1.0:
                    failures.append(f"{case}: error {ratio:.3g} x its bound")
            result = "ok" if not failures else f"FAIL ({len(failures)} cases)"
            out.write(f"{name:8} {device[:24]:24} {np.dtype(dtype).name:8} {cases:6} "
                      f"{worst:12.3g}  {result}\n")
            for failure in failures[:5]:
                out.write(f"    {failure}\n")
            status |= bool(failures)
    for name, reason in unavailable:
        out.write(f"{name:8} unavailable: {reason}\n")
    out.write("all available backends agree with the NumPy reference\n" if status == 0
              else "MISMATCH: some backend disagrees with the NumPy reference (see above)\n")
    return int(status)


def main(argv=None):
    parser = _cli.Parser(prog="python -m fastlinear check", description=_cli.plain(__doc__))
    parser.add_argument("--backend", action="append", type=_cli.backend_name,
                        help="check only this backend (repeatable); default: every registered "
                             "one, the unavailable ones listed with the reason")
    args = parser.parse_args(argv)
    if args.backend and _dispatch.AUTO in args.backend:
        raise _cli.UsageError("--backend takes a backend's name (numpy, numba, cupy), not auto")
    status = run(args.backend)
    for name in args.backend or ():
        reason = _dispatch.unavailable_reason(name)
        if reason is not None:  # asked for by name: not checked is not a pass
            raise _dispatch.BackendUnavailableError(f"{reason} (nothing checked)")
    return status
