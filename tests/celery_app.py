"""The Celery app that the tests' worker subprocesses run (``celery -A tests.celery_app``).

The test process imports it too (tests/conftest.py), so that the package's
``shared_task`` tasks publish to the same broker the worker consumes from.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def _sqlite_begin_immediate_before_django_51() -> None:
    """Give Django < 5.1 what tests/settings.py asks of 5.1+ (``transaction_mode``).

    The test process and a worker share one SQLite file; two deferred transactions
    that both read and then write deadlock at once ("database is locked"), where
    BEGIN IMMEDIATE makes the second one wait for the first.
    """
    import django

    if django.VERSION >= (5, 1):
        return
    from django.db.backends.sqlite3.base import DatabaseWrapper

    def begin_immediate(self: DatabaseWrapper) -> None:
        self.cursor().execute("BEGIN IMMEDIATE")

    DatabaseWrapper._start_transaction_under_autocommit = begin_immediate


_sqlite_begin_immediate_before_django_51()

app = Celery("django_satori_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="tests.celery_app.probe")
def probe(path: str, hold_first_attempt: float = 0.0) -> None:
    """Report what the worker sees to ``path``; the infrastructure tests read it.

    Each run appends one JSON line. The first run may sleep ``hold_first_attempt``
    seconds so a test can kill the worker while it holds an unacknowledged task.
    """
    import json
    import time

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection

    with open(path, "a+", encoding="utf-8") as report:
        report.seek(0)
        attempt = len(report.readlines()) + 1
        report.write(
            json.dumps(
                {
                    "attempt": attempt,
                    "vendor": connection.vendor,
                    "database": str(connection.settings_dict["NAME"]),
                    "usernames": sorted(
                        get_user_model().objects.values_list("username", flat=True)
                    ),
                    "satori_base_url": settings.SATORI.get("BASE_URL"),
                    "satori_max_attempts": settings.SATORI.get("MAX_ATTEMPTS"),
                }
            )
            + "\n"
        )
    if attempt == 1 and hold_first_attempt:
        time.sleep(hold_first_attempt)
