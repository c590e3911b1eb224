"""Health of the sync for monitoring: ``manage.py satori_status`` reads it from here.

Everything is cheap to ask every minute: counts per status (one grouped query),
the oldest pending row, a Celery ping with a short timeout, and when the sweep
last ran, which the sweep notes in a cache (``SATORI['STATUS_CACHE']``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.conf import settings
from django.core.cache import caches
from django.db.models import Min
from django.utils import timezone

from .conf import get_settings
from .models import SyncState, SyncStatus
from .sync import pending_counts

log = logging.getLogger("django_satori.status")

SWEEP_KEY = "django_satori:last_sweep"
#: Extra seconds the ping gets to connect to the broker before it counts as unreachable.
PING_GRACE_SECONDS = 2.0


def record_sweep(now: dt.datetime | None = None) -> None:
    """Note that the sweep ran. Never fails the sweep: monitoring is not worth a lost run."""
    when = now or timezone.now()
    try:
        caches[get_settings().STATUS_CACHE].set(SWEEP_KEY, when.timestamp(), timeout=None)
    except Exception:
        log.warning("Could not note the sweep's run in the status cache.", exc_info=True)


def last_sweep() -> dt.datetime | None:
    try:
        value = caches[get_settings().STATUS_CACHE].get(SWEEP_KEY)
    except Exception:
        log.warning("Could not read the sweep's last run from the status cache.", exc_info=True)
        return None
    if not isinstance(value, (int, float)):
        return None
    # The same kind of datetime as timezone.now(): aware only with USE_TZ.
    if settings.USE_TZ:
        return dt.datetime.fromtimestamp(value, tz=dt.UTC)
    return dt.datetime.fromtimestamp(value)


def ping_workers(timeout: float) -> tuple[list[str], str]:
    """Names of the Celery workers that answered within ``timeout`` seconds, and an error.

    The ping runs in a thread that is given up on after the timeout plus a short
    grace: with the broker down, connecting can retry far longer than a health
    check may take.
    """
    found: dict[str, Any] = {}

    def ping() -> None:
        try:
            replies = current_app.control.ping(timeout=timeout) or []
            found["workers"] = sorted(name for reply in replies for name in reply)
        except Exception as exc:  # the broker is down or refuses us
            found["error"] = type(exc).__name__

    thread = threading.Thread(target=ping, name="satori-status-ping", daemon=True)
    thread.start()
    thread.join(timeout + PING_GRACE_SECONDS)
    if thread.is_alive():
        return [], "broker did not answer"
    return list(found.get("workers", [])), str(found.get("error", ""))


@dataclass
class Status:
    counts: dict[str, int]
    #: Seconds since the pending row that has waited longest last changed; None: none pending.
    oldest_pending_seconds: float | None
    #: Worker names that answered the ping; None when it was not asked.
    workers: list[str] | None
    worker_error: str
    #: Seconds since the sweep last ran; None when no run is recorded.
    last_sweep_seconds: float | None
    problems: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.counts.get(SyncStatus.FAILED, 0)

    @property
    def backlog(self) -> int:
        waiting = (SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
        return sum(self.counts.get(status, 0) for status in waiting)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.problems,
            "problems": list(self.problems),
            "counts": dict(self.counts),
            "backlog": self.backlog,
            "failed": self.failed,
            "oldest_pending_seconds": _rounded(self.oldest_pending_seconds),
            "workers": self.workers,
            "worker_error": self.worker_error,
            "last_sweep_seconds": _rounded(self.last_sweep_seconds),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def collect(*, ping: bool = True, ping_timeout: float = 1.0) -> Status:
    now = timezone.now()
    counts = {status: 0 for status in SyncStatus.values}
    counts.update(pending_counts())
    oldest = (
        SyncState.objects.filter(status=SyncStatus.PENDING)
        .order_by()
        .aggregate(oldest=Min("updated_at"))["oldest"]
    )
    swept = last_sweep()
    workers: list[str] | None = None
    error = ""
    if ping:
        workers, error = ping_workers(ping_timeout)
    return Status(
        counts=counts,
        oldest_pending_seconds=max(0.0, (now - oldest).total_seconds()) if oldest else None,
        workers=workers,
        worker_error=error,
        last_sweep_seconds=max(0.0, (now - swept).total_seconds()) if swept else None,
    )
