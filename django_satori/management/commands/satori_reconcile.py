"""``manage.py satori_reconcile``: compare the local mirror with SATORI's last export."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from ... import reconcile


class Command(BaseCommand):
    help = _(
        "Report customers only in Django, only in SATORI, and with different values "
        "(from the last imported SATORI export)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--format", choices=("text", "csv"), default="text")
        parser.add_argument(
            "--category",
            action="append",
            choices=reconcile.CATEGORIES,
            help=_("Only this category (repeatable)."),
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            metavar="N",
            help=_("Customers listed per category (text: 50 by default)."),
        )
        parser.add_argument(
            "--mark-for-sync",
            action="store_true",
            help=_("Mark every customer of the chosen categories for sync."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        categories = tuple(options["category"] or reconcile.CATEGORIES)
        if options["mark_for_sync"]:
            if not options["category"]:
                raise CommandError(_("--mark-for-sync needs --category."))
            marked = 0
            for category in categories:
                marked += reconcile.mark_ids_for_sync(list(reconcile.category_ids(category)))
            self.stdout.write(
                ngettext(
                    "%(n)d customer marked for sync.", "%(n)d customers marked for sync.", marked
                )
                % {"n": marked}
            )
            return
        if options["format"] == "csv":
            reconcile.write_csv(self.stdout, categories, limit=options["limit"])
        else:
            limit = 50 if options["limit"] is None else options["limit"]
            reconcile.write_text(self.stdout, categories, limit=limit)
