"""What ``satori_bulk_upsert`` and ``satori_bulk_register`` share (not a command itself).

Exit codes: 0 the job finished (rows SATORI refused are listed, on stderr),
1 the job failed, was cancelled, or ``--wait`` ran out of time, 2 wrong usage.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import bulk
from django_satori.models import BulkJob, BulkState, Customer, SyncStatus

USAGE = 2
FAILURE = 1
#: Row errors printed at the end of a run.
ERRORS_SHOWN = 20


def usage_error(message: str) -> CommandError:
    return CommandError(message, returncode=USAGE)


class BulkCommand(BaseCommand):
    mode: str = "upsert"

    def add_arguments(self, parser: CommandParser) -> None:
        select = parser.add_argument_group(_("which customers (combined with AND)"))
        select.add_argument("--all", action="store_true", help=_("Every customer."))
        select.add_argument(
            "--pending",
            action="store_true",
            help=_("Customers waiting to be sent (sync status pending)."),
        )
        select.add_argument(
            "--status",
            action="append",
            default=[],
            metavar="STATUS",
            choices=SyncStatus.values,
            help=_("Sync status, repeatable: %(choices)s.")
            % {"choices": ", ".join(SyncStatus.values)},
        )
        select.add_argument(
            "--email-domain",
            action="append",
            default=[],
            metavar="DOMAIN",
            help=_("E-mail domain, repeatable (example.jp)."),
        )
        select.add_argument(
            "--created-since",
            metavar="DATE",
            help=_("Created on or after this date (YYYY-MM-DD) or time."),
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help=_(
                "Write the CSV parts and report invalid rows; upload "
                "nothing and change no sync state."
            ),
        )
        parser.add_argument(
            "--chunk-size",
            type=int,
            metavar="ROWS",
            help=_("Rows per uploaded file (at most %(max)d).") % {"max": bulk.MAX_CHUNK_SIZE},
        )
        parser.add_argument(
            "--wait",
            action="store_true",
            help=_(
                "Run the whole job in this process and wait for SATORI (no Celery worker needed)."
            ),
        )
        parser.add_argument(
            "--timeout",
            type=float,
            metavar="SECONDS",
            help=_("With --wait: give up waiting after this long."),
        )
        parser.add_argument(
            "--progress-every",
            type=int,
            default=10_000,
            metavar="ROWS",
            help=_("Print progress every this many rows."),
        )

    # -- selection -------------------------------------------------------------------

    def selection(self, options: dict[str, Any]) -> tuple[QuerySet[Customer], str]:
        chosen = (
            options["all"]
            or options["pending"]
            or options["status"]
            or options["email_domain"]
            or options["created_since"]
        )
        if not chosen:
            raise usage_error(
                _(
                    "Choose the customers: --all, --pending, --status, "
                    "--email-domain or --created-since."
                )
            )
        queryset = Customer.objects.all()
        described: list[str] = []
        statuses = list(options["status"])
        if options["pending"]:
            statuses.append(SyncStatus.PENDING)
        if statuses:
            queryset = queryset.filter(sync_state__status__in=statuses)
            described.append("status=" + ",".join(statuses))
        domains = [d.strip().lstrip("@").lower() for d in options["email_domain"] if d.strip()]
        if domains:
            match = Q()
            for domain in domains:
                match |= Q(email__iendswith="@" + domain)
            queryset = queryset.filter(match)
            described.append("domain=" + ",".join(domains))
        if options["created_since"]:
            since = self._moment(options["created_since"])
            queryset = queryset.filter(created_at__gte=since)
            described.append("created_since=" + options["created_since"])
        if options["all"] and not described:
            described.append("all")
        return queryset, _("Command: %(filters)s") % {"filters": " ".join(described)}

    @staticmethod
    def _moment(text: str) -> dt.datetime:
        moment = parse_datetime(text)
        if moment is None:
            day = parse_date(text)
            if day is None:
                raise usage_error(
                    _("--created-since needs YYYY-MM-DD or an ISO date-time, not %(value)r.")
                    % {"value": text}
                )
            moment = dt.datetime.combine(day, dt.time.min)
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment)
        return moment

    # -- running ----------------------------------------------------------------------

    def handle(self, *args: Any, **options: Any) -> None:
        chunk = options["chunk_size"]
        if chunk is not None and not 1 <= chunk <= bulk.MAX_CHUNK_SIZE:
            raise usage_error(
                _("--chunk-size must be between 1 and %(max)d.") % {"max": bulk.MAX_CHUNK_SIZE}
            )
        if options["timeout"] is not None and not options["wait"]:
            raise usage_error(_("--timeout only makes sense with --wait."))
        queryset, description = self.selection(options)
        self.every = max(1, options["progress_every"])
        with transaction.atomic():
            job = bulk.start_bulk_job(
                queryset,
                mode=self.mode,
                description=description,
                chunk_size=chunk,
                dry_run=options["dry_run"],
                # Exported here: a worker asked too would export it a second time.
                run_here=options["wait"] or options["dry_run"],
            )
        self.stdout.write(
            _("Bulk job #%(id)d (%(mode)s) created.")
            % {"id": job.pk, "mode": job.get_mode_display()}
        )
        if options["dry_run"]:
            job = bulk.run_job(job.pk, progress=self._progress, progress_every=self.every)
            self._report(job)
            return
        if not options["wait"]:
            self.stdout.write(
                _(
                    "A Celery worker writes and uploads it; follow it with "
                    "`manage.py satori_bulk_status --job %(id)d`."
                )
                % {"id": job.pk}
            )
            return
        job = bulk.drive_job(
            job.pk,
            progress=self._progress,
            progress_every=self.every,
            on_tick=self._tick,
            timeout=options["timeout"],
        )
        self._report(job)
        if job.state not in bulk.TERMINAL_STATES:
            raise CommandError(
                _(
                    "Gave up waiting: job #%(id)d is still %(state)s. It goes on "
                    "with a worker, or run this again with --wait."
                )
                % {"id": job.pk, "state": job.get_state_display()},
                returncode=FAILURE,
            )
        if job.state != BulkState.FINISHED:
            raise CommandError(
                _("Job #%(id)d ended %(state)s: %(error)s")
                % {
                    "id": job.pk,
                    "state": job.get_state_display(),
                    "error": job.error or self._part_errors(job),
                },
                returncode=FAILURE,
            )

    def _progress(self, job: BulkJob, rows: int) -> None:
        self.stderr.write(
            ngettext("… %(rows)d row read", "… %(rows)d rows read", rows) % {"rows": rows}
        )

    def _tick(self, job: BulkJob) -> None:
        key = (job.state, job.succeeded_count, job.failed_count)
        if key != getattr(self, "_last_tick", None):
            self._last_tick = key
            self.stderr.write(
                ngettext(
                    "… %(state)s: %(done)d of %(rows)d row done in SATORI",
                    "… %(state)s: %(done)d of %(rows)d rows done in SATORI",
                    job.row_count,
                )
                % {
                    "state": job.get_state_display(),
                    "done": job.succeeded_count + job.failed_count,
                    "rows": job.row_count,
                }
            )

    @staticmethod
    def _part_errors(job: BulkJob) -> str:
        return "; ".join(f"{p.number}: {p.error}" for p in job.parts.exclude(error=""))

    def _report(self, job: BulkJob) -> None:
        write = self.stdout.write
        write(
            _(
                "Job #%(id)d: %(state)s. Rows: %(rows)d, succeeded: %(ok)d, failed: %(bad)d, "
                "left out as invalid: %(invalid)d, left out as busy: %(busy)d, parts: %(parts)d."
            )
            % {
                "id": job.pk,
                "state": job.get_state_display(),
                "rows": job.row_count,
                "ok": job.succeeded_count,
                "bad": job.failed_count,
                "invalid": job.invalid_count,
                "busy": job.skipped_count,
                "parts": job.part_count,
            }
        )
        for part in job.parts.all():
            write(
                ngettext(
                    "  part %(n)d: %(state)s, %(rows)d row, file %(file)s%(error)s",
                    "  part %(n)d: %(state)s, %(rows)d rows, file %(file)s%(error)s",
                    part.row_count,
                )
                % {
                    "n": part.number,
                    "state": part.get_state_display(),
                    "rows": part.row_count,
                    "file": part.csv_file.name or "—",
                    "error": f" — {part.error}" if part.error else "",
                }
            )
        errors = job.row_errors.order_by("part__number", "row_number", "id")
        total = errors.count()
        if total:
            out = self.stderr
            out.write(ngettext("%(n)d row error:", "%(n)d row errors:", total) % {"n": total})
            for error in errors[:ERRORS_SHOWN]:
                where = (
                    _("before upload")
                    if error.before_upload
                    else _("part %(p)s row %(r)s")
                    % {"p": error.part.number if error.part else "", "r": error.row_number}
                )
                out.write(f"  {error.email} [{where}] {error.field}: {error.message}")
            if total > ERRORS_SHOWN:
                out.write(_("  … and %(n)d more (see the admin).") % {"n": total - ERRORS_SHOWN})
        sys.stdout.flush()
