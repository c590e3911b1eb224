"""``manage.py satori_status``: is the sync healthy? For cron, monitoring and health checks.

Prints the number of customers in each sync status, the age of the oldest
pending change, whether a Celery worker answered a ping, and when the sweep
last ran. With thresholds it exits 1 when one is exceeded, so it can be a
container health check or a cron job that mails on failure.

Exit codes: 0 healthy (or no threshold given), 1 a threshold was exceeded,
2 wrong usage.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import status as satori_status

from ._bulk import FAILURE


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Show the SATORI sync backlog, failures, workers and sweep; exit 1 past a threshold."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-age",
            type=float,
            metavar="SECONDS",
            help=_("Exit 1 when the oldest pending change has waited longer than this."),
        )
        parser.add_argument(
            "--max-failed",
            type=int,
            metavar="N",
            help=_("Exit 1 when more than N customers have failed."),
        )
        parser.add_argument(
            "--max-sweep-age",
            type=float,
            metavar="SECONDS",
            help=_("Exit 1 when the sweep has not run for this long (or never)."),
        )
        parser.add_argument(
            "--require-worker",
            action="store_true",
            help=_("Exit 1 when no Celery worker answers the ping."),
        )
        parser.add_argument(
            "--no-ping",
            action="store_true",
            help=_("Do not ping the Celery workers (no broker needed)."),
        )
        parser.add_argument(
            "--ping-timeout",
            type=float,
            default=1.0,
            metavar="SECONDS",
            help=_("How long to wait for the workers' answers (default 1)."),
        )
        parser.add_argument("--json", action="store_true", help=_("Print JSON."))

    def handle(self, *args: Any, **options: Any) -> None:
        if options["require_worker"] and options["no_ping"]:
            raise CommandError(
                _("--require-worker needs the ping; leave out --no-ping."), returncode=2
            )
        state = satori_status.collect(
            ping=not options["no_ping"], ping_timeout=max(0.1, options["ping_timeout"])
        )
        state.problems = self._problems(state, options)
        if options["json"]:
            self.stdout.write(json.dumps(state.as_dict(), ensure_ascii=False, sort_keys=True))
        else:
            self._print(state)
        if state.problems:
            raise CommandError("; ".join(state.problems), returncode=FAILURE)

    def _problems(self, state: satori_status.Status, options: dict[str, Any]) -> list[str]:
        problems = []
        max_age = options["max_age"]
        age = state.oldest_pending_seconds
        if max_age is not None and age is not None and age > max_age:
            problems.append(
                _("The oldest pending change has waited %(age)d s (more than %(max)d s).")
                % {"age": age, "max": max_age}
            )
        max_failed = options["max_failed"]
        if max_failed is not None and state.failed > max_failed:
            problems.append(
                ngettext(
                    "%(n)d customer has failed (more than %(max)d).",
                    "%(n)d customers have failed (more than %(max)d).",
                    state.failed,
                )
                % {"n": state.failed, "max": max_failed}
            )
        max_sweep = options["max_sweep_age"]
        swept = state.last_sweep_seconds
        if max_sweep is not None and (swept is None or swept > max_sweep):
            problems.append(_("The sweep has not run in the last %(max)d s.") % {"max": max_sweep})
        if options["require_worker"] and not state.workers:
            problems.append(_("No Celery worker answered the ping."))
        return problems

    def _print(self, state: satori_status.Status) -> None:
        write = self.stdout.write
        write(
            _("Sync states: %(counts)s")
            % {"counts": ", ".join(f"{k}={v}" for k, v in sorted(state.counts.items()))}
        )
        write(_("Backlog (pending, sending, in bulk): %(n)d") % {"n": state.backlog})
        write(_("Failed: %(n)d") % {"n": state.failed})
        age = state.oldest_pending_seconds
        write(
            _("Oldest pending change: %(age)s")
            % {"age": _("none") if age is None else _("%(n)d s ago") % {"n": age}}
        )
        if state.workers is None:
            workers = _("not asked (--no-ping)")
        elif state.workers:
            workers = ", ".join(state.workers)
        elif state.worker_error:
            workers = _("none (broker unreachable: %(error)s)") % {"error": state.worker_error}
        else:
            workers = _("none answered")
        write(_("Workers: %(workers)s") % {"workers": workers})
        swept = state.last_sweep_seconds
        write(
            _("Last sweep: %(when)s")
            % {"when": _("never recorded") if swept is None else _("%(n)d s ago") % {"n": swept}}
        )
