"""python -m vdit_core.train (also under torchrun)."""

import sys

from .trainer import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # main() has said where the last checkpoint is
    sys.exit(130)
