"""The sync engine, in the order a change travels.

1. Recording (in the caller's transaction): ``Customer.save()`` and deletes
   mark the customer's :class:`~django_satori.models.SyncState` row pending.
   That row is the outbox: committed with the change, or not at all.
2. Dispatch (after commit): the row's id goes to a publisher thread, which
   queues ids in batches as ``push_many`` tasks (ids only, no data).
3. Sending (in the worker): the task claims its rows, sends each customer's
   *current* data, and writes SATORI's answer back to the same row.
4. Safety net: :func:`sweep` (Celery beat and ``manage.py satori_sync``)
   re-dispatches whatever stayed pending, and routes a large backlog through
   the bulk CSV API instead of thousands of single calls.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime as dt
import enum
import functools
import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

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
from django.db.models import F, Q
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from django.utils.translation import gettext as _

from . import ratelimit, signals
from .conf import SatoriSettings, get_settings
from .exceptions import (
    SatoriError,
    SatoriNotFoundError,
    SatoriValidationError,
)
from .mapping import ModelMapping, get_mappings
from .models import (
    ActionStatus,
    BulkJob,
    BulkState,
    Customer,
    CustomerAction,
    Operation,
    SyncLog,
    SyncState,
    SyncStatus,
)
from .rawsql import executemany, insert_from, insert_rows
from .redaction import for_log, redact_form
from .schema import STANDARD_FIELDS, join_tags, normalize_email

log = logging.getLogger("django_satori.sync")

#: Customer model fields sent as SATORI items of the same name.
DATA_FIELDS: tuple[str, ...] = tuple(
    f for f in STANDARD_FIELDS if f not in ("email", "hashcode", "append_tags", "delete_tags")
)
#: States a worker may pick up (SENDING only once its claim has expired).
_SENDABLE = (SyncStatus.PENDING, SyncStatus.SENDING)
#: Sent, or on its way: an unchanged connected object need not be marked again.
#: (Failed, stopped and the rest are marked again, so a save can restart them.)
_UNDER_WAY = (SyncStatus.SYNCED, SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
_BULK_JOB_ACTIVE = (
    BulkState.CREATED,
    BulkState.EXPORTING,
    BulkState.UPLOADING,
    BulkState.PROCESSING,
)


# --------------------------------------------------------------------------
# 1. Recording changes, inside the caller's transaction
# --------------------------------------------------------------------------


def record_change(customer: Customer) -> None:
    """Mark ``customer`` for sync; called by ``Customer.save()`` in its transaction."""
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return
    old_email = getattr(customer, "_loaded_email", None)
    if old_email and old_email != customer.email:
        _follow_email_change(customer, old_email)
    customer._loaded_email = customer.email
    state_id, became_pending = _mark_pending(customer.email, customer.pk, Operation.UPSERT, conf)
    if became_pending:
        _dispatch_on_commit(state_id, conf.COALESCE_SECONDS)


def _customer_deleted(sender: Any, instance: Customer, **kwargs: Any) -> None:
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return
    email = getattr(instance, "_loaded_email", None) or instance.email
    state_id, became_pending = _mark_pending(email, None, Operation.DELETE, conf)
    if became_pending:
        _dispatch_on_commit(state_id, conf.COALESCE_SECONDS)


def _mark_pending(
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
    became_pending = status != SyncStatus.PENDING
    if became_pending:
        # Saves within the window ride along with the first one (coalescing).
        # dispatched_at: the task queued after commit is on its way; the sweep
        # only steps in if the row is still pending long after that.
        changes.update(not_before=due, attempts=0, dispatched_at=now)
    SyncState.objects.filter(pk=pk).update(**changes)
    return pk, became_pending


#: ``_mark_pending`` as one statement. Only a row that was not pending takes this
#: call's ``not_before``, so ``not_before = <due>`` in RETURNING says it just
#: became pending. ``customer_id``: kept when NULL is passed for an upsert, cleared
#: for a delete (the second placeholder).
_MARK_SQL = (
    "UPDATE {table} SET version = version + 1, status = %(pending)s, "
    "operation = %(operation)s, updated_at = %(now)s, "
    "customer_id = CASE WHEN %(clear)s THEN NULL ELSE COALESCE(%(customer)s, customer_id) END, "
    "not_before = CASE WHEN status = %(pending)s THEN not_before ELSE %(due)s END, "
    "attempts = CASE WHEN status = %(pending)s THEN attempts ELSE 0 END, "
    "dispatched_at = CASE WHEN status = %(pending)s THEN dispatched_at ELSE %(now)s END "
    "WHERE email = %(email)s RETURNING id, not_before = %(due)s"
)


def _mark_existing(
    email: str, customer_id: int | None, operation: str, now: dt.datetime, due: dt.datetime
) -> tuple[int, bool] | None:
    """``_mark_pending`` for an existing row in one statement; None: no such row, or
    a database that cannot return rows from an UPDATE (the caller's ORM path)."""
    connection = connections[router.db_for_write(SyncState)]
    if not _can_update_returning(connection):
        return None
    adapt = connection.ops.adapt_datetimefield_value
    params = {
        "pending": SyncStatus.PENDING,
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


def _can_update_returning(connection: Any) -> bool:
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
        SyncState.objects.create(email=customer.email, version=0, **carried)


def mark_for_sync(queryset: models.QuerySet[Any]) -> int:
    """Mark every customer in ``queryset`` pending (after ``update()``/``bulk_*()``).

    ``queryset`` may be of :class:`Customer` or of a connected model. Large
    selections are left to :func:`sweep`, which sends them through bulk jobs.
    """
    conf = get_settings()
    mapping = get_mappings().get(queryset.model)
    if mapping is not None:
        count = 0
        for instance in queryset.iterator(chunk_size=500):
            if _sync_source(mapping, instance, force=True):
                count += 1
        return count
    if queryset.model is not Customer:
        raise TypeError(
            f"{queryset.model.__name__} is not Customer or a connected model (SATORI['MAPPINGS'])."
        )
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
            transaction.on_commit(_enqueue_sweep)
        else:
            ids = list(states.values_list("pk", flat=True))
            transaction.on_commit(lambda: dispatch_many(ids))
    return count


# Connected project models ----------------------------------------------------


def _source_saved(sender: Any, instance: Any, raw: bool = False, **kwargs: Any) -> None:
    mapping = get_mappings().get(sender)
    if mapping is not None and not raw and get_settings().SYNC_ENABLED:
        _sync_source(mapping, instance)


def _sync_source(mapping: ModelMapping, instance: Any, *, force: bool = False) -> bool:
    """Update (or create) the Customer that mirrors ``instance``; its save records the change.

    A save that changed nothing SATORI gets (a login updating ``last_login``,
    say) writes nothing, unless ``force`` (``mark_for_sync``).
    """
    pk = str(instance.pk)
    customer = _mirrors(mapping, pk).first()
    if not mapping.wants_sync(instance):
        if customer is not None:
            _stop(customer, _("The connected object no longer wants to be synced."))
        return False
    values = mapping.customer_values(instance)
    values["email"] = normalize_email(values["email"])
    if customer is not None and not force and _mirror_is_current(customer, values):
        return True
    if customer is None:
        customer = Customer.objects.filter(email=values["email"]).first() or Customer(
            source_model=mapping.label, source_pk=pk
        )
        customer.source_model, customer.source_pk = mapping.label, pk
    for name, value in values.items():
        setattr(customer, name, value)
    customer.save()
    return True


def _mirror_is_current(customer: Customer, values: dict[str, Any]) -> bool:
    """The mirror already holds ``values`` and its sync is under way or done."""
    if any(getattr(customer, name) != value for name, value in values.items()):
        return False  # the usual case, decided without a query
    return SyncState.objects.filter(customer=customer, status__in=_UNDER_WAY).exists()


def _mirrors(mapping: ModelMapping, pk: str) -> models.QuerySet[Customer]:
    # The unique index on (source_model, source_pk) is partial (source_model <> ''):
    # SQLite only uses it when the query repeats that condition, else it scans the table.
    return Customer.objects.filter(~Q(source_model=""), source_model=mapping.label, source_pk=pk)


def _source_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    mapping = get_mappings().get(sender)
    if mapping is None or not get_settings().SYNC_ENABLED:
        return
    customer = _mirrors(mapping, str(instance.pk))
    if mapping.on_delete == "delete":
        customer.delete()
    else:
        for c in customer:
            _stop(c, _("The connected object was deleted; the customer stays in SATORI."))


def _stop(customer: Customer, reason: str) -> None:
    Customer.objects.filter(pk=customer.pk).update(source_model="", source_pk="")
    SyncState.objects.filter(customer=customer).update(
        status=SyncStatus.STOPPED, last_error=reason, updated_at=timezone.now()
    )


_connected: list[tuple[models.signals.ModelSignal, Any, str]] = []


def connect_signals() -> None:
    """Connect deletes of Customer and saves/deletes of connected models (idempotent)."""
    for signal, sender, uid in _connected:
        signal.disconnect(sender=sender, dispatch_uid=uid)
    _connected.clear()
    wiring: list[tuple[models.signals.ModelSignal, Any, Any, str]] = [
        (post_delete, Customer, _customer_deleted, "django_satori.customer_deleted"),
    ]
    for model, mapping in get_mappings().items():
        wiring.append((post_save, model, _source_saved, f"django_satori.saved.{mapping.label}"))
        wiring.append(
            (post_delete, model, _source_deleted, f"django_satori.deleted.{mapping.label}")
        )
    for signal, sender, receiver, uid in wiring:
        signal.connect(receiver, sender=sender, dispatch_uid=uid, weak=False)
        _connected.append((signal, sender, uid))


# --------------------------------------------------------------------------
# 2. Dispatch, after commit
# --------------------------------------------------------------------------

#: One quick retry, then give up: the row is safe in the outbox and the sweep
#: sends it later, so a save must not hang while the broker is down.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3}
#: After a failed publish, skip publishing for this long (per process): during a
#: broker outage every save would otherwise wait for its own failed attempt.
BROKER_PAUSE_SECONDS = 5.0
_broker_paused_until = 0.0
#: Most outbox ids in one ``push_many`` message. A worker sends them one after
#: another, so this bounds how long one message keeps a worker busy.
DISPATCH_BATCH = 100
#: How long the publisher thread lets ids gather before sending them. Pushes
#: wait ``COALESCE_SECONDS`` anyway, so nobody sees these milliseconds.
DISPATCH_LINGER_SECONDS = 0.05
#: At interpreter exit, wait this long for queued ids to reach the broker.
DISPATCH_EXIT_WAIT_SECONDS = 5.0


def _publish(task: Any, args: tuple[Any, ...], countdown: float, what: str) -> bool:
    global _broker_paused_until
    if time.monotonic() < _broker_paused_until:
        return False
    try:
        task.apply_async(args, countdown=max(0.0, countdown), retry_policy=PUBLISH_RETRY)
    except Exception:  # the broker is down; the outbox keeps the work for the sweep
        _broker_paused_until = time.monotonic() + BROKER_PAUSE_SECONDS
        log.warning("Could not queue %s; the periodic sweep will send it.", what, exc_info=True)
        return False
    return True


def _dispatch_on_commit(state_id: int, countdown: float) -> None:
    transaction.on_commit(lambda: _publisher.put(state_id, countdown))


class _Publisher:
    """Hands after-commit dispatches to the broker from one thread per process.

    Building and sending a Celery message costs about half a millisecond of CPU,
    which in the saving request was a large part of what sync adds to a save.
    The request only queues the id here; the thread sends the ids that gathered
    meanwhile as one ``push_many`` message. Ids still queued when a process
    dies are not lost: their rows are pending in the outbox, and the sweep
    dispatches them, as after a broker outage. In Celery's eager mode the
    dispatch happens at once, in the caller.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
        self._unsent = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, state_id: int, countdown: float) -> None:
        if _eager() or not _threads_run():
            dispatch_many([state_id], countdown)
            return
        with self._changed:
            self._unsent += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="django-satori-publisher"
                )
                self._thread.start()
        self._queue.put((state_id, countdown))

    def wait(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._unsent == 0, timeout)

    def forget(self) -> None:
        """In a forked child: the parent's queue, lock and thread are the parent's."""
        self.__init__()  # type: ignore[misc]

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            self._take_queued(batch)
            if len(batch) < DISPATCH_BATCH:
                # Let more gather; with a backlog the batch is already full and
                # goes at once, so the thread keeps up with any rate of saves.
                time.sleep(DISPATCH_LINGER_SECONDS)
                self._take_queued(batch)
            try:
                by_countdown: dict[float, list[int]] = {}
                for state_id, countdown in batch:
                    by_countdown.setdefault(countdown, []).append(state_id)
                for countdown, ids in by_countdown.items():
                    dispatch_many(ids, countdown)
            except Exception:  # keep the thread alive; the sweep sends what was missed
                log.exception("Could not queue SATORI pushes; the periodic sweep will send them.")
            finally:
                with self._changed:
                    self._unsent -= len(batch)
                    self._changed.notify_all()

    def _take_queued(self, batch: list[tuple[int, float]]) -> None:
        while len(batch) < DISPATCH_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return


_publisher = _Publisher()
os.register_at_fork(after_in_child=_publisher.forget)
atexit.register(lambda: _publisher.wait(DISPATCH_EXIT_WAIT_SECONDS))


def wait_for_dispatch(timeout: float = 10.0) -> bool:
    """Wait until this process has handed every after-commit dispatch to the broker.

    Saves return before their push task is queued (a thread queues it a few
    milliseconds later). Scripts and tests that need the message in the broker
    call this; it returns False if ``timeout`` passed first.
    """
    return _publisher.wait(timeout)


@functools.cache
def _threads_run() -> bool:
    """False under uWSGI without threads, where a background thread only runs while a
    request is being handled: ids could wait there for the sweep. Publish inline then."""
    try:
        import uwsgi  # importable only inside a uWSGI worker
    except ImportError:
        return True
    options = getattr(uwsgi, "opt", {})
    enabled = options.get("enable-threads") not in (None, False, b"false", b"0", "false", "0")
    threads = options.get("threads")
    return enabled or (threads is not None and int(threads) > 1)


def _eager() -> bool:
    from .tasks import push_many

    return bool(push_many.app.conf.task_always_eager)


def dispatch_many(state_ids: list[int], countdown: float = 0) -> int:
    """Queue pushes for ``state_ids``, ``DISPATCH_BATCH`` to a message; returns how many
    were queued (none while the broker is down: the sweep sends them later)."""
    from .tasks import push_many

    queued = 0
    for start in range(0, len(state_ids), DISPATCH_BATCH):
        ids = state_ids[start : start + DISPATCH_BATCH]
        if _publish(push_many, (ids,), countdown, f"the push of {len(ids)} sync state(s)"):
            queued += len(ids)
    return queued


def _enqueue_sweep() -> None:
    from .tasks import sweep as sweep_task

    _publish(sweep_task, (), 0, "the sweep")


# --------------------------------------------------------------------------
# 3. Sending, in the worker
# --------------------------------------------------------------------------


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


PushResult = tuple["PushOutcome", float | None]


def push(state_id: int, *, ignore_window: bool = False) -> PushResult:
    """Send one customer's current state to SATORI. Returns the outcome and, for a
    later attempt, the delay in seconds before the task should run again.

    ``ignore_window`` sends a first attempt before its coalescing window ends
    (eager mode, where a task cannot wait).
    """
    return push_batch([state_id], ignore_window=ignore_window)[state_id]


def push_batch(state_ids: list[int], *, ignore_window: bool = False) -> dict[int, PushResult]:
    """:func:`push` for several rows, sent one after another (the ``push_many`` task).

    The rows are claimed with one UPDATE and loaded with one SELECT; SATORI's
    answers are written back a few at a time (:func:`_write_back`) and the
    SyncLog entries together: per customer, what is left is the call. A row
    that fails with an unexpected error is given back (pending, for the
    sweep) and the others go on; a database error gives back every row whose
    answer is not written yet, and is raised.
    """
    conf = get_settings()
    if not conf.SYNC_ENABLED:
        return {state_id: (PushOutcome.SKIPPED, None) for state_id in state_ids}
    now = timezone.now()
    token = uuid.uuid4().hex
    due = Q(not_before__isnull=True) | Q(not_before__lte=now)
    if ignore_window:
        due |= Q(attempts=0)
    lease = dt.timedelta(seconds=conf.LEASE_SECONDS)
    (
        SyncState.objects.filter(pk__in=state_ids, status__in=_SENDABLE, bulk_part__isnull=True)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lt=now))
        .filter(due)
        .update(status=SyncStatus.SENDING, lease_token=token, lease_until=now + lease)
    )
    claimed = {
        state.pk: state
        for state in SyncState.objects.select_related("customer").filter(
            pk__in=state_ids, lease_token=token
        )
    }
    results: dict[int, PushResult] = {}
    answered: list[_Answered] = []
    # A long batch renews its claim on the rows still to come before it runs out.
    renew_at = time.monotonic() + conf.LEASE_SECONDS / 2
    try:
        with _logs_together():
            for state_id in state_ids:
                state = claimed.get(state_id)
                if state is None:
                    results[state_id] = _why_not_claimed(state_id, now)
                    continue
                if time.monotonic() > renew_at:
                    (
                        SyncState.objects.filter(
                            pk__in=[pk for pk in claimed if pk not in results], lease_token=token
                        ).update(lease_until=timezone.now() + lease)
                    )
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
            _give_back(unsent, token)
    return results


def _send(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    try:
        if state.operation == Operation.DELETE:
            return _send_delete(state, token, conf)
        if state.operation == Operation.UPSERT and state.customer is not None:
            return _send_upsert(state, token, conf)
        _release(state, token, status=SyncStatus.SYNCED, synced_version=state.version)
        return PushOutcome.SKIPPED, None
    except DatabaseError:
        raise
    except Exception:
        # Our own bug, or a receiver's: give the row back so nothing is stuck.
        log.exception("Pushing sync state %s failed; the sweep will try again.", state.pk)
        _release(state, token, status=SyncStatus.PENDING)
        return PushOutcome.ERROR, None


def _give_back(state_ids: list[int], token: str) -> None:
    try:
        SyncState.objects.filter(pk__in=state_ids, lease_token=token).update(
            status=SyncStatus.PENDING, lease_until=None, lease_token=""
        )
    except DatabaseError:  # the database is gone: the claims expire and the sweep hands them out
        log.warning("Could not give back %d claimed sync state(s).", len(state_ids))


def _why_not_claimed(state_id: int, now: dt.datetime) -> PushResult:
    row = SyncState.objects.filter(pk=state_id).values("status", "not_before").first()
    due = row["not_before"] if row else None
    if row and row["status"] == SyncStatus.PENDING and due and due > now:
        return PushOutcome.NOT_DUE, (due - now).total_seconds()
    return PushOutcome.BUSY, None


def build_payload(customer: Customer, state: SyncState, conf: SatoriSettings) -> dict[str, Any]:
    """The SATORI items for ``customer`` (wire keys), before validation."""
    payload: dict[str, Any] = {"email": customer.email}
    for name in DATA_FIELDS:
        payload[name] = getattr(customer, name)
    if not payload.get("collection_route") and conf.BULK_DEFAULT_COLLECTION_ROUTE:
        payload["collection_route"] = conf.BULK_DEFAULT_COLLECTION_ROUTE
    payload.update(customer.custom_fields or {})
    tags = [str(t) for t in (customer.tags or [])]
    payload["append_tags"] = join_tags(tags, conf.TAG_SEPARATOR)
    removed = [t for t in (state.sent_tags or []) if t not in tags]
    payload["delete_tags"] = join_tags(removed, conf.TAG_SEPARATOR)
    return payload


def fingerprint(payload: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _send_upsert(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    from .client import get_client
    from .schema import clean_customer

    customer = state.customer
    assert customer is not None
    endpoint = (
        "customer/registration.json"
        if conf.PUSH_ENDPOINT == "registration"
        else "customer/upsert.json"
    )
    if not conf.CREATE_UNKNOWN and not (state.in_satori or state.hashcode):
        message = _("Not in SATORI, and SATORI['CREATE_UNKNOWN'] is False: not created.")
        _release(state, token, status=SyncStatus.NOT_IN_SATORI, last_error=message)
        _log(state.email, endpoint, SyncLog.Outcome.SKIPPED, message=message)
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
        _release(state, token, status=SyncStatus.STOPPED, last_error=message)
        _log(state.email, endpoint, SyncLog.Outcome.SKIPPED, message=message)
        return PushOutcome.SKIPPED, None
    try:
        wire = clean_customer(payload, custom_fields=conf.CUSTOM_FIELDS)
    except SatoriValidationError as exc:
        return _failed(state, token, endpoint, exc, conf, customer, summary={})
    identity = "email"
    if state.previous_email and state.hashcode:
        identity, wire["hashcode"] = "hashcode", state.hashcode
    digest = fingerprint(wire)
    summary = _summary(endpoint, wire, conf)
    if digest == state.fingerprint and identity == "email":
        newer = _release(state, token, status=SyncStatus.SYNCED, synced_version=state.version)
        _log(
            state.email,
            endpoint,
            SyncLog.Outcome.SKIPPED,
            request=summary,
            message=_("Unchanged since the last push: not sent again."),
        )
        return PushOutcome.UNCHANGED, _again(newer)
    if conf.DRY_RUN:
        _release(state, token, status=SyncStatus.DRY_RUN)
        _log(
            state.email,
            endpoint,
            SyncLog.Outcome.DRY_RUN,
            request=summary,
            message=_("Dry run: this is what would have been sent."),
        )
        return PushOutcome.DRY_RUN, None
    wait = ratelimit.acquire(conf)
    if wait:
        return _rate_limited(state, token, wait, conf)

    client = get_client()
    send = (
        client.register_customer if conf.PUSH_ENDPOINT == "registration" else client.upsert_customer
    )
    started = time.monotonic()
    try:
        result = send(wire, identity_type=identity)
    except SatoriError as exc:
        return _failed(
            state, token, endpoint, exc, conf, customer, summary=summary, started=started
        )
    _log(
        state.email,
        endpoint,
        SyncLog.Outcome.OK,
        status=result.status,
        request=summary,
        response=getattr(result, "response_summary", {}),
        attempt=state.attempts + 1,
        started=started,
    )
    return _Answered(
        state,
        PushOutcome.SYNCED,
        SyncStatus.SYNCED,
        customer,
        endpoint,
        result,
        values={
            "fingerprint": digest,
            "sent_tags": list(customer.tags or []),
            "in_satori": True,
            "hashcode": result.hashcode or state.hashcode,
            "previous_email": "",
        },
    )


def _send_delete(state: SyncState, token: str, conf: SatoriSettings) -> PushResult | _Answered:
    from .client import get_client

    endpoint = "customer/delete.json"
    if not state.in_satori and not state.hashcode:
        # Never reached SATORI (or already deleted there): nothing to delete.
        _release(state, token, status=SyncStatus.DELETED, synced_version=state.version)
        return PushOutcome.DELETED, None
    identity = {"hashcode": state.hashcode} if state.hashcode else {"email": state.email}
    summary = _summary(endpoint, {"email": state.email, **identity}, conf)
    if conf.DRY_RUN:
        _release(state, token, status=SyncStatus.DRY_RUN)
        _log(state.email, endpoint, SyncLog.Outcome.DRY_RUN, request=summary)
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
    _log(
        state.email,
        endpoint,
        SyncLog.Outcome.OK,
        status=getattr(result, "status", None),
        request=summary,
        started=started,
        attempt=state.attempts + 1,
        message=str(result) if isinstance(result, SatoriError) else "",
    )
    return _Answered(
        state,
        PushOutcome.DELETED,
        SyncStatus.DELETED,
        None,
        endpoint,
        result,
        values={
            "fingerprint": "",
            "sent_tags": [],
            "in_satori": False,
            "hashcode": "",
            "previous_email": state.previous_email,
        },
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
    if final:
        _release(
            state,
            token,
            status=SyncStatus.FAILED,
            attempts=attempt,
            last_error=message,
            last_error_at=timezone.now(),
        )
        delay = None
    else:
        delay = backoff(attempt, conf, getattr(exc, "retry_after", None))
        due = timezone.now() + dt.timedelta(seconds=delay)
        _release(
            state,
            token,
            status=SyncStatus.PENDING,
            attempts=attempt,
            last_error=message,
            last_error_at=timezone.now(),
            not_before=due,
            dispatched_at=due,
        )
    _log(
        state.email,
        endpoint,
        SyncLog.Outcome.FAILED if final else SyncLog.Outcome.RETRY,
        status=exc.status,
        request=summary,
        attempt=attempt,
        message=message,
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


def backoff(attempt: int, conf: SatoriSettings, retry_after: float | None = None) -> float:
    """Exponential back-off with full jitter; SATORI's Retry-After is a floor."""
    ceiling = min(conf.RETRY_BACKOFF_MAX_SECONDS, conf.RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, float(retry_after or 0))


def _rate_limited(state: SyncState, token: str, wait: float, conf: SatoriSettings) -> PushResult:
    due = timezone.now() + dt.timedelta(seconds=wait)
    if SyncState.objects.filter(status=SyncStatus.PENDING).count() > conf.BULK_THRESHOLD:
        # Too much for single calls: leave it to the sweep, which starts a bulk job.
        _release(state, token, status=SyncStatus.PENDING, not_before=due, dispatched_at=None)
        return PushOutcome.RETRY, None
    _release(state, token, status=SyncStatus.PENDING, not_before=due, dispatched_at=due)
    return PushOutcome.RETRY, wait


def _again(newer: bool) -> float | None:
    """When to push again: a save during the call left a newer version pending."""
    return get_settings().COALESCE_SECONDS if newer else None


def _release(
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


#: Most answers held before they are written back (one round trip for them all on
#: PostgreSQL). A worker killed meanwhile leaves their rows claimed: when the claim
#: expires the sweep sends them again, which SATORI takes harmlessly (an upsert or a
#: registration of the same data changes nothing; a delete of a deleted customer is
#: counted as done).
WRITE_BACK_BATCH = 20
#: Held answers are written after the next call once the oldest has waited this long,
#: so the admin soon shows what SATORI answered even when calls are slow.
WRITE_BACK_SECONDS = 1.0


@dataclasses.dataclass
class _Answered:
    """SATORI accepted a push or delete; the answer is still to be written back."""

    state: SyncState
    outcome: PushOutcome
    status: str  # the row's status when no newer version arrived meanwhile
    customer: Customer | None
    endpoint: str
    result: Any
    #: fingerprint, sent_tags, in_satori, hashcode, previous_email
    values: dict[str, Any]
    at: float = dataclasses.field(default_factory=time.monotonic)


#: ``_release`` for one answer, the version check in a CASE; the %s after
#: ``updated_at`` are the values of ``_ANSWER_FIELDS``, in that order.
_WRITE_BACK_SQL = (
    "UPDATE {table} SET status = CASE WHEN version = %s THEN %s ELSE %s END, "
    "synced_version = %s, not_before = NULL, lease_until = NULL, lease_token = '', "
    "last_error = '', attempts = attempts + 1, fingerprint = %s, sent_tags = %s, "
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


def _write_back(answered: list[_Answered], token: str) -> dict[int, PushResult]:
    """Write SATORI's answers to their rows, then send ``after_push`` for each.

    As ``_release`` does for one row: a save during the call leaves the row
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
    for answer in answered:
        values = {**answer.values, "last_synced_at": now, "updated_at": now}
        params.append(
            [
                answer.state.version,
                answer.status,
                SyncStatus.PENDING,
                answer.state.version,
                *(field.get_db_prep_save(values[field.name], connection) for field in fields),
                answer.state.pk,
                token,
            ]
        )
    ids = [answer.state.pk for answer in answered]

    def write() -> set[int]:
        with transaction.atomic(using=alias):
            executemany(connection, sql, params)
            return set(
                SyncState.objects.using(alias)
                .filter(pk__in=ids, status=SyncStatus.PENDING)
                .values_list("pk", flat=True)
            )

    try:
        newer = write()
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise
        # The connection dropped (a restarted server, a proxy's idle timeout). These
        # calls were made: once more on a new connection, rather than leave them all
        # to be sent again when their claims expire.
        with contextlib.suppress(DatabaseError):
            connection.close()
        newer = write()
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


def _summary(endpoint: str, wire: dict[str, str], conf: SatoriSettings) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "fields": redact_form(list(wire.items()), conf.REDACT_PERSONAL_DATA),
    }


#: SyncLog rows waiting to be written together (push_batch), per thread.
_pending_logs = threading.local()
#: Most SyncLog rows held back before they are written.
LOG_BATCH = 50


@contextlib.contextmanager
def _logs_together() -> Iterator[None]:
    _pending_logs.rows = []
    try:
        yield
    finally:
        rows, _pending_logs.rows = _pending_logs.rows, None
        _write_logs(rows)


#: Every column of a SyncLog entry but its id.
_LOG_FIELDS = tuple(f.attname for f in SyncLog._meta.concrete_fields if not f.primary_key)


def _write_logs(rows: list[SyncLog]) -> None:
    # rawsql rather than bulk_create: the ORM's preparation of each value was most of
    # the 0.1 ms a push spent on its log entry.
    insert_rows(
        SyncLog, _LOG_FIELDS, [{name: getattr(row, name) for name in _LOG_FIELDS} for row in rows]
    )


def _log(
    email: str,
    endpoint: str,
    outcome: str,
    *,
    status: int | None = None,
    request: dict[str, Any] | None = None,
    response: dict[str, Any] | None = None,
    message: str = "",
    attempt: int = 0,
    started: float | None = None,
) -> None:
    duration = int((time.monotonic() - started) * 1000) if started else 0
    entry = SyncLog(
        email=email,
        endpoint=endpoint,
        outcome=outcome,
        satori_status=status,
        request_summary=request or {},
        response_summary=response or {},
        message=message,
        attempt=attempt,
        duration_ms=duration,
        created_at=timezone.now(),
    )
    rows = getattr(_pending_logs, "rows", None)
    if rows is None:
        entry.save()
        return
    rows.append(entry)
    if len(rows) >= LOG_BATCH:
        _pending_logs.rows = []
        _write_logs(rows)


# Actions ------------------------------------------------------------------------


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
    transaction.on_commit(lambda: dispatch_action(action.pk, 0))
    return action


def dispatch_action(action_id: int, countdown: float = 0) -> bool:
    from .tasks import send_action

    return _publish(send_action, (action_id,), countdown, f"SATORI action {action_id}")


def send_action(action_id: int) -> tuple[str, float | None]:
    """Send one action. Waits while its customer is still on the way to SATORI."""
    from .client import get_client

    conf = get_settings()
    now = timezone.now()
    endpoint = conf.ACTION_PATH.rsplit("/", 2)[-2:]
    endpoint_name = "/".join(endpoint)
    claimed = (
        CustomerAction.objects.filter(pk=action_id)
        .filter(
            Q(status=ActionStatus.PENDING) | Q(status=ActionStatus.SENDING, lease_until__lt=now)
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .update(
            status=ActionStatus.SENDING, lease_until=now + dt.timedelta(seconds=conf.LEASE_SECONDS)
        )
    )
    if not claimed:
        return "busy", None
    action = CustomerAction.objects.get(pk=action_id)
    customer_state = (
        SyncState.objects.filter(email=action.email).values("status", "in_satori").first()
    )
    on_its_way = (
        customer_state
        and not customer_state["in_satori"]
        and customer_state["status"] in (SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
    )
    if on_its_way:
        # An action for a customer SATORI does not have yet would be refused.
        delay = max(conf.COALESCE_SECONDS, 5.0)
        CustomerAction.objects.filter(pk=action_id).update(
            status=ActionStatus.PENDING,
            lease_until=None,
            not_before=now + dt.timedelta(seconds=delay),
        )
        return "waiting", delay
    summary = _summary(
        endpoint_name,
        {"email": action.email, "name": action.name, "content": action.content, "url": action.url},
        conf,
    )
    if conf.DRY_RUN:
        CustomerAction.objects.filter(pk=action_id).update(
            status=ActionStatus.DRY_RUN, lease_until=None
        )
        _log(action.email, endpoint_name, SyncLog.Outcome.DRY_RUN, request=summary)
        return "dry_run", None
    wait = ratelimit.acquire(conf)
    if wait:
        CustomerAction.objects.filter(pk=action_id).update(
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
        retry_in = None if final else backoff(attempt, conf, getattr(exc, "retry_after", None))
        CustomerAction.objects.filter(pk=action_id).update(
            status=ActionStatus.FAILED if final else ActionStatus.PENDING,
            attempts=attempt,
            last_error=str(exc),
            lease_until=None,
            not_before=None if final else timezone.now() + dt.timedelta(seconds=retry_in or 0),
        )
        _log(
            action.email,
            endpoint_name,
            SyncLog.Outcome.FAILED if final else SyncLog.Outcome.RETRY,
            status=exc.status,
            request=summary,
            attempt=attempt,
            message=str(exc),
            started=started,
        )
        return ("failed", None) if final else ("retry", retry_in)
    CustomerAction.objects.filter(pk=action_id).update(
        status=ActionStatus.SENT,
        attempts=attempt,
        last_error="",
        lease_until=None,
        sent_at=timezone.now(),
    )
    _log(
        action.email,
        endpoint_name,
        SyncLog.Outcome.OK,
        status=result.status,
        request=summary,
        attempt=attempt,
        started=started,
    )
    return "sent", None


# --------------------------------------------------------------------------
# 4. The safety net
# --------------------------------------------------------------------------


def sweep(*, limit: int = 5000) -> dict[str, int]:
    """Re-dispatch what stayed pending; route a large backlog through a bulk job.

    Safe to run any time, from beat or by hand: a duplicate dispatch is a
    no-op because a worker must claim a row before it sends it.
    """
    conf = get_settings()
    now = timezone.now()
    stale = now - dt.timedelta(seconds=conf.SWEEP_AFTER_SECONDS)
    counts = {"reclaimed": 0, "dispatched": 0, "bulk": 0, "actions": 0}
    if not conf.SYNC_ENABLED:
        return counts
    # A worker died holding a claim: give the row back.
    counts["reclaimed"] = SyncState.objects.filter(
        status=SyncStatus.SENDING, lease_until__lt=now
    ).update(status=SyncStatus.PENDING, lease_until=None, lease_token="", updated_at=now)
    due = (
        SyncState.objects.filter(status=SyncStatus.PENDING, bulk_part__isnull=True)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .filter(Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=stale))
    )
    upserts = due.filter(operation=Operation.UPSERT, customer__isnull=False)
    if upserts.count() > conf.BULK_THRESHOLD:
        counts["bulk"] = _route_to_bulk(upserts)
        due = due.exclude(operation=Operation.UPSERT)
    ids = list(due.values_list("pk", flat=True)[:limit])
    if ids:
        SyncState.objects.filter(pk__in=ids).update(dispatched_at=now)
        counts["dispatched"] = dispatch_many(ids)
    actions = (
        CustomerAction.objects.filter(
            Q(status=ActionStatus.PENDING) | Q(status=ActionStatus.SENDING, lease_until__lt=now)
        )
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .filter(created_at__lt=stale)
        .values_list("pk", flat=True)[:limit]
    )
    counts["actions"] = sum(dispatch_action(pk) for pk in actions)
    counts["bulk_polled"] = _poll_overdue_bulk_parts(now)
    return counts


def _route_to_bulk(pending: models.QuerySet[SyncState]) -> int:
    from .bulk import start_bulk_job

    if BulkJob.objects.filter(state__in=_BULK_JOB_ACTIVE, automatic=True).exists():
        return 0  # one automatic job at a time; the next sweep takes the rest
    customers = Customer.objects.filter(sync_state__in=pending)
    with transaction.atomic():
        job = start_bulk_job(
            customers,
            mode=pending_bulk_mode(),
            automatic=True,
            description=_("Backlog of pending customers"),
        )
    return job.pk


def pending_bulk_mode() -> str:
    return "registration" if get_settings().PUSH_ENDPOINT == "registration" else "upsert"


def _poll_overdue_bulk_parts(now: dt.datetime) -> int:
    from .bulk import poll_overdue_parts

    return poll_overdue_parts(now)


def pending_counts() -> dict[str, int]:
    """How many customers are in each sync status (for commands and the admin)."""
    rows = SyncState.objects.values_list("status").annotate(n=models.Count("pk"))
    return {status: n for status, n in rows}
