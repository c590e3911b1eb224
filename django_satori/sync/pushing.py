"""Pushing: one customer to SATORI and SATORI's answer back to its outbox row.

The ``push_many`` task calls :func:`push_batch` with the ids a dispatch queued.
Each row is claimed first (:func:`outbox.claim <django_satori.sync.outbox.claim>`),
so two workers never send the same customer; its *current* data is sent, and
the answer is written back with a version check, so a save during the call
keeps the row pending for one more push.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import logging
import time
from typing import Any

from django.db import DatabaseError
from django.utils import timezone
from django.utils.translation import gettext as _

from .. import ratelimit, signals
from ..client import get_client
from ..conf import SatoriSettings, get_settings
from ..exceptions import (
    SatoriError,
    SatoriNotFoundError,
    SatoriRateLimitError,
    SatoriValidationError,
)
from ..models import Customer, Operation, SyncLog, SyncState, SyncStatus
from ..redaction import for_log, redact_form
from ..schema import DATA_FIELDS, clean_customer, join_tags
from . import history, outbox

log = logging.getLogger("django_satori.sync")

#: Most answers held before they are written back (one round trip for them all on
#: PostgreSQL). A worker killed meanwhile leaves their rows claimed: when the claim
#: expires the sweep sends them again, which SATORI takes harmlessly (an upsert or a
#: registration of the same data changes nothing; a delete of a deleted customer is
#: counted as done).
WRITE_BACK_BATCH = 20
#: Held answers are written after the next call once the oldest has waited this long,
#: so the admin soon shows what SATORI answered even when calls are slow.
WRITE_BACK_SECONDS = 1.0


class PushOutcome(enum.Enum):
    SYNCED = "synced"
    DELETED = "deleted"
    UNCHANGED = "unchanged"
    RETRY = "retry"
    FAILED = "failed"
    DRY_RUN = "dry_run"
    SKIPPED = "skipped"
    BUSY = "busy"
    NOT_DUE = "not_due"
    ERROR = "error"


#: The outcome and, for a later attempt, the delay in seconds before the task should
#: run again (None: nothing more to do now).
PushResult = tuple[PushOutcome, float | None]


@dataclasses.dataclass
class _Answered(outbox.Answer):
    """SATORI accepted the call; the answer is still to be written back."""

    outcome: PushOutcome = PushOutcome.SYNCED
    customer: Customer | None = None
    endpoint: str = ""
    result: Any = None


def push(state_id: int, *, ignore_window: bool = False) -> PushResult:
    """Send one customer's current state to SATORI.

    ``ignore_window`` sends a first attempt before its coalescing window ends
    (eager mode, where a task cannot wait).
    """
    return push_batch([state_id], ignore_window=ignore_window)[state_id]


def push_batch(state_ids: list[int], *, ignore_window: bool = False) -> dict[int, PushResult]:
    """:func:`push` for several rows, sent one after another (the ``push_many`` task).

    The rows are claimed with one UPDATE and loaded with one SELECT; SATORI's
    answers are written back a few at a time and the SyncLog entries together:
    per customer, what is left is the call. A row that fails with an unexpected
    error is given back (pending, for the sweep) and the others go on; a
    database error gives back every row whose answer is not written yet, and
    is raised.
    """
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return {state_id: (PushOutcome.SKIPPED, None) for state_id in state_ids}
    now = timezone.now()
    token, claimed = outbox.claim(state_ids, conf, ignore_window=ignore_window)
    results: dict[int, PushResult] = {}
    answered: list[_Answered] = []
    # A long batch renews its claim on the rows still to come before it runs out.
    renew_at = time.monotonic() + conf.LEASE_SECONDS / 2
    try:
        if not conf.DRY_RUN:
            outbox.note_tags_to_send(claimed.values(), token)
        with history.together():
            for state_id in state_ids:
                state = claimed.get(state_id)
                if state is None:
                    results[state_id] = _why_not_claimed(state_id, now)
                    continue
                if time.monotonic() > renew_at:
                    outbox.renew([pk for pk in claimed if pk not in results], token, conf)
                    renew_at = time.monotonic() + conf.LEASE_SECONDS / 2
                outcome = _send(state, token, conf)
                if isinstance(outcome, _Answered):
                    answered.append(outcome)
                else:
                    results[state_id] = outcome
                if answered and (
                    len(answered) >= WRITE_BACK_BATCH
                    or time.monotonic() - answered[0].at > WRITE_BACK_SECONDS
                ):
                    results.update(_write_back(answered, token))
                    answered = []
            if answered:
                results.update(_write_back(answered, token))
    finally:
        unsent = [pk for pk in claimed if pk not in results]
        if unsent:
            outbox.give_back(unsent, token)
    return results


def _write_back(answered: list[_Answered], token: str) -> dict[int, PushResult]:
    """Write the answers, then send ``after_push`` for each."""
    newer = outbox.write_back(answered, token)
    results: dict[int, PushResult] = {}
    for answer in answered:
        results[answer.state.pk] = answer.outcome, _again(answer.state.pk in newer)
        try:
            signals.after_push.send(
                sender=Customer,
                email=answer.state.email,
                customer=answer.customer,
                endpoint=answer.endpoint,
                result=answer.result,
            )
        except Exception:  # a receiver's bug: SATORI has the data, the row says so
            log.exception("An after_push receiver failed for sync state %s.", answer.state.pk)
    return results


def _send(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    try:
        if state.operation == Operation.DELETE:
            return _send_delete(state, token, conf)
        if state.operation == Operation.UPSERT and state.customer is not None:
            return _send_upsert(state, token, conf)
        outbox.release(state, token, status=SyncStatus.SYNCED, synced_version=state.version)
        return PushOutcome.SKIPPED, None
    except DatabaseError:
        raise
    except Exception:
        # Our own bug, or a receiver's: give the row back so nothing is stuck.
        log.exception("Pushing sync state %s failed; the sweep will try again.", state.pk)
        outbox.release(state, token, status=SyncStatus.PENDING)
        return PushOutcome.ERROR, None


def _why_not_claimed(state_id: int, now: dt.datetime) -> PushResult:
    row = SyncState.objects.filter(pk=state_id).values("status", "not_before").first()
    due = row["not_before"] if row else None
    if row and row["status"] == SyncStatus.PENDING and due and due > now:
        return PushOutcome.NOT_DUE, (due - now).total_seconds()
    return PushOutcome.BUSY, None


def build_payload(customer: Customer, state: SyncState, conf: SatoriSettings) -> dict[str, Any]:
    """The SATORI items for ``customer`` (wire keys), before validation.

    BULK_DEFAULT_COLLECTION_ROUTE is not used here: it fills bulk rows only (the
    bulk API requires the column), while a single upsert without a route leaves
    the one SATORI holds alone. ``delete_tags`` goes to ``upsert.json`` only:
    ``registration.json`` only adds tags (see :func:`tags_left_in_satori`).
    """
    payload: dict[str, Any] = {"email": customer.email}
    for name in DATA_FIELDS:
        payload[name] = getattr(customer, name)
    # Custom fields and EXTRA_STANDARD_ITEMS, under their wire keys.
    payload.update(customer.custom_fields or {})
    tags = [str(t) for t in (customer.tags or [])]
    payload["append_tags"] = join_tags(tags, conf.TAG_SEPARATOR)
    if conf.PUSH_ENDPOINT != "registration":
        removed = [t for t in (state.sent_tags or []) if t not in tags]
        payload["delete_tags"] = join_tags(removed, conf.TAG_SEPARATOR)
    return payload


def tags_left_in_satori(customer: Customer, state: SyncState, conf: SatoriSettings) -> list[str]:
    """Tags SATORI may hold that the customer no longer has and this push cannot remove.

    With PUSH_ENDPOINT "registration" that is every dropped tag: the endpoint only
    adds tags. Such a push is not *synced* (SATORI may differ): the row ends
    failed, naming the tags, on every push until one with upsert removes them.
    """
    if conf.PUSH_ENDPOINT != "registration":
        return []
    tags = [str(t) for t in (customer.tags or [])]
    return [t for t in (state.sent_tags or []) if t not in tags]


def fingerprint(payload: dict[str, str]) -> str:
    """A digest of what was sent: the same data is not sent twice."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _summary(endpoint: str, wire: dict[str, str], conf: SatoriSettings) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "fields": redact_form(list(wire.items()), conf.REDACT_PERSONAL_DATA),
    }


def _send_upsert(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    customer = state.customer
    assert customer is not None
    endpoint = (
        "customer/registration.json"
        if conf.PUSH_ENDPOINT == "registration"
        else "customer/upsert.json"
    )
    if not conf.CREATE_UNKNOWN and not (state.in_satori or state.hashcode):
        message = _("Not in SATORI, and SATORI['CREATE_UNKNOWN'] is False: not created.")
        outbox.release(state, token, status=SyncStatus.NOT_IN_SATORI, last_error=message)
        history.log(endpoint, SyncLog.Outcome.SKIPPED, email=state.email, message=message)
        return PushOutcome.SKIPPED, None

    try:
        payload = build_payload(customer, state, conf)
    except SatoriValidationError as exc:
        # A bad tag (one holding the separator) is refused here, before any hook
        # or call: it must fail with its reason, not crash the task and come back.
        return _failed(state, token, endpoint, exc, conf, customer, summary={})
    responses = signals.before_push.send(
        sender=Customer, customer=customer, payload=payload, endpoint=endpoint
    )
    if any(response is False for _receiver, response in responses):
        message = _("A before_push receiver vetoed this push.")
        outbox.release(state, token, status=SyncStatus.STOPPED, last_error=message)
        history.log(endpoint, SyncLog.Outcome.SKIPPED, email=state.email, message=message)
        return PushOutcome.SKIPPED, None
    try:
        wire = clean_customer(payload, custom_fields=conf.CUSTOM_FIELDS)
    except SatoriValidationError as exc:
        return _failed(state, token, endpoint, exc, conf, customer, summary={})
    identity = "email"
    if state.previous_email and state.hashcode and conf.DELETE_IDENTITY != "email":
        identity, wire["hashcode"] = "hashcode", state.hashcode
    digest = fingerprint(wire)
    summary = _summary(endpoint, wire, conf)
    if digest == state.fingerprint and identity == "email":
        newer = outbox.release(state, token, status=SyncStatus.SYNCED, synced_version=state.version)
        history.log(
            endpoint,
            SyncLog.Outcome.SKIPPED,
            email=state.email,
            request=summary,
            message=_("Unchanged since the last push: not sent again."),
        )
        return PushOutcome.UNCHANGED, _again(newer)
    if conf.DRY_RUN:
        outbox.release(state, token, status=SyncStatus.DRY_RUN)
        history.log(
            endpoint,
            SyncLog.Outcome.DRY_RUN,
            email=state.email,
            request=summary,
            message=_("Dry run: this is what would have been sent."),
        )
        return PushOutcome.DRY_RUN, None
    wait = ratelimit.acquire(conf)
    if wait:
        return _rate_limited(state, token, wait, conf)
    sent = list(state.sent_tags or [])
    added = [tag for tag in customer.tags or [] if tag not in sent]
    if added:
        # Written before the call: if this worker dies after SATORI applied it, the
        # next push still knows these tags may be in SATORI and removes any dropped.
        state.sent_tags = sent + added
        outbox.note_tags_sent(state, token)

    client = get_client()
    send = (
        client.register_customer if conf.PUSH_ENDPOINT == "registration" else client.upsert_customer
    )
    started = time.monotonic()
    try:
        result = send(wire, identity_type=identity, cleaned=True)  # checked above
    except SatoriError as exc:
        return _failed(
            state, token, endpoint, exc, conf, customer, summary=summary, started=started
        )
    left = tags_left_in_satori(customer, state, conf)
    history.log(
        endpoint,
        SyncLog.Outcome.OK,
        email=state.email,
        status=result.status,
        request=summary,
        response=getattr(result, "response_summary", {}),
        attempt=state.attempts + 1,
        started=started,
        message=_tags_left_message(left) if left else "",
    )
    if left:
        return _tags_left(state, token, customer, result, left)
    return _Answered(
        state,
        SyncStatus.SYNCED,
        {
            "fingerprint": digest,
            "sent_tags": list(customer.tags or []),
            "in_satori": True,
            "hashcode": result.hashcode or state.hashcode,
            "previous_email": "",
        },
        outcome=PushOutcome.SYNCED,
        customer=customer,
        endpoint=endpoint,
        result=result,
    )


def _tags_left_message(tags: list[str]) -> str:
    return _(
        "SATORI took the push, but registration.json cannot remove tags: %(tags)s may still "
        "be on the customer in SATORI, so it is not synced. A push with "
        "SATORI['PUSH_ENDPOINT'] = 'upsert' removes them; until then every push of this "
        "customer ends here."
    ) % {"tags": ", ".join(tags)}


def _tags_left(
    state: SyncState, token: str, customer: Customer, result: Any, tags: list[str]
) -> PushResult:
    """A registration push SATORI accepted that leaves dropped tags in SATORI: not synced."""
    outbox.release(
        state,
        token,
        status=SyncStatus.FAILED,
        attempts=state.attempts + 1,
        last_error=_tags_left_message(tags),
        last_error_at=timezone.now(),
        # The next push sends everything again, and still knows these tags may be there.
        fingerprint="",
        sent_tags=list(customer.tags or []) + tags,
        in_satori=True,
        hashcode=result.hashcode or state.hashcode,
        previous_email="",
    )
    return PushOutcome.FAILED, None


def _send_delete(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    endpoint = "customer/delete.json"
    if not state.in_satori and not state.hashcode:
        # Never reached SATORI (or already deleted there): nothing to delete.
        outbox.release(state, token, status=SyncStatus.DELETED, synced_version=state.version)
        return PushOutcome.DELETED, None
    identity = (
        {"hashcode": state.hashcode}
        if state.hashcode and conf.DELETE_IDENTITY != "email"
        else {"email": state.email}
    )
    summary = _summary(endpoint, {"email": state.email, **identity}, conf)
    if conf.DRY_RUN:
        outbox.release(state, token, status=SyncStatus.DRY_RUN)
        history.log(endpoint, SyncLog.Outcome.DRY_RUN, email=state.email, request=summary)
        return PushOutcome.DRY_RUN, None
    wait = ratelimit.acquire(conf)
    if wait:
        return _rate_limited(state, token, wait, conf)
    started = time.monotonic()
    try:
        result: Any = get_client().delete_customer(**identity)
    except SatoriNotFoundError as exc:
        result = exc  # already gone: deleting twice is not an error
    except SatoriError as exc:
        return _failed(state, token, endpoint, exc, conf, None, summary=summary, started=started)
    history.log(
        endpoint,
        SyncLog.Outcome.OK,
        email=state.email,
        status=getattr(result, "status", None),
        request=summary,
        started=started,
        attempt=state.attempts + 1,
        message=str(result) if isinstance(result, SatoriError) else "",
    )
    return _Answered(
        state,
        SyncStatus.DELETED,
        {
            "fingerprint": "",
            "sent_tags": [],
            "in_satori": False,
            "hashcode": "",
            "previous_email": state.previous_email,
        },
        outcome=PushOutcome.DELETED,
        customer=None,
        endpoint=endpoint,
        result=result,
    )


def _failed(
    state: SyncState,
    token: str,
    endpoint: str,
    exc: SatoriError,
    conf: SatoriSettings,
    customer: Customer | None,
    *,
    summary: dict[str, Any],
    started: float | None = None,
) -> PushResult:
    attempt = state.attempts + 1
    final = not exc.retryable or attempt >= conf.MAX_ATTEMPTS
    message = str(exc)
    unknown: dict[str, Any] = {}
    if started is not None and exc.retryable and not isinstance(exc, SatoriRateLimitError):
        # A timeout, a dropped connection, a 5xx: SATORI may have applied the call.
        unknown = outbox.outcome_unknown(state, list(customer.tags or []) if customer else [])
    if final:
        outbox.release(
            state,
            token,
            status=SyncStatus.FAILED,
            attempts=attempt,
            last_error=message,
            last_error_at=timezone.now(),
            **unknown,
        )
        delay = None
    else:
        delay = outbox.backoff(attempt, conf, getattr(exc, "retry_after", None))
        outbox.retry_later(
            state,
            token,
            due=timezone.now() + dt.timedelta(seconds=delay),
            dispatched=True,
            attempts=attempt,
            last_error=message,
            last_error_at=timezone.now(),
            **unknown,
        )
    history.log_failure(
        endpoint,
        exc,
        final=final,
        email=state.email,
        request=summary,
        attempt=attempt,
        started=started,
        response={"status": exc.status, "message": exc.message},
    )
    # The row keeps SATORI's words for a person to read; a log line may quote an
    # address in them, so it is redacted as the client's own lines are.
    log.info(
        "SATORI %s failed for sync state %s (attempt %s, %s): %s",
        endpoint,
        state.pk,
        attempt,
        "final" if final else f"retry in {delay:.0f}s",
        for_log(message, conf),
    )
    signals.push_failed.send(
        sender=Customer,
        email=state.email,
        customer=customer,
        endpoint=endpoint,
        error=exc,
        final=final,
    )
    return (PushOutcome.FAILED, None) if final else (PushOutcome.RETRY, delay)


def _rate_limited(state: SyncState, token: str, wait: float, conf: SatoriSettings) -> PushResult:
    due = timezone.now() + dt.timedelta(seconds=wait)
    if outbox.pending_count() > conf.BULK_THRESHOLD:
        # Too much for single calls: leave it to the sweep, which starts a bulk job.
        outbox.retry_later(state, token, due=due, dispatched=False)
        return PushOutcome.RETRY, None
    outbox.retry_later(state, token, due=due, dispatched=True)
    return PushOutcome.RETRY, wait


def _again(newer: bool) -> float | None:
    """When to push again: a save during the call left a newer version pending."""
    return get_settings().COALESCE_SECONDS if newer else None
