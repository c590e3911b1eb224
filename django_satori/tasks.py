"""Celery tasks. They take database ids only: no credentials and no personal data
travel through the broker, and their return values (logged by Celery) are
outcome words, never customer data.

``acks_late`` with ``reject_on_worker_lost``: a worker killed mid-task leaves
the message to be delivered again; the row's claim (lease) keeps two workers
from sending the same customer at once, and the sweep is the last safety net.
"""

from __future__ import annotations

from celery import shared_task
from django.db import DatabaseError, close_old_connections

from . import sync

_COMMON = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    # A dropped database connection: reconnect and try again shortly.
    "autoretry_for": (DatabaseError,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "max_retries": 10,
}


def _fresh_connections() -> None:
    # Workers keep connections across tasks; a dead one must not fail the next task.
    close_old_connections()


@shared_task(name="django_satori.tasks.push_customer", **_COMMON)
def push_customer(state_id: int) -> str:
    _fresh_connections()
    outcome, again_in = sync.push(state_id)
    if again_in is not None:
        sync.dispatch(state_id, again_in)
    return outcome.value


@shared_task(name="django_satori.tasks.send_action", **_COMMON)
def send_action(action_id: int) -> str:
    _fresh_connections()
    outcome, again_in = sync.send_action(action_id)
    if again_in is not None:
        sync.dispatch_action(action_id, again_in)
    return outcome


@shared_task(name="django_satori.tasks.sweep", **_COMMON)
def sweep() -> dict[str, int]:
    _fresh_connections()
    return sync.sweep()


#: Add to ``CELERY_BEAT_SCHEDULE`` (see docs/operations.md); every minute by default.
BEAT_SCHEDULE = {
    "django-satori-sweep": {"task": "django_satori.tasks.sweep", "schedule": 60.0},
}
