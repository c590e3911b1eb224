"""``manage.py satori_cleanup``: apply the retention settings now (the beat task does it hourly).

* no option: delete SyncLog entries older than ``LOG_RETENTION_DAYS`` and the
  CSV files of bulk jobs that ended more than ``BULK_FILE_RETENTION_DAYS`` ago;
* ``--logs`` / ``--files``: only one of the two;
* ``--log-days`` / ``--file-days``: other periods than the settings;
* ``--dry-run``: count what would be deleted, delete nothing.

Files of running jobs are never deleted. Exit codes: 0 done, 2 wrong usage.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils.translation import gettext as _

from django_satori import retention

from ._bulk import usage_error


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Delete old SATORI sync log entries and old bulk CSV files (the retention settings)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--logs", action="store_true", help=_("Only the sync log."))
        parser.add_argument("--files", action="store_true", help=_("Only the bulk CSV files."))
        parser.add_argument(
            "--log-days",
            type=float,
            metavar="DAYS",
            help=_("Keep this many days of sync log (default SATORI['LOG_RETENTION_DAYS'])."),
        )
        parser.add_argument(
            "--file-days",
            type=float,
            metavar="DAYS",
            help=_(
                "Keep the files of jobs ended this many days ago "
                "(default SATORI['BULK_FILE_RETENTION_DAYS'])."
            ),
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            metavar="N",
            help=_("Log entries deleted per statement (default SATORI['LOG_DELETE_BATCH'])."),
        )
        parser.add_argument(
            "--dry-run", action="store_true", help=_("Count what would be deleted; delete nothing.")
        )

    def handle(self, *args: Any, **options: Any) -> None:
        for name in ("log_days", "file_days", "batch_size"):
            if options[name] is not None and options[name] <= 0:
                raise usage_error(
                    _("--%(option)s must be positive.") % {"option": name.replace("_", "-")}
                )
        both = not options["logs"] and not options["files"]
        result = retention.run(
            logs=both or options["logs"],
            files=both or options["files"],
            log_days=options["log_days"],
            file_days=options["file_days"],
            batch=options["batch_size"],
            dry_run=options["dry_run"],
        )
        if options["dry_run"]:
            template = _(
                "Would delete: %(logs)d sync log entries, the files of %(parts)d bulk parts, "
                "%(orphans)d files no part refers to."
            )
        else:
            template = _(
                "Deleted: %(logs)d sync log entries, the files of %(parts)d bulk parts, "
                "%(orphans)d files no part refers to."
            )
        self.stdout.write(
            template
            % {
                "logs": result.log_entries,
                "parts": result.bulk_files,
                "orphans": result.orphan_files,
            }
        )
