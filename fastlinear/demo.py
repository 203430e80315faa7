"""``python -m fastlinear demo``: train a small MLP of fastlinear layers on scikit-learn's digits.

The data (8x8 images of handwritten digits, 1797 samples) ships with scikit-learn, so nothing is
downloaded. The network is Linear(64, 128) -> ReLU -> Linear(128, 64) -> ReLU -> Linear(64, 10):
``fastlinear.Linear`` layers with the ReLU fused in (``activation="relu"``) in a
``fastlinear.Sequential``, trained by ``train_step`` (softmax cross-entropy, SGD with momentum:
one native call per step on the numba backend). Prints loss and test accuracy per epoch, and
the training steps per second.
"""

import os
import sys
import time

import numpy as np

import fastlinear
from fastlinear import _cli

# The network, as layer widths: 8x8 images in, 10 digit classes out. The benchmark's training
# step times this same network (fastlinear.bench.training).
LAYER_SIZES = (64, 128, 64, 10)


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
    """Fused ``Linear + ReLU`` layers, then a plain ``Linear`` for the logits; SGD with momentum,
    layer by layer (the per-layer way the benchmarks compare ``Sequential`` with).

    ``sizes`` are the layer widths, input first. Weights are He-initialised from ``rng``, so the
    same seed gives the same network on every backend.
    """

    def __init__(self, sizes=LAYER_SIZES, dtype=np.float32, backend=None, rng=None):
        rng = np.random.default_rng(rng)
        last = len(sizes) - 2
        self.layers = [fastlinear.Linear(d, m, dtype=dtype, backend=backend, rng=rng,
                                         activation=None if index == last else "relu")
                       for index, (d, m) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
        for layer in self.layers:
            # He initialisation, so ReLU layers train quickly: Linear draws W as randn * 0.01,
            # rescaled in place where the backend keeps it.
            layer.W *= layer.W.dtype.type(np.sqrt(2 / layer.in_features) / 0.01)
        self.velocity = None

    def forward(self, X):
        """Logits ``(N, sizes[-1])`` of ``X`` ``(N, sizes[0])``."""
        for layer in self.layers:
            X = layer.forward(X)
        return X

    def backward(self, dlogits):
        """Gradients of every layer (``dW``, ``db``) from the logits' gradient; the input's
        gradient is not needed, so the first layer skips it."""
        grad = dlogits
        for layer in reversed(self.layers):
            grad = layer.backward(grad, need_dX=layer is not self.layers[0])

    def step(self, lr, momentum):
        """One SGD-with-momentum update of every parameter from its gradient."""
        if self.velocity is None:
            self.velocity = [[p * 0 for p, _ in layer.parameters()] for layer in self.layers]
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


def build_parser():
    parser = _cli.Parser(prog="python -m fastlinear demo", description=_cli.plain(__doc__))
    parser.add_argument("--backend", type=_cli.backend_name, default=None,
                        help="numpy, numba, cupy or auto (default: FASTLINEAR_BACKEND, else "
                             "auto)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="samples per SGD step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9,
                        help="SGD momentum, 0 for plain SGD (default: %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the data and the layers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the split and the batch order "
                             "(default: %(default)s)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise _cli.UsageError(f"--{name.replace('_', '-')} must be at least 1, got "
                                  f"{getattr(args, name)}")

    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    # the network first: a backend that cannot run says so before the data set is loaded
    net = fastlinear.Sequential(*MLP(LAYER_SIZES, dtype, args.backend, rng).layers,
                                backend=args.backend)
    X_train, X_test, y_train, y_test = load_digits_split(dtype, args.seed)
    backend = args.backend or fastlinear.current_backend()
    print(f"fastlinear {fastlinear.__version__} demo: digits, {len(X_train)} train / "
          f"{len(X_test)} test samples, MLP {'-'.join(map(str, LAYER_SIZES))}, {dtype.name}, "
          f"backend {backend!r}")

    start = time.perf_counter()
    accuracy, steps, step_seconds = 0.0, 0, 0.0
    batches = range(0, len(X_train), args.batch_size)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(X_train))
        total_loss = 0.0
        for start_row in progress(batches, len(batches), f"epoch {epoch}"):
            rows = order[start_row:start_row + args.batch_size]
            X, y = X_train[rows], y_train[rows]
            before = time.perf_counter()
            loss = net.train_step(X, y, loss="softmax_cross_entropy", lr=args.lr,
                                  momentum=args.momentum)
            if epoch > 1 or start_row:  # the first step loads the backend: not counted
                step_seconds += time.perf_counter() - before
                steps += 1
            total_loss += loss * len(rows)
        accuracy = float(np.mean(net.forward(X_test).argmax(axis=1) == y_test))
        print(f"epoch {epoch:3d}  loss {total_loss / len(X_train):.4f}  "
              f"test accuracy {accuracy:.2%}  ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"final test accuracy {accuracy:.2%} in {time.perf_counter() - start:.1f} s; "
          f"{steps / max(step_seconds, 1e-9):,.0f} training steps per second "
          f"(train_step alone, after the first step)")
    return 0 if accuracy >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
