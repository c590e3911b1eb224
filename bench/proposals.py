"""Prototypes of the fixes RESULTS.md proposes, applied in-process to a benchmark child.

They exist to measure a proposal beside the code as it is, in the same
invocation ("before" and "after"); they are not the fixes. Each one says
which function of ``django_satori`` it stands in for and what the real
patch is. Nothing here is imported unless a run asks for a proposal.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from django_satori.models import SyncState, SyncStatus
from django_satori.sync import outbox


def debounce() -> None:
    """Stands in for ``outbox.mark_pending``: every save while pending moves ``not_before``.

    Today the window is fixed: it opens at the first save and a save that
    comes after it closes starts another call. Real patch (sync.py,
    ``_mark_pending``, the already-pending branch): also set
    ``not_before = Greatest(F("not_before"), now + COALESCE_SECONDS)`` capped
    at ``pending_since + COALESCE_MAX_SECONDS`` (a new field set when the row
    becomes pending), so a customer saved without pause is still sent. The
    prototype leaves the cap out. ``push`` already handles the moved window:
    a task that finds the row not yet due re-queues itself for the rest.
    """
    original = outbox.mark_pending

    def mark_pending(
        email: str, customer_id: int | None, operation: str, conf: Any
    ) -> tuple[int, bool]:
        state_id, became_pending = original(email, customer_id, operation, conf)
        if not became_pending:
            later = timezone.now() + dt.timedelta(seconds=conf.COALESCE_SECONDS)
            SyncState.objects.filter(pk=state_id, status=SyncStatus.PENDING).update(
                not_before=Greatest(F("not_before"), later)
            )
        return state_id, became_pending

    outbox.mark_pending = mark_pending


PROPOSALS: dict[str, Callable[[], None]] = {
    "debounce": debounce,
}


def apply(names: str) -> None:
    for name in filter(None, names.split(",")):
        PROPOSALS[name]()
