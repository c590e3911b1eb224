#!/usr/bin/env python
"""The example project's manage.py: ``python example_project/manage.py <command>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    # Python put this file's folder first on the path, where example_project/celery.py
    # would shadow the celery package; the repository root goes there instead.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
