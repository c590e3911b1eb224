"""One measurement in a fresh process: ``python -m bench.child TASK '{"param": ...}'``.

A fresh process per run makes ``ru_maxrss`` (peak RSS) that run's own figure,
and keeps one run's caches and garbage out of the next. The result is printed
as one ``BENCH-RESULT {json}`` line on stdout for :mod:`bench.run`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "


#: task name -> "module:function" in this package (imported on use).
TASKS = {
    "migrate": "prepare:migrate",
    "seed": "prepare:seed",
    "versions": "prepare:versions",
    "saves": "saves:run",
    "sync_engine": "syncing:run_engine",
    "sync_bare": "syncing:run_bare",
    "coalesce": "syncing:run_coalesce",
    "bulk_sync": "syncing:run_bulk",
    "export": "export:run",
    "save_breakdown": "breakdown:run",
    "push_breakdown": "breakdown:run_push",
    "import_file": "importing:make_file",
    "import": "importing:run",
}


def _task(name: str) -> Callable[..., dict[str, Any]]:
    from importlib import import_module

    module, function = TASKS[name].split(":")
    return getattr(import_module(f"{__package__}.{module}"), function)  # type: ignore[no-any-return]


def main(argv: list[str]) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")
    import django

    django.setup()
    # The package's tasks must publish to the benchmark's broker.
    from . import celery_app  # noqa: F401

    task, params = argv[0], json.loads(argv[1] if len(argv) > 1 else "{}")
    result = _task(task)(**params)
    from .measure import peak_rss_kib

    result.setdefault("peak_rss_kib", peak_rss_kib())
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
