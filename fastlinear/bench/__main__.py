"""``python -m fastlinear.bench``, the same as ``python -m fastlinear bench``."""

import sys

from fastlinear.bench import main

sys.exit(main())
