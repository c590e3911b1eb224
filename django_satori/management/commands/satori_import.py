"""``manage.py satori_import export.csv``: import SATORI's admin customer export.

Links or creates local customers and records what SATORI holds, without
sending anything to SATORI. See docs/importing.md.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from ... import reconcile
from ...importing import ENCODINGS, ImportFileError, ImportResult, SkippedRow, import_export


class Command(BaseCommand):
    help = _(
        "Import the customer CSV exported from SATORI's admin screen (nothing is sent to SATORI)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help=_("The exported CSV file."))
        parser.add_argument(
            "--encoding",
            choices=ENCODINGS,
            default="auto",
            help=_(
                "File encoding; auto detects UTF-8 (with or without BOM) and Shift_JIS (cp932)."
            ),
        )
        parser.add_argument(
            "--dry-run", action="store_true", help=_("Show what would change; write nothing.")
        )
        parser.add_argument(
            "--progress-every",
            type=int,
            default=10_000,
            metavar="N",
            help=_("Print progress every N rows (0: never)."),
        )
        parser.add_argument(
            "--batch-size", type=int, default=1000, metavar="N", help=_("Rows per transaction.")
        )
        parser.add_argument(
            "--column",
            action="append",
            default=[],
            metavar="HEADER=KEY",
            help=_("Map another header to a key, e.g. 'プラン=custom:plan' (repeatable)."),
        )
        parser.add_argument(
            "--report", action="store_true", help=_("Print the reconciliation report afterwards.")
        )
        parser.add_argument(
            "--report-limit",
            type=int,
            default=50,
            metavar="N",
            help=_("Customers listed per report category."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        columns: dict[str, str] = {}
        for item in options["column"]:
            header, sep, key = item.partition("=")
            if not sep or not header.strip() or not key.strip():
                raise CommandError(_("--column expects HEADER=KEY, got %(item)r") % {"item": item})
            columns[header.strip()] = key.strip()
        if options["batch_size"] < 1:
            raise CommandError(_("--batch-size must be at least 1."))
        try:
            result = import_export(
                options["file"],
                encoding=options["encoding"],
                dry_run=options["dry_run"],
                batch_size=options["batch_size"],
                columns=columns,
                progress=self._progress if options["progress_every"] else None,
                progress_every=options["progress_every"],
                on_skip=self._skipped,
            )
        except FileNotFoundError as exc:
            raise CommandError(_("No such file: %(file)s") % {"file": exc.filename}) from None
        except ImportFileError as exc:
            message = str(exc)
            if exc.suggested_encoding:
                message += " " + _("Run again with --encoding %(encoding)s.") % {
                    "encoding": exc.suggested_encoding
                }
            raise CommandError(message) from None
        self._summary(result)
        if options["report"]:
            self.stdout.write("")
            reconcile.write_text(self.stdout, limit=options["report_limit"])

    def _progress(self, result: ImportResult) -> None:
        self.stderr.write(
            ngettext(
                "%(rows)d row read, %(applied)d applied, %(skipped)d skipped (%(seconds).1fs)",
                "%(rows)d rows read, %(applied)d applied, %(skipped)d skipped (%(seconds).1fs)",
                result.rows,
            )
            % {
                "rows": result.rows,
                "applied": result.applied,
                "skipped": result.skipped_count,
                "seconds": result.seconds,
            }
        )
        sys.stderr.flush()

    def _skipped(self, row: SkippedRow) -> None:
        self.stderr.write(
            _("line %(line)d skipped%(email)s: %(reason)s")
            % {
                "line": row.line,
                "email": f" ({row.email})" if row.email else "",
                "reason": row.reason,
            }
        )

    def _summary(self, result: ImportResult) -> None:
        write = self.stdout.write
        if result.dry_run:
            write(_("Dry run: nothing was written. This is what the import would do."))
        write(_("Encoding: %(encoding)s") % {"encoding": result.encoding})
        write(
            _("Columns used: %(columns)s")
            % {
                "columns": ", ".join(
                    f"{h} -> {k}" if h != k else h for h, k in result.columns.items()
                )
            }
        )
        for column in result.ignored_columns:
            write(
                _("Column ignored: %(column)s (%(reason)s)")
                % {"column": column.column, "reason": column.reason}
            )
        write(_("Rows read: %(n)d") % {"n": result.rows})
        write(_("Customers created: %(n)d") % {"n": result.created})
        write(_("Existing customers linked (now known in SATORI): %(n)d") % {"n": result.linked})
        write(_("Existing customers refreshed: %(n)d") % {"n": result.refreshed})
        write(_("Hashcodes stored: %(n)d") % {"n": result.hashcodes})
        write(_("Rows skipped: %(n)d") % {"n": result.skipped_count})
        if result.were_not_in_satori:
            write(
                ngettext(
                    "%(n)d linked customer had been refused as 'not in SATORI': mark it "
                    "for sync to send its local data.",
                    "%(n)d linked customers had been refused as 'not in SATORI': mark "
                    "them for sync to send their local data.",
                    result.were_not_in_satori,
                )
                % {"n": result.were_not_in_satori}
            )
        if result.run is not None:
            write(
                _("Import #%(id)s finished in %(seconds).1fs. Nothing was sent to SATORI.")
                % {"id": result.run.pk, "seconds": result.seconds}
            )
