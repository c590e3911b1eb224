"""The safety net, above the sync and bulk engines: Celery beat runs :func:`sweep`
every minute (``django_satori.beat.BEAT_SCHEDULE``), and ``manage.py satori_sync``
runs it by hand.

It gives back claims of workers that died, re-dispatches what stayed pending
(a lost task, a broker outage; connected object changes whose mirror was not
built), routes a large backlog through a bulk job,
re-dispatches lost actions and finds bulk steps whose task was lost.
"""

from __future__ import annotations

import datetime as dt

from django.db import models, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from . import bulk
from .conf import get_settings
from .models import BulkJob, Customer, SyncState
from .status import record_sweep
from .sync import actions, dispatch, outbox, sources


def sweep(*, limit: int = 5000) -> dict[str, int]:
    """Re-dispatch what stayed pending; route a large backlog through a bulk job.

    Safe to run any time, from beat or by hand: a duplicate dispatch is a
    no-op because a worker must claim a row before it sends it.
    """
    conf = get_settings()
    now = timezone.now()
    stale = now - dt.timedelta(seconds=conf.SWEEP_AFTER_SECONDS)
    counts = {"reclaimed": 0, "dispatched": 0, "bulk": 0, "actions": 0, "source_changes": 0}
    if not conf.SYNC_ENABLED:
        return counts
    # Saves of connected objects whose task was lost: the worker builds their mirrors.
    counts["source_changes"] = dispatch.dispatch_source_changes(
        sources.overdue_source_changes(stale, limit)
    )
    counts["reclaimed"] = outbox.reclaim_expired(now)
    due = outbox.overdue(now, stale)
    upserts = outbox.bulk_candidates(due)
    if upserts.count() > conf.BULK_THRESHOLD:
        counts["bulk"] = _route_to_bulk(upserts)
        due = due.exclude(pk__in=upserts.values("pk"))
    ids = list(due.values_list("pk", flat=True)[:limit])
    if ids:
        outbox.mark_dispatched(ids, now)
        counts["dispatched"] = dispatch.dispatch_many(ids)
    counts["actions"] = sum(
        dispatch.dispatch_action(pk) for pk in actions.overdue_actions(now, stale, limit)
    )
    counts["bulk_polled"] = bulk.poll_overdue_parts(now)
    record_sweep(now)  # read by satori_status (--max-sweep-age)
    return counts


def _route_to_bulk(pending: models.QuerySet[SyncState]) -> int:
    if BulkJob.objects.filter(state__in=bulk.ACTIVE_STATES, automatic=True).exists():
        return 0  # one automatic job at a time; the next sweep takes the rest
    customers = Customer.objects.filter(sync_state__in=pending)
    with transaction.atomic():
        job = bulk.start_bulk_job(
            customers,
            mode=pending_bulk_mode(),
            automatic=True,
            description=_("Backlog of pending customers"),
        )
    return job.pk


def pending_bulk_mode() -> str:
    """The bulk mode that matches ``PUSH_ENDPOINT``, for a backlog of pending pushes."""
    return "registration" if get_settings().PUSH_ENDPOINT == "registration" else "upsert"
