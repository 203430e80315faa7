"""Losses of ``Sequential.train_step``: their names, definitions and NumPy reference math.

Each loss is defined as PyTorch defines it with its default ``reduction="mean"``; the functions
here are the reference every backend's step is tested against::

    softmax_cross_entropy   torch.nn.CrossEntropyLoss(): logits Z (N, C), integer labels y (N,)
        loss = mean_n( logsumexp(Z[n]) - Z[n, y[n]] )
        dZ   = (softmax(Z) - onehot(y)) / N
    mse                     torch.nn.MSELoss(): outputs Z (N, M), targets T (N, M)
        loss = mean_{n,m}( (Z - T)**2 )
        dZ   = 2 (Z - T) / (N M)

``logsumexp`` and ``softmax`` subtract each row's maximum first, so no ``exp`` overflows.
"""

from __future__ import annotations

from fastlinear import _arrays

LOSSES = ("softmax_cross_entropy", "mse")
# The integer the compiled step takes for a loss.
LOSS_CODES = {name: code for code, name in enumerate(LOSSES)}


def check_loss(loss: object) -> str:
    """Return ``loss`` as a canonical name; raise ``ValueError`` for an unknown one."""
    if loss in LOSS_CODES and type(loss) is str:
        return loss
    if isinstance(loss, str):
        name = loss.strip().lower()
        if name in LOSSES:
            return name
    raise ValueError(f"unknown loss {loss!r}: expected one of "
                     f"{', '.join(repr(name) for name in LOSSES)}")


def _refuse_empty(name, array):
    raise ValueError(f"{name} is empty (shape {tuple(array.shape)}): a mean loss needs at least "
                     f"one element")


def softmax_cross_entropy(logits, labels, grad_out=None):
    """Mean cross-entropy of ``logits`` (N, C) against integer ``labels`` (N,), and its gradient
    with respect to the logits (into ``grad_out`` when given), in the logits' dtype."""
    xp = _arrays.namespace(logits)  # NumPy, or CuPy on the GPU
    n = logits.shape[0]
    if n == 0:
        _refuse_empty("logits", logits)
    rows = xp.arange(n)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - xp.log(total)
    picked = log_probs[rows, labels].sum()  # / n: .mean() costs ~6 us more (its wrapper)
    grad = xp.divide(exp, total, out=grad_out)  # softmax
    grad[rows, labels] -= 1
    grad /= grad.dtype.type(n)
    return -float(picked) / n, grad


def mse(outputs, targets, grad_out=None):
    """Mean squared error over all elements of ``outputs - targets`` (N, M), and its gradient
    with respect to the outputs (into ``grad_out`` when given)."""
    xp = _arrays.namespace(outputs)
    if outputs.size == 0:
        _refuse_empty("outputs", outputs)
    diff = xp.subtract(outputs, targets, out=grad_out)
    loss = float((diff * diff).mean())
    diff *= diff.dtype.type(2.0 / diff.size)
    return loss, diff


def value_and_grad(loss, outputs, y, grad_out=None):
    """``(loss value as a float, d loss / d outputs)`` of the loss named ``loss``."""
    if loss == "softmax_cross_entropy":
        return softmax_cross_entropy(outputs, y, grad_out)
    return mse(outputs, y, grad_out)
