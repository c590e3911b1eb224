"""The benchmark data set: customers with tags and two custom fields, and Members.

Rows are written with ``bulk_create`` (no ``save()``, so no outbox work) and
are deterministic, so every run and every database sees the same data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from django_satori.models import Customer, SourceChange, SyncLog, SyncState, SyncStatus
from tests.testapp.models import Member

PLANS = ("free", "standard", "gold", "platinum")
BATCH = 5000
MEMBER_LABEL = "testapp.member"


def email_for(i: int) -> str:
    return f"customer{i:07d}@bench.example.com"


def member_email(i: int) -> str:
    return f"member{i:07d}@bench.example.com"


def _customer(i: int) -> Customer:
    return Customer(
        email=email_for(i),
        last_name="山田",
        first_name=f"太郎{i}",
        last_name_reading="ヤマダ",
        first_name_reading="タロウ",
        lead_company_name=f"株式会社ベンチ{i % 500}",
        department="営業部",
        phone_number=f"03-{i % 10000:04d}-{(i * 7) % 10000:04d}",
        address="東京都千代田区丸の内1-1-1",
        collection_route="bench",
        collection_date=dt.date(2024, 1, 1) + dt.timedelta(days=i % 365),
        delivery_permission="approval" if i % 5 else "reject",
        tags=["newsletter", f"segment-{i % 20}"] + (["vip"] if i % 11 == 0 else []),
        custom_fields={"custom:plan": PLANS[i % len(PLANS)], "custom:age": 20 + i % 60},
    )


def _batches(start: int, stop: int) -> Iterator[range]:
    for low in range(start, stop, BATCH):
        yield range(low, min(low + BATCH, stop))


def wipe() -> None:
    """Empty every table the benchmarks write to (fast: no per-row signals)."""
    from django_satori.models import (
        BulkJob,
        BulkPart,
        BulkRowError,
        CustomerAction,
        ImportedCustomer,
    )

    # Children first, so SQLite's foreign key checks never object.
    models = [
        BulkRowError,
        ImportedCustomer,
        CustomerAction,
        SyncLog,
        SyncState,
        BulkPart,
        BulkJob,
        Customer,
        Member,
    ]
    names = [connection.ops.quote_name(m._meta.db_table) for m in models]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE {', '.join(names)} RESTART IDENTITY CASCADE")
        else:
            for name in names:
                cursor.execute(f"DELETE FROM {name}")
            cursor.execute("DELETE FROM sqlite_sequence")
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM")


def seed_customers(count: int, *, synced: bool) -> None:
    """``count`` customers; with ``synced`` each has a SyncState as after a past sync."""
    now = timezone.now()
    for batch in _batches(0, count):
        with transaction.atomic():
            created = Customer.objects.bulk_create([_customer(i) for i in batch])
            if synced:
                SyncState.objects.bulk_create(
                    SyncState(
                        email=c.email,
                        customer_id=c.pk,
                        status=SyncStatus.SYNCED,
                        version=1,
                        synced_version=1,
                        in_satori=True,
                        last_synced_at=now,
                        sent_tags=c.tags,
                    )
                    for c in created
                )


def seed_members(count: int) -> None:
    """``count`` Members, each mirrored by a synced Customer (as the signal would leave it)."""
    now = timezone.now()
    for batch in _batches(0, count):
        with transaction.atomic():
            members = Member.objects.bulk_create(
                Member(
                    email=member_email(i),
                    family_name="佐藤",
                    given_name=f"花子{i}",
                    company=f"会員企業{i % 300}",
                    plan=PLANS[i % len(PLANS)],
                    tags="member newsletter",
                )
                for i in batch
            )
            customers = Customer.objects.bulk_create(
                Customer(
                    email=m.email,
                    last_name=m.family_name,
                    first_name=m.given_name,
                    lead_company_name=m.company,
                    tags=m.tag_list,
                    custom_fields={"custom:plan": m.plan},
                    source_model=MEMBER_LABEL,
                    source_pk=str(m.pk),
                )
                for m in members
            )
            SyncState.objects.bulk_create(
                SyncState(
                    email=c.email,
                    customer_id=c.pk,
                    status=SyncStatus.SYNCED,
                    version=1,
                    synced_version=1,
                    in_satori=True,
                    last_synced_at=now,
                    sent_tags=c.tags,
                )
                for c in customers
            )


def mark_all_synced() -> int:
    """Put every outbox row back to 'synced', as between two bursts of real traffic.

    Rows already in that state are left alone: rewriting 100,000 unchanged rows
    (and their index entries) before and after every export run cost PostgreSQL
    seconds a run, outside the timed span but inside the ten minutes of a run.
    """
    SourceChange.objects.all().delete()  # connected saves not yet applied by a worker
    changed = (
        ~Q(status=SyncStatus.SYNCED)
        | Q(not_before__isnull=False)
        | Q(dispatched_at__isnull=False)
        | Q(lease_until__isnull=False)
        | ~Q(lease_token="")
        | ~Q(attempts=0)
    )
    return SyncState.objects.filter(changed).update(
        status=SyncStatus.SYNCED,
        not_before=None,
        dispatched_at=None,
        lease_until=None,
        lease_token="",
        attempts=0,
    )


def analyze() -> None:
    """Fresh planner statistics after a bulk load (PostgreSQL plans by them)."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


# -- the same customers, generated by the database (for a million rows) -------------


def _defaults(model: type, skip: set[str]) -> tuple[list[str], list[Any]]:
    """Columns and values for every NOT NULL field not in ``skip``, from its default."""
    columns, values = [], []
    for field in model._meta.concrete_fields:
        if field.primary_key or field.attname in skip or field.null:
            continue
        columns.append(connection.ops.quote_name(field.column))
        values.append(field.get_db_prep_save(field.get_default(), connection))
    return columns, values


def _expressions(vendor: str) -> dict[str, str]:
    """SQL for each generated Customer column, over a series ``i``; same values as _customer."""
    if vendor == "postgresql":
        pad7, pad4 = "lpad(i::text, 7, '0')", "lpad(({x})::text, 4, '0')"
        date = "date '2024-01-01' + (i %% 365)"
        array, obj = "jsonb_build_array", "jsonb_build_object"
        plan = "(ARRAY['free','standard','gold','platinum'])[i %% 4 + 1]"
    else:
        pad7, pad4 = "substr('0000000' || i, -7)", "substr('0000' || ({x}), -4)"
        date = "date('2024-01-01', '+' || (i %% 365) || ' days')"
        array, obj = "json_array", "json_object"
        plan = (
            "CASE i %% 4 WHEN 0 THEN 'free' WHEN 1 THEN 'standard' WHEN 2 THEN 'gold' "
            "ELSE 'platinum' END"
        )
    return {
        "email": f"'customer' || {pad7} || '@bench.example.com'",
        "last_name": "'山田'",
        "first_name": "'太郎' || i",
        "last_name_reading": "'ヤマダ'",
        "first_name_reading": "'タロウ'",
        "lead_company_name": "'株式会社ベンチ' || (i %% 500)",
        "department": "'営業部'",
        "phone_number": f"'03-' || {pad4.format(x='i %% 10000')} || '-' || "
        f"{pad4.format(x='(i * 7) %% 10000')}",
        "address": "'東京都千代田区丸の内1-1-1'",
        "collection_route": "'bench'",
        "collection_date": date,
        "delivery_permission": "CASE WHEN i %% 5 = 0 THEN 'reject' ELSE 'approval' END",
        "tags": f"CASE WHEN i %% 11 = 0 THEN {array}('newsletter', 'segment-' || (i %% 20), 'vip') "
        f"ELSE {array}('newsletter', 'segment-' || (i %% 20)) END",
        "custom_fields": f"{obj}('custom:plan', {plan}, 'custom:age', 20 + i %% 60)",
    }


def seed_customers_sql(count: int, *, synced: bool) -> None:
    """What :func:`seed_customers` writes, generated by one INSERT ... SELECT per table."""
    vendor = connection.vendor
    expressions = _expressions(vendor)
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    columns, values = _defaults(Customer, set(expressions) | {"created_at", "updated_at"})
    q = connection.ops.quote_name
    columns += [q(name) for name in expressions] + [q("created_at"), q("updated_at")]
    selects = ["%s"] * len(values) + list(expressions.values()) + ["%s", "%s"]
    params = [*values, now, now]
    if vendor == "postgresql":
        series = "generate_series(0, %s) AS s(i)"
    else:
        series = (
            "(WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < %s) "
            "SELECT i FROM s)"
        )
    customer_table = q(Customer._meta.db_table)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {customer_table} ({', '.join(columns)}) "
            f"SELECT {', '.join(selects)} FROM {series} ORDER BY i",
            [*params, count - 1],
        )
        if synced:
            state_fixed = {"email": "email", "customer_id": "id", "sent_tags": "tags"}
            state_params = {
                "status": SyncStatus.SYNCED,
                "version": 1,
                "synced_version": 1,
                "in_satori": True,
                "last_synced_at": now,
                "created_at": now,
                "updated_at": now,
            }
            columns, values = _defaults(SyncState, set(state_fixed) | set(state_params))
            columns += [q(name) for name in (*state_fixed, *state_params)]
            selects = ["%s"] * len(values) + list(state_fixed.values()) + ["%s"] * len(state_params)
            cursor.execute(
                f"INSERT INTO {q(SyncState._meta.db_table)} ({', '.join(columns)}) "
                f"SELECT {', '.join(selects)} FROM {customer_table} ORDER BY id",
                [*values, *state_params.values()],
            )
