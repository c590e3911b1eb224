"""The Celery beat schedule django-satori needs.

It imports nothing from Django, so a settings module can use it::

    from django_satori.beat import BEAT_SCHEDULE
    CELERY_BEAT_SCHEDULE = {**BEAT_SCHEDULE}

The sweep re-dispatches whatever stayed pending (a lost task, a broker
outage, a worker killed mid-call), polls overdue bulk jobs and routes a large
backlog through the bulk CSV API. Every minute is cheap: it is a few indexed
queries when there is nothing to do. The hourly cleanup deletes what is past
the retention settings, in small batches.
"""

BEAT_SCHEDULE: dict[str, dict[str, object]] = {
    "django-satori-sweep": {"task": "django_satori.tasks.sweep", "schedule": 60.0},
    # Retention: SyncLog entries and bulk CSV files past SATORI's *_RETENTION_DAYS.
    "django-satori-cleanup": {"task": "django_satori.tasks.cleanup", "schedule": 3600.0},
}
