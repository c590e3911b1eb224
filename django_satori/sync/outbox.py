"""The outbox: the only code that writes :class:`~django_satori.models.SyncState`.

One row per SATORI customer identity (e-mail). Its life, in the order a change
travels:

- **marking** (in the caller's transaction): a save or delete bumps ``version``
  and makes the row pending (:func:`record_change`, :func:`record_delete`,
  :func:`mark_customers`);
- **claims**: a worker claims rows with a lease token before it sends them
  (:func:`claim`), and gives them back (:func:`release`, :func:`give_back`,
  :func:`write_back`); an expired claim is given back by the sweep
  (:func:`reclaim_expired`);
- **bulk parts**: an export claims rows for a part (:func:`claim_for_part`), and
  the part's results or failure release them (:func:`write_part_results`,
  :func:`release_part`);
- **import**: SATORI's admin export links rows to what SATORI holds
  (:func:`link_imported`, :func:`record_seen`).

Every status change goes through a version check, so an answer about an older
version never marks a newer change synced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar, cast

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Case, F, Q, Value, When
from django.db.models.expressions import RawSQL
from django.utils import timezone
from django.utils.translation import gettext as _

from ..conf import SatoriSettings, get_settings
from ..models import BulkPart, Customer, Operation, SyncState, SyncStatus
from ..rawsql import executemany, insert_from, insert_rows, update_rows
from . import dispatch

T = TypeVar("T")
log = logging.getLogger("django_satori.sync")

#: States a worker may pick up (SENDING only once its claim has expired).
SENDABLE = (SyncStatus.PENDING, SyncStatus.SENDING)
#: Sent, or on its way: an unchanged connected object need not be marked again.
#: (Failed, stopped and the rest are marked again, so a save can restart them.)
UNDER_WAY = (SyncStatus.SYNCED, SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
#: Still on its way to SATORI (an action for such a customer waits).
ON_ITS_WAY = (SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
#: E-mails or primary keys per ``IN (...)``: below SQLite's old 999-variable limit.
BATCH = 500


def chunked(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def backoff(attempt: int, conf: SatoriSettings, retry_after: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: exponential back-off with jitter;
    SATORI's Retry-After is a floor."""
    ceiling = min(conf.RETRY_BACKOFF_MAX_SECONDS, conf.RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, float(retry_after or 0))


# --------------------------------------------------------------------------
# Marking, inside the caller's transaction
# --------------------------------------------------------------------------


def record_change(customer: Customer) -> None:
    """Mark a saved ``customer`` for sync, in its save's transaction; push after commit."""
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return
    old_email = getattr(customer, "_loaded_email", None)
    email_changed = bool(old_email and old_email != customer.email)
    if email_changed:
        _follow_email_change(customer, cast(str, old_email))
    customer._loaded_email = customer.email
    state_id, became_pending = mark_pending(customer.email, customer.pk, Operation.UPSERT, conf)
    if became_pending or email_changed:
        dispatch.dispatch_on_commit(state_id, conf.COALESCE_SECONDS)


def record_delete(customer: Customer) -> None:
    """Mark a deleted ``customer``'s row for a delete in SATORI; push after commit."""
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return
    email = getattr(customer, "_loaded_email", None) or customer.email
    state_id, became_pending = mark_pending(email, None, Operation.DELETE, conf)
    if became_pending:
        dispatch.dispatch_on_commit(state_id, conf.COALESCE_SECONDS)


def mark_pending(
    email: str, customer_id: int | None, operation: str, conf: SatoriSettings
) -> tuple[int, bool]:
    """Bump the row's version and make it pending. Returns (id, whether it just became pending).

    The row is locked until the caller's transaction ends, so a worker cannot
    finish with an older version in between: the status we read is the truth.
    This runs in every save, so an existing row is updated with one statement
    where the database can return rows from an UPDATE (``_MARK_SQL``); the ORM
    path below does the same work in two statements.
    """
    now = timezone.now()
    due = now + dt.timedelta(seconds=conf.COALESCE_SECONDS)
    marked = _mark_existing(email, customer_id, operation, now, due)
    if marked is not None:
        return marked
    row = (
        SyncState.objects.select_for_update()
        .filter(email=email)
        .values_list("pk", "status")
        .first()
    )
    if row is None:
        try:
            with transaction.atomic():
                state = SyncState.objects.create(
                    email=email,
                    customer_id=customer_id,
                    operation=operation,
                    status=SyncStatus.PENDING,
                    dispatched_at=now,
                    not_before=due,
                )
            return state.pk, True
        except IntegrityError:  # created by a concurrent transaction: update it instead
            row = (
                SyncState.objects.select_for_update()
                .filter(email=email)
                .values_list("pk", "status")
                .get()
            )
    pk, status = row
    changes: dict[str, Any] = {
        "version": F("version") + 1,
        "status": SyncStatus.PENDING,
        "operation": operation,
        "updated_at": now,
    }
    if customer_id is not None or operation == Operation.DELETE:
        changes["customer_id"] = customer_id
    if status == SyncStatus.SENDING:
        changes["fingerprint"] = ""  # see _MARK_SQL
    became_pending = status != SyncStatus.PENDING
    if became_pending:
        # Saves within the window ride along with the first one (coalescing).
        # dispatched_at: the task queued after commit is on its way; the sweep
        # only steps in if the row is still pending long after that.
        changes.update(not_before=due, attempts=0, dispatched_at=now)
    SyncState.objects.filter(pk=pk).update(**changes)
    return pk, became_pending


#: ``mark_pending`` as one statement. Only a row that was not pending takes this
#: call's ``not_before``, so ``not_before = <due>`` in RETURNING says it just
#: became pending. ``customer_id``: kept when NULL is passed for an upsert, cleared
#: for a delete. A row being sent loses its fingerprint: if the worker sending it
#: dies after SATORI applied the call, the fingerprint would describe the push
#: before, and a revert to that state would be skipped as unchanged (a live worker
#: writes the new fingerprint back anyway).
_MARK_SQL = (
    "UPDATE {table} SET version = version + 1, status = %(pending)s, "
    "operation = %(operation)s, updated_at = %(now)s, "
    "customer_id = CASE WHEN %(clear)s THEN NULL ELSE COALESCE(%(customer)s, customer_id) END, "
    "not_before = CASE WHEN status = %(pending)s THEN not_before ELSE %(due)s END, "
    "attempts = CASE WHEN status = %(pending)s THEN attempts ELSE 0 END, "
    "dispatched_at = CASE WHEN status = %(pending)s THEN dispatched_at ELSE %(now)s END, "
    "fingerprint = CASE WHEN status = %(sending)s THEN '' ELSE fingerprint END "
    "WHERE email = %(email)s RETURNING id, not_before = %(due)s"
)


def _mark_existing(
    email: str, customer_id: int | None, operation: str, now: dt.datetime, due: dt.datetime
) -> tuple[int, bool] | None:
    """``mark_pending`` for an existing row in one statement; None: no such row, or
    a database that cannot return rows from an UPDATE (the caller's ORM path)."""
    connection = connections[router.db_for_write(SyncState)]
    if not can_update_returning(connection):
        return None
    adapt = connection.ops.adapt_datetimefield_value
    params = {
        "pending": SyncStatus.PENDING,
        "sending": SyncStatus.SENDING,
        "operation": operation,
        "now": adapt(now),
        "due": adapt(due),
        "email": email,
        "customer": customer_id,
        "clear": operation == Operation.DELETE,
    }
    with connection.cursor() as cursor:
        cursor.execute(
            _MARK_SQL.format(table=connection.ops.quote_name(SyncState._meta.db_table)), params
        )
        row = cursor.fetchone()
    return None if row is None else (int(row[0]), bool(row[1]))


def can_update_returning(connection: Any) -> bool:
    """Whether ``connection``'s database returns rows from an UPDATE."""
    if connection.vendor == "postgresql":
        return True
    return connection.vendor == "sqlite" and connection.Database.sqlite_version_info >= (3, 35)


def _follow_email_change(customer: Customer, old_email: str) -> None:
    """The customer's e-mail changed: carry SATORI's identity over to the new address.

    With a known hashcode the next push identifies the customer by hashcode,
    so SATORI changes the address instead of creating a second customer.
    """
    old = SyncState.objects.select_for_update().filter(email=old_email).first()
    if old is None:
        return
    SyncState.objects.filter(pk=old.pk).update(
        customer=None,
        operation=Operation.NONE,
        status=SyncStatus.SYNCED,
        updated_at=timezone.now(),
    )
    carried = {
        "hashcode": old.hashcode,
        "in_satori": old.in_satori,
        "sent_tags": old.sent_tags,
        "previous_email": old.previous_email or (old_email if old.in_satori else ""),
    }
    updated = SyncState.objects.filter(email=customer.email).update(**carried)
    if not updated:
        # Not pending yet: mark_pending, called next, makes it pending and so dispatches it.
        SyncState.objects.create(
            email=customer.email,
            version=0,
            status=SyncStatus.SYNCED,
            operation=Operation.NONE,
            **carried,
        )


def mark_customers(
    queryset: models.QuerySet[Customer], conf: SatoriSettings, *, full: bool = False
) -> int:
    """Mark every customer in ``queryset`` pending (after ``update()``/``bulk_*()``).

    Pushes are queued after commit; a selection larger than ``BULK_THRESHOLD``
    is left to the sweep, which sends it through a bulk job. ``full``: SATORI is
    known to differ (the reconciliation found it): the next push sends every item,
    even what we sent before, and removes the tags SATORI's export showed.
    """
    now = timezone.now()
    pending = {
        "status": SyncStatus.PENDING,
        "operation": Operation.UPSERT,
        "attempts": 0,
        "not_before": now,
        "dispatched_at": None,
        "updated_at": now,
    }
    with transaction.atomic():
        states = SyncState.objects.filter(customer__in=queryset.values("pk"))
        if full:
            _forget_acknowledged(states)
        count = states.update(version=F("version") + 1, **pending)
        # Customers written with update()/bulk_create() have no outbox row yet: theirs
        # are inserted pending, by one INSERT ... SELECT.
        missing = queryset.filter(sync_state__isnull=True).values_list("pk", "email")
        inserted = insert_from(
            SyncState, ("customer_id", "email"), missing, constants={"version": 1, **pending}
        )
        # Left out: the address has a row without a customer (one deleted before, or
        # whose e-mail changed). Its history (hashcode, sent tags) is this customer's now.
        for pk, email in missing:
            inserted += SyncState.objects.filter(email=email, customer__isnull=True).update(
                customer_id=pk, version=F("version") + 1, **pending
            )
        if inserted:
            count = states.count()
        if count > conf.BULK_THRESHOLD:
            transaction.on_commit(dispatch.dispatch_sweep)
        else:
            dispatch.dispatch_many_on_commit(list(states.values_list("pk", flat=True)))
    return count


def _forget_acknowledged(states: models.QuerySet[SyncState]) -> None:
    rows = []
    for pk, sent, remote in states.values_list("pk", "sent_tags", "remote_values"):
        sent = list(sent or [])
        remote_tags = (remote or {}).get("tags") or []
        rows.append(
            {
                "pk": pk,
                "fingerprint": "",
                "sent_tags": sent
                + [t for t in remote_tags if isinstance(t, str) and t not in sent],
            }
        )
    update_rows(SyncState, ["fingerprint", "sent_tags"], rows)


def stop(customer_id: int, reason: str) -> None:
    """Stop syncing a customer (its connected object went away or opted out)."""
    SyncState.objects.filter(customer_id=customer_id).update(
        status=SyncStatus.STOPPED, last_error=reason, updated_at=timezone.now()
    )


def is_under_way(customer: Customer) -> bool:
    """The customer's current data is in SATORI, or on its way there."""
    return SyncState.objects.filter(customer=customer, status__in=UNDER_WAY).exists()


def pending_counts() -> dict[str, int]:
    """How many customers are in each sync status (for commands and the admin)."""
    rows = SyncState.objects.values_list("status").annotate(n=models.Count("pk"))
    return {status: n for status, n in rows}


def pending_count() -> int:
    return SyncState.objects.filter(status=SyncStatus.PENDING).count()


# --------------------------------------------------------------------------
# Claims of single pushes
# --------------------------------------------------------------------------


def claim(
    state_ids: list[int], conf: SatoriSettings, *, ignore_window: bool = False
) -> tuple[str, dict[int, SyncState]]:
    """Claim the sendable rows among ``state_ids`` with one UPDATE; returns the claim's
    token and the claimed rows (with their customers)."""
    now = timezone.now()
    token = uuid.uuid4().hex
    due = Q(not_before__isnull=True) | Q(not_before__lte=now)
    if ignore_window:
        due |= Q(attempts=0)
    lease = dt.timedelta(seconds=conf.LEASE_SECONDS)
    (
        SyncState.objects.filter(pk__in=state_ids, status__in=SENDABLE, bulk_part__isnull=True)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .filter(due)
        .update(
            status=SyncStatus.SENDING,
            lease_token=token,
            lease_until=now + lease,
            # Taken over from a worker whose claim expired: it may have been sent.
            fingerprint=Case(
                When(status=SyncStatus.SENDING, then=Value("")), default=F("fingerprint")
            ),
        )
    )
    claimed = {
        state.pk: state
        for state in SyncState.objects.select_related("customer").filter(
            pk__in=state_ids, lease_token=token
        )
    }
    return token, claimed


def renew(state_ids: Iterable[int], token: str, conf: SatoriSettings) -> None:
    """Extend the claim on rows a long batch has still to send."""
    SyncState.objects.filter(pk__in=list(state_ids), lease_token=token).update(
        lease_until=timezone.now() + dt.timedelta(seconds=conf.LEASE_SECONDS)
    )


def release(
    state: SyncState, token: str, *, status: str, synced_version: int | None = None, **fields: Any
) -> bool:
    """Write the outcome and give up the claim, unless a newer change arrived meanwhile.

    A newer version keeps the row pending, as the data just sent is already
    stale; returns True then. Usually the first UPDATE matches, so a push
    costs one statement here (the second runs only after a save during the call).
    """
    changes: dict[str, Any] = {
        "lease_until": None,
        "lease_token": "",
        "updated_at": timezone.now(),
        **fields,
    }
    if synced_version is not None:
        changes.update(synced_version=synced_version, not_before=None)
    mine = SyncState.objects.filter(pk=state.pk, lease_token=token)
    if mine.filter(version=state.version if synced_version is None else synced_version).update(
        status=status, **changes
    ):
        return False
    return bool(mine.update(status=SyncStatus.PENDING, **changes))


def retry_later(
    state: SyncState, token: str, *, due: dt.datetime, dispatched: bool, **fields: Any
) -> None:
    """Give the row back pending until ``due``; ``dispatched``: a task is queued for then."""
    release(
        state,
        token,
        status=SyncStatus.PENDING,
        not_before=due,
        dispatched_at=due if dispatched else None,
        **fields,
    )


def note_tags_sent(state: SyncState, token: str) -> None:
    """Record, before the call, the tags a push is about to add (``state.sent_tags``)."""
    SyncState.objects.filter(pk=state.pk, lease_token=token).update(sent_tags=state.sent_tags)


def note_tags_to_send(states: Iterable[SyncState], token: str) -> None:
    """:func:`note_tags_sent` for the rows a batch is about to send, before its first call:
    one round trip instead of one UPDATE per push (pipelined on PostgreSQL).

    A row that then is not sent (vetoed, rate-limited, failed) keeps the tags in
    ``sent_tags`` although SATORI may not have them: its next push sends them in
    ``delete_tags`` if they are dropped meanwhile, which SATORI takes harmlessly
    (docs/satori-facts.md), and the push after a success writes the tags sent.
    """
    rows = []
    for state in states:
        customer = state.customer
        if state.operation != Operation.UPSERT or customer is None:
            continue
        sent = list(state.sent_tags or [])
        added = [tag for tag in customer.tags or [] if tag not in sent]
        if added:
            state.sent_tags = sent + added
            rows.append({"pk": state.pk, "sent_tags": state.sent_tags})
    update_rows(SyncState, ["sent_tags"], rows, where={"lease_token": token})


def outcome_unknown(state: SyncState, tags_sent: list[str]) -> dict[str, Any]:
    """Fields for a row whose call may have been applied although no answer came.

    SATORI may now hold what was sent, or what it had before: the next push must
    send everything (no "unchanged" skip: the fingerprint is cleared) and remove
    every tag either state has (the tags sent are added to ``sent_tags``), so a
    revert A -> B -> A or a removal computed from the wrong list cannot leave
    SATORI different.
    """
    sent = list(state.sent_tags or [])
    return {"fingerprint": "", "sent_tags": sent + [tag for tag in tags_sent if tag not in sent]}


def give_back(state_ids: list[int], token: str) -> None:
    """Give claimed rows back pending (a batch stopped before sending them)."""
    try:
        SyncState.objects.filter(pk__in=state_ids, lease_token=token).update(
            status=SyncStatus.PENDING, lease_until=None, lease_token=""
        )
    except DatabaseError:  # the database is gone: the claims expire and the sweep hands them out
        log.warning("Could not give back %d claimed sync state(s).", len(state_ids))


@dataclasses.dataclass
class Answer:
    """SATORI accepted a push or delete: what to write to its row."""

    state: SyncState
    #: The row's status when no newer version arrived meanwhile.
    status: str
    #: fingerprint, sent_tags, in_satori, hashcode, previous_email
    values: dict[str, Any]
    at: float = dataclasses.field(default_factory=time.monotonic)


#: ``release`` for one answer, the version check in a CASE; the %s after
#: ``updated_at`` are the values of ``_ANSWER_FIELDS``, in that order.
_WRITE_BACK_SQL = (
    "UPDATE {table} SET status = CASE WHEN version = %s THEN %s ELSE %s END, "
    "synced_version = %s, not_before = NULL, lease_until = NULL, lease_token = '', "
    "last_error = '', attempts = attempts + 1, removal_pending = %s, fingerprint = %s, "
    "sent_tags = %s, "
    "in_satori = %s, hashcode = %s, previous_email = %s, last_synced_at = %s, updated_at = %s "
    "WHERE id = %s AND lease_token = %s"
)
_ANSWER_FIELDS = (
    "fingerprint",
    "sent_tags",
    "in_satori",
    "hashcode",
    "previous_email",
    "last_synced_at",
    "updated_at",
)


def write_back(answers: Sequence[Answer], token: str) -> set[int]:
    """Write SATORI's answers to their rows; returns the ids a newer save left pending.

    As ``release`` does for one row: a save during the call leaves the row
    pending, as the data just sent is already stale. One statement per row,
    sent with ``rawsql.executemany`` (pipelined on psycopg 3: one round trip), then
    one SELECT for the rows left pending. That SELECT also sees a save made
    just after this write-back, which then gets one more, harmless, dispatch.
    """
    alias = router.db_for_write(SyncState)
    connection = connections[alias]
    fields = [cast(models.Field, SyncState._meta.get_field(name)) for name in _ANSWER_FIELDS]
    sql = _WRITE_BACK_SQL.format(table=connection.ops.quote_name(SyncState._meta.db_table))
    now = timezone.now()
    params = []
    for answer in answers:
        values = {**answer.values, "last_synced_at": now, "updated_at": now}
        params.append(
            [
                answer.state.version,
                answer.status,
                SyncStatus.PENDING,
                answer.state.version,
                # This push sent delete_tags for every tag dropped since SATORI last heard.
                False,
                *(field.get_db_prep_save(values[field.name], connection) for field in fields),
                answer.state.pk,
                token,
            ]
        )
    ids = [answer.state.pk for answer in answers]

    def write() -> set[int]:
        with transaction.atomic(using=alias):
            executemany(connection, sql, params)
            return set(
                SyncState.objects.using(alias)
                .filter(pk__in=ids, status=SyncStatus.PENDING)
                .values_list("pk", flat=True)
            )

    try:
        return write()
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        # The connection dropped (a restarted server, a proxy's idle timeout). These
        # calls were made: once more on a new connection, rather than leave them all
        # to be sent again when their claims expire.
        with contextlib.suppress(DatabaseError):
            connection.close()
        return write()


# --------------------------------------------------------------------------
# The sweep's share
# --------------------------------------------------------------------------


def reclaim_expired(now: dt.datetime) -> int:
    """A worker died holding a claim: give its rows back pending. Its call may have
    reached SATORI, so the next push sends everything (no "unchanged" skip)."""
    return SyncState.objects.filter(status=SyncStatus.SENDING, lease_until__lt=now).update(
        status=SyncStatus.PENDING, lease_until=None, lease_token="", fingerprint="", updated_at=now
    )


def overdue(now: dt.datetime, stale: dt.datetime) -> models.QuerySet[SyncState]:
    """Pending rows due now whose push was never queued, or queued before ``stale``."""
    return (
        SyncState.objects.filter(status=SyncStatus.PENDING, bulk_part__isnull=True)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=stale))
    )


def bulk_candidates(due: models.QuerySet[SyncState]) -> models.QuerySet[SyncState]:
    """The rows of ``due`` a bulk job may send: upserts of existing customers, except
    those only a single push can complete (tags to remove)."""
    return due.filter(operation=Operation.UPSERT, customer__isnull=False, removal_pending=False)


def mark_dispatched(state_ids: list[int], now: dt.datetime) -> None:
    SyncState.objects.filter(pk__in=state_ids).update(dispatched_at=now)


# --------------------------------------------------------------------------
# Bulk parts
# --------------------------------------------------------------------------


def claim_for_part(
    part: BulkPart, members: list[tuple[int, str]], conf: SatoriSettings
) -> set[str]:
    """Claim the outbox rows of ``members`` (customer id, e-mail) for ``part``; returns
    the e-mails claimed.

    Left out: rows being sent singly or already in another part (counted as
    skipped; an expired send is given back by the sweep first), rows whose
    e-mail changed locally (SATORI must be told by hashcode, which only a
    single push does: they are dispatched), and, with ``CREATE_UNKNOWN``
    False, customers SATORI does not know.
    """
    now = timezone.now()
    emails = list(dict.fromkeys(email for _pk, email in members))  # each once, in order
    # Left to single pushes: a changed e-mail (told by hashcode) and tags to remove.
    identity_change = Q(previous_email__gt="", hashcode__gt="") | Q(removal_pending=True)
    unknown = Q(in_satori=False, hashcode="")
    # Rows being sent are left alone even when their claim has expired: the sweep gives
    # those back first, and a slow worker's late answer must not land on a bulk row.
    free = (
        SyncState.objects.filter(bulk_part__isnull=True)
        .exclude(status=SyncStatus.SENDING)
        .exclude(identity_change)
    )
    if not conf.CREATE_UNKNOWN:
        free = free.exclude(unknown)
    vendor = connections[router.db_for_write(SyncState)].vendor
    updated = 0
    for members_of in _by_email(emails, vendor):
        # As few columns as possible: this UPDATE is most of an export's cost.
        updated += free.filter(members_of).update(
            bulk_part=part, status=SyncStatus.IN_BULK, bulk_version=F("version")
        )
    if updated == len(emails) and vendor in ("postgresql", "sqlite"):
        # The part is new and e-mails are unique (compared exactly, as these databases do):
        # every member's row is now the part's, so there is nothing to read back.
        return set(emails)
    claimed = set(SyncState.objects.filter(bulk_part=part).values_list("email", flat=True))
    rest = [(pk, email) for pk, email in members if email not in claimed]
    existing: set[str] = set()
    handover: list[int] = []
    for pairs in chunked(rest):
        rows = SyncState.objects.filter(email__in=[e for _pk, e in pairs]).values_list(
            "pk",
            "email",
            "bulk_part_id",
            "status",
            "previous_email",
            "hashcode",
            "in_satori",
            "removal_pending",
        )
        for pk, email, bulk_part, status, previous, hashcode, in_satori, removal in rows:
            existing.add(email)
            if bulk_part is not None or status == SyncStatus.SENDING:
                continue
            if (previous and hashcode) or removal:
                handover.append(pk)
            elif not conf.CREATE_UNKNOWN and not in_satori and not hashcode:
                SyncState.objects.filter(pk=pk, bulk_part__isnull=True).update(
                    status=SyncStatus.NOT_IN_SATORI,
                    updated_at=now,
                    last_error=_(
                        "Not in SATORI, and SATORI['CREATE_UNKNOWN'] is False: not created."
                    ),
                )
    missing = [(pk, email) for pk, email in rest if email not in existing]
    if missing:
        # Customers written with update()/bulk_create() have no outbox row yet.
        creatable = conf.CREATE_UNKNOWN
        SyncState.objects.bulk_create(
            [
                SyncState(
                    email=email,
                    customer_id=pk,
                    operation=Operation.UPSERT,
                    status=SyncStatus.IN_BULK if creatable else SyncStatus.NOT_IN_SATORI,
                    bulk_part=part if creatable else None,
                    bulk_version=1,
                )
                for pk, email in missing
            ],
            batch_size=BATCH,
            ignore_conflicts=True,
        )
        claimed = set(SyncState.objects.filter(bulk_part=part).values_list("email", flat=True))
    if handover:
        _hand_over(handover, now)
    return claimed


def _by_email(emails: list[str], vendor: str) -> Iterator[Q]:
    """Conditions that select the outbox rows of ``emails``: one for the whole list where
    the database takes it as a single parameter (one statement per part), else batches.

    SQLite is steered to the rows by primary key, found through the e-mail index: given
    ``bulk_part IS NULL`` beside ``email IN (...)`` and no planner statistics, it walks
    the index on ``bulk_part_id``, i.e. every unclaimed row, for each statement.
    """
    if not emails:
        return
    if vendor == "postgresql":
        yield Q(email__in=RawSQL("SELECT unnest(%s::text[])", (emails,)))
        return
    if vendor == "sqlite":  # JSON1 is built in (and needed by the JSONFields anyway)
        batches: Iterable[Any] = [RawSQL("SELECT value FROM json_each(%s)", (json.dumps(emails),))]
    else:
        batches = chunked(emails)
    for batch in batches:
        yield Q(pk__in=SyncState.objects.filter(email__in=batch).values("pk"))


def _hand_over(state_ids: list[int], now: dt.datetime) -> None:
    """Leave these to single pushes (which identify a changed e-mail by hashcode and
    remove tags)."""
    for batch in chunked(state_ids):
        SyncState.objects.filter(pk__in=batch, bulk_part__isnull=True).update(
            status=SyncStatus.PENDING, not_before=now, dispatched_at=now, updated_at=now
        )
    dispatch.dispatch_many_on_commit(state_ids)


def mark_invalid(messages: dict[str, str]) -> None:
    """Show a row's local error (by e-mail) on its outbox row (failed), unless it changed
    since or a worker is sending it.

    Without this the sweep would put the same invalid rows into every
    automatic job. The version is compared in the UPDATE itself, so a save
    that lands meanwhile keeps its row pending.
    """
    now = timezone.now()
    snapshot = list(
        SyncState.objects.filter(email__in=list(messages), bulk_part__isnull=True)
        .exclude(status=SyncStatus.SENDING, lease_until__gt=now)
        .values_list("pk", "email", "version")
    )
    for pk, email, version in snapshot:
        SyncState.objects.filter(pk=pk, version=version, bulk_part__isnull=True).update(
            status=SyncStatus.FAILED, last_error=messages[email], last_error_at=now, updated_at=now
        )


def settle_dry_run(emails: Sequence[str]) -> None:
    """An automatic job under ``DRY_RUN``: like a single push, the row ends as dry_run,
    so the sweep does not start the same job again every minute."""
    now = timezone.now()
    for batch in chunked(emails):
        SyncState.objects.filter(
            email__in=batch, status=SyncStatus.PENDING, bulk_part__isnull=True
        ).update(status=SyncStatus.DRY_RUN, updated_at=now)


def release_part(part_id: int, *, error: str = "", hold_seconds: float = 0) -> int:
    """Give a part's customers back: synced if SATORI already has their current version,
    else pending. ``hold_seconds`` keeps the sweep from retrying at once after a failure."""
    now = timezone.now()
    changes: dict[str, Any] = {
        "bulk_part": None,
        "status": Case(
            When(version=F("synced_version"), then=Value(SyncStatus.SYNCED)),
            default=Value(SyncStatus.PENDING),
        ),
        "dispatched_at": None,
        "not_before": now + dt.timedelta(seconds=hold_seconds) if hold_seconds else None,
        "updated_at": now,
    }
    if error:
        changes.update(last_error=error, last_error_at=now)
    return SyncState.objects.filter(bulk_part_id=part_id).update(**changes)


#: (outbox row id, customer id, tags sent) of a part's customer, by e-mail.
PartMember = tuple[int, Any, Any]


def part_members(part: BulkPart) -> dict[str, PartMember]:
    return {
        email: (pk, customer_id, sent_tags)
        for pk, email, customer_id, sent_tags in SyncState.objects.filter(
            bulk_part=part
        ).values_list("pk", "email", "customer_id", "sent_tags")
    }


def write_part_results(
    part: BulkPart,
    members: dict[str, PartMember],
    failed: dict[str, str],
    tags_by_email: dict[str, list[str]],
) -> list[int]:
    """Write a finished part's per-row results to its members' rows (in the caller's
    transaction); returns the ids left pending because they were saved meanwhile.

    ``failed``: SATORI's message by e-mail. A row saved while the job ran goes back to
    pending for its newer version; the others end failed or synced.
    """
    now = timezone.now()
    failures = [
        SyncState(pk=members[email][0], last_error=message, last_error_at=now)
        for email, message in failed.items()
        if email in members
    ]
    for batch in chunked(failures):
        SyncState.objects.bulk_update(batch, ["last_error", "last_error_at"])
        SyncState.objects.filter(pk__in=[r.pk for r in batch], bulk_part=part).update(
            status=Case(
                When(version=F("bulk_version"), then=Value(SyncStatus.FAILED)),
                default=Value(SyncStatus.PENDING),
            ),
            bulk_part=None,
            attempts=F("attempts") + 1,
            not_before=None,
            dispatched_at=None,
            updated_at=now,
        )
    succeeded = [email for email in members if email not in failed]
    # SATORI now has these tags too. A row whose sent tags include one it no longer
    # has cannot be synced by the bulk API, which only adds tags: it stays pending for
    # a single push, which sends delete_tags.
    grown = []
    removals = []
    for email in succeeded:
        sent = list(members[email][2] or [])
        tags = tags_by_email.get(email, ())
        added = [t for t in tags if t and t not in sent]
        if added:
            grown.append({"pk": members[email][0], "sent_tags": sent + added})
        if any(t not in tags for t in sent):
            removals.append(members[email][0])
    # One UPDATE per row, pipelined: bulk_update() built a CASE over each batch in
    # Python, 1.6 of the 2.1 s a 10,000-row part took to apply.
    update_rows(SyncState, ["sent_tags"], grown)
    for ids in chunked([members[email][0] for email in succeeded]):
        SyncState.objects.filter(pk__in=ids, bulk_part=part).update(
            status=Case(
                When(version=F("bulk_version"), then=Value(SyncStatus.SYNCED)),
                default=Value(SyncStatus.PENDING),
            ),
            synced_version=F("bulk_version"),
            in_satori=True,
            last_synced_at=now,
            attempts=0,
            last_error="",
            last_error_at=None,
            bulk_part=None,
            # Unknown to us what exactly SATORI stored: the next single push sends in full.
            fingerprint="",
            not_before=None,
            dispatched_at=None,
            updated_at=now,
        )
    for ids in chunked(removals):
        SyncState.objects.filter(pk__in=ids).update(
            status=SyncStatus.PENDING, removal_pending=True, updated_at=now
        )
    return list(
        SyncState.objects.filter(
            pk__in=[v[0] for v in members.values()], status=SyncStatus.PENDING
        ).values_list("pk", flat=True)
    )


# --------------------------------------------------------------------------
# Links from SATORI's admin export (importing.py)
# --------------------------------------------------------------------------

#: Columns of a row the import inserts; the rest are :func:`link_imported`'s constants.
IMPORT_COLUMNS: tuple[str, ...] = ("email", "customer_id", "hashcode", "remote_values", "sent_tags")


def link_imported(rows: list[dict[str, Any]], seen_at: dt.datetime) -> None:
    """Insert rows for customers found in SATORI's export (``IMPORT_COLUMNS`` each).

    Status "synced" with version 0: nothing is pending, so nothing goes out; the
    reconciliation report shows whether the values agree.
    """
    insert_rows(
        SyncState,
        IMPORT_COLUMNS,
        rows,
        constants={
            "operation": Operation.UPSERT,
            "status": SyncStatus.SYNCED,
            "version": 0,
            "synced_version": 0,
            "in_satori": True,
            "remote_seen_at": seen_at,
        },
    )


def record_seen(rows: list[dict[str, Any]]) -> None:
    """Record what SATORI's export holds for existing rows (pk, in_satori, hashcode,
    remote_values, remote_seen_at, customer_id each)."""
    update_rows(
        SyncState,
        ("in_satori", "hashcode", "remote_values", "remote_seen_at", "customer_id"),
        rows,
    )
