"""``python -m bayeslora`` (also what ``accelerate launch -m bayeslora`` runs)."""

import sys

from .cli import main

sys.exit(main())
