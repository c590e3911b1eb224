"""The example project's Celery app: ``python -m celery -A example_project worker -B``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
# Every CELERY_* Django setting configures Celery (CELERY_BROKER_URL, CELERY_BEAT_SCHEDULE...).
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _add_satori_schedule(sender: Celery, **kwargs: Any) -> None:
    # django-satori's periodic sweep re-sends whatever stayed pending. Added here,
    # not in settings, because django_satori.tasks imports models and can only be
    # imported once Django is set up (beat and the worker finalize after that).
    from django_satori.tasks import BEAT_SCHEDULE

    sender.conf.beat_schedule = {**BEAT_SCHEDULE, **(sender.conf.beat_schedule or {})}
