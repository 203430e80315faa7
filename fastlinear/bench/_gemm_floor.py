"""The training step's GEMMs alone, back to back in one ``@njit`` call: the machine's floor.

The same products as ``Sequential.train_step`` on numba (per layer ``A @ W``, ``A.T @ G`` and,
but for the first layer, ``G @ W.T``), through the same gemm call (``_numba_network._product``),
on the same arena layout, with nothing between them: no bias, activation, loss or update.
Imported only when the bench times it (it imports Numba).
"""

from numba import njit

from fastlinear.backends._numba_network import _block, _parameters, _product


@njit(cache=True)
def step_gemms(gemm, int_bits, layout, params, grads, X, work):
    """Every GEMM of a training step of the network ``layout`` describes, on batch ``X``."""
    rows = X.shape[0]
    A = X
    at = 0  # layer i's blocks, walked up then down as the step walks them
    for i in range(layout.shape[0]):
        W, _ = _parameters(params, layout, i)
        H = _block(work, at, rows, layout[i, 1])
        _product(gemm, int_bits, A, False, W, False, H, 0.0)
        A = H
        at += 3 * rows * layout[i, 1]
    for i in range(layout.shape[0] - 1, -1, -1):
        D, M = layout[i, 0], layout[i, 1]
        at -= 3 * rows * M
        W, _ = _parameters(params, layout, i)
        G = _block(work, at + 2 * rows * M, rows, M)
        dW = _block(grads, layout[i, 2], D, M)
        if i == 0:
            _product(gemm, int_bits, X, True, G, False, dW, 0.0)
        else:
            before = at - 3 * rows * D  # layer i - 1's blocks, D columns each
            _product(gemm, int_bits, _block(work, before, rows, D), True, G, False, dW, 0.0)
            _product(gemm, int_bits, G, False, W, True, _block(work, before + 2 * rows * D,
                                                              rows, D), 0.0)
