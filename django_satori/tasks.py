"""Celery tasks. They take database ids only: no credentials and no personal data
travel through the broker, and their return values (logged by Celery) are
outcome words and counts, never customer data.

``acks_late`` with ``reject_on_worker_lost``: a worker killed mid-task leaves
the message to be delivered again; the row's claim (lease) keeps two workers
from sending the same customer at once, and the sweep is the last safety net.

Tasks are queued only through :mod:`django_satori.sync.dispatch`.
"""

from __future__ import annotations

import math

from celery import Task, shared_task
from django.db import DatabaseError, close_old_connections

from . import bulk, retention
from . import sweep as safety_net
from .sync import actions, dispatch, pushing, sources

_COMMON = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    # A dropped database connection or a locked SQLite database: try again after
    # 2, 4, 8 ... 60 s. No jitter, which could make a retry immediate: a lock held
    # by another process would then be met again at once.
    "autoretry_for": (DatabaseError,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": False,
    "max_retries": 10,
}


def _fresh_connections() -> None:
    # Workers keep connections across tasks; a dead one must not fail the next task.
    close_old_connections()


@shared_task(name="django_satori.tasks.push_many", bind=True, **_COMMON)
def push_many(self: Task, state_ids: list[int]) -> dict[str, int]:
    """Push outbox rows one after another (``dispatch.dispatch_many`` batches them)."""
    _fresh_connections()
    # Eager mode (CELERY_TASK_ALWAYS_EAGER, often in tests) runs a re-dispatch at
    # once, whatever its countdown: send now, and leave any later attempt to the sweep.
    eager = bool(self.request.is_eager)
    results = pushing.push_batch(state_ids, ignore_window=eager)
    outcomes: dict[str, int] = {}
    again: dict[int, list[int]] = {}
    for state_id, (outcome, again_in) in results.items():
        outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
        if again_in is not None and not eager:
            again.setdefault(math.ceil(again_in), []).append(state_id)
    for delay, ids in again.items():
        dispatch.dispatch_many(ids, delay)
    return outcomes


@shared_task(name="django_satori.tasks.apply_source_changes", **_COMMON)
def apply_source_changes(change_ids: list[int]) -> int:
    """Build the mirrors of connected objects whose saves recorded these changes."""
    _fresh_connections()
    return sources.apply_source_changes(change_ids)


@shared_task(name="django_satori.tasks.send_action", bind=True, **_COMMON)
def send_action(self: Task, action_id: int) -> str:
    _fresh_connections()
    outcome, again_in = actions.send_action(action_id)
    if again_in is not None and not self.request.is_eager:
        dispatch.dispatch_action(action_id, again_in)
    return outcome


# The sweep is not retried: beat runs it again within a minute, and two sweeps
# waiting for the same lock would only queue behind each other.
@shared_task(name="django_satori.tasks.sweep", **{**_COMMON, "autoretry_for": ()})
def sweep() -> dict[str, int]:
    _fresh_connections()
    return safety_net.sweep()


# Bulk CSV jobs (see django_satori.bulk). Each step queues the next one; waiting
# for SATORI is a task scheduled for later, never a sleeping worker.


@shared_task(name="django_satori.tasks.run_bulk_job", **_COMMON)
def run_bulk_job(job_id: int) -> str:
    _fresh_connections()
    return str(bulk.run_job(job_id).state)


@shared_task(name="django_satori.tasks.upload_bulk_part", bind=True, **_COMMON)
def upload_bulk_part(self: Task, part_id: int) -> str:
    _fresh_connections()
    outcome, delay = bulk.upload_part(part_id)
    if outcome == "retry" and delay is not None and not self.request.is_eager:
        # Eager mode would retry at once, without the back-off: the sweep does it later.
        bulk.enqueue_upload(part_id, delay)
    elif outcome == "uploaded" and delay is not None:
        # Eager mode runs this at once; the check is then "not due" and the sweep
        # (poll_overdue_parts) or satori_bulk_status asks SATORI later.
        bulk.enqueue_poll(part_id, delay)
    return outcome


@shared_task(name="django_satori.tasks.poll_bulk_part", **_COMMON)
def poll_bulk_part(part_id: int) -> str:
    _fresh_connections()
    outcome, delay = bulk.poll_part(part_id)
    if delay is not None:
        bulk.enqueue_poll(part_id, delay)
    return outcome


# Retention (see django_satori.retention): old SyncLog entries and bulk CSV files.


@shared_task(name="django_satori.tasks.cleanup", **_COMMON)
def cleanup() -> dict[str, int]:
    _fresh_connections()
    return retention.run().as_dict()
