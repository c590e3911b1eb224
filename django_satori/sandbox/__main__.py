"""``python -m django_satori.sandbox --port 8765``: see ``--help``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
