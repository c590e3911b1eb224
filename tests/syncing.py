"""Helpers for driving the sync engine in-process (without a worker)."""

from __future__ import annotations

import time

from django.utils import timezone

from django_satori import sync
from django_satori.models import SyncState, SyncStatus


def drain(timeout: float = 20.0) -> int:
    """Push every due pending row until none is left; returns the number of pushes.

    Stands in for a worker in unit tests: connected objects' recorded changes are
    applied first (their mirrors built), then ``sync.push`` is the task's
    ``push_batch`` for one row.
    Rows waiting for a retry (back-off, Retry-After) are waited for.
    """
    pushes = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sync.apply_source_changes()
        now = timezone.now()
        due = list(
            SyncState.objects.filter(status=SyncStatus.PENDING, bulk_part__isnull=True)
            .exclude(not_before__gt=now)
            .values_list("pk", flat=True)
        )
        waiting = SyncState.objects.filter(status=SyncStatus.PENDING, not_before__gt=now)
        if not due and not waiting.exists():
            return pushes
        for pk in due:
            sync.push(pk)
            pushes += 1
        if not due:
            time.sleep(0.02)
    raise AssertionError("pending rows did not drain")
