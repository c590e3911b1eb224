"""``manage.py satori_doctor``: is this project ready to sync with SATORI?

Offline checks (settings, broker, caches, worker, beat, sandbox keys), then a
live probe that changes nothing in SATORI, and with ``--write-test EMAIL`` a
test customer written, acted on, bulk-upserted and deleted. The logic is in
``django_satori.doctor``; this prints it and keeps it for the admin page.

Exit codes: 0 everything sync needs works, 1 something failed, 2 wrong usage.
Keys are never printed, at any verbosity.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import doctor
from django_satori.conf import get_settings
from django_satori.exceptions import SatoriValidationError
from django_satori.redaction import scrub, secret_needles
from django_satori.schema import normalize_email

from ._bulk import FAILURE

USAGE = 2


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Diagnose the connection to SATORI: settings, broker, cache, worker, beat, and a "
        "live probe; exit 1 when something sync needs does not work."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--no-live",
            action="store_true",
            help=_("Only the offline checks: send nothing to SATORI."),
        )
        parser.add_argument(
            "--write-test",
            metavar="EMAIL",
            help=_(
                "Also write a test customer with this address (upsert, action, bulk upsert), "
                "then delete it. Use an address that is not a customer in SATORI."
            ),
        )
        parser.add_argument(
            "--ping-timeout",
            type=float,
            default=2.0,
            metavar="SECONDS",
            help=_("How long to wait for the workers' answers (default 2)."),
        )
        parser.add_argument("--json", action="store_true", help=_("Print JSON."))

    def handle(self, *args: Any, **options: Any) -> None:
        email = options["write_test"]
        if email is not None:
            try:
                email = normalize_email(email)
            except SatoriValidationError as exc:
                raise CommandError(
                    _("--write-test needs an e-mail address: %(error)s") % {"error": exc.message},
                    returncode=USAGE,
                ) from None
            if not email:
                raise CommandError(_("--write-test needs an e-mail address."), returncode=USAGE)
        report = doctor.diagnose(
            live=not options["no_live"],
            write_email=email,
            ping_timeout=max(0.1, options["ping_timeout"]),
        )
        try:
            report.save(source="command")
        except DatabaseError as exc:
            # Not kept for the admin page (not migrated yet?); the diagnosis itself stands.
            self.stderr.write(
                _("The diagnosis could not be kept (%(error)s).") % {"error": type(exc).__name__}
            )
        needles = secret_needles(get_settings())
        if options["json"]:
            data = report.as_dict()
            for check, stored in zip(report.checks, data["checks"], strict=True):
                stored["message"] = doctor.render(check.message)
                stored["fix"] = doctor.render(check.fix) or None
            self.stdout.write(scrub(json.dumps(data, ensure_ascii=False, sort_keys=True), needles))
        else:
            self._print(report, options["verbosity"], needles)
        if not report.ok:
            failed = sum(1 for check in report.checks if check.level == doctor.FAIL)
            raise CommandError(
                ngettext(
                    "%(n)d check failed: sync does not work yet.",
                    "%(n)d checks failed: sync does not work yet.",
                    failed,
                )
                % {"n": failed},
                returncode=FAILURE,
            )

    def _print(self, report: doctor.Report, verbosity: int, needles: Any) -> None:
        labels = {
            doctor.OK: self.style.SUCCESS(_("[OK]  ")),
            doctor.WARN: self.style.WARNING(_("[WARN]")),
            doctor.FAIL: self.style.ERROR(_("[FAIL]")),
            doctor.SKIP: _("[SKIP]"),
        }
        write = self.stdout.write
        write(_("SATORI connection diagnosis"))
        for check in report.checks:
            write(f"{labels[check.level]} {check.id}: {doctor.render(check.message)}")
            if check.fix is not None and check.level != doctor.OK:
                write("       " + _("Fix: %(fix)s") % {"fix": doctor.render(check.fix)})
            if verbosity >= 2 and check.details:
                seen = json.dumps(check.details, ensure_ascii=False, sort_keys=True)
                write("       " + _("Seen: %(details)s") % {"details": scrub(seen, needles)})
        code = doctor.snippet(report.suggested)
        if code:
            write("")
            write(_("SATORI answered differently from our defaults. Paste into your settings:"))
            write(scrub(code, needles))
        write("")
        if report.ok:
            write(self.style.SUCCESS(_("Everything sync needs works.")))
