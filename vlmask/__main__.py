"""``python -m vlmask`` (also what ``torchrun -m vlmask`` runs)."""

import sys

from vlmask.cli import main

sys.exit(main())
