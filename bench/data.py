"""The benchmark data set: customers with tags and two custom fields, and Members.

Rows are written with ``bulk_create`` (no ``save()``, so no outbox work) and
are deterministic, so every run and every database sees the same data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

from django.db import connection, transaction
from django.utils import timezone

from django_satori.models import Customer, SyncLog, SyncState, SyncStatus
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
    models = [BulkRowError, ImportedCustomer, CustomerAction, SyncLog, SyncState, BulkPart,
              BulkJob, Customer, Member]
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
                    SyncState(email=c.email, customer_id=c.pk, status=SyncStatus.SYNCED,
                              version=1, synced_version=1, in_satori=True,
                              last_synced_at=now, sent_tags=c.tags)
                    for c in created
                )


def seed_members(count: int) -> None:
    """``count`` Members, each mirrored by a synced Customer (as the signal would leave it)."""
    now = timezone.now()
    for batch in _batches(0, count):
        with transaction.atomic():
            members = Member.objects.bulk_create(
                Member(email=member_email(i), family_name="佐藤", given_name=f"花子{i}",
                       company=f"会員企業{i % 300}", plan=PLANS[i % len(PLANS)],
                       tags="member newsletter")
                for i in batch
            )
            customers = Customer.objects.bulk_create(
                Customer(email=m.email, last_name=m.family_name, first_name=m.given_name,
                         lead_company_name=m.company, tags=m.tag_list,
                         custom_fields={"custom:plan": m.plan},
                         source_model=MEMBER_LABEL, source_pk=str(m.pk))
                for m in members
            )
            SyncState.objects.bulk_create(
                SyncState(email=c.email, customer_id=c.pk, status=SyncStatus.SYNCED,
                          version=1, synced_version=1, in_satori=True, last_synced_at=now,
                          sent_tags=c.tags)
                for c in customers
            )


def mark_all_synced() -> int:
    """Put every outbox row back to 'synced', as between two bursts of real traffic."""
    return SyncState.objects.update(status=SyncStatus.SYNCED, not_before=None,
                                    dispatched_at=None, lease_until=None, lease_token="",
                                    attempts=0)


def analyze() -> None:
    """Fresh planner statistics after a bulk load (PostgreSQL plans by them)."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
