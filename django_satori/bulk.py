"""Bulk CSV jobs: one code path for the admin actions, the commands and the sweep.

A job travels through these steps, each one a Celery task that takes ids only
and keeps its progress in the database, so a lost task is found again by
:func:`poll_overdue_parts` (run by the sweep every minute):

1. :func:`start_bulk_job` stores the selection as a pickled ``Query`` (never
   a list of primary keys, so a million rows cost nothing here) and queues
   :func:`run_job` after commit.
2. :func:`run_job` streams the rows as ``values_list`` tuples, checks each one
   locally (invalid rows are left out and recorded as :class:`BulkRowError`
   before anything is uploaded), writes parts of at most ``BULK_CHUNK_SIZE``
   rows to temporary files, claims the customers' outbox rows for the part
   (so a single push cannot race it: ``sync.push`` refuses rows that have a
   ``bulk_part``), saves each file to ``SATORI['BULK_STORAGE']`` and queues
   its upload.
3. :func:`upload_part` uploads one file and keeps SATORI's ``process_code``.
4. :func:`poll_part` asks ``status.json`` from re-scheduled tasks (never a
   sleeping worker) until SATORI says ``finished`` or the deadline passes, then
   writes the per-row results back in batches.

Customers whose part fails (refused upload, unknown process code, deadline)
or is cancelled go back to where they were before: pending, or synced when
the data SATORI has is already their current version. Nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import pickle
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast

from django.core.files.storage import Storage
from django.db import connections, models, transaction
from django.db.models import F, Q, Sum
from django.db.models.expressions import Col
from django.db.models.sql.constants import MULTI
from django.utils import timezone
from django.utils.dateparse import parse_date
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from . import bulk_csv, bulk_files
from .client import get_client
from .conf import SatoriSettings, get_settings
from .exceptions import SatoriError, SatoriNotFoundError, SatoriValidationError
from .models import (
    BulkJob,
    BulkMode,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
)
from .rawsql import analyze_if_stale
from .redaction import for_log
from .sync import dispatch, history, outbox

log = logging.getLogger("django_satori.bulk")

ACTIVE_STATES = (BulkState.CREATED, BulkState.EXPORTING, BulkState.UPLOADING, BulkState.PROCESSING)
TERMINAL_STATES = (BulkState.FINISHED, BulkState.FAILED, BulkState.CANCELLED)
#: SATORI takes at most this many data rows per upload.
MAX_CHUNK_SIZE = 10_000
#: An upload claimed this long ago without a process code was interrupted.
UPLOAD_STALE_SECONDS = 900.0
#: How far a running status check pushes ``next_poll_at`` (a claim on the poll).
POLL_CLAIM_SECONDS = 120.0
#: Rows between two progress callbacks of an export.
PROGRESS_EVERY = 10_000

T = TypeVar("T")


def bulk_storage(conf: SatoriSettings | None = None) -> Storage:
    return bulk_files.bulk_storage(conf)


# --------------------------------------------------------------------------
# Starting and cancelling
# --------------------------------------------------------------------------


def start_bulk_job(
    customers: models.QuerySet[Customer],
    *,
    mode: str,
    user: Any = None,
    description: str = "",
    automatic: bool = False,
    chunk_size: int | None = None,
    dry_run: bool = False,
    run_here: bool = False,
) -> BulkJob:
    """Record a bulk job for ``customers`` and queue its export after commit.

    Returns at once whatever the size of the selection. With ``dry_run`` (or
    ``SATORI['DRY_RUN']``) the parts are written but nothing is uploaded.
    ``run_here``: the caller runs the job itself (:func:`run_job`, :func:`drive_job`),
    so no worker is asked to; should the caller die first, the sweep hands the
    unstarted job to a worker.
    """
    if customers.model is not Customer:
        raise TypeError("start_bulk_job() needs a queryset of Customer.")
    if mode not in BulkMode.values:
        raise ValueError(f"mode must be one of {', '.join(BulkMode.values)}, not {mode!r}.")
    if chunk_size is not None and not 1 <= int(chunk_size) <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}.")
    conf = get_settings()
    job = BulkJob.objects.create(
        mode=mode,
        query=pickle.dumps(customers.query),
        description=(description or "")[:255],
        automatic=automatic,
        dry_run=dry_run or conf.DRY_RUN,
        chunk_size=chunk_size,
        started_by=user if getattr(user, "is_authenticated", False) else None,
    )
    if not run_here:
        transaction.on_commit(lambda: enqueue_run(job.pk))
    return job


def job_queryset(job: BulkJob) -> models.QuerySet[Customer]:
    """The job's selection, rebuilt from its pickled query (written only by this module)."""
    queryset = Customer.objects.all()
    queryset.query = pickle.loads(bytes(job.query or b""))  # noqa: S301 - our own column, never user input
    return queryset


@dataclass(frozen=True)
class CancelResult:
    cancelled_parts: int
    uploaded_parts: int
    released: int
    already_done: bool = False

    def message(self) -> str:
        if self.already_done:
            return _("The job had already ended; nothing was cancelled.")
        parts, released, uploaded = self.cancelled_parts, self.released, self.uploaded_parts
        # One count per sentence, so that each is worded for its own number.
        sentences = [
            ngettext(
                "Cancelled %(n)d part not yet uploaded.",
                "Cancelled %(n)d parts not yet uploaded.",
                parts,
            )
            % {"n": parts},
            ngettext("%(n)d customer released.", "%(n)d customers released.", released)
            % {"n": released},
        ]
        if uploaded:
            sentences.append(
                ngettext(
                    "%(n)d part had already been uploaded: SATORI offers no way to recall an "
                    "upload, so it runs to the end and its results are still recorded.",
                    "%(n)d parts had already been uploaded: SATORI offers no way to recall an "
                    "upload, so they run to the end and their results are still recorded.",
                    uploaded,
                )
                % {"n": uploaded}
            )
        # English puts a space between sentences, Japanese none after "。".
        return "".join(
            sentence if i == 0 or sentences[i - 1].endswith("。") else " " + sentence
            for i, sentence in enumerate(sentences)
        )


def cancel_job(job: BulkJob | int) -> CancelResult:
    """Cancel what has not been uploaded yet. Uploaded parts cannot be recalled."""
    job_id = job if isinstance(job, int) else job.pk
    now = timezone.now()
    with transaction.atomic():
        job_row = BulkJob.objects.select_for_update().get(pk=job_id)
        if job_row.state in TERMINAL_STATES:
            return CancelResult(0, 0, 0, already_done=True)
        not_uploaded = Q(state__in=(BulkState.CREATED, BulkState.EXPORTING)) | Q(
            state=BulkState.UPLOADING, uploaded_at__isnull=True
        )
        part_ids = list(job_row.parts.filter(not_uploaded).values_list("pk", flat=True))
        cancelled = BulkPart.objects.filter(not_uploaded, pk__in=part_ids).update(
            state=BulkState.CANCELLED, finished_at=now, error=_("Cancelled before upload.")
        )
        # Only the parts cancelled here: an upload may have claimed one since the list
        # was read (the job's lock does not stop it), and that part keeps its customers.
        released = sum(
            outbox.release_part(pk)
            for pk in BulkPart.objects.filter(
                pk__in=part_ids, state=BulkState.CANCELLED
            ).values_list("pk", flat=True)
        )
        in_flight = job_row.parts.filter(
            state__in=(BulkState.UPLOADING, BulkState.PROCESSING)
        ).count()
        result = CancelResult(cancelled, in_flight, released)
        job_row.state = BulkState.CANCELLED
        job_row.error = result.message()
        if not in_flight:
            job_row.finished_at = now
        job_row.save(update_fields=["state", "error", "finished_at"])
    _refresh_job(job_id)
    return result


def refresh_job(job: BulkJob | int) -> int:
    """Ask SATORI now about every processing part of ``job``; returns how many were asked."""
    job_id = job if isinstance(job, int) else job.pk
    asked = 0
    for part_id in BulkPart.objects.filter(job_id=job_id, state=BulkState.PROCESSING).values_list(
        "pk", flat=True
    ):
        _outcome, delay = poll_part(part_id, force=True)
        asked += 1
        if delay is not None:
            enqueue_poll(part_id, delay)
    return asked


# --------------------------------------------------------------------------
# Queueing the next step (a broker outage only delays: see poll_overdue_parts)
# --------------------------------------------------------------------------


def enqueue_run(job_id: int) -> bool:
    return dispatch.dispatch_bulk_run(job_id)


def enqueue_upload(part_id: int, countdown: float = 0) -> bool:
    return dispatch.dispatch_bulk_upload(part_id, countdown)


def enqueue_poll(part_id: int, countdown: float = 0) -> bool:
    return dispatch.dispatch_bulk_poll(part_id, countdown)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def run_job(
    job_id: int,
    *,
    on_part_ready: Callable[[int], Any] | None = None,
    progress: Callable[[BulkJob, int], Any] | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> BulkJob:
    """Write the job's parts and hand each finished one to ``on_part_ready``.

    By default a part's upload is queued as a task; the ``--wait`` commands
    pass a function that uploads in-process instead.
    """
    now = timezone.now()
    claimed = BulkJob.objects.filter(pk=job_id, state=BulkState.CREATED).update(
        state=BulkState.EXPORTING, started_at=now
    )
    job = BulkJob.objects.get(pk=job_id)
    if not claimed:
        if job.state != BulkState.EXPORTING:
            return job  # a duplicate delivery: done already, or cancelled
        _recover_interrupted_export(job)
    export = _Export(
        job, get_settings(), on_part_ready or enqueue_upload, progress, max(1, progress_every)
    )
    try:
        export.run()
    except Exception as exc:
        _fail_export(job, exc)
        raise
    return BulkJob.objects.get(pk=job_id)


def _recover_interrupted_export(job: BulkJob) -> None:
    """A worker died while exporting (the task came back): start the export again.

    Parts already handed over keep their customers; the rest are released and
    the export runs again, skipping customers that are in a part already.
    """
    log.warning("Bulk job %s: the export was interrupted; starting it again.", job.pk)
    BulkPart.objects.filter(pk__in=_release_unfinished_parts(job)).delete()
    job.row_errors.filter(before_upload=True).delete()


def _fail_export(job: BulkJob, exc: BaseException) -> None:
    log.exception("Bulk job %s: the export failed.", job.pk)
    BulkPart.objects.filter(pk__in=_release_unfinished_parts(job)).update(
        state=BulkState.FAILED, error=_("The export stopped with an error.")
    )
    message = _(
        "The export stopped with an error (%(kind)s); customers not yet uploaded were released."
    ) % {"kind": type(exc).__name__}
    BulkJob.objects.filter(pk=job.pk, state=BulkState.EXPORTING).update(
        state=BulkState.UPLOADING, error=message
    )
    _refresh_job(job.pk)


def _release_unfinished_parts(job: BulkJob) -> list[int]:
    """Give back the customers of the parts an export was still writing; returns their ids."""
    part_ids = list(job.parts.filter(state=BulkState.EXPORTING).values_list("pk", flat=True))
    for part_id in part_ids:
        outbox.release_part(part_id)
    return part_ids


class _Export:
    def __init__(
        self,
        job: BulkJob,
        conf: SatoriSettings,
        on_part_ready: Callable[[int], Any],
        progress: Callable[[BulkJob, int], Any] | None,
        every: int,
    ) -> None:
        self.job = job
        self.every = every
        self.conf = conf
        self.on_part_ready = on_part_ready
        self.progress = progress
        self.size = min(job.chunk_size or conf.BULK_CHUNK_SIZE, MAX_CHUNK_SIZE)
        self.encoder = bulk_csv.RowEncoder(conf)
        self.number = job.parts.aggregate(n=models.Max("number"))["n"] or 0
        self.errors: list[BulkRowError] = []
        self.invalid = 0
        self.skipped = 0
        # Claiming is what makes a bulk job exclusive; a dry run changes no outbox row.
        self.claims = not job.dry_run
        self.settle_dry_run = job.dry_run and job.automatic

    def run(self) -> None:
        if self.claims:
            # The claims join the selection to the outbox: plans from stale statistics
            # (a large mark_for_sync a moment ago) made this take minutes instead of seconds.
            analyze_if_stale(SyncState, Customer)
        rows = _selection_rows(job_queryset(self.job), self.conf.BULK_EXPORT_ITERATOR_CHUNK)
        encoder = self.encoder
        encode = encoder._encode
        progress, every, size = self.progress, self.every, self.size
        rows = rows if progress is None else _counted(rows, every, progress, self.job)
        writer: bulk_csv.PartWriter | None = None
        # Bound methods in locals: this loop runs once per customer, a million times.
        members: list[tuple[int, str]] = []
        append = members.append
        write: Callable[[list[str]], Any] = list  # replaced when the first part starts
        try:
            for values in rows:
                try:
                    cells = encode(values)
                except SatoriValidationError as exc:
                    self._invalid(values, exc)
                    continue
                if writer is None:
                    writer = bulk_csv.PartWriter(encoder.header, self.conf.BULK_CSV_COLUMNS)
                    members, write = writer.members, writer.write_plain
                    append = members.append
                if encoder.row_has_cr:
                    writer.add(values[0], cells, True)
                else:
                    write(cells)
                    append((values[0], cells[0]))
                if len(members) >= size:
                    current, writer = writer, None
                    if not self._finish_part(current):
                        return
            if writer is not None:
                current, writer = writer, None
                if not self._finish_part(current):
                    return
        finally:
            if writer is not None:
                writer.close()
            self._flush_errors()
        self._done()

    # -- invalid rows -------------------------------------------------------------

    def _invalid(self, values: Sequence[Any], exc: SatoriValidationError) -> None:
        self.invalid += 1
        email = str(values[1] or "")[:255]
        self.errors.append(
            BulkRowError(
                job=self.job,
                email=email,
                customer_id=values[0],
                field=(exc.field or "")[:100],
                message=exc.message,
                before_upload=True,
            )
        )
        if len(self.errors) >= outbox.BATCH:
            self._flush_errors()

    def _flush_errors(self) -> None:
        if not self.errors:
            return
        errors, self.errors = self.errors, []
        BulkRowError.objects.bulk_create(errors, batch_size=outbox.BATCH)
        BulkJob.objects.filter(pk=self.job.pk).update(invalid_count=self.invalid)
        if self.claims:
            outbox.mark_invalid({e.email: e.message for e in errors})

    # -- parts ----------------------------------------------------------------------

    def _finish_part(self, writer: bulk_csv.PartWriter) -> bool:
        """Claim, save and hand over one part. False when the job was cancelled."""
        try:
            if BulkJob.objects.filter(pk=self.job.pk, state=BulkState.CANCELLED).exists():
                return False
            self.number += 1
            claimed: set[str] = set()
            # One commit for the part and its claim (on SQLite each commit is a disk sync).
            with transaction.atomic():
                part = BulkPart.objects.create(
                    job=self.job,
                    number=self.number,
                    state=BulkState.EXPORTING,
                    row_count=len(writer),
                )
                if self.claims:
                    claimed = outbox.claim_for_part(part, writer.members, self.conf)
            if self.claims:
                self.skipped += len(writer) - len(claimed)
                # claimed holds only members' e-mails: as many as rows means no duplicates.
                if len(claimed) < len(writer):
                    writer.keep_only(claimed)
            else:
                if writer.duplicates():
                    writer.keep_only({email for _pk, email in writer.members})
                if self.settle_dry_run:
                    outbox.settle_dry_run([email for _pk, email in writer.members])
            if not len(writer):
                part.delete()
                self.number -= 1
                return True
            name = bulk_files.save_part(self.conf, self.job.pk, part.number, writer.finish())
            ready = BulkState.CREATED if self.job.dry_run else BulkState.UPLOADING
            moved = BulkPart.objects.filter(pk=part.pk, state=BulkState.EXPORTING).update(
                state=ready, csv_file=name, row_count=len(writer)
            )
            if not moved:  # cancelled while we wrote it
                outbox.release_part(part.pk)
                return False
            self._count()
            if not self.job.dry_run:
                self.on_part_ready(part.pk)
            return True
        finally:
            writer.close()

    def _count(self) -> None:
        BulkJob.objects.filter(pk=self.job.pk).update(
            skipped_count=self.skipped,
            invalid_count=self.invalid,
            part_count=self.number,
            row_count=self._rows(),
        )

    def _rows(self) -> int:
        return (
            BulkPart.objects.filter(job_id=self.job.pk)
            .exclude(state=BulkState.CANCELLED)
            .aggregate(n=Sum("row_count"))["n"]
            or 0
        )

    def _done(self) -> None:
        self._count()
        now = timezone.now()
        if self.job.dry_run:
            BulkJob.objects.filter(pk=self.job.pk, state=BulkState.EXPORTING).update(
                state=BulkState.FINISHED, finished_at=now
            )
        else:
            BulkJob.objects.filter(pk=self.job.pk, state=BulkState.EXPORTING).update(
                state=BulkState.UPLOADING
            )
        _refresh_job(self.job.pk)


def _selection_rows(customers: models.QuerySet[Customer], page: int) -> Iterator[Sequence[Any]]:
    """The selection's ``VALUE_FIELDS`` in primary-key order, ``page`` rows per query.

    On SQLite each page is read whole and its cursor closed before the export writes
    (claims, parts): an open cursor holds a read transaction, which in rollback-journal
    mode keeps every other process from committing (the sweep, the web server) and in
    WAL mode makes this connection's next write fail at once once another process has
    written. Other databases stream through one server-side cursor.
    """
    rows = customers.order_by("pk").values_list(*bulk_csv.VALUE_FIELDS)
    if connections[rows.db].vendor != "sqlite":
        chunked = not connections[rows.db].settings_dict.get("DISABLE_SERVER_SIDE_CURSORS")
        yield from _read(rows, chunked=chunked, page=page)
        return
    last = None
    while True:
        chunk = list(
            _read(
                (rows if last is None else rows.filter(pk__gt=last))[:page],
                chunked=False,
                page=page,
            )
        )
        yield from chunk
        if len(chunk) < page:
            return
        last = chunk[-1][0]


def _read(rows: models.QuerySet[Any], *, chunked: bool, page: int) -> Iterator[Sequence[Any]]:
    """``rows`` (a ``values_list``) as lists, read with the query compiled by Django but
    without its per-row machinery: the columns that need converting (the JSON fields, a
    date on SQLite) are converted one by one, the rest are taken as the driver gives them.
    Reading the rows through ``values_list`` was the largest part of an export's time."""
    query = rows.query
    if query.extra_select or query.annotation_select:
        # values_list() puts such columns in its own order: leave it to Django.
        yield from (rows.iterator(chunk_size=page) if chunked else rows)
        return
    compiler = query.get_compiler(rows.db)
    results = compiler.execute_sql(MULTI, chunked_fetch=chunked, chunk_size=page)
    convert: Callable[[Sequence[Any]], list[Any]] | None = None
    for chunk in results:
        if convert is None:
            convert = _row_converter(compiler)
        yield from map(convert, chunk)


def _row_converter(compiler: Any) -> Callable[[Sequence[Any]], list[Any]]:
    """A function turning one database row into the values ``values_list`` gives."""
    connection = compiler.connection
    fields = [s[0] for s in compiler.select[0 : compiler.col_count]]
    steps: list[tuple[int, Callable[[Any], Any]]] = []
    # One scanner per read: its memo of object keys is its own (cleared after each value).
    decoder: Any = json.JSONDecoder()
    json_value = functools.partial(_json_value, scan=decoder.scan_once)
    for pos, (converters, expression) in compiler.get_converters(fields).items():
        if _plain_json(converters, expression):
            steps.append((pos, json_value))
            continue
        for converter in converters:
            if connection.vendor == "sqlite" and _name(converter) == "convert_datefield_value":
                steps.append((pos, _sqlite_date))  # the same, without the call's arguments
            else:
                steps.append((pos, functools.partial(_call, converter, expression, connection)))
    if not steps:
        return list

    def convert(row: Sequence[Any]) -> list[Any]:
        values = list(row)
        for pos, step in steps:
            values[pos] = step(values[pos])
        return values

    return convert


def _call(converter: Callable[..., Any], expression: Any, connection: Any, value: Any) -> Any:
    return converter(value, expression, connection)


def _name(function: Any) -> str:
    return str(getattr(function, "__name__", ""))


def _sqlite_date(value: Any) -> Any:
    """SQLite's ``convert_datefield_value``: dates come back as text."""
    if value is None or isinstance(value, dt.date):
        return value
    return parse_date(value)


def _plain_json(converters: list[Any], expression: Any) -> bool:
    """A JSONField column read whole, whose only conversion is ``json.loads``."""
    if len(converters) != 1 or type(expression) is not Col:
        return False
    field = getattr(converters[0], "__self__", None)
    return (
        isinstance(field, models.JSONField)
        and field.decoder is None
        and getattr(converters[0], "__func__", None) is models.JSONField.from_db_value
    )


def _json_value(value: Any, scan: Callable[[str, int], tuple[Any, int]]) -> Any:
    """``JSONField.from_db_value`` for a column read whole. The decoder's scanner (C) is
    called directly: ``json.loads`` spent most of its time around it, checking for
    whitespace the database never puts there. Anything else is ``json.loads``'s."""
    if value is None:
        return None
    try:
        decoded, end = scan(value, 0)
        if end == len(value):
            return decoded
    except (StopIteration, ValueError, TypeError):
        pass
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _counted(
    rows: Iterable[T], every: int, progress: Callable[[BulkJob, int], Any], job: BulkJob
) -> Iterator[T]:
    """``rows``, calling ``progress`` every ``every`` rows (kept out of the plain loop)."""
    for seen, values in enumerate(rows, start=1):
        if seen % every == 0:
            progress(job, seen)
        yield values


# --------------------------------------------------------------------------
# Upload
# --------------------------------------------------------------------------


def upload_part(part_id: int) -> tuple[str, float | None]:
    """Upload one part. Returns (outcome, seconds until the next step or None).

    Outcomes: "uploaded" (poll after the delay), "retry" (upload again after
    the delay), "failed", "held" (the answer was lost and a person decides),
    "busy" (another task has it, or it is not due yet).
    """
    conf = get_settings()
    now = timezone.now()
    claimed = BulkPart.objects.filter(
        pk=part_id, state=BulkState.UPLOADING, uploaded_at__isnull=True, held=False
    ).update(uploaded_at=now, upload_attempts=F("upload_attempts") + 1, next_poll_at=None)
    if not claimed:
        return "busy", None
    part = BulkPart.objects.select_related("job").get(pk=part_id)
    job = part.job
    endpoint = "bulk_customers/%s.json" % (
        "registration" if job.mode == BulkMode.REGISTRATION else "upsert"
    )
    started = time.monotonic()
    try:
        client = get_client()
        send = client.bulk_register if job.mode == BulkMode.REGISTRATION else client.bulk_upsert
        with bulk_storage(conf).open(str(part.csv_file.name), "rb") as fileobj:
            result = send(
                cast(BinaryIO, fileobj),
                identity_type=job.identity_type,
                filename=f"customers-{job.pk}-{part.number}.csv",
            )
    except SatoriError as exc:
        return _upload_failed(part, exc, endpoint, started, conf)
    except OSError as exc:  # the stored file is gone (storage cleaned, wrong BULK_STORAGE)
        message = _("The part's CSV file could not be read from storage (%(kind)s).") % {
            "kind": type(exc).__name__
        }
        _fail_part(part.pk, message)
        return "failed", None
    now = timezone.now()
    delay = conf.BULK_POLL_INTERVAL_SECONDS
    BulkPart.objects.filter(pk=part.pk).update(
        state=BulkState.PROCESSING,
        process_code=result.process_code,
        uploaded_at=now,
        next_poll_at=now + dt.timedelta(seconds=delay),
    )
    history.log(
        endpoint,
        SyncLog.Outcome.OK,
        status=result.status,
        started=started,
        request=result.request_summary,
        response=result.response_summary,
        message=ngettext(
            "Job %(job)s part %(part)s: %(rows)d row uploaded.",
            "Job %(job)s part %(part)s: %(rows)d rows uploaded.",
            part.row_count,
        )
        % {"job": job.pk, "part": part.number, "rows": part.row_count},
    )
    _refresh_job(job.pk)
    return "uploaded", delay


def _upload_failed(
    part: BulkPart, exc: SatoriError, endpoint: str, started: float, conf: SatoriSettings
) -> tuple[str, float | None]:
    attempt = part.upload_attempts
    if exc.answer_lost:
        history.log(
            endpoint,
            SyncLog.Outcome.FAILED,
            status=exc.status,
            started=started,
            attempt=attempt,
            request=getattr(exc, "request_summary", {}),
            message=str(exc),
        )
        return _upload_unanswered(part, str(exc), conf)
    retry = exc.retryable and attempt < conf.BULK_UPLOAD_ATTEMPTS
    history.log(
        endpoint,
        SyncLog.Outcome.RETRY if retry else SyncLog.Outcome.FAILED,
        status=exc.status,
        started=started,
        attempt=attempt,
        request=getattr(exc, "request_summary", {}),
        response=getattr(exc, "response_summary", {}),
        message=str(exc),
    )
    if retry:
        # SATORI answered (a 5xx, a 429): most likely it did not take the file. Lost
        # answers, where it may well have, are handled above.
        delay = outbox.backoff(attempt, conf, getattr(exc, "retry_after", None))
        note = _(
            "Upload attempt %(n)d failed: %(error)s. Trying again in %(delay)d s. If "
            "SATORI received the file before the error, it may process these rows "
            "twice; for upserts that is harmless."
        ) % {"n": attempt, "error": str(exc), "delay": int(delay)}
        BulkPart.objects.filter(pk=part.pk, state=BulkState.UPLOADING).update(
            uploaded_at=None, error=note
        )
        return "retry", delay
    if exc.retryable:
        message = _(
            "SATORI did not take the file after %(n)d attempts: %(error)s. If one of "
            "them reached SATORI, it may still process these rows."
        ) % {"n": attempt, "error": str(exc)}
    else:
        column = _refused_column(part, exc, conf)
        if column:
            message = _(
                "SATORI refused the column %(column)s of the file: %(error)s. If SATORI does "
                "not take that column, list the columns it takes in "
                "SATORI['BULK_CSV_COLUMNS']."
            ) % {"column": column, "error": str(exc)}
        else:
            message = _("SATORI refused the file: %(error)s") % {"error": str(exc)}
    _fail_part(part.pk, message)
    return "failed", None


def _refused_column(part: BulkPart, exc: SatoriError, conf: SatoriSettings) -> str:
    """The column of the part's header that SATORI's refusal names, if any."""
    if not isinstance(exc, SatoriValidationError):
        return ""
    try:
        with bulk_storage(conf).open(str(part.csv_file.name), "rb") as fileobj:
            columns = next(bulk_csv.read_header(fileobj), [])
    except OSError:
        return ""
    return _field_in(exc.message, columns)


def _upload_unanswered(
    part: BulkPart, error: str, conf: SatoriSettings
) -> tuple[str, float | None]:
    """An upload's answer was lost: SATORI may have the file, and has no idempotency
    key, so a blind re-send can make it process the rows twice, or an old copy after
    newer data. Sent again at most once, after ``BULK_RESEND_WAIT_SECONDS``, or held
    for a person (``BULK_RESEND_UNANSWERED = "never"``)."""
    unanswered = part.unanswered_uploads + 1
    earlier = part.error + "\n" if part.unanswered_uploads and part.error else ""
    lost = _("Upload attempt %(n)d: the answer was lost (%(error)s); SATORI may have the file.") % {
        "n": part.upload_attempts,
        "error": error,
    }
    mine = BulkPart.objects.filter(pk=part.pk, state=BulkState.UPLOADING)
    if unanswered > 1:
        mine.update(unanswered_uploads=unanswered)
        _fail_part(
            part.pk,
            earlier
            + lost
            + " "
            + _(
                "Not sent a third time: its customers were put back to be sent again. "
                "SATORI may still process one of the uploads."
            ),
        )
        return "failed", None
    if conf.BULK_RESEND_UNANSWERED == "never":
        mine.update(
            unanswered_uploads=unanswered,
            held=True,
            error=lost
            + " "
            + _(
                "Not sent again (SATORI['BULK_RESEND_UNANSWERED'] is \"never\"): check "
                "SATORI's import history, then re-send the upload or give it up."
            ),
        )
        _refresh_job(part.job_id)
        return "held", None
    wait = conf.BULK_RESEND_WAIT_SECONDS
    mine.update(
        unanswered_uploads=unanswered,
        uploaded_at=None,
        next_poll_at=timezone.now() + dt.timedelta(seconds=wait),
        error=lost
        + " "
        + _(
            "It is sent once more in %(wait)d s (SATORI['BULK_RESEND_WAIT_SECONDS']); should "
            "both reach SATORI, the rows are processed twice, which changes nothing for upserts."
        )
        % {"wait": int(wait)},
    )
    return "retry", wait


def resend_held(job: BulkJob | int) -> int:
    """A person chose to upload the held parts of ``job`` again; returns how many."""
    job_id = job if isinstance(job, int) else job.pk
    part_ids = list(
        BulkPart.objects.filter(job_id=job_id, state=BulkState.UPLOADING, held=True).values_list(
            "pk", flat=True
        )
    )
    BulkPart.objects.filter(pk__in=part_ids, held=True).update(
        held=False, uploaded_at=None, next_poll_at=None
    )
    for part_id in part_ids:
        enqueue_upload(part_id)
    return len(part_ids)


def give_up_held(job: BulkJob | int) -> int:
    """A person chose not to upload the held parts again: they fail, and their customers
    go back to be sent again. Returns how many."""
    job_id = job if isinstance(job, int) else job.pk
    part_ids = list(
        BulkPart.objects.filter(job_id=job_id, state=BulkState.UPLOADING, held=True).values_list(
            "pk", flat=True
        )
    )
    for part_id in part_ids:
        _fail_part(
            part_id,
            _(
                "Given up after its upload's answer was lost: its customers were put back to "
                "be sent again. SATORI may still process the upload it may have."
            ),
        )
    return len(part_ids)


def _fail_part(part_id: int, message: str) -> None:
    """The part is over without results: its customers go back (see _release_part)."""
    conf = get_settings()
    now = timezone.now()
    moved = (
        BulkPart.objects.filter(pk=part_id)
        .exclude(state__in=TERMINAL_STATES)
        .update(state=BulkState.FAILED, error=message, finished_at=now, next_poll_at=None)
    )
    if moved:
        outbox.release_part(part_id, error=message, hold_seconds=conf.RETRY_BACKOFF_MAX_SECONDS)
        part = BulkPart.objects.get(pk=part_id)
        # The message may quote SATORI, whose errors can name a customer's address.
        log.warning(
            "Bulk job %s part %s failed: %s", part.job_id, part.number, for_log(message, conf)
        )
        _refresh_job(part.job_id)


# --------------------------------------------------------------------------
# Status and results
# --------------------------------------------------------------------------


def poll_delay(poll_count: int, conf: SatoriSettings) -> float:
    """Seconds before the next status check: growing from the interval to the maximum."""
    grown = conf.BULK_POLL_INTERVAL_SECONDS * 1.5 ** max(0, poll_count - 1)
    return max(conf.BULK_POLL_INTERVAL_SECONDS, min(conf.BULK_POLL_MAX_INTERVAL_SECONDS, grown))


def poll_part(part_id: int, *, force: bool = False) -> tuple[str, float | None]:
    """Ask SATORI how one uploaded part is doing; apply its results when finished.

    Returns (outcome, seconds until the next check or None when there is
    nothing more to do). Outcomes: "processing", "finished", "failed",
    "not_due" (someone else checks it, or it is not time yet).
    """
    conf = get_settings()
    now = timezone.now()
    due = BulkPart.objects.filter(pk=part_id, state=BulkState.PROCESSING)
    if not force:
        due = due.filter(
            Q(next_poll_at__isnull=True) | Q(next_poll_at__lte=now + dt.timedelta(seconds=1))
        )
    claimed = due.update(
        next_poll_at=now + dt.timedelta(seconds=POLL_CLAIM_SECONDS),
        poll_count=F("poll_count") + 1,
        last_polled_at=now,
    )
    if not claimed:
        return "not_due", None
    part = BulkPart.objects.get(pk=part_id)
    BulkJob.objects.filter(pk=part.job_id).update(last_polled_at=now)
    uploaded = part.uploaded_at or now
    if (now - uploaded).total_seconds() > conf.BULK_DEADLINE_SECONDS:
        _fail_part(
            part.pk,
            _(
                "SATORI had not finished this part %(hours).1f hours after the upload "
                "(SATORI['BULK_DEADLINE_SECONDS']); its customers were put back so they are sent "
                "again. SATORI may still apply the rows later."
            )
            % {"hours": conf.BULK_DEADLINE_SECONDS / 3600},
        )
        return "failed", None
    started = time.monotonic()
    try:
        status = get_client().bulk_status(part.process_code)
    except SatoriNotFoundError as exc:
        history.log(
            "bulk_customers/status.json",
            SyncLog.Outcome.FAILED,
            status=exc.status,
            started=started,
            message=str(exc),
        )
        _fail_part(
            part.pk,
            _(
                "SATORI no longer knows process code %(code)s (expired or unknown): %(error)s. "
                "The results cannot be read, so its customers were put back to be sent again."
            )
            % {"code": part.process_code, "error": str(exc)},
        )
        return "failed", None
    except SatoriError as exc:
        history.log(
            "bulk_customers/status.json",
            SyncLog.Outcome.RETRY if exc.retryable else SyncLog.Outcome.FAILED,
            status=exc.status,
            started=started,
            message=str(exc),
        )
        if not exc.retryable:
            _fail_part(
                part.pk, _("SATORI refused the status request: %(error)s") % {"error": str(exc)}
            )
            return "failed", None
        delay = max(poll_delay(part.poll_count, conf), float(getattr(exc, "retry_after", 0) or 0))
        BulkPart.objects.filter(pk=part.pk, state=BulkState.PROCESSING).update(
            next_poll_at=timezone.now() + dt.timedelta(seconds=delay),
            error=_("Last status check failed: %(error)s") % {"error": str(exc)},
        )
        return "processing", delay
    if not status.finished:
        delay = poll_delay(part.poll_count, conf)
        BulkPart.objects.filter(pk=part.pk, state=BulkState.PROCESSING).update(
            next_poll_at=timezone.now() + dt.timedelta(seconds=delay), error=""
        )
        return "processing", delay
    apply_results(part, [(row.row_number, row.message) for row in status.failed_rows])
    history.log(
        "bulk_customers/status.json",
        SyncLog.Outcome.OK,
        status=status.status,
        started=started,
        request=status.request_summary,
        response={
            "process_status": status.process_status,
            "succeeded_rows": len(status.succeeded_rows),
            "failed_rows": len(status.failed_rows),
        },
        message=_("Job %(job)s part %(part)s finished.")
        % {"job": part.job_id, "part": part.number},
    )
    return "finished", None


def _field_in(message: str, columns: Iterable[str]) -> str:
    """The first CSV column SATORI's message names, if any."""
    best: tuple[int, str] | None = None
    for name in columns:
        hit = re.search(rf"(?<![A-Za-z0-9_:]){re.escape(name)}(?![A-Za-z0-9_])", message)
        if hit and (best is None or hit.start() < best[0]):
            best = (hit.start(), name)
    return best[1] if best else ""


def apply_results(part: BulkPart, failed_rows: Iterable[tuple[int, str]]) -> bool:
    """Write a finished part's results back to its customers, in batches.

    ``failed_rows`` are SATORI's (row_number, message); row 1 is the header.
    Every other row of the file succeeded. A customer saved while the job ran
    goes back to pending for its newer version. Returns False if another
    check applied them first.
    """
    conf = get_settings()
    failed = dict(failed_rows)
    now = timezone.now()
    with transaction.atomic():
        won = BulkPart.objects.filter(pk=part.pk, state=BulkState.PROCESSING).update(
            state=BulkState.FINISHED, finished_at=now, next_poll_at=None, error=""
        )
        if not won:
            return False
        failed_by_email: dict[str, tuple[int, str]] = {}
        tags_by_email: dict[str, list[str]] = {}
        columns: list[str] = []
        with bulk_storage(conf).open(str(part.csv_file.name), "rb") as fileobj:
            for row_number, columns, cells in bulk_csv.read_rows(fileobj):
                email = cells[columns.index("email")]
                message = failed.pop(row_number, None)
                if message is not None:
                    failed_by_email[email] = (row_number, message)
                    continue
                tags = cells[columns.index("append_tags")] if "append_tags" in columns else ""
                if tags:
                    tags_by_email[email] = tags.split(conf.TAG_SEPARATOR)
        members = outbox.part_members(part)
        _record_row_errors(part, failed_by_email, members, columns)
        pending = outbox.write_part_results(
            part,
            members,
            {email: message for email, (_row, message) in failed_by_email.items()},
            tags_by_email,
        )
        succeeded = len([email for email in members if email not in failed_by_email])
        note = ""
        if failed:
            note = ngettext(
                "SATORI reported %(n)d failed row number that is not in the file: %(rows)s.",
                "SATORI reported %(n)d failed row numbers that are not in the file: %(rows)s.",
                len(failed),
            ) % {"n": len(failed), "rows": ", ".join(map(str, sorted(failed)[:20]))}
        BulkPart.objects.filter(pk=part.pk).update(
            succeeded_count=succeeded, failed_count=len(failed_by_email), error=note
        )
    if pending and len(pending) <= conf.BULK_THRESHOLD:
        dispatch.dispatch_many(pending)  # saved during the job: send the newer version
    _refresh_job(part.job_id)
    return True


def _record_row_errors(
    part: BulkPart,
    failed_by_email: dict[str, tuple[int, str]],
    members: dict[str, outbox.PartMember],
    columns: list[str],
) -> None:
    errors = [
        BulkRowError(
            job_id=part.job_id,
            part=part,
            row_number=row_number,
            email=email[:255],
            customer_id=members[email][1] if email in members else None,
            field=_field_in(message, columns)[:100],
            message=message,
        )
        for email, (row_number, message) in failed_by_email.items()
    ]
    BulkRowError.objects.bulk_create(errors, batch_size=outbox.BATCH)


def _refresh_job(job_id: int) -> None:
    """Recount the job from its parts and settle its state once every part has ended."""
    now = timezone.now()
    with transaction.atomic():
        job = BulkJob.objects.select_for_update().get(pk=job_id)
        parts = job.parts.all()
        totals = parts.exclude(state=BulkState.CANCELLED).aggregate(
            rows=Sum("row_count"), ok=Sum("succeeded_count"), bad=Sum("failed_count")
        )
        states = list(parts.values_list("state", flat=True))
        job.row_count = totals["rows"] or 0
        job.succeeded_count = totals["ok"] or 0
        job.failed_count = totals["bad"] or 0
        job.part_count = len(states)
        fields = ["row_count", "succeeded_count", "failed_count", "part_count"]
        if job.state in (BulkState.UPLOADING, BulkState.PROCESSING, BulkState.CANCELLED):
            live = [s for s in states if s not in TERMINAL_STATES]
            done = [s for s in states if s != BulkState.CANCELLED]
            if job.state == BulkState.CANCELLED:
                new_state = BulkState.CANCELLED  # in-flight parts still run to the end
            elif any(s in (BulkState.UPLOADING, BulkState.EXPORTING) for s in live):
                new_state = BulkState.UPLOADING
            elif live:
                new_state = BulkState.PROCESSING
            elif done and all(s == BulkState.FAILED for s in done):
                new_state = BulkState.FAILED
            else:
                new_state = BulkState.FINISHED
            if not live and job.finished_at is None:
                job.finished_at = now
                fields.append("finished_at")
            if new_state != job.state:
                job.state = new_state
                fields.append("state")
        job.save(update_fields=fields)


# --------------------------------------------------------------------------
# Safety net (called by sync.sweep every minute)
# --------------------------------------------------------------------------


def poll_overdue_parts(now: dt.datetime) -> int:
    """Find bulk work whose task was lost and queue it again; returns how many were queued.

    Status checks long overdue, uploads never picked up, exports never
    started. An upload claimed long ago without a process code was cut off
    mid-way: its answer is lost, as after a timeout (``_upload_unanswered``).
    """
    conf = get_settings()
    grace = dt.timedelta(seconds=max(60.0, conf.BULK_POLL_MAX_INTERVAL_SECONDS))
    queued = 0
    overdue = BulkPart.objects.filter(state=BulkState.PROCESSING).filter(
        Q(next_poll_at__isnull=True) | Q(next_poll_at__lt=now - grace)
    )
    for part_id in overdue.values_list("pk", flat=True)[:1000]:
        queued += enqueue_poll(part_id)
    waiting = BulkPart.objects.filter(
        state=BulkState.UPLOADING,
        uploaded_at__isnull=True,
        held=False,
        job__started_at__lt=now - grace,
    ).filter(Q(next_poll_at__isnull=True) | Q(next_poll_at__lte=now))  # a re-send's wait
    for part_id in waiting.values_list("pk", flat=True)[:1000]:
        queued += enqueue_upload(part_id)
    cut_off = BulkPart.objects.filter(
        state=BulkState.UPLOADING,
        process_code="",
        held=False,
        uploaded_at__lt=now - dt.timedelta(seconds=UPLOAD_STALE_SECONDS),
    )
    for part in cut_off.select_related("job")[:1000]:
        # The worker uploading it died: the answer is lost like any other.
        outcome, delay = _upload_unanswered(part, _("the upload was interrupted"), conf)
        if outcome == "retry":
            queued += enqueue_upload(part.pk, delay or 0)
    unstarted = BulkJob.objects.filter(state=BulkState.CREATED, created_at__lt=now - grace)
    for job_id in unstarted.values_list("pk", flat=True)[:100]:
        queued += enqueue_run(job_id)
    return queued


# --------------------------------------------------------------------------
# Running a job in this process (commands with --wait, no worker needed)
# --------------------------------------------------------------------------


def drive_job(
    job_id: int,
    *,
    progress: Callable[[BulkJob, int], Any] | None = None,
    progress_every: int = PROGRESS_EVERY,
    on_tick: Callable[[BulkJob], Any] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
    timeout: float | None = None,
) -> BulkJob:
    """Run every step of a job in this process until it ends (for cron without Celery).

    Waiting happens here, in the command's own process, never in a worker.
    """
    due: dict[int, tuple[float, str]] = {}

    def ready(part_id: int) -> None:
        due[part_id] = (time.monotonic(), "upload")

    job = run_job(job_id, on_part_ready=ready, progress=progress, progress_every=progress_every)
    started = time.monotonic()
    while True:
        now = time.monotonic()
        for part_id, (when, step) in sorted(due.items(), key=lambda item: item[1][0]):
            if when > now:
                continue
            del due[part_id]
            if step == "upload":
                outcome, delay = upload_part(part_id)
                if outcome in ("uploaded", "retry") and delay is not None:
                    due[part_id] = (
                        time.monotonic() + delay,
                        "poll" if outcome == "uploaded" else "upload",
                    )
            else:
                outcome, delay = poll_part(part_id, force=True)
                if delay is not None:
                    due[part_id] = (time.monotonic() + delay, "poll")
        job = BulkJob.objects.get(pk=job_id)
        if on_tick is not None:
            on_tick(job)
        if not due or job.state in TERMINAL_STATES:
            return job
        if timeout is not None and time.monotonic() - started > timeout:
            return job
        sleep(max(0.05, min(when for when, _step in due.values()) - time.monotonic()))
