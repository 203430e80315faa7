"""The shapes and dtypes both benchmark tools time: ``python -m fastlinear bench`` and asv."""

import argparse

# (N, D, M) = (batch, in_features, out_features): tiny (call overhead), medium, large, tall,
# and skinny (N = 1, a one-row training step).
DEFAULT_SHAPES = ((32, 64, 64), (64, 256, 256), (256, 1024, 1024), (1024, 1024, 1024),
                  (2048, 4096, 1024), (8192, 512, 512), (1, 4096, 4096))
# One of each kind: tiny, medium, skinny. Also the asv suite's default grid.
QUICK_SHAPES = ((32, 64, 64), (256, 1024, 1024), (1, 4096, 4096))
DTYPES = ("float32", "float64")

# The training step of the demo's network, at the demo's batch and at a larger one.
TRAINING_BATCHES = (32, 256)
# Fused linear + ReLU layers: a small layer's forward and backward ("step"), where fusing saves
# separate passes, and a large forward, where the activation must cost nothing beside the GEMM.
FUSED_CASES = (((32, 64, 128), "step"), ((1024, 1024, 1024), "forward"))
FUSED_ACTIVATION = "relu"


def shape_text(shape):
    """``(256, 1024, 1024)`` -> ``"256x1024x1024"``."""
    return "x".join(str(size) for size in shape)


def parse_shape(text):
    """``"256x1024x1024"`` -> ``(256, 1024, 1024)``; ValueError for anything else."""
    parts = text.strip().lower().replace("×", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"a shape is NxDxM (e.g. 256x1024x1024), got {text!r}")
    return tuple(int(p) for p in parts)


def parse_shapes(text):
    """``"32x64x64,1x4096x4096"`` -> ``((32, 64, 64), (1, 4096, 4096))`` (argparse type)."""
    try:
        return tuple(parse_shape(item) for item in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_names(text):
    """Comma-separated list of names, stripped and lower-cased (argparse type)."""
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def parse_sizes(text):
    """``"32,256"`` -> ``(32, 256)``; ``""`` -> ``()`` (argparse type)."""
    try:
        sizes = tuple(int(item) for item in parse_names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes
