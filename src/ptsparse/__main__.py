"""``python -m ptsparse``, as ``torchrun -m ptsparse`` launches it: the command line."""

import sys

from .cli import main

sys.exit(main())
