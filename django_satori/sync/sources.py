"""What starts a sync: saves and deletes of ``Customer`` and of connected models.

A connected model (``SATORI['MAPPINGS']``, say the project's ``Member``) is
mirrored into a :class:`~django_satori.models.Customer` in the same
transaction as its own save; the mirror's save marks the outbox row.
:func:`connect_signals` wires the receivers at start-up.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import connections, models, router
from django.db.models import BooleanField, F, Func
from django.db.models.signals import post_delete, post_save
from django.utils.translation import gettext as _

from ..conf import get_settings
from ..exceptions import SatoriValidationError
from ..mapping import MappingError, ModelMapping, get_mappings
from ..models import Customer
from ..schema import normalize_email
from . import outbox

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
    """Update (or create) the Customer that mirrors ``instance``; its save records the change.

    A save that changed nothing SATORI gets (a login updating ``last_login``,
    say) writes nothing, unless ``force`` (``mark_for_sync``).
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
    # column was a third of what a connected save added.
    customer.save(update_fields=[*changed, "updated_at"] if changed else None)
    return True


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
        sync_source(mapping, instance)


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
