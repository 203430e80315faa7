"""Activations fused into the linear layer: their names, definitions and NumPy reference math.

Each activation is defined as PyTorch defines it (``F.relu``, ``F.gelu(approximate="none")``,
``F.gelu(approximate="tanh")``, ``torch.tanh``, ``torch.sigmoid``); the functions here are the
reference every backend's fused kernels are tested against.

The backward pass needs one array saved from the forward pass (``saved_for_backward``): the
forward's output ``Y`` for relu, tanh and sigmoid, whose derivatives are functions of the output,
and the pre-activation ``Z = X @ W + b`` for the two GELUs, whose derivatives are not.

Formulas, as every backend computes them (``zc`` is ``z`` clamped to ``[-GELU_CLAMP, GELU_CLAMP]``,
``B = GELU_TANH_BETA``, ``K = GELU_TANH_KAPPA``)::

    relu       y = max(z, 0) (NaN stays NaN; -0.0 gives +0.0, as np.maximum(-0.0, 0): the
               NumPy reference, unlike torch.relu, which keeps -0.0)
               dz = dy if not (y <= 0) else 0
    tanh       y = tanh(z)
               dz = dy * (1 - y * y)
    sigmoid    y = 1 / (1 + exp(-z)), computed from exp(-|z|)
               dz = dy * y * (1 - y)
    gelu       y = z * 0.5 * (1 + erf(z / sqrt(2)))
               dz = dy * (0.5 * (1 + erf(z / sqrt(2))) + zc * exp(-zc * zc / 2) / sqrt(2 pi))
    gelu_tanh  t = tanh(B * (zc + K * zc**3)),  y = 0.5 * z * (1 + t)
               dz = dy * (0.5 * (1 + t) + 0.5 * zc * (1 - t * t) * B * (1 + 3 K zc**2))

Where PyTorch's own formula breaks down these take the mathematical limit: the GELUs' derivatives
at ``|z| >= GELU_CLAMP`` are exactly 1 or 0 also where ``z**2`` overflows or ``z`` is infinite
(PyTorch's CPU kernels give NaN there). ``gelu(-inf)`` is NaN (``-inf * 0``), ``gelu(inf)`` inf.
"""

from __future__ import annotations

import functools
import math

import numpy as np

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "tanh", "sigmoid")
SAVES_PREACTIVATION = frozenset({"gelu", "gelu_tanh"})
# The integer each compiled kernel (numba, CUDA) takes for an activation; 0 is none.
ACTIVATION_CODES: dict[str | None, int] = {
    None: 0, **{name: code for code, name in enumerate(ACTIVATIONS, start=1)}}

# GELU constants: sqrt(2 / pi) and the tanh approximation's cubic coefficient; 1 / sqrt(2) and
# 1 / sqrt(2 pi) for the erf form.
GELU_TANH_BETA = math.sqrt(2.0 / math.pi)
GELU_TANH_KAPPA = 0.044715
SQRT1_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# Beyond |z| = GELU_CLAMP both GELUs have saturated in every float format (tanh's argument is
# above 4e7, exp(-z**2 / 2) is 0), so powers of z are taken of z clamped to it: same results,
# no overflow of z**2 or z**3.
GELU_CLAMP = 1.0e3


def check_activation(activation):
    """Return ``activation`` as a canonical name (or ``None``); raise for an unknown one."""
    if activation is None:
        return None
    if isinstance(activation, str):
        name = activation.strip().lower()
        if name in ACTIVATIONS:
            return name
        if name in ("none", "identity", "linear"):
            return None
    raise ValueError(f"unknown activation {activation!r}: expected None or one of "
                     f"{', '.join(repr(a) for a in ACTIVATIONS)}")


def check_saved(activation, saved):
    """Raise where ``activation``'s backward is given no ``saved`` array."""
    if activation is not None and saved is None:
        raise ValueError(f"activation={activation!r} needs saved=, what linear_forward(..., "
                         f"return_saved=True) returned beside Y "
                         f"(the {saved_for_backward(activation)})")


def saved_for_backward(activation):
    """What the backward pass of ``activation`` needs: ``"output"``, ``"preactivation"``, None."""
    if activation is None:
        return None
    return "preactivation" if activation in SAVES_PREACTIVATION else "output"


@functools.cache
def _scipy_erf():
    """SciPy's vectorised erf, or None where SciPy is not installed (looked up once)."""
    try:
        from scipy.special import erf
    except ImportError:
        return None
    return erf


def _erf(x):
    """The error function elementwise, in ``x``'s dtype (SciPy's where installed, else libm's)."""
    erf = _scipy_erf()
    if erf is None:
        return np.vectorize(math.erf, otypes=[x.dtype])(x)
    return erf(x).astype(x.dtype, copy=False)


def apply(activation, Z, out=None):
    """``act(Z)`` elementwise in ``Z``'s dtype, into ``out`` (which may be ``Z`` itself)."""
    if out is None:
        out = np.empty_like(Z)
    dtype = Z.dtype.type
    if activation is None:
        out[...] = Z
    elif activation == "relu":
        np.maximum(Z, dtype(0), out=out)  # NaN propagates, as in torch.relu
    elif activation == "tanh":
        np.tanh(Z, out=out)
    elif activation == "sigmoid":
        # exp of a non-positive argument never overflows
        e = np.exp(-np.abs(Z))
        positive = Z >= 0
        np.divide(np.where(positive, dtype(1), e), dtype(1) + e, out=out)
    elif activation == "gelu":
        cdf = dtype(0.5) * (dtype(1) + _erf(Z * dtype(SQRT1_2)))
        with np.errstate(invalid="ignore"):  # -inf * 0 is NaN, as the formula says
            np.multiply(Z, cdf, out=out)
    elif activation == "gelu_tanh":
        zc = np.clip(Z, dtype(-GELU_CLAMP), dtype(GELU_CLAMP))
        inner = dtype(GELU_TANH_BETA) * (zc + dtype(GELU_TANH_KAPPA) * zc * zc * zc)
        with np.errstate(invalid="ignore"):  # -inf * 0 is NaN, as the formula says
            np.multiply(dtype(0.5) * Z, dtype(1) + np.tanh(inner), out=out)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out


def grad(activation, dY, saved, out=None):
    """``dY * act'(z)``: the gradient with respect to the pre-activation, in ``dY``'s dtype.

    ``saved`` is what ``saved_for_backward(activation)`` names: the forward output ``Y`` for
    relu, tanh and sigmoid, the pre-activation ``Z`` for gelu and gelu_tanh.
    """
    if out is None:
        out = np.empty_like(dY)
    dtype = dY.dtype.type
    one = dtype(1)
    if activation is None:
        out[...] = dY
    elif activation == "relu":
        # torch's threshold_backward selects, not multiplies: zero where y <= 0 even where dY
        # is NaN or inf, and the gradient passes where y is NaN
        np.copyto(out, dY)
        np.putmask(out, saved <= 0, dtype(0))  # as out[saved <= 0] = 0, in half the time
    elif activation == "tanh":
        np.multiply(dY, one - saved * saved, out=out)
    elif activation == "sigmoid":
        np.multiply(dY, saved * (one - saved), out=out)
    elif activation == "gelu":
        zc = np.clip(saved, dtype(-GELU_CLAMP), dtype(GELU_CLAMP))
        cdf = dtype(0.5) * (one + _erf(saved * dtype(SQRT1_2)))
        pdf = dtype(INV_SQRT_2PI) * np.exp(dtype(-0.5) * zc * zc)
        np.multiply(dY, cdf + zc * pdf, out=out)
    elif activation == "gelu_tanh":
        zc = np.clip(saved, dtype(-GELU_CLAMP), dtype(GELU_CLAMP))
        zz = zc * zc
        t = np.tanh(dtype(GELU_TANH_BETA) * (zc + dtype(GELU_TANH_KAPPA) * zz * zc))
        left = dtype(0.5) * (one + t)
        right = (dtype(0.5) * zc) * (one - t * t) * (dtype(GELU_TANH_BETA)
                                                     * (one + dtype(3 * GELU_TANH_KAPPA) * zz))
        np.multiply(dY, left + right, out=out)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return out
