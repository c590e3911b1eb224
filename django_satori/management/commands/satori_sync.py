"""``manage.py satori_sync``: the sync engine's safety net by hand, or sending without Celery.

* no option: run the sweep once (what beat runs every minute) and print its counts;
* ``--retry-failed``: mark every failed customer for sync first;
* ``--all``: mark every customer for sync first (a large number goes through bulk jobs);
* ``--now``: build the customers of connected objects saved since (what the
  worker does), then send the pending customers in this process, one call each,
  keeping to ``RATE_LIMIT_PER_MINUTE`` (waiting here, in the command, when it is
  reached).

Exit codes: 0 done, 1 some customers ended failed (``--now``) or time ran out,
2 wrong usage.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Min
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from django_satori import sweep, sync
from django_satori.conf import get_settings
from django_satori.models import Customer, SyncState, SyncStatus

from ._bulk import FAILURE, usage_error


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Run the SATORI sync sweep once, or send pending customers now without a worker."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--retry-failed", action="store_true", help=_("Mark failed customers for sync first.")
        )
        parser.add_argument(
            "--all", action="store_true", help=_("Mark every customer for sync first.")
        )
        parser.add_argument(
            "--now",
            action="store_true",
            help=_("Send pending customers in this process (no Celery)."),
        )
        parser.add_argument(
            "--timeout", type=float, metavar="SECONDS", help=_("With --now: stop after this long.")
        )
        parser.add_argument(
            "--progress-every",
            type=int,
            default=50,
            metavar="N",
            help=_("With --now: print progress every N customers."),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["timeout"] is not None and not options["now"]:
            raise usage_error(_("--timeout only makes sense with --now."))
        if options["all"]:
            count = sync.mark_for_sync(Customer.objects.all())
            self.stdout.write(
                ngettext(
                    "%(n)d customer marked for sync.", "%(n)d customers marked for sync.", count
                )
                % {"n": count}
            )
        elif options["retry_failed"]:
            count = sync.mark_for_sync(
                Customer.objects.filter(sync_state__status=SyncStatus.FAILED)
            )
            self.stdout.write(
                ngettext(
                    "%(n)d failed customer marked for sync.",
                    "%(n)d failed customers marked for sync.",
                    count,
                )
                % {"n": count}
            )
        if options["now"]:
            self._send_now(options["timeout"], max(1, options["progress_every"]))
            return
        counts = sweep.sweep()
        self.stdout.write(" ".join(f"{key}={value}" for key, value in sorted(counts.items())))
        self._status_line()

    def _status_line(self) -> None:
        counts = sync.pending_counts()
        self.stdout.write(
            _("Sync states: %(counts)s")
            % {"counts": ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "—"}
        )

    def _send_now(self, timeout: float | None, every: int) -> None:
        if not get_settings().SYNC_ENABLED:
            raise CommandError(
                _("SATORI['SYNC_ENABLED'] is False: nothing is sent."), returncode=FAILURE
            )
        started = time.monotonic()
        # Saves of connected models first: their customers are built by this step.
        sync.apply_source_changes()
        outcomes: dict[str, int] = {}
        failed_ids: set[int] = set()
        pending = SyncState.objects.filter(status=SyncStatus.PENDING, bulk_part__isnull=True)
        total = pending.count()
        self.stderr.write(
            ngettext("%(n)d customer pending.", "%(n)d customers pending.", total) % {"n": total}
        )
        done = 0
        while True:
            now = timezone.now()
            due = list(pending.exclude(not_before__gt=now).values_list("pk", flat=True)[:500])
            moved = False
            for state_id in due:
                outcome, _again = sync.push(state_id)
                moved = moved or outcome is not sync.PushOutcome.BUSY
                outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
                if outcome is sync.PushOutcome.FAILED:
                    failed_ids.add(state_id)
                done += 1
                if done % every == 0:
                    self.stderr.write(_("… %(done)d sent or tried") % {"done": done})
                if timeout is not None and time.monotonic() - started > timeout:
                    break
            if timeout is not None and time.monotonic() - started > timeout:
                self._summary(outcomes)
                seconds = int(timeout)  # as %d shows it, so the noun agrees with the number
                raise CommandError(
                    ngettext(
                        "Stopped after %(s)d second; the rest stays pending.",
                        "Stopped after %(s)d seconds; the rest stays pending.",
                        seconds,
                    )
                    % {"s": seconds},
                    returncode=FAILURE,
                )
            if due and moved:
                continue
            if due:  # only rows another process holds: give it a moment
                time.sleep(0.2)
                continue
            # Nothing due: wait for the earliest one (rate limit or back-off), here.
            earliest = pending.aggregate(t=Min("not_before"))["t"]
            if earliest is None and not pending.exists():
                break
            wait = max(0.05, (earliest - timezone.now()).total_seconds()) if earliest else 0.05
            if timeout is not None:
                wait = min(wait, max(0.0, timeout - (time.monotonic() - started)) + 0.01)
            time.sleep(wait)
        self._summary(outcomes)
        if failed_ids:
            failed = len(failed_ids)
            raise CommandError(
                ngettext(
                    "%(n)d customer failed; see its last error in the admin.",
                    "%(n)d customers failed; see their last error in the admin.",
                    failed,
                )
                % {"n": failed},
                returncode=FAILURE,
            )

    def _summary(self, outcomes: dict[str, int]) -> None:
        self.stdout.write(
            _("Done: %(counts)s")
            % {"counts": ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "—"}
        )
        self._status_line()
