"""``python -m fastlinear.bench``, the same as ``python -m fastlinear bench``."""

import sys

from fastlinear import _cli
from fastlinear.bench import main

sys.exit(_cli.run("python -m fastlinear.bench", main, sys.argv[1:]))
