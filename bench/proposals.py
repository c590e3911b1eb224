"""Prototypes of the fixes RESULTS.md proposes, applied in-process to a benchmark child.

They exist to measure a proposal beside the code as it is, in the same
invocation ("before" and "after"); they are not the fixes. Each one says
which function of ``django_satori`` it stands in for and what the real
patch is. Nothing here is imported unless a run asks for a proposal.
"""

from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Greatest
from django.utils import timezone

from django_satori import sync

_pending: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
_idle = threading.Event()
_idle.set()
#: Most ids in one message of the batched publisher.
BATCH_LIMIT = 500
#: How long the batched publisher lets ids gather before it sends them. Pushes wait
#: COALESCE_SECONDS (2 s by default) anyway, so this adds no delay anyone sees.
LINGER_SECONDS = 0.05
#: The task a batch would go to (real patch: a new task in tasks.py, see batched_publish).
PUSH_MANY = "django_satori.tasks.push_many"


def _start_publisher(send: Callable[[list[tuple[int, float]]], None],
                     linger: float = 0.0) -> None:
    def publisher() -> None:
        while True:
            item = _pending.get()
            if item is None:
                return
            if linger:
                time.sleep(linger)
            batch = [item]
            while len(batch) < BATCH_LIMIT:
                try:
                    more = _pending.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                batch.append(more)
            send(batch)
            if _pending.empty():
                _idle.set()

    threading.Thread(target=publisher, name="satori-publisher", daemon=True).start()

    def dispatch_on_commit(state_id: int, countdown: float) -> None:
        def hand_over() -> None:
            _idle.clear()
            _pending.put((state_id, countdown))

        transaction.on_commit(hand_over)

    sync._dispatch_on_commit = dispatch_on_commit


def deferred_publish() -> None:
    """Stands in for ``sync._dispatch_on_commit``: publish from a thread, not in the save.

    Patch (sync.py): ``_dispatch_on_commit`` puts ``(state_id, countdown)``
    on a per-process queue after commit; a daemon publisher thread per
    process (re-created after a fork) drains it and calls ``dispatch()`` for
    each id. A process that dies with ids still queued loses nothing: their
    rows are pending in the outbox and the sweep dispatches them after
    ``SWEEP_AFTER_SECONDS``, exactly as after a broker outage today.
    """
    _start_publisher(lambda batch: [sync.dispatch(*item) for item in batch])


def batched_publish() -> None:
    """Like :func:`deferred_publish`, but one message per batch of ids.

    Celery spends about 0.4 ms of CPU building and sending each message
    (RESULTS.md), in the saving process. Patch: tasks.py gains
    ``push_many(state_ids)`` that runs ``sync.push`` for each id (and
    re-dispatches like ``push_customer``); the publisher thread sends the ids
    it finds queued (up to ``BATCH_LIMIT``, after letting them gather for
    ``LINGER_SECONDS``) as one ``push_many`` message with the largest countdown
    among them. One save alone is still one message.
    """
    from .celery_app import app

    def send(batch: list[tuple[int, float]]) -> None:
        try:
            app.send_task(PUSH_MANY, ([state_id for state_id, _ in batch],),
                          countdown=max(countdown for _, countdown in batch),
                          retry_policy=sync.PUBLISH_RETRY)
        except Exception:  # as dispatch(): the sweep sends them later
            sync.log.warning("Could not queue a batch of SATORI pushes.", exc_info=True)

    _start_publisher(send, linger=LINGER_SECONDS)


def wait_published(timeout: float = 600.0) -> None:
    """Block until the publisher thread has sent everything handed to it."""
    if not _idle.wait(timeout):
        raise TimeoutError("the publisher thread did not drain")


def single_statement_mark() -> None:
    """Stands in for ``sync._mark_pending``: one UPDATE ... RETURNING instead of two ORM queries.

    Building and compiling the two ORM statements (``select_for_update()``
    ``...first()`` and ``filter().update()``) costs about 0.6 ms of CPU per save
    here; the same work as one prepared SQL statement costs 0.08 ms. Patch
    (sync.py): for an existing row, run ::

        UPDATE django_satori_syncstate SET version = version + 1, status = 'pending',
               operation = %s, updated_at = %s, customer_id = COALESCE(%s, customer_id),
               not_before = CASE WHEN status = 'pending' THEN not_before ELSE %s END,
               attempts = CASE WHEN status = 'pending' THEN attempts ELSE 0 END,
               dispatched_at = CASE WHEN status = 'pending' THEN dispatched_at ELSE %s END
        WHERE email = %s RETURNING id, not_before = %s

    The second column says whether the row just became pending (only then
    does it get this call's new ``not_before``). The row is locked by the
    UPDATE as by ``select_for_update`` today. No row: the current create
    path. RETURNING needs SQLite >= 3.35 (Django 4.2 allows older: keep the
    ORM path there) and works on PostgreSQL; a DELETE keeps today's path.
    """
    from django.db import connection

    original = sync._mark_pending
    table = connection.ops.quote_name(sync.SyncState._meta.db_table)
    sql = (f"UPDATE {table} SET version = version + 1, status = %s, operation = %s, "
           "updated_at = %s, customer_id = COALESCE(%s, customer_id), "
           "not_before = CASE WHEN status = %s THEN not_before ELSE %s END, "
           "attempts = CASE WHEN status = %s THEN attempts ELSE 0 END, "
           "dispatched_at = CASE WHEN status = %s THEN dispatched_at ELSE %s END "
           "WHERE email = %s RETURNING id, not_before = %s")

    def mark_pending(email: str, customer_id: int | None, operation: str,
                     conf: Any) -> tuple[int, bool]:
        if operation != sync.Operation.UPSERT or customer_id is None:
            return original(email, customer_id, operation, conf)
        now = timezone.now()
        due = now + dt.timedelta(seconds=conf.COALESCE_SECONDS)
        pending = sync.SyncStatus.PENDING
        adapt = connection.ops.adapt_datetimefield_value
        with connection.cursor() as cursor:
            cursor.execute(sql, [pending, operation, adapt(now), customer_id, pending,
                                 adapt(due), pending, pending, adapt(now), email, adapt(due)])
            row = cursor.fetchone()
        if row is None:
            return original(email, customer_id, operation, conf)
        return int(row[0]), bool(row[1])

    sync._mark_pending = mark_pending


def debounce() -> None:
    """Stands in for ``sync._mark_pending``: every save while pending moves ``not_before``.

    Today the window is fixed: it opens at the first save and a save that
    comes after it closes starts another call. Real patch (sync.py,
    ``_mark_pending``, the already-pending branch): also set
    ``not_before = Greatest(F("not_before"), now + COALESCE_SECONDS)`` capped
    at ``pending_since + COALESCE_MAX_SECONDS`` (a new field set when the row
    becomes pending), so a customer saved without pause is still sent. The
    prototype leaves the cap out. ``push`` already handles the moved window:
    a task that finds the row not yet due re-queues itself for the rest.
    """
    original = sync._mark_pending

    def mark_pending(email: str, customer_id: int | None, operation: str,
                     conf: Any) -> tuple[int, bool]:
        state_id, became_pending = original(email, customer_id, operation, conf)
        if not became_pending:
            later = timezone.now() + dt.timedelta(seconds=conf.COALESCE_SECONDS)
            sync.SyncState.objects.filter(pk=state_id, status=sync.SyncStatus.PENDING).update(
                not_before=Greatest(F("not_before"), later))
        return state_id, became_pending

    sync._mark_pending = mark_pending


def int_custom_fast_path() -> None:
    """Stands in for ``bulk_csv.RowEncoder._custom``: integers skip the full schema check.

    ``_custom`` sends every non-string custom value through ``clean_customer``
    (a regex and a dict per row). Real patch (bulk_csv.py): in the loop, take
    ``str(value)`` directly when ``type(value) is int`` and the field is an
    integer field; everything else keeps the schema's rules.
    """
    from django_satori import bulk_csv
    from django_satori.schema import CUSTOM_PREFIX, custom_field_type

    original = bulk_csv.RowEncoder._custom

    def custom(self: Any, values: Any) -> list[str]:
        integers = getattr(self, "_bench_integers", None)
        if integers is None:
            integers = frozenset(CUSTOM_PREFIX + i for i, d in self._definitions.items()
                                 if custom_field_type(d)[0] == "integer")
            self._bench_integers = integers
        if not isinstance(values, dict) or not all(
                key in self._custom_set for key in values):
            return original(self, values)
        cells = []
        for key in self._custom_keys:
            value = values.get(key)
            if value is None or value == "":
                cells.append("")
            elif key in self._plain_text and isinstance(value, str):
                cells.append(value)
            elif key in integers and type(value) is int:
                cells.append(str(value))
            else:
                return original(self, values)
        return cells

    bulk_csv.RowEncoder._custom = custom


def claim_by_pk() -> None:
    """Stands in for ``bulk._claim``: claim the part's rows by primary key, not by e-mail.

    ``_claim`` updates ``free.filter(email__in=batch)`` where ``free`` starts
    with ``bulk_part IS NULL``. Without planner statistics (SQLite has none
    unless someone runs ANALYZE) SQLite answers that through the index on
    ``bulk_part_id``, i.e. it walks every unclaimed row for each batch of 500
    e-mails: quadratic in the size of the export (RESULTS.md: 100,000 rows
    in 4 s, 1,000,000 in minutes). Patch (bulk.py, ``_claim``): look the
    batch's primary keys up by e-mail first and update ``pk__in`` those, which
    SQLite answers with one index seek per row; PostgreSQL is unaffected. The
    prototype is ``_claim``'s own source with that one statement changed.
    """
    import inspect
    import textwrap

    from django_satori import bulk

    source = textwrap.dedent(inspect.getsource(bulk._claim))
    old = "free.filter(email__in=batch).update("
    new = ("free.filter(pk__in=list(SyncState.objects.filter(email__in=batch)"
           ".values_list('pk', flat=True))).update(")
    if source.count(old) != 1:
        raise RuntimeError("bulk._claim changed: the claim_by_pk prototype no longer applies")
    namespace: dict[str, Any] = {}
    exec(compile(source.replace(old, new), bulk.__file__, "exec"),  # noqa: S102
         vars(bulk), namespace)
    bulk._claim = namespace["_claim"]


PROPOSALS: dict[str, Callable[[], None]] = {
    "deferred_publish": deferred_publish,
    "batched_publish": batched_publish,
    "single_statement_mark": single_statement_mark,
    "debounce": debounce,
    "int_custom_fast_path": int_custom_fast_path,
    "claim_by_pk": claim_by_pk,
}


def apply(names: str) -> None:
    for name in filter(None, names.split(",")):
        PROPOSALS[name]()
