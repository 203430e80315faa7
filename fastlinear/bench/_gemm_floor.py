"""The training step's GEMMs alone, back to back in one ``@njit`` call: the machine's floor.

The same products as ``Sequential.train_step`` on numba (per layer ``A @ W``, ``A.T @ G`` and,
but for the first layer, ``G @ W.T``), through the same gemm call (``_numba_network._product``),
on the same arena layout, with nothing between them: no bias, activation, loss or update.
Imported only when the bench times it (it imports Numba).
"""

from numba import njit

from fastlinear.backends._numba_network import _block, _offsets, _parameters, _product


@njit(cache=True)
def step_gemms(gemm, int_bits, layout, params, grads, X, work):
    """Every GEMM of a training step of the network ``layout`` describes, on batch ``X``."""
    rows = X.shape[0]
    offsets = _offsets(layout, rows)
    A = X
    for i in range(layout.shape[0]):
        W, _ = _parameters(params, layout, i)
        H = _block(work, offsets[i], rows, layout[i, 1])
        _product(gemm, int_bits, A, False, W, False, H, 0.0)
        A = H
    for i in range(layout.shape[0] - 1, -1, -1):
        M = layout[i, 1]
        W, _ = _parameters(params, layout, i)
        G = _block(work, offsets[i] + 2 * rows * M, rows, M)
        dW = _block(grads, layout[i, 2], layout[i, 0], M)
        A = X if i == 0 else _block(work, offsets[i - 1], rows, layout[i - 1, 1])
        _product(gemm, int_bits, A, True, G, False, dW, 0.0)
        if i > 0:
            dA = _block(work, offsets[i - 1] + 2 * rows * layout[i - 1, 1], rows,
                        layout[i - 1, 1])
            _product(gemm, int_bits, G, False, W, True, dA, 0.0)
