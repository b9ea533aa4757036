"""``python -m bida`` (what ``torchrun -m bida train ...`` runs)."""

import sys

from .tools.cli import main

sys.exit(main())
