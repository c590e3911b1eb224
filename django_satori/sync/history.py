"""The one writer of :class:`~django_satori.models.SyncLog`: what was sent and answered.

Pushes gather their entries and write them together (:func:`together`);
everything else (actions, bulk steps) writes one entry per call.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from django.utils import timezone

from ..exceptions import SatoriError
from ..models import SyncLog
from ..rawsql import insert_rows

#: Most entries held back before they are written.
LOG_BATCH = 50
#: Every column of an entry but its id.
LOG_FIELDS = tuple(f.attname for f in SyncLog._meta.concrete_fields if not f.primary_key)

#: Entries waiting to be written together, per thread (None: write at once).
_held = threading.local()


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Hold the entries logged inside the block and write them in batches."""
    _held.rows = []
    try:
        yield
    finally:
        rows, _held.rows = _held.rows, None
        write(rows)


def write(rows: list[SyncLog]) -> None:
    # rawsql rather than bulk_create: the ORM's preparation of each value was most of
    # the 0.1 ms a push spent on its log entry.
    insert_rows(
        SyncLog, LOG_FIELDS, [{name: getattr(row, name) for name in LOG_FIELDS} for row in rows]
    )


def log_failure(
    endpoint: str,
    error: SatoriError,
    *,
    final: bool,
    email: str,
    request: Any,
    attempt: int,
    started: float | None,
    response: Any = None,
) -> None:
    """Record a refused or failed call: failed when ``final``, else to be retried."""
    log(
        endpoint,
        SyncLog.Outcome.FAILED if final else SyncLog.Outcome.RETRY,
        email=email,
        status=error.status,
        request=request,
        attempt=attempt,
        message=str(error),
        started=started,
        response=response,
    )


def log(
    endpoint: str,
    outcome: str,
    *,
    email: str = "",
    status: int | None = None,
    request: Any = None,
    response: Any = None,
    message: str = "",
    attempt: int = 0,
    started: float | None = None,
) -> None:
    """Record one call (or a decision not to call) for the admin's sync log."""
    duration = int((time.monotonic() - started) * 1000) if started else 0
    entry = SyncLog(
        email=email,
        endpoint=endpoint,
        outcome=outcome,
        satori_status=status,
        request_summary=request if isinstance(request, dict) else {},
        response_summary=response if isinstance(response, dict) else {},
        message=message,
        attempt=attempt,
        duration_ms=duration,
        created_at=timezone.now(),
    )
    rows = getattr(_held, "rows", None)
    if rows is None:
        entry.save()
        return
    rows.append(entry)
    if len(rows) >= LOG_BATCH:
        _held.rows = []
        write(rows)
