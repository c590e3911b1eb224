"""``manage.py satori_bulk_status``: ask SATORI about running bulk jobs now and list them.

Exit codes: 0 listed, 1 the job given with ``--job`` does not exist or a
status check failed to reach SATORI, 2 wrong usage.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import bulk
from django_satori.models import BulkJob, BulkPart, BulkState

from ._bulk import ERRORS_SHOWN, FAILURE


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Check the bulk jobs still processing in SATORI now, then print a table of jobs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--job", type=int, metavar="ID", help=_("Only this job, with its parts and row errors.")
        )
        parser.add_argument(
            "--limit", type=int, default=20, help=_("How many recent jobs to list.")
        )
        parser.add_argument(
            "--no-refresh",
            action="store_true",
            help=_("Only print what is known; do not ask SATORI."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        jobs = BulkJob.objects.all()
        if options["job"] is not None:
            jobs = jobs.filter(pk=options["job"])
            if not jobs.exists():
                raise CommandError(
                    _("There is no bulk job #%(id)d.") % {"id": options["job"]}, returncode=FAILURE
                )
        if not options["no_refresh"]:
            parts = BulkPart.objects.filter(state=BulkState.PROCESSING, job__in=jobs)
            for part_id in parts.values_list("pk", flat=True):
                outcome, delay = bulk.poll_part(part_id, force=True)
                self.stderr.write(
                    _("part %(id)d: %(outcome)s") % {"id": part_id, "outcome": outcome}
                )
                if delay is not None:
                    bulk.enqueue_poll(part_id, delay)
        self._table(list(jobs.select_related("started_by")[: max(1, options["limit"])]))
        if options["job"] is not None:
            self._details(BulkJob.objects.get(pk=options["job"]))

    def _table(self, jobs: list[BulkJob]) -> None:
        columns = (
            _("job"),
            _("mode"),
            _("state"),
            _("rows"),
            _("succeeded"),
            _("failed"),
            _("invalid"),
            _("parts"),
            _("created"),
            _("selection"),
        )
        rows = [
            [
                str(job.pk),
                job.mode,
                job.state,
                str(job.row_count),
                str(job.succeeded_count),
                str(job.failed_count),
                str(job.invalid_count),
                str(job.part_count),
                job.created_at.strftime("%Y-%m-%d %H:%M"),
                job.description,
            ]
            for job in jobs
        ]
        if not rows:
            self.stdout.write(_("No bulk jobs."))
            return
        widths = [
            max(_width(str(c)) for c in column) for column in zip(columns, *rows, strict=False)
        ]
        for line in (columns, *rows):
            cells = (str(c) + " " * (w - _width(str(c))) for c, w in zip(line, widths, strict=True))
            self.stdout.write("  ".join(cells).rstrip())

    def _details(self, job: BulkJob) -> None:
        if job.error:
            self.stdout.write(_("Error: %(error)s") % {"error": job.error})
        for part in job.parts.all():
            # Two counted nouns in one line: each is worded for its own number first.
            # Translators: the number of rows in a bulk job's part (its CSV file).
            rows = ngettext("%(n)d row", "%(n)d rows", part.row_count) % {"n": part.row_count}
            # Translators: how many times SATORI was asked about the part's progress.
            polls = ngettext("%(n)d check", "%(n)d checks", part.poll_count) % {
                "n": part.poll_count
            }
            self.stdout.write(
                _(
                    "part %(n)d: %(state)s, %(rows)s (%(ok)d ok, %(bad)d failed), process "
                    "code %(code)s, %(polls)s%(error)s"
                )
                % {
                    "n": part.number,
                    "state": part.get_state_display(),
                    "rows": rows,
                    "ok": part.succeeded_count,
                    "bad": part.failed_count,
                    "code": part.process_code or "—",
                    "polls": polls,
                    "error": f" — {part.error}" if part.error else "",
                }
            )
        for error in job.row_errors.order_by("part__number", "row_number", "id")[:ERRORS_SHOWN]:
            self.stdout.write(
                f"  {error.email} [{error.row_number or '-'}] {error.field}: {error.message}"
            )


def _width(text: str) -> int:
    """Columns a terminal gives ``text``: Japanese (wide) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
