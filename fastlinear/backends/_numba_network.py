"""A whole network's forward, backward or training step in one ``@njit`` call (numba backend).

``Sequential`` keeps its layers' parameters in flat arenas; this module's ``network_call`` walks
them with the layout table ``layout`` (one row per layer: ``D, M, W offset, b offset or -1,
activation code``) and a flat workspace that holds, per layer ``i`` at offset ``3 * N * (M_0 +
... + M_{i-1})``, three (N, M_i) blocks: the output ``H_i``, the pre-activation ``Z_i`` (written
only for the GELUs, whose derivatives need it) and the gradient ``dH_i`` with respect to
``H_i``, which the backward pass turns into ``G_i = dH_i * act'`` in place.

The products are NumPy's BLAS gemm (``_numba_blas``), called directly: every matrix here is
C-contiguous, so each product's transposes and leading dimensions are known (``_product``) and
no layout is inspected at run time or compiled for. Biases, activations, loss, its
gradient, the bias sums and the SGD update are loops here, so a step crosses the Python
boundary once. float32 is accumulated in float32, as by the BLAS and the NumPy reference; the
loss value is summed in float64.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, register_jitable
from numba.np.arrayobj import populate_array

from fastlinear.backends._numba_activations import (
    GELU,
    GELU_TANH,
    RELU,
    SIGMOID,
    TANH,
    activate,
    activation_grad,
)
from fastlinear.backends._numba_blas import _gemm

__all__ = ["FORWARD", "BACKWARD", "STEP", "network_call", "first_bad_label"]

# What network_call does (its ``mode``).
FORWARD, BACKWARD, STEP = 0, 1, 2
# Loss codes: as fastlinear.losses.LOSS_CODES.
CROSS_ENTROPY, MSE = 0, 1


@intrinsic
def _borrowed(typingctx, array, offset, shape):
    """The C-contiguous array of ``shape`` (a tuple of one or two sizes) over the elements
    ``offset:offset + prod(shape)`` of the C-contiguous ``array``, built directly: no slice or
    ``reshape`` (a helper call that inspects strides) and no reference count (its memory-info is
    null, so numba's increfs and decrefs of it are no-ops, not atomic operations). It borrows
    ``array``'s memory: valid while ``array`` lives, never to be returned to Python; bounds are
    the caller's (``_block``, ``_vector``, ``_flat``, which compile only into compiled callers:
    called from Python they would hand out an array that owns nothing)."""
    if not (isinstance(array, types.Array) and array.layout == "C"
            and isinstance(shape, types.UniTuple) and shape.count in (1, 2)):
        return None
    result_type = types.Array(array.dtype, shape.count, "C", readonly=not array.mutable)

    def codegen(context, builder, signature, args):
        source, start, sizes = args
        data = context.make_array(signature.args[0])(context, builder, source).data
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(
            context.get_data_type(array.dtype)))
        dims = [builder.extract_value(sizes, k) for k in range(shape.count)]
        strides = [itemsize] if shape.count == 1 else [builder.mul(dims[1], itemsize), itemsize]
        result = context.make_array(result_type)(context, builder)
        populate_array(result, data=builder.gep(data, [start]), shape=dims, strides=strides,
                       itemsize=itemsize, meminfo=None)
        return result._getvalue()

    return result_type(array, types.intp, types.UniTuple(types.intp, shape.count)), codegen


@register_jitable
def _vector(array, offset, length):
    """``array.flat[offset:offset + length]`` (C-contiguous ``array``), borrowed
    (``_borrowed``): only for use inside the compiled call that holds ``array``."""
    if offset < 0 or length < 0 or offset + length > array.size:
        raise IndexError("a vector out of its arena")
    return _borrowed(array, offset, (length,))


@register_jitable
def _block(work, offset, rows, cols):
    """The (rows, cols) C-contiguous matrix at ``work[offset:]``, borrowed (``_borrowed``):
    only for use inside the compiled call that holds ``work``."""
    if offset < 0 or rows < 0 or cols < 0 or offset + rows * cols > work.size:
        raise IndexError("a workspace block out of its arena")
    return _borrowed(work, offset, (rows, cols))


@register_jitable
def _flat(block):
    """The C-contiguous ``block``'s elements as one vector, borrowed (``_borrowed``)."""
    return _borrowed(block, 0, (block.size,))


_N, _T = ord("N"), ord("T")


@njit(cache=True)
def _product(gemm, int_bits, A, transpose_a, B, transpose_b, C, beta):
    """Row-major ``C = op(A) @ op(B) + beta C`` for C-contiguous ``A``, ``B``, ``C``; ``op``
    transposes where asked. Row-major ``C`` is column-major ``C.T = op(B).T @ op(A).T``, and a
    row-major matrix is its transpose in column-major: gemm with B first, ``'N'`` where no
    transpose is asked."""
    rows, cols = C.shape
    inner = A.shape[0] if transpose_a else A.shape[1]
    _gemm(gemm, int_bits, _T if transpose_b else _N, _T if transpose_a else _N, cols, rows,
          inner, 1.0, B, B.shape[1], A, A.shape[1], beta, C, cols)


@njit(cache=True)
def _layer_forward(gemm, int_bits, A, W, b, H, Z, code):
    """``H = act(A @ W + b)``; ``Z = A @ W + b`` for the GELUs. Bias rows first, then gemm with
    ``beta=1`` adds the product; then the whole block is activated in one pass (``H`` and ``Z``
    are C-contiguous: one loop over all elements, not a call per row)."""
    beta = 0.0
    if b.shape[0] > 0:
        beta = 1.0
        for n in range(H.shape[0]):
            row = H[n]
            for j in range(H.shape[1]):
                row[j] = b[j]
    _product(gemm, int_bits, A, False, W, False, H, beta)
    flat = _flat(H)
    if code == GELU or code == GELU_TANH:
        _copy(flat, _flat(Z))
    activate(code, flat)


@njit(cache=True)
def _copy(source, target):
    """``target[:] = source`` for two vectors of one length (a loop: no array expression to
    compile)."""
    for j in range(source.shape[0]):
        target[j] = source[j]


@njit(cache=True)
def _column_sums(G, total):
    """``total[:] = G.sum(0)``, the rows added in order (``G`` has at least one row)."""
    _copy(G[0], total)
    for n in range(1, G.shape[0]):
        row = G[n]
        for j in range(G.shape[1]):
            total[j] += row[j]


@njit(cache=True)
def _output_gradient(code, G, saved, total):
    """``G *= act'`` in place (``G`` holding ``dH`` on entry, ``_numba_activations``'s formulas)
    and ``total[:] = G.sum(0)`` unless ``total`` is empty, the rows added in order. For the
    identity, ReLU, tanh and sigmoid the sums are taken in the pass that writes ``G`` (one pass
    over the block, not two; the sums start from -0.0, which adds exactly as copying the first
    row would). These loops are written here, not taken from the shared
    ``activation_grad(code, dy, saved, g)``: called with ``dy`` and ``g`` the same row, its
    loop over two arguments that may alias ran several times slower inside the step
    (``benchmarks/relu_grad_in_place.py``)."""
    if code == GELU or code == GELU_TANH:
        flat = _flat(G)
        activation_grad(code, flat, _flat(saved), flat)
        if total.shape[0] > 0:
            _column_sums(G, total)
        return
    real = G.dtype.type
    zero, one = real(0.0), real(1.0)
    sums = total.shape[0] > 0
    for j in range(total.shape[0]):
        total[j] = -zero
    for n in range(G.shape[0]):
        g, y = G[n], saved[n]
        for j in range(G.shape[1]):
            if code == RELU:  # NaN outputs pass the gradient, as torch's threshold_backward
                v = zero if y[j] <= zero else g[j]  # a select: vectorises, unlike an if
            elif code == TANH:
                v = g[j] * (one - y[j] * y[j])
            elif code == SIGMOID:
                v = g[j] * (y[j] * (one - y[j]))
            else:
                v = g[j]
            g[j] = v
            if sums:
                total[j] += v


# float32 exp for arguments <= 0 (the shifted logits of a softmax): x = n ln2 + r, |r| <= ln2/2,
# ln2 split in two (Cody-Waite) so n ln2 is exact; exp(r) by Cephes' expf polynomial; 2^n built
# from its bits. Written as selects and casts so the loop vectorises (libm's expf would be one
# call an element).
_F32 = np.float32
_EXP_LOW = _F32(-87.33654)  # ln of float32's smallest normal: below it, 0 (np.exp: subnormal)
_LOG2E, _LN2_HI, _LN2_LO = _F32(1.44269504088896341), _F32(0.693359375), _F32(-2.12194440e-4)
_EXP_POLY = (_F32(1.9875691500e-4), _F32(1.3981999507e-3), _F32(8.3334519073e-3),
             _F32(4.1665795894e-2), _F32(1.6666665459e-1), _F32(5.0000001201e-1))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the integer ``bits`` (its low 32 bits)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(bits), codegen


@njit(cache=True)
def _exp_nonpositive_f32(x):
    """``exp`` of the float32 vector ``x`` (every element <= 0, or NaN) in place: within 2 ulp
    of ``np.exp`` down to -87.3; 0 below, where ``np.exp`` is subnormal (an absolute error under
    1.2e-38); ``exp(-inf) = 0``; NaN stays NaN."""
    zero, half = _F32(0.0), _F32(0.5)
    c0, c1, c2, c3, c4, c5 = _EXP_POLY
    for k in range(x.shape[0]):
        v = x[k]
        low = v < _EXP_LOW
        t = _EXP_LOW if low else v  # NaN passes here but its result is replaced below
        t = zero if t != t else t
        n = np.floor(t * _LOG2E + half)
        r = t - n * _LN2_HI - n * _LN2_LO
        p = (((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5) * r * r + r + _F32(1.0)
        e = p * _float32_from_bits((np.int32(n) + 127) << 23)
        e = zero if low else e
        # ``v + zero``, not ``v``: storing back the loaded value made LLVM write the loop with
        # masked stores, much slower on Zen 3 than this blend (see _numba_activations)
        x[k] = v + zero if v != v else e


# Where _cross_entropy takes its product of norms into the total: far below float64's 1.8e308
# even times one more norm (at most the number of classes).
_PRODUCT_LIMIT = 1e250


@njit(cache=True)
def _cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy of ``logits`` (N, C) against ``labels`` over the N rows; its
    gradient ``(softmax - onehot) / N`` into ``dlogits`` (C-contiguous). float32 takes the
    exponentials in one vectorised pass over the block (``_exp_nonpositive_f32``)."""
    rows, classes = logits.shape
    real = logits.dtype.type
    inv_rows = real(1.0 / rows)
    total = 0.0  # of top - z[label] per row here; of log(norm) below
    for n in range(rows):
        z, g = logits[n], dlogits[n]
        top = z[0]
        for j in range(1, classes):
            # One vmaxss a class: NaNs after the first class are passed over, but a row with a
            # NaN ends all NaN all the same (its shifted NaN makes the norm NaN below). Keeping
            # NaN as the top put a compare, an or and a blend on the dependency chain.
            v = z[j]
            top = v if v > top else top
        total += float(top) - float(z[labels[n]])
        for j in range(classes):
            g[j] = z[j] - top
    flat = _flat(dlogits)
    if dlogits.itemsize == 4:
        _exp_nonpositive_f32(flat)
    else:
        for k in range(flat.shape[0]):
            flat[k] = math.exp(flat[k])
    # The rows' log(norm) summed as the log of their product: one libm call, not one a row.
    # Every norm lies in [1, classes] (the top logit adds exp(0) = 1) or is NaN, so the product
    # only grows; it is taken into the total before it could overflow.
    product = 1.0
    for n in range(rows):
        g = dlogits[n]
        norm = real(0.0)
        for j in range(classes):
            norm += g[j]
        product *= float(norm)
        if product > _PRODUCT_LIMIT:
            total += math.log(product)
            product = 1.0
        scale = inv_rows / norm
        for j in range(classes):
            g[j] *= scale
        g[labels[n]] -= inv_rows
    return (total + math.log(product)) / rows


@njit(cache=True)
def _mse(outputs, targets, doutputs):
    """Mean of ``(outputs - targets)**2`` over all elements; its gradient into ``doutputs``."""
    rows, cols = outputs.shape
    scale = outputs.dtype.type(2.0 / (rows * cols))
    total = 0.0
    for n in range(rows):
        for j in range(cols):
            diff = outputs[n, j] - targets[n, j]
            total += float(diff) * float(diff)
            doutputs[n, j] = diff * scale
    return total / (rows * cols)


@njit(cache=True)
def _sgd(params, velocity, grads, lr, momentum):
    """``torch.optim.SGD`` on these (equal-length) slices of the arenas: ``v = momentum v + g;
    p -= lr v`` (``p -= lr g`` without momentum)."""
    real = params.dtype.type
    rate, keep = real(lr), real(momentum)
    if momentum == 0.0:
        for k in range(params.shape[0]):
            params[k] -= rate * grads[k]
    else:
        for k in range(params.shape[0]):
            v = keep * velocity[k] + grads[k]
            velocity[k] = v
            params[k] -= rate * v


@njit(cache=True)
def first_bad_label(labels, classes):
    """Index of the first label outside ``[0, classes)``, or -1."""
    for n in range(labels.shape[0]):
        if labels[n] < 0 or labels[n] >= classes:
            return n
    return -1


@njit(cache=True)
def _offset(layout, rows, i):
    """Offset of layer ``i``'s three workspace blocks."""
    position = 0
    for k in range(i):
        position += 3 * rows * layout[k, 1]
    return position


@njit(cache=True)
def _parameters(params, layout, i):
    """Layer ``i``'s ``W`` (D, M) and ``b`` (M,) (empty without a bias) in ``params``."""
    D, M, w_at, b_at = layout[i, 0], layout[i, 1], layout[i, 2], layout[i, 3]
    W = _block(params, w_at, D, M)
    b = _vector(params, b_at, M) if b_at >= 0 else _vector(params, 0, 0)
    return W, b


@njit(cache=True)
def _forward_all(gemm, int_bits, layout, params, X, work):
    """Every layer's forward pass; returns the last layer's output block."""
    rows = X.shape[0]
    A = X
    at = 0  # layer i's blocks (_offset), walked up
    for i in range(layout.shape[0]):
        M = layout[i, 1]
        W, b = _parameters(params, layout, i)
        H = _block(work, at, rows, M)
        Z = _block(work, at + rows * M, rows, M)
        _layer_forward(gemm, int_bits, A, W, b, H, Z, layout[i, 4])
        A = H
        at += 3 * rows * M
    return A


@njit(cache=True)
def _backward_all(gemm, int_bits, layout, params, grads, X, work, dX, velocity, lr, momentum,
                  update):
    """Every layer's gradients from ``dH`` of the last layer (in its workspace block); ``dX``
    (N, D_0) receives the input's gradient unless it has no rows. With ``update``, each layer's
    SGD update (``_sgd``) runs as soon as its last product that reads ``W`` is done, while its
    ``dW``, ``db`` and ``W`` are still in cache; no later product reads that layer's
    parameters, so the result is that of one update after the whole backward pass."""
    rows = X.shape[0]
    at = _offset(layout, rows, layout.shape[0] - 1)  # layer i's blocks, walked down
    for i in range(layout.shape[0] - 1, -1, -1):
        D, M, w_at, b_at, code = layout[i, 0], layout[i, 1], layout[i, 2], layout[i, 3], \
            layout[i, 4]
        W, _ = _parameters(params, layout, i)
        H = _block(work, at, rows, M)
        saved = _block(work, at + rows * M, rows, M) if (
            code == GELU or code == GELU_TANH) else H
        G = _block(work, at + 2 * rows * M, rows, M)
        _output_gradient(code, G, saved,
                         _vector(grads, b_at, M) if b_at >= 0 else _vector(grads, 0, 0))
        dW = _block(grads, w_at, D, M)
        before = at - 3 * rows * D  # layer i - 1's blocks (D columns each), where i > 0
        if i > 0:
            A = _block(work, before, rows, D)
            _product(gemm, int_bits, A, True, G, False, dW, 0.0)
            dA = _block(work, before + 2 * rows * D, rows, D)
            _product(gemm, int_bits, G, False, W, True, dA, 0.0)
        else:
            _product(gemm, int_bits, X, True, G, False, dW, 0.0)
            if dX.shape[0] > 0:
                _product(gemm, int_bits, G, False, W, True, dX, 0.0)
        if update:  # W and b adjacent in the arenas (Sequential.__init__): one pass over both
            end = w_at + D * M + (M if b_at >= 0 else 0)
            _sgd(_vector(params, w_at, end - w_at), _vector(velocity, w_at, end - w_at),
                 _vector(grads, w_at, end - w_at), lr, momentum)
        at = before


@njit(cache=True)
def network_call(mode, gemm, int_bits, layout, arenas, X, work, outer, labels, dX, loss_code,
                 lr, momentum):
    """One native call on the arenas, the rows of ``arenas`` (3, P): parameters, gradients and
    velocity; ``mode`` says which:

    * ``FORWARD``: ``outer`` (N, M_last) receives the network's output; returns 0.0.
    * ``BACKWARD``: from ``outer`` = the output's gradient and the workspace of the last
      forward, every layer's ``dW``/``db`` into ``grads`` and ``dX``; returns 0.0.
    * ``STEP``: forward, the loss (``labels`` for cross-entropy, ``outer`` = targets for MSE)
      and its gradient, backward with the SGD update of ``params`` and ``velocity``: each
      layer's update runs inside the backward pass, as soon as no later product reads its
      ``W`` (so midway some layers hold new parameters, others old); returns the loss. A label
      out of range returns ``-(1 + its index)`` before anything is written.
    """
    size = arenas.shape[1]
    params, grads = _vector(arenas, 0, size), _vector(arenas, size, size)
    velocity = _vector(arenas, 2 * size, size)
    rows = X.shape[0]
    last = layout.shape[0] - 1
    classes = layout[last, 1]
    if mode == STEP and loss_code == CROSS_ENTROPY:
        bad = first_bad_label(labels, classes)
        if bad >= 0:
            return -1.0 - bad
    dlast = _block(work, _offset(layout, rows, last) + 2 * rows * classes, rows, classes)
    if mode == BACKWARD:
        for n in range(rows):
            _copy(outer[n], dlast[n])
        _backward_all(gemm, int_bits, layout, params, grads, X, work, dX, velocity, 0.0, 0.0,
                      False)
        return 0.0
    output = _forward_all(gemm, int_bits, layout, params, X, work)
    if mode == FORWARD:
        for n in range(rows):
            _copy(output[n], outer[n])
        return 0.0
    if loss_code == CROSS_ENTROPY:
        loss = _cross_entropy(output, labels, dlast)
    else:
        loss = _mse(output, outer, dlast)
    _backward_all(gemm, int_bits, layout, params, grads, X, work, dX, velocity, lr, momentum,
                  True)
    return loss
