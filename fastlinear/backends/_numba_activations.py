"""Activations and their derivatives as ``@njit`` row loops, for the numba backend's epilogues.

The formulas are those of ``fastlinear.activations`` (the reference), term for term. Constants
are cast to the rows' dtype, so float32 rows are computed in float32 (``math.erf``,
``math.tanh`` and ``math.exp`` then call libm's float32 functions). Each activation has its own
loop, so the branch on the activation is taken once per row, not per element.
"""

import math

from numba import njit

from fastlinear import activations

__all__ = ["activation_code", "activate", "activation_grad"]

_CODES = activations.ACTIVATION_CODES
# Module-level ints, so the compiled branches compare against constants.
NONE, RELU, GELU, GELU_TANH, TANH, SIGMOID = (
    _CODES[name] for name in (None, "relu", "gelu", "gelu_tanh", "tanh", "sigmoid"))
_CLAMP = activations.GELU_CLAMP
_BETA = activations.GELU_TANH_BETA
_KAPPA = activations.GELU_TANH_KAPPA
_SQRT1_2 = activations.SQRT1_2
_INV_SQRT_2PI = activations.INV_SQRT_2PI


def activation_code(activation):
    """The integer the compiled functions take for ``activation`` (a name or ``None``)."""
    return _CODES[activation]


@njit(cache=True)
def _clamp(z, limit):
    """``z`` clamped to ``[-limit, limit]``; NaN stays NaN."""
    if z > limit:
        return limit
    if z < -limit:
        return -limit
    return z


@njit(cache=True)
def _gelu_tanh_inner(z, beta, kappa):
    """``beta * (z + kappa * z**3)``, the argument of the tanh approximation's tanh."""
    return beta * (z + kappa * z * z * z)


@njit(cache=True)
def activate(code, y):
    """``y[:] = act(y)`` in place, for one row ``y``."""
    real = y.dtype.type
    zero, half, one = real(0.0), real(0.5), real(1.0)
    if code == RELU:
        for j in range(y.shape[0]):
            # NaN stays NaN, as np.maximum(z, 0) keeps it. Every element is stored, and the
            # kept one as ``z + 0`` (so -0.0 becomes 0.0): storing back the loaded value
            # itself lets LLVM turn the loop into masked stores, which cost ~5x this blend on
            # Zen 3 (0.8 against 0.12 ns an element, benchmarks/results/training_step_*).
            z = y[j]
            y[j] = zero if z < zero else z + zero
    elif code == TANH:
        for j in range(y.shape[0]):
            y[j] = math.tanh(y[j])
    elif code == SIGMOID:
        for j in range(y.shape[0]):
            z = y[j]
            e = math.exp(-abs(z))  # never overflows
            y[j] = (one if z >= zero else e) / (one + e)
    elif code == GELU:
        root_half = real(_SQRT1_2)
        for j in range(y.shape[0]):
            z = y[j]
            y[j] = z * (half * (one + math.erf(z * root_half)))
    elif code == GELU_TANH:
        clamp, beta, kappa = real(_CLAMP), real(_BETA), real(_KAPPA)
        for j in range(y.shape[0]):
            z = y[j]
            inner = _gelu_tanh_inner(_clamp(z, clamp), beta, kappa)
            y[j] = (half * z) * (one + math.tanh(inner))


@njit(cache=True)
def activation_grad(code, dy, saved, g):
    """``g[:] = dy * act'(z)`` for one row; ``saved`` is the row of ``Y`` or ``Z`` that
    ``activations.saved_for_backward`` names."""
    real = g.dtype.type
    zero, half, one = real(0.0), real(0.5), real(1.0)
    if code == RELU:
        for j in range(g.shape[0]):
            g[j] = zero if saved[j] <= zero else dy[j]  # NaN outputs pass the gradient
    elif code == TANH:
        for j in range(g.shape[0]):
            y = saved[j]
            g[j] = dy[j] * (one - y * y)
    elif code == SIGMOID:
        for j in range(g.shape[0]):
            y = saved[j]
            g[j] = dy[j] * (y * (one - y))
    elif code == GELU:
        clamp, root_half, inv_root = real(_CLAMP), real(_SQRT1_2), real(_INV_SQRT_2PI)
        for j in range(g.shape[0]):
            z = saved[j]
            zc = _clamp(z, clamp)
            cdf = half * (one + math.erf(z * root_half))
            pdf = inv_root * math.exp(real(-0.5) * zc * zc)
            g[j] = dy[j] * (cdf + zc * pdf)
    elif code == GELU_TANH:
        clamp, beta, kappa = real(_CLAMP), real(_BETA), real(_KAPPA)
        for j in range(g.shape[0]):
            zc = _clamp(saved[j], clamp)
            zz = zc * zc
            t = math.tanh(_gelu_tanh_inner(zc, beta, kappa))
            right = (half * zc) * (one - t * t) * (beta * (one + real(3 * _KAPPA) * zz))
            g[j] = dy[j] * (half * (one + t) + right)
    else:
        for j in range(g.shape[0]):
            g[j] = dy[j]
