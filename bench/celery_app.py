"""The Celery app of the benchmark worker (``celery -A bench.celery_app worker``).

The driving child process imports it too, so that the package's tasks publish
to the same broker.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.settings")

app = Celery("django_satori_bench")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
