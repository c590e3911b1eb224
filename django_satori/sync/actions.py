"""User-defined actions: each :class:`~django_satori.models.CustomerAction` is its own
outbox row, claimed and retried like a customer's (same lease, same back-off)."""

from __future__ import annotations

import datetime as dt
import time

from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.translation import gettext as _

from .. import ratelimit
from ..client import get_client
from ..conf import get_settings
from ..exceptions import SatoriError, SatoriValidationError
from ..models import ActionStatus, Customer, CustomerAction, SyncLog, SyncState
from ..redaction import redact_form
from ..schema import normalize_email
from . import dispatch, history, outbox, sources


def add_action(
    email: str,
    name: str,
    *,
    content: str = "",
    url: str = "",
    occurred_at: dt.datetime | None = None,
    customer: Customer | None = None,
) -> CustomerAction:
    """Record a user-defined action for ``email``; sent to SATORI after commit."""
    email = normalize_email(email)
    if not name or not str(name).strip():
        raise SatoriValidationError(_("An action needs a name."), field="name")
    if customer is None:
        customer = Customer.objects.filter(email=email).first()
    action = CustomerAction.objects.create(
        email=email,
        customer=customer,
        name=str(name).strip(),
        content=content,
        url=url,
        occurred_at=occurred_at or timezone.now(),
    )
    transaction.on_commit(lambda: dispatch.dispatch_action(action.pk, 0))
    return action


def send_action(action_id: int) -> tuple[str, float | None]:
    """Send one action. Waits while its customer is still on the way to SATORI.

    Returns the outcome word and, for a later attempt, the delay in seconds.
    """
    conf = get_settings()
    now = timezone.now()
    endpoint = "/".join(conf.ACTION_PATH.rsplit("/", 2)[-2:])
    claimed = (
        CustomerAction.objects.filter(pk=action_id)
        .filter(
            Q(status=ActionStatus.PENDING) | Q(status=ActionStatus.SENDING, lease_until__lt=now)
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .update(
            status=ActionStatus.SENDING,
            lease_until=now + dt.timedelta(seconds=conf.LEASE_SECONDS),
        )
    )
    if not claimed:
        return "busy", None
    action = CustomerAction.objects.get(pk=action_id)
    mine = CustomerAction.objects.filter(pk=action_id)
    customer_state = (
        SyncState.objects.filter(email=action.email).values("status", "in_satori").first()
    )
    if (
        customer_state
        and not customer_state["in_satori"]
        and customer_state["status"] in outbox.ON_ITS_WAY
    ) or (
        # A connected object just saved (a sign-up): its customer is not even pending
        # until a worker has built the mirror.
        not (customer_state and customer_state["in_satori"])
        and sources.change_on_its_way(action.email)
    ):
        # An action for a customer SATORI does not have yet would be refused.
        delay = max(conf.COALESCE_SECONDS, 5.0)
        mine.update(
            status=ActionStatus.PENDING,
            lease_until=None,
            not_before=now + dt.timedelta(seconds=delay),
        )
        return "waiting", delay
    summary = {
        "endpoint": endpoint,
        "fields": redact_form(
            [
                ("email", action.email),
                ("name", action.name),
                ("content", action.content),
                ("url", action.url),
            ],
            conf.REDACT_PERSONAL_DATA,
        ),
    }
    if conf.DRY_RUN:
        mine.update(status=ActionStatus.DRY_RUN, lease_until=None)
        history.log(endpoint, SyncLog.Outcome.DRY_RUN, email=action.email, request=summary)
        return "dry_run", None
    wait = ratelimit.acquire(conf)
    if wait:
        mine.update(
            status=ActionStatus.PENDING,
            lease_until=None,
            not_before=now + dt.timedelta(seconds=wait),
        )
        return "rate_limited", wait
    attempt = action.attempts + 1
    started = time.monotonic()
    try:
        result = get_client().add_action(
            email=action.email,
            name=action.name,
            content=action.content,
            url=action.url,
            occurred_at=action.occurred_at,
        )
    except SatoriError as exc:
        final = not exc.retryable or attempt >= conf.MAX_ATTEMPTS
        retry_in = (
            None if final else outbox.backoff(attempt, conf, getattr(exc, "retry_after", None))
        )
        mine.update(
            status=ActionStatus.FAILED if final else ActionStatus.PENDING,
            attempts=attempt,
            last_error=str(exc),
            lease_until=None,
            not_before=None if final else timezone.now() + dt.timedelta(seconds=retry_in or 0),
        )
        history.log_failure(
            endpoint,
            exc,
            final=final,
            email=action.email,
            request=summary,
            attempt=attempt,
            started=started,
        )
        return ("failed", None) if final else ("retry", retry_in)
    mine.update(
        status=ActionStatus.SENT,
        attempts=attempt,
        last_error="",
        lease_until=None,
        sent_at=timezone.now(),
    )
    history.log(
        endpoint,
        SyncLog.Outcome.OK,
        email=action.email,
        status=result.status,
        request=summary,
        attempt=attempt,
        started=started,
    )
    return "sent", None


def overdue_actions(now: dt.datetime, stale: dt.datetime, limit: int) -> list[int]:
    """Actions due whose task was lost (created before ``stale``)."""
    return list(
        CustomerAction.objects.filter(
            Q(status=ActionStatus.PENDING) | Q(status=ActionStatus.SENDING, lease_until__lt=now)
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .filter(created_at__lt=stale)
        .values_list("pk", flat=True)[:limit]
    )
