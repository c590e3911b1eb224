"""What starts a sync: saves and deletes of ``Customer`` and of connected models.

A connected model (``SATORI['MAPPINGS']``, say the project's ``Member``) is
mirrored into a :class:`~django_satori.models.Customer`. Its save checks what
the mirror would refuse and records a :class:`~django_satori.models.SourceChange`
(one INSERT, in the save's transaction); after commit a worker builds the mirror
from the object as it is then (:func:`apply_source_changes`), and the mirror's
save marks the outbox row. Deletes update the mirror at once.
:func:`connect_signals` wires the receivers at start-up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, models, router, transaction
from django.db.models import BooleanField, F, Func, Q
from django.db.models.signals import post_delete, post_save
from django.utils import timezone
from django.utils.translation import gettext as _

from ..conf import get_settings
from ..exceptions import SatoriValidationError
from ..mapping import MappingError, ModelMapping, get_mappings
from ..models import Customer, SourceChange, refuse_invalid_values
from ..schema import normalize_email
from . import dispatch, outbox

log = logging.getLogger("django_satori.sync")


def mark_for_sync(queryset: models.QuerySet[Any], *, full: bool = False) -> int:
    """Mark every customer in ``queryset`` pending (after ``update()``/``bulk_*()``).

    ``queryset`` may be of :class:`Customer` or of a connected model. Large
    selections are left to the sweep, which sends them through bulk jobs.
    ``full`` (Customer only): send every item again, even unchanged ones, and
    remove the tags SATORI's last imported export showed; for customers known to
    differ in SATORI. Returns the number of customers marked.
    """
    mapping = get_mappings().get(queryset.model)
    if mapping is not None:
        count = 0
        for instance in queryset.iterator(chunk_size=500):
            if sync_source(mapping, instance, force=True):
                count += 1
        return count
    if queryset.model is not Customer:
        raise TypeError(
            f"{queryset.model.__name__} is not Customer or a connected model (SATORI['MAPPINGS'])."
        )
    return outbox.mark_customers(queryset, get_settings(), full=full)


def sync_source(mapping: ModelMapping, instance: Any, *, force: bool = False) -> bool:
    """Update (or create) the Customer that mirrors ``instance``; its save marks the outbox.

    The worker calls it for recorded changes (:func:`apply_source_changes`),
    ``mark_for_sync`` directly. A save that changed nothing SATORI gets (a login
    updating ``last_login``, say) writes nothing, unless ``force`` (``mark_for_sync``).
    """
    pk = str(instance.pk)
    customer = _mirror(mapping, pk)
    if not mapping.wants_sync(instance):
        if customer is not None:
            _stop(customer, _("The connected object no longer wants to be synced."))
        return False
    values = mapping.customer_values(instance)
    values["email"] = normalize_email(values["email"])
    changed = []
    if customer is not None:
        changed = [name for name, value in values.items() if getattr(customer, name) != value]
    if customer is not None and not force and not changed and outbox.is_under_way(customer):
        return True  # the mirror already holds these values and is sent or on its way
    if customer is None or customer.email != values["email"]:
        # The mirror already owns its own address (unique): only a new one is checked.
        _refuse_shared_address(mapping, instance, customer, values["email"])
    if customer is None:
        customer = Customer.objects.filter(email=values["email"]).first() or Customer(
            source_model=mapping.label, source_pk=pk
        )
        customer.source_model, customer.source_pk = mapping.label, pk
        changed = []  # new, or taken over: saved in full
    for name, value in values.items():
        setattr(customer, name, value)
    # An existing mirror writes only what changed: building the UPDATE of every
    # column was a third of what updating a mirror cost.
    customer.save(update_fields=[*changed, "updated_at"] if changed else None)
    return True


# Connected objects: the save records the change, a worker builds the mirror --------


def record_source_change(mapping: ModelMapping, instance: Any) -> int:
    """Record that the connected ``instance`` changed; its mirror is built after commit.

    Runs in the save's transaction, so the record commits exactly with the
    change. What the mirror's save would refuse is refused here, naming the
    field (an address SATORI cannot take, tags of the wrong shape, an address
    another connected object already uses): the object's own save fails, as it
    did when the mirror was written in the request. Returns the record's id.
    """
    pk = str(instance.pk)
    email = None
    if mapping.wants_sync(instance):
        values = mapping.customer_values(instance)
        refuse_invalid_values(values)
        email = values["email"]
    alias = router.db_for_write(SourceChange)
    connection = connections[alias]
    change_id = None
    if get_settings().EMAIL_LOWERCASE and outbox.can_update_returning(connection):
        change_id = _insert_unless_shared(connection, mapping.label, pk, email)
    if change_id is None:
        # The address is taken (the statement inserted nothing), or a database without
        # INSERT ... RETURNING, or addresses compared ignoring case: check, then insert.
        if email is not None:
            _refuse_shared_address(mapping, instance, _mirror(mapping, pk), email)
        change_id = SourceChange.objects.create(
            source_model=mapping.label, source_pk=pk, email=email or ""
        ).pk
    dispatch.dispatch_source_change_on_commit(change_id, using=alias)
    return change_id


#: The change record and the address check in one statement: a second statement was
#: most of what sync added to a connected save. Inserts nothing if another object's
#: mirror holds the address, or a customer made directly holds it while this object
#: already has a mirror (see _refuse_shared_address, which then says why). The time
#: is the database's own (UTC, as Django stores it): adapting a datetime in Python
#: cost a tenth of the statement.
_RECORD_SQL = (
    "INSERT INTO {change} (source_model, source_pk, email, created_at, attempts, error) "
    "SELECT %s, %s, %s, {now}, 0, '' WHERE NOT EXISTS ("
    "SELECT 1 FROM {customer} c WHERE c.email = %s "
    "AND NOT (c.source_model = %s AND c.source_pk = %s) "
    "AND (NOT (c.source_model = '') OR EXISTS (SELECT 1 FROM {customer} m "
    "WHERE m.source_model = %s AND m.source_pk = %s AND NOT (m.source_model = ''))"
    ")) RETURNING id"
)
_NOW_SQL = {
    "postgresql": "statement_timestamp()",
    # Django's own text form of a UTC datetime, to the millisecond.
    "sqlite": "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now')",
}


def _insert_unless_shared(connection: Any, label: str, pk: str, email: str | None) -> int | None:
    sql = _RECORD_SQL_BY_ALIAS.get(connection.alias)
    if sql is None:
        quote = connection.ops.quote_name
        sql = _RECORD_SQL_BY_ALIAS[connection.alias] = _RECORD_SQL.format(
            change=quote(SourceChange._meta.db_table),
            customer=quote(Customer._meta.db_table),
            now=_NOW_SQL[connection.vendor],
        )
    with connection.cursor() as cursor:
        cursor.execute(sql, (label, pk, email or "", email, label, pk, label, pk))
        row = cursor.fetchone()
    return None if row is None else int(row[0])


_RECORD_SQL_BY_ALIAS: dict[str, str] = {}


def apply_source_changes(change_ids: Iterable[int] | None = None) -> int:
    """Build the mirrors of the recorded changes ``change_ids`` (the worker's task);
    returns how many objects were handled.

    ``None`` applies every recorded change that has no error, at once: for tests
    and scripts that need the mirrors now (a save leaves them to the worker).
    """
    changes = SourceChange.objects.all()
    if change_ids is None:
        changes = changes.filter(error="")
    else:
        changes = changes.filter(pk__in=list(change_ids))
    objects = dict.fromkeys(changes.order_by("id").values_list("source_model", "source_pk"))
    by_label = {mapping.label: mapping for mapping in get_mappings().values()}
    return sum(_apply(by_label.get(label), label, pk) for label, pk in objects)


def _apply(mapping: ModelMapping | None, label: str, pk: str) -> bool:
    """Bring the mirror of one object up to date with the object as it is now."""
    alias = router.db_for_write(Customer)
    changes = SourceChange.objects.using(alias).filter(source_model=label, source_pk=pk)
    with contextlib.ExitStack() as stack:
        stack.enter_context(transaction.atomic(using=alias))
        source_alias = router.db_for_write(mapping.model) if mapping else alias
        if source_alias != alias:
            stack.enter_context(transaction.atomic(using=source_alias))
        ids = _take(changes, connections[alias])
        if not ids:
            return False  # another worker took them
        taken = changes.filter(pk__in=ids)
        # The object is locked while its mirror is written: a delete waits, and so
        # does another worker's read, so an older state never overwrites a newer one.
        instance = (
            None
            if mapping is None
            else mapping.model._base_manager.using(source_alias)
            .select_for_update()
            .filter(pk=pk)
            .first()
        )
        if mapping is None or instance is None:
            # No longer connected, or deleted since: its delete took care of the mirror.
            taken.delete()
            return True
        try:
            with transaction.atomic(using=alias):
                sync_source(mapping, instance)
        except SatoriValidationError as exc:
            _keep_error(
                taken, ids, exc.message if exc.field is None else f"{exc.field}: {exc.message}"
            )
            return True
        except IntegrityError as exc:  # an address taken by a concurrent save
            _keep_error(
                taken,
                ids,
                _("Another customer has this e-mail address: %(error)s") % {"error": exc},
            )
            return True
        except DatabaseError:
            raise  # a lost connection, a lock: rolled back, the task tries again
        except Exception as exc:  # the project's mapping failed on this object
            log.exception("Could not build the SATORI customer of %s %s", label, pk)
            _keep_error(taken, ids, f"{type(exc).__name__}: {exc}")
            return True
        taken.delete()
    return True


def _take(changes: models.QuerySet[SourceChange], connection: Any) -> list[int]:
    """Lock the object's recorded changes and return their ids. Only these are
    deleted afterwards: a change recorded meanwhile is applied by its own task."""
    if connection.features.has_select_for_update:
        ids = list(changes.select_for_update().values_list("id", flat=True))
        changes.filter(pk__in=ids).update(attempts=F("attempts") + 1)
        return ids
    # SQLite: write first, so this transaction holds the write lock before it reads
    # anything (reading first, its snapshot could be outdated by the time it writes).
    changes.update(attempts=F("attempts") + 1)
    return list(changes.values_list("id", flat=True))


def _keep_error(taken: models.QuerySet[SourceChange], ids: list[int], error: str) -> None:
    """Keep the newest change with its error (shown in the admin), drop the rest."""
    newest = max(ids)
    taken.exclude(pk=newest).delete()
    taken.filter(pk=newest).update(error=error[:2000])
    log.warning("The SATORI customer of a connected object was not updated: %s", error)


def change_on_its_way(email: str) -> bool:
    """Whether a connected object's save for ``email`` waits for its mirror to be built."""
    return SourceChange.objects.filter(email=email, error="").exists()


def retry_source_changes(changes: models.QuerySet[SourceChange]) -> int:
    """Clear the errors of ``changes`` and queue them again (the admin's retry)."""
    ids = list(changes.values_list("pk", flat=True))
    SourceChange.objects.filter(pk__in=ids).update(error="", dispatched_at=timezone.now())
    return dispatch.dispatch_source_changes(ids)


def overdue_source_changes(stale: dt.datetime, limit: int) -> list[int]:
    """Recorded changes whose task was lost (a crash, a broker outage); marks them queued."""
    ids = list(
        SourceChange.objects.filter(error="")
        .filter(Q(dispatched_at__isnull=True, created_at__lt=stale) | Q(dispatched_at__lt=stale))
        .values_list("pk", flat=True)[:limit]
    )
    SourceChange.objects.filter(pk__in=ids).update(dispatched_at=timezone.now())
    return ids


def _mirror(mapping: ModelMapping, pk: str) -> Customer | None:
    """``mirrors(mapping, pk).first()``, with the query compiled once per process:
    compiling it and building the instance through the ORM cost more than running it."""
    alias = router.db_for_read(Customer)
    connection = connections[alias]
    found = _MIRROR_SQL.get((alias, connection.vendor))
    if found is None:
        found = _MIRROR_SQL[alias, connection.vendor] = _compile_mirror_query(connection)
    sql, slots, converters = found
    given = {_LABEL: mapping.label, _PK: pk}
    with connection.cursor() as cursor:
        cursor.execute(sql, [given.get(p, p) for p in slots])
        row = cursor.fetchone()
    if row is None:
        return None
    values = list(row)
    for index, expression, functions in converters:
        for convert in functions:
            values[index] = convert(values[index], expression, connection)
    return Customer.from_db(alias, None, values)


_LABEL, _PK = "\x00label", "\x00pk"  # stand-ins, to find where each parameter goes
#: By (alias, vendor): the SELECT of every concrete field, its parameters' stand-ins,
#: and the converters of each column (what the ORM applies when it reads a row).
_MIRROR_SQL: dict[tuple[str, str], tuple[str, tuple[Any, ...], list[Any]]] = {}


def _compile_mirror_query(connection: Any) -> tuple[str, tuple[Any, ...], list[Any]]:
    query = Customer.objects.filter(_HAS_SOURCE, source_model=_LABEL, source_pk=_PK)
    query = query.order_by()[:1]
    compiler = query.query.get_compiler(connection=connection)
    sql, params = compiler.as_sql()
    columns = [column for column, _select, _alias in compiler.select]
    fields = [column.target.attname for column in columns]
    if fields != [field.attname for field in Customer._meta.concrete_fields]:
        raise RuntimeError("the mirror's SELECT does not list the concrete fields in order")
    converters = [
        (index, expression, functions)
        for index, (functions, expression) in compiler.get_converters(columns).items()
    ]
    return sql, tuple(params), converters


def _refuse_shared_address(
    mapping: ModelMapping, instance: Any, mirror: Customer | None, email: str
) -> None:
    """Two local objects must not become one SATORI customer.

    Addresses are compared as SATORI may key them (ignoring case), so
    ``OK.User@Example.jp`` and ``ok.user@example.jp`` are one customer there: the
    second would overwrite the first's data, and deleting it would delete the
    first one's customer. A Customer without a source (created directly, or whose
    object stopped syncing) is taken over instead, as before.
    """
    if get_settings().EMAIL_LOWERCASE:
        others = Customer.objects.filter(email=email)  # stored normalised: the index serves
    else:
        # Stored as typed: SATORI may still see one customer in addresses that differ
        # only in case, so connected objects stay unique regardless of case.
        others = Customer.objects.filter(email__iexact=email)
    if mirror is not None:
        others = others.exclude(pk=mirror.pk)
    holder = others.values_list("source_model", "source_pk").first()
    if holder is None:
        return
    source_model, source_pk = holder
    if mirror is None and not source_model:
        return  # an unconnected customer: this object takes it over
    raise SatoriValidationError(
        _(
            "This e-mail address is already used in SATORI by %(other)s: SATORI does not "
            "tell addresses apart by upper and lower case, so both would be one customer."
        )
        % {"other": f"{source_model} {source_pk}" if source_model else _("another customer")},
        field="email",
    )


def mirrors(mapping: ModelMapping, pk: str) -> models.QuerySet[Customer]:
    """The Customer mirroring the connected object ``pk`` (at most one)."""
    return Customer.objects.filter(_HAS_SOURCE, source_model=mapping.label, source_pk=pk)


#: ``NOT (source_model = '')``, the partial unique index's condition, with the '' written
#: into the SQL: ``~Q(source_model="")`` binds it as a parameter, and SQLite then took
#: twice as long to find the mirror (86 against 43 µs at 4,000 customers).
_HAS_SOURCE = Func(
    F("source_model"), template="NOT (%(expressions)s = '')", output_field=BooleanField()
)


def _stop(customer: Customer, reason: str) -> None:
    Customer.objects.filter(pk=customer.pk).update(source_model="", source_pk="")
    outbox.stop(customer.pk, reason)


# Receivers ------------------------------------------------------------------


def _customer_saved(sender: Any, instance: Customer, raw: bool = False, **kwargs: Any) -> None:
    # Sent inside Customer.save()'s transaction: the outbox row commits with the change.
    # raw: loaddata writes fixtures as they are, without syncing them.
    if not raw:
        outbox.record_change(instance)


def _customer_deleted(sender: Any, instance: Customer, **kwargs: Any) -> None:
    outbox.record_delete(instance)


def _source_saved(sender: Any, instance: Any, raw: bool = False, **kwargs: Any) -> None:
    mapping = get_mappings().get(sender)
    if mapping is not None and not raw and get_settings().SYNC_ENABLED:
        record_source_change(mapping, instance)


def _source_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    mapping = get_mappings().get(sender)
    if mapping is None or not get_settings().SYNC_ENABLED:
        return
    customer = mirrors(mapping, str(instance.pk))
    if mapping.on_delete == "delete":
        customer.delete()
    else:
        for c in customer:
            _stop(c, _("The connected object was deleted; the customer stays in SATORI."))


_connected: list[tuple[models.signals.ModelSignal, Any, str]] = []


def connect_signals() -> None:
    """Connect the receivers of Customer and of the connected models (idempotent).

    A mistake in ``SATORI['MAPPINGS']`` does not stop start-up: the entries that
    are valid are connected, and system check E005 lists every error.
    """
    for signal, sender, uid in _connected:
        signal.disconnect(sender=sender, dispatch_uid=uid)
    _connected.clear()
    wiring: list[tuple[models.signals.ModelSignal, Any, Any, str]] = [
        (post_save, Customer, _customer_saved, "django_satori.customer_saved"),
        (post_delete, Customer, _customer_deleted, "django_satori.customer_deleted"),
    ]
    try:
        mappings = get_mappings()
    except MappingError as exc:
        log.error("SATORI['MAPPINGS'] is not valid; no connected model is synced: %s", exc)
        mappings = {}
    for model, mapping in mappings.items():
        wiring.append((post_save, model, _source_saved, f"django_satori.saved.{mapping.label}"))
        wiring.append(
            (post_delete, model, _source_deleted, f"django_satori.deleted.{mapping.label}")
        )
    for signal, sender, receiver, uid in wiring:
        signal.connect(receiver, sender=sender, dispatch_uid=uid, weak=False)
        _connected.append((signal, sender, uid))
