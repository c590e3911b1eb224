"""The sync dashboard: how many customers are synced, waiting or failed, and why.

Everything is read from the tables the sync already writes (``SyncState``,
``SyncLog``, ``BulkJob``, ``ImportRun``); the only live check is a Celery ping
with a short timeout, run in a thread the page stops waiting for, so a broker
that does not answer never holds the page.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from typing import Any
from urllib.parse import urlencode

from celery import current_app
from django.db.models import Count, Max, Min, Q
from django.db.models.functions import TruncDay, TruncHour
from django.urls import reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext as _

from .admin_status import duration_text, job_progress
from .conf import get_settings
from .models import BulkJob, Customer, ImportRun, SourceChange, SyncLog, SyncState, SyncStatus
from .status import last_sweep

#: The statuses always shown, even at zero, in this order; the rest only when present.
MAIN_STATUSES = (
    SyncStatus.SYNCED,
    SyncStatus.PENDING,
    SyncStatus.SENDING,
    SyncStatus.FAILED,
    SyncStatus.NOT_IN_SATORI,
)
#: Calls that reached for SATORI (a skipped or dry-run entry is a decision not to call).
CALL_OUTCOMES = (SyncLog.Outcome.OK, SyncLog.Outcome.RETRY, SyncLog.Outcome.FAILED)
FAIL_OUTCOMES = (SyncLog.Outcome.RETRY, SyncLog.Outcome.FAILED)
#: Seconds the page waits for workers to answer a ping.
PING_TIMEOUT = 1.0
TOP_REASONS = 10
RECENT_JOBS = 10
RECENT_IMPORTS = 5


# --------------------------------------------------------------------------
# Counts
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatusCount:
    status: str
    label: str
    count: int
    url: str


def status_counts(changelist_url: str) -> list[StatusCount]:
    """Customers per sync status, each linked to the customer list filtered on it."""
    rows = dict(
        SyncState.objects.filter(customer__isnull=False)
        .values_list("status")
        .annotate(n=Count("pk"))
        .values_list("status", "n")
    )
    never = Customer.objects.filter(sync_state__isnull=True).count()
    labels = dict(SyncStatus.choices)
    order = list(MAIN_STATUSES) + [s for s in SyncStatus.values if s not in MAIN_STATUSES]
    counts = [
        StatusCount(
            status,
            str(labels[status]),
            rows.get(status, 0),
            f"{changelist_url}?{urlencode({'sync_status': status})}",
        )
        for status in order
        if status in MAIN_STATUSES or rows.get(status)
    ]
    if never:
        counts.append(
            StatusCount(
                "none",
                _("Never marked for sync"),
                never,
                f"{changelist_url}?{urlencode({'sync_status': 'none'})}",
            )
        )
    return counts


@dataclasses.dataclass(frozen=True)
class Reason:
    message: str
    count: int
    url: str


def failure_reasons(changelist_url: str) -> list[Reason]:
    """The most frequent last errors of failed customers, each linked to those customers."""
    rows = (
        SyncState.objects.filter(status=SyncStatus.FAILED, customer__isnull=False)
        .values("last_error")
        .annotate(n=Count("pk"))
        .order_by("-n", "last_error")[:TOP_REASONS]
    )
    return [
        Reason(
            row["last_error"] or _("(no message)"),
            row["n"],
            f"{changelist_url}?"
            + urlencode({"sync_status": SyncStatus.FAILED, "last_error": row["last_error"]}),
        )
        for row in rows
    ]


# --------------------------------------------------------------------------
# Is anything running?
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Health:
    state: str  # "yes", "no", "unknown"
    text: str
    basis: str


_ping_lock = threading.Lock()
_ping_running = False


def worker_health(timeout: float = PING_TIMEOUT) -> Health:
    """Ping the Celery workers; never waits much longer than ``timeout``."""
    global _ping_running
    basis = _("Celery ping with a %(s)s-second timeout, sent when this page was loaded.") % {
        "s": f"{timeout:g}"
    }
    if current_app.conf.task_always_eager:
        return Health(
            "unknown", _("Tasks run inside the web process (CELERY_TASK_ALWAYS_EAGER)."), basis
        )
    with _ping_lock:
        if _ping_running:
            # The last ping is still stuck on the broker: do not pile up threads.
            return Health("unknown", _("The broker did not answer the last ping yet."), basis)
        _ping_running = True
    answer: list[Any] = []
    failure: list[BaseException] = []

    def ping() -> None:
        global _ping_running
        try:
            answer.append(current_app.control.ping(timeout=timeout) or [])
        except Exception as exc:  # any broker trouble is reported, never raised into the page
            failure.append(exc)
        finally:
            with _ping_lock:
                _ping_running = False

    thread = threading.Thread(target=ping, name="django-satori-dashboard-ping", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if failure:
        # The exception's text may hold the broker URL (and its password): name the type only.
        return Health(
            "no",
            _("The broker could not be reached (%(error)s).")
            % {"error": type(failure[0]).__name__},
            basis,
        )
    if not answer:
        return Health("unknown", _("The broker did not answer in time."), basis)
    workers = [name for reply in answer[0] for name in reply]
    if not workers:
        return Health("no", _("No worker answered."), basis)
    return Health(
        "yes",
        _("%(n)d worker(s) answered: %(names)s")
        % {
            "n": len(workers),
            "names": ", ".join(sorted(workers)),
        },
        basis,
    )


def sweep_health(now: dt.datetime) -> Health:
    """Whether the sweep seems to run, from what it leaves behind.

    The sweep dispatches again every pending customer that is due and was not
    dispatched for ``SWEEP_AFTER_SECONDS``; such rows older than three sweeps mean no
    sweep (or no worker) ran. The newest sync log entry and bulk status check are shown
    as well, because an idle sweep writes nothing.
    """
    conf = get_settings()
    late = now - dt.timedelta(seconds=max(3 * conf.SWEEP_AFTER_SECONDS, 180))
    ran = last_sweep()
    if ran is not None:
        # Every sweep notes its run in SATORI['STATUS_CACHE'] (as satori_status reads it).
        basis = _("Based on the sweep's last run, noted in the cache SATORI['STATUS_CACHE'].")
        if ran >= now - dt.timedelta(minutes=3):
            return Health("yes", _("The sweep last ran at %(when)s.") % {"when": _when(ran)}, basis)
        return Health(
            "no",
            _("The sweep last ran at %(when)s: is celery beat running?") % {"when": _when(ran)},
            basis,
        )
    overdue = (
        SyncState.objects.filter(status=SyncStatus.PENDING, bulk_part__isnull=True)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=late))
        .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=late))
        .filter(updated_at__lt=late)
        .count()
    )
    newest_log = SyncLog.objects.aggregate(t=Max("created_at"))["t"]
    newest_poll = BulkJob.objects.aggregate(t=Max("last_polled_at"))["t"]
    basis = _(
        "Based on pending customers that are due but were not dispatched again for over "
        "%(minutes)s minutes (the sweep re-dispatches them every SWEEP_AFTER_SECONDS); "
        "newest sync log entry: %(log)s; newest bulk status check (BulkJob.last_polled_at): "
        "%(poll)s."
    ) % {
        "minutes": f"{(now - late).total_seconds() / 60:g}",
        "log": _when(newest_log),
        "poll": _when(newest_poll),
    }
    if overdue:
        return Health(
            "no",
            _("%(n)d due customer(s) were not dispatched again: is celery beat running?")
            % {"n": overdue},
            basis,
        )
    pending = SyncState.objects.filter(status=SyncStatus.PENDING).exists()
    if pending:
        return Health("yes", _("Pending customers are being dispatched."), basis)
    return Health("unknown", _("Nothing is waiting, so there is nothing to tell from."), basis)


def _when(value: dt.datetime | None) -> str:
    return date_format(timezone.localtime(value), "DATETIME_FORMAT") if value else _("never")


@dataclasses.dataclass(frozen=True)
class OldestPending:
    since: dt.datetime
    age: str
    count: int


def oldest_pending(now: dt.datetime) -> OldestPending | None:
    """The pending customer whose row changed longest ago (updated_at: its last change)."""
    row = SyncState.objects.filter(status=SyncStatus.PENDING).aggregate(
        t=Min("updated_at"), n=Count("pk")
    )
    if not row["n"]:
        return None
    return OldestPending(row["t"], duration_text((now - row["t"]).total_seconds()), row["n"])


# --------------------------------------------------------------------------
# Charts (server-side SVG)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bucket:
    start: dt.datetime
    label: str
    calls: int
    fails: int


@dataclasses.dataclass(frozen=True)
class Chart:
    id: str
    title: str
    buckets: list[Bucket]
    svg: SafeString

    @property
    def calls(self) -> int:
        return sum(b.calls for b in self.buckets)

    @property
    def fails(self) -> int:
        return sum(b.fails for b in self.buckets)


def call_buckets(
    now: dt.datetime, *, hours: int | None = None, days: int | None = None
) -> list[Bucket]:
    """Calls and failures per hour (``hours``) or per local day (``days``), oldest first."""
    tz = timezone.get_current_timezone()
    local = timezone.localtime(now, tz)
    if hours:
        first = local.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=hours - 1)
        starts = [first + dt.timedelta(hours=i) for i in range(hours)]
        trunc: Any = TruncHour("created_at", tzinfo=tz)
        fmt = "H:i"
    else:
        assert days
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        starts = [
            timezone.make_aware(
                dt.datetime.combine(midnight.date() - dt.timedelta(days=days - 1 - i), dt.time()),
                tz,
            )
            for i in range(days)
        ]
        trunc = TruncDay("created_at", tzinfo=tz)
        fmt = "n/j"
    rows = (
        SyncLog.objects.filter(created_at__gte=starts[0], outcome__in=CALL_OUTCOMES)
        .annotate(bucket=trunc)
        .values("bucket")
        .annotate(calls=Count("pk"), fails=Count("pk", filter=Q(outcome__in=FAIL_OUTCOMES)))
    )
    found = {timezone.localtime(row["bucket"], tz): (row["calls"], row["fails"]) for row in rows}
    return [Bucket(start, date_format(start, fmt), *found.get(start, (0, 0))) for start in starts]


def bar_chart(chart_id: str, title: str, buckets: list[Bucket], label_every: int) -> Chart:
    """Calls (light) with failures (red) over them, one bar per bucket; no script, no CDN."""
    width, height, left, bottom, top = 720, 200, 36, 22, 8
    inner_w, inner_h = width - left - 4, height - bottom - top
    peak = max([b.calls for b in buckets] + [1])
    step = inner_w / len(buckets)
    bar = max(step * 0.7, 1)
    parts = [
        format_html(
            '<line x1="{}" y1="{}" x2="{}" y2="{}"></line>',
            left,
            top + inner_h,
            width - 4,
            top + inner_h,
        ),
        format_html('<text x="{}" y="{}" text-anchor="end">{}</text>', left - 4, top + 8, peak),
        format_html('<text x="{}" y="{}" text-anchor="end">0</text>', left - 4, top + inner_h),
    ]
    for index, bucket in enumerate(buckets):
        x = left + index * step + (step - bar) / 2
        calls_h = inner_h * bucket.calls / peak
        fails_h = inner_h * bucket.fails / peak
        tip = _("%(when)s: %(calls)d calls, %(fails)d failed") % {
            "when": bucket.label,
            "calls": bucket.calls,
            "fails": bucket.fails,
        }
        parts.append(
            format_html(
                '<g class="satori-bucket" data-calls="{}" data-fails="{}"><title>{}</title>'
                '<rect class="satori-calls" x="{}" y="{}" width="{}" height="{}"></rect>'
                '<rect class="satori-fails" x="{}" y="{}" width="{}" height="{}"></rect></g>',
                bucket.calls,
                bucket.fails,
                tip,
                f"{x:.1f}",
                f"{top + inner_h - calls_h:.1f}",
                f"{bar:.1f}",
                f"{calls_h:.1f}",
                f"{x:.1f}",
                f"{top + inner_h - fails_h:.1f}",
                f"{bar:.1f}",
                f"{fails_h:.1f}",
            )
        )
        if index % label_every == 0:
            parts.append(
                format_html(
                    '<text x="{}" y="{}" text-anchor="middle">{}</text>',
                    f"{x + bar / 2:.1f}",
                    height - 6,
                    bucket.label,
                )
            )
    svg = format_html(
        '<svg class="satori-chart" id="{}" viewBox="0 0 {} {}" role="img" aria-label="{}" '
        'xmlns="http://www.w3.org/2000/svg">{}</svg>',
        chart_id,
        width,
        height,
        title,
        mark_safe("".join(parts)),  # noqa: S308 - every piece above went through format_html
    )
    return Chart(chart_id, title, buckets, svg)


def charts(now: dt.datetime) -> list[Chart]:
    return [
        bar_chart(
            "satori-chart-24h",
            _("Calls to SATORI in the last 24 hours, per hour"),
            call_buckets(now, hours=24),
            label_every=3,
        ),
        bar_chart(
            "satori-chart-7d",
            _("Calls to SATORI in the last 7 days, per day"),
            call_buckets(now, days=7),
            label_every=1,
        ),
    ]


@dataclasses.dataclass
class SourceChanges:
    waiting: int
    failed: int
    url: str
    failed_url: str


def source_changes() -> SourceChanges | None:
    """Connected objects saved whose customer is not built yet (or could not be)."""
    counts = SourceChange.objects.aggregate(
        waiting=Count("pk", filter=Q(error="")), failed=Count("pk", filter=~Q(error=""))
    )
    if not counts["waiting"] and not counts["failed"]:
        return None
    url = reverse("admin:django_satori_sourcechange_changelist")
    return SourceChanges(
        waiting=counts["waiting"],
        failed=counts["failed"],
        url=url,
        failed_url=f"{url}?{urlencode({'error__isempty': '0'})}",
    )


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------


def dashboard_context() -> dict[str, Any]:
    now = timezone.now()
    changelist = reverse("admin:django_satori_customer_changelist")
    jobs = list(
        BulkJob.objects.select_related("started_by").prefetch_related("parts")[:RECENT_JOBS]
    )
    started = time.monotonic()
    worker = worker_health()
    return {
        "now": now,
        "status_counts": status_counts(changelist),
        "customer_total": Customer.objects.count(),
        "oldest_pending": oldest_pending(now),
        "source_changes": source_changes(),
        "worker": worker,
        "ping_seconds": f"{time.monotonic() - started:.1f}",
        "sweep": sweep_health(now),
        "charts": charts(now),
        "reasons": failure_reasons(changelist),
        "failed_url": f"{changelist}?{urlencode({'sync_status': SyncStatus.FAILED})}",
        "jobs": [(job, job_progress(job, list(job.parts.all()))) for job in jobs],
        "imports": list(ImportRun.objects.select_related("started_by")[:RECENT_IMPORTS]),
    }
