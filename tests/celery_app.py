"""The Celery app that the tests' worker subprocesses run (``celery -A tests.celery_app``).

The test process imports it too (tests/conftest.py), so that the package's
``shared_task`` tasks publish to the same broker the worker consumes from.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

app = Celery("django_satori_tests")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
