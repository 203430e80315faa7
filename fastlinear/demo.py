"""``python -m fastlinear demo``: train a small MLP of fastlinear layers on scikit-learn's digits.

The data (8x8 images of handwritten digits, 1797 samples) ships with scikit-learn, so nothing is
downloaded. The network is Linear(64, 128) -> ReLU -> Linear(128, 64) -> ReLU -> Linear(64, 10)
with a softmax cross-entropy loss and SGD with momentum; ReLU and the loss live here, the linear
layers are ``fastlinear.Linear``. Prints loss and test accuracy per epoch.
"""

import argparse
import os
import sys
import time

import numpy as np

import fastlinear


def relu_forward(Z):
    return np.maximum(Z, 0)


def relu_backward(dA, Z):
    return dA * (Z > 0)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of ``logits`` (N, C) against integer ``labels``, and its gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1
    return loss, grad / n


class MLP:
    """Linear -> ReLU -> Linear -> ReLU -> Linear, trained by SGD with momentum."""

    def __init__(self, sizes, dtype, backend, rng):
        self.layers = [fastlinear.Linear(d, m, dtype=dtype, backend=backend, rng=rng)
                       for d, m in zip(sizes[:-1], sizes[1:], strict=True)]
        for layer in self.layers:  # He initialisation, so ReLU layers train quickly
            layer.W = (rng.standard_normal(layer.W.shape) * np.sqrt(2 / layer.in_features)
                       ).astype(dtype)
        self.velocity = [[np.zeros_like(p) for p, _ in layer.parameters()]
                         for layer in self.layers]

    def forward(self, X):
        self.pre_activations = []
        for layer in self.layers[:-1]:
            Z = layer.forward(X)
            self.pre_activations.append(Z)
            X = relu_forward(Z)
        return self.layers[-1].forward(X)

    def backward(self, dlogits):
        grad = self.layers[-1].backward(dlogits)
        for layer, Z in zip(reversed(self.layers[:-1]), reversed(self.pre_activations),
                            strict=True):
            grad = layer.backward(relu_backward(grad, Z), need_dX=layer is not self.layers[0])

    def step(self, lr, momentum):
        for layer, velocities in zip(self.layers, self.velocity, strict=True):
            for (param, grad), v in zip(layer.parameters(), velocities, strict=True):
                v *= momentum
                v -= lr * grad
                param += v


def load_digits_split(dtype, seed):
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise SystemExit('the demo needs scikit-learn: pip install "fastlinear[demo]"') from exc
    digits = load_digits()
    X = (digits.data / 16.0).astype(dtype)
    return train_test_split(X, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def progress(iterable, total, desc):
    """tqdm's bar when installed (the demo extra has it), else a plain iterator."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty() and os.environ.get("CI") == "true")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastlinear demo", description=__doc__)
    parser.add_argument("--backend", default=None,
                        help="numpy, numba, cupy or auto (default: FASTLINEAR_BACKEND, else auto)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    X_train, X_test, y_train, y_test = load_digits_split(dtype, args.seed)
    model = MLP([X_train.shape[1], 128, 64, 10], dtype, args.backend, rng)
    backend = args.backend or fastlinear.current_backend()
    print(f"fastlinear {fastlinear.__version__} demo: digits, {len(X_train)} train / "
          f"{len(X_test)} test samples, MLP 64-128-64-10, {dtype.name}, backend {backend!r}")

    start = time.perf_counter()
    accuracy = 0.0
    batches = range(0, len(X_train), args.batch_size)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(X_train))
        total_loss = 0.0
        for start_row in progress(batches, len(batches), f"epoch {epoch}"):
            rows = order[start_row:start_row + args.batch_size]
            loss, dlogits = softmax_cross_entropy(model.forward(X_train[rows]), y_train[rows])
            model.backward(dlogits.astype(dtype))
            model.step(args.lr, args.momentum)
            total_loss += loss * len(rows)
        accuracy = float(np.mean(model.forward(X_test).argmax(axis=1) == y_test))
        print(f"epoch {epoch:3d}  loss {total_loss / len(X_train):.4f}  "
              f"test accuracy {accuracy:.2%}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"final test accuracy {accuracy:.2%} in {time.perf_counter() - start:.1f} s")
    return 0 if accuracy >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
