"""What django-satori keeps, and for how long: SyncLog entries and bulk CSV files.

Run by the ``django_satori.tasks.cleanup`` beat task every hour and by
``manage.py satori_cleanup``. Both settings may be None to keep everything.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.utils import timezone

from . import bulk_files
from .conf import SatoriSettings, get_settings
from .models import SyncLog


@dataclass(frozen=True)
class CleanupResult:
    log_entries: int = 0
    bulk_files: int = 0
    orphan_files: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "log_entries": self.log_entries,
            "bulk_files": self.bulk_files,
            "orphan_files": self.orphan_files,
        }


def delete_old_logs(
    days: float | None = None,
    *,
    now: dt.datetime | None = None,
    batch: int | None = None,
    conf: SatoriSettings | None = None,
    dry_run: bool = False,
) -> int:
    """Delete SyncLog entries older than ``days`` (default: ``LOG_RETENTION_DAYS``).

    A few hundred rows per statement, each statement its own transaction: one
    DELETE of millions of rows would hold its locks (and grow the WAL) for
    minutes while the workers keep writing new entries.
    """
    conf = conf or get_settings()
    days = conf.LOG_RETENTION_DAYS if days is None else days
    if days is None:
        return 0
    size = max(1, batch or conf.LOG_DELETE_BATCH)
    cutoff = (now or timezone.now()) - dt.timedelta(days=float(days))
    # No ordering: the model's "-id" would steer the database away from created_at's index.
    old = SyncLog.objects.filter(created_at__lt=cutoff).order_by()
    if dry_run:
        return old.count()
    deleted = 0
    while True:
        ids = list(old.values_list("pk", flat=True)[:size])
        if not ids:
            return deleted
        count, _by_model = SyncLog.objects.filter(pk__in=ids).delete()
        deleted += count


def run(
    *,
    logs: bool = True,
    files: bool = True,
    log_days: float | None = None,
    file_days: float | None = None,
    batch: int | None = None,
    dry_run: bool = False,
) -> CleanupResult:
    """Apply both retention settings (or the days given); returns what was (or would be) deleted."""
    conf = get_settings()
    entries = delete_old_logs(log_days, batch=batch, conf=conf, dry_run=dry_run) if logs else 0
    cleaned = (
        bulk_files.delete_expired(file_days, conf=conf, dry_run=dry_run)
        if files
        else bulk_files.FileCleanup(0, 0)
    )
    return CleanupResult(entries, cleaned.parts, cleaned.orphans)
