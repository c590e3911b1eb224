"""What the admin tells an operator about a customer's error and a bulk job's progress.

Read-only: everything here is worked out from what the sync and bulk code already
store (``SyncState``, ``SyncLog``, ``BulkRowError``, ``BulkPart``), so nothing in
those writers changes for the admin's sake.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from .models import BulkJob, BulkPart, BulkRowError, BulkState, SyncLog, SyncState, SyncStatus


class Origin:
    SATORI = "satori"  # SATORI answered with an error: its words are shown as they are
    LOCAL = "local"  # our own check refused the data before anything was sent
    UNREACHED = "unreached"  # sent, but no usable answer (network, timeout, odd reply)
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class ErrorOrigin:
    kind: str
    #: SATORI's words (for Origin.SATORI) or the error as stored.
    text: str
    #: SATORI's status code when it answered.
    status: int | None = None

    @property
    def from_satori(self) -> bool:
        return self.kind == Origin.SATORI

    @property
    def label(self) -> str:
        """Where the error comes from, in the admin's language."""
        if self.kind == Origin.SATORI:
            if self.status is not None:
                return _("SATORI refused it (status %(status)s)") % {"status": self.status}
            return _("SATORI refused it")
        if self.kind == Origin.LOCAL:
            return _("Refused by our own check before sending to SATORI")
        if self.kind == Origin.UNREACHED:
            return _("No usable answer from SATORI (network, timeout or an unexpected reply)")
        return _("Error")


def error_origin(state: SyncState | None) -> ErrorOrigin | None:
    """Whether the row's last error is SATORI's answer or ours, from the evidence kept.

    The failure's log entry (same e-mail, same text) holds SATORI's status when SATORI
    answered, and SATORI's own words in its response; one with no status and no
    request was refused before sending (the sync code logs those with an empty
    request); one with a request but no status never got an answer. A bulk row error
    with the same text says itself whether it was left out before upload.
    """
    if state is None or not state.last_error:
        return None
    if state.status in (SyncStatus.NOT_IN_SATORI, SyncStatus.STOPPED):
        return ErrorOrigin(Origin.LOCAL, state.last_error)
    # The failure's own log entry: the sync code stores the same text on both.
    entry = (
        SyncLog.objects.filter(
            email=state.email,
            outcome__in=(SyncLog.Outcome.FAILED, SyncLog.Outcome.RETRY),
            message=state.last_error,
        )
        .order_by("-created_at", "-id")
        .first()
    )
    if entry is not None:
        if entry.satori_status is not None:
            said = entry.response_summary.get("message") if entry.response_summary else None
            return ErrorOrigin(Origin.SATORI, str(said or entry.message), entry.satori_status)
        if not entry.request_summary:
            return ErrorOrigin(Origin.LOCAL, state.last_error)
        return ErrorOrigin(Origin.UNREACHED, state.last_error)
    if state.customer_id is not None:
        row = (
            BulkRowError.objects.filter(customer_id=state.customer_id, message=state.last_error)
            .order_by("-id")
            .first()
        )
        if row is not None:
            kind = Origin.LOCAL if row.before_upload else Origin.SATORI
            return ErrorOrigin(kind, row.message)
    return ErrorOrigin(Origin.UNKNOWN, state.last_error)


@dataclasses.dataclass(frozen=True)
class RetryInfo:
    attempts: int
    limit: int
    next_at: dt.datetime | None


def retry_info(state: SyncState | None, max_attempts: int) -> RetryInfo | None:
    """Attempts against SATORI['MAX_ATTEMPTS'] and the next try, for a row that is retrying."""
    if state is None or state.status != SyncStatus.PENDING or not state.attempts:
        return None
    if not state.last_error:
        return None
    return RetryInfo(state.attempts, max_attempts, state.not_before)


# --------------------------------------------------------------------------
# Bulk jobs
# --------------------------------------------------------------------------


def duration_text(seconds: float) -> str:
    """``1 h 5 min``, ``3 min 20 s``, ``12 s``: short, for a table cell."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return _("%(h)d h %(m)d min") % {"h": hours, "m": minutes}
    if minutes:
        return _("%(m)d min %(s)d s") % {"m": minutes, "s": secs}
    return _("%(s)d s") % {"s": secs}


def part_stage(part: BulkPart, now: dt.datetime | None = None) -> str:
    """One part's stage in words: what it waits for, and for how long."""
    now = now or timezone.now()
    if part.state == BulkState.EXPORTING:
        return _("Writing its CSV")
    if part.state == BulkState.UPLOADING:
        if part.held:
            return _("The upload's answer was lost: waiting for your decision")
        if part.upload_attempts:
            return ngettext(
                "Uploading to SATORI (%(n)d attempt so far)",
                "Uploading to SATORI (%(n)d attempts so far)",
                part.upload_attempts,
            ) % {"n": part.upload_attempts}
        return _("Waiting to be uploaded to SATORI")
    if part.state == BulkState.PROCESSING:
        waited = duration_text((now - (part.uploaded_at or now)).total_seconds())
        return ngettext(
            "SATORI is processing it: %(n)d status check, waited %(waited)s",
            "SATORI is processing it: %(n)d status checks, waited %(waited)s",
            part.poll_count,
        ) % {"n": part.poll_count, "waited": waited}
    if part.state == BulkState.FINISHED:
        return _("Finished: results written back")
    if part.state == BulkState.FAILED:
        return _("Failed")
    if part.state == BulkState.CANCELLED:
        return _("Cancelled")
    return _("Waiting to start")


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # ok, bad, out, busy
    count: int
    percent: float
    label: str


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """A bulk job's rows split into what happened to them, for the bar and its legend."""

    selected: int
    sent: int
    succeeded: int
    failed: int
    left_out: int
    in_satori: int
    segments: list[Segment]
    summary: str
    stage: str
    complete: bool
    clean: bool

    @property
    def percent_done(self) -> int:
        if not self.selected:
            return 100 if self.complete else 0
        return round(100 * (self.succeeded + self.failed + self.left_out) / self.selected)


def job_progress(job: BulkJob, parts: list[BulkPart] | None = None) -> JobProgress:
    """Rows succeeded, failed, left out (invalid or busy) and at SATORI, of all selected."""
    if parts is None:
        parts = list(job.parts.all())
    left_out = job.invalid_count + job.skipped_count
    sent = job.row_count
    in_satori = sum(
        p.row_count
        for p in parts
        if p.state in (BulkState.PROCESSING, BulkState.UPLOADING) and not job.dry_run
    )
    selected = sent + left_out
    complete = job.state in (BulkState.FINISHED, BulkState.FAILED, BulkState.CANCELLED)
    pieces = [
        ("ok", job.succeeded_count, _("succeeded")),
        ("bad", job.failed_count, _("failed")),
        ("out", left_out, _("left out")),
        ("busy", in_satori, _("at SATORI")),
    ]
    segments = [
        Segment(kind, count, 100 * count / selected if selected else 0, label)
        for kind, count, label in pieces
        if count
    ]
    summary = _("%(ok)d succeeded, %(bad)d failed, %(out)d left out of %(selected)d selected") % {
        "ok": job.succeeded_count,
        "bad": job.failed_count,
        "out": left_out,
        "selected": selected,
    }
    return JobProgress(
        selected=selected,
        sent=sent,
        succeeded=job.succeeded_count,
        failed=job.failed_count,
        left_out=left_out,
        in_satori=in_satori,
        segments=segments,
        summary=summary,
        stage=job_stage(job, parts),
        complete=complete,
        clean=complete
        and job.state == BulkState.FINISHED
        and not left_out
        and not job.failed_count,
    )


def job_stage(job: BulkJob, parts: list[BulkPart]) -> str:
    """The job's current stage in words, from its busiest part."""
    now = timezone.now()
    if job.state == BulkState.CREATED:
        return _("Waiting for a worker to start it")
    if job.state == BulkState.EXPORTING:
        return ngettext(
            "Writing the CSV: %(n)d part written",
            "Writing the CSV: %(n)d parts written",
            len(parts),
        ) % {"n": len(parts)}
    for state in (BulkState.UPLOADING, BulkState.PROCESSING):
        busy = [p for p in parts if p.state == state]
        if busy and job.state not in (BulkState.FINISHED, BulkState.FAILED):
            text = part_stage(busy[0], now)
            if len(parts) > 1:
                done = sum(1 for p in parts if p.state == BulkState.FINISHED)
                text = _("%(stage)s (part %(part)d; %(done)d of %(total)d parts finished)") % {
                    "stage": text,
                    "part": busy[0].number,
                    "done": done,
                    "total": len(parts),
                }
            return text
    if job.state == BulkState.FINISHED and job.dry_run:
        return _("Dry run: CSV written, nothing uploaded")
    return str(job.get_state_display())
