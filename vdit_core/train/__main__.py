"""python -m vdit_core.train (also under torchrun)."""

import sys

from .trainer import main

sys.exit(main())
