"""How an export claims its customers' outbox rows (``bulk._claim``), and the row encoder's
fast paths, without the sandbox: nothing here is uploaded.

The claim is one statement per part on SQLite and PostgreSQL; these tests pin down what it
takes and what it leaves, whatever the statement looks like.
"""

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_satori import bulk, bulk_csv, bulk_files
from django_satori.conf import get_settings
from django_satori.exceptions import SatoriValidationError
from django_satori.models import (
    BulkJob,
    BulkMode,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    CustomerAction,
    SyncState,
    SyncStatus,
)
from django_satori.sync import dispatch
from django_satori.sync.outbox import claim_for_part

pytestmark = pytest.mark.django_db(transaction=True)


def customers(n: int, prefix: str) -> list[Customer]:
    """bulk_create skips save(): no outbox rows until a test makes them."""
    return Customer.objects.bulk_create(
        [
            Customer(email=f"{prefix}{i}@example.jp", last_name="山田", collection_route="web")
            for i in range(n)
        ],
        batch_size=1000,
    )


def outbox(people: list[Customer], **fields) -> list[SyncState]:
    fields.setdefault("status", SyncStatus.SYNCED)
    return SyncState.objects.bulk_create(
        [SyncState(email=c.email, customer=c, **fields) for c in people], batch_size=1000
    )


def new_part(number: int = 1) -> BulkPart:
    job = BulkJob.objects.create(mode=BulkMode.UPSERT, query=b"")
    return BulkPart.objects.create(job=job, number=number, state=BulkState.EXPORTING)


def members(people: list[Customer]) -> list[tuple[int, str]]:
    return [(c.pk, c.email) for c in people]


@pytest.fixture
def dispatched(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(dispatch, "dispatch_many", lambda ids, countdown=0: calls.extend(ids))
    return calls


def test_the_claim_takes_and_leaves_each_kind_of_row_as_documented(dispatched):
    # More members than one IN (...) batch, so a per-batch loop would show.
    synced = customers(1200, "synced")
    outbox(synced, version=3, synced_version=3)
    pending = customers(3, "pending")
    outbox(pending, status=SyncStatus.PENDING, version=5, synced_version=4)
    busy = customers(2, "busy")
    outbox(
        busy, status=SyncStatus.SENDING, lease_until=timezone.now() - dt.timedelta(minutes=5)
    )  # expired: still left alone
    elsewhere = customers(2, "elsewhere")
    other_part = new_part(7)
    outbox(elsewhere, status=SyncStatus.IN_BULK, bulk_part=other_part)
    moved = customers(1, "moved")
    outbox(
        moved,
        status=SyncStatus.PENDING,
        previous_email="old@example.jp",
        hashcode="h1",
        in_satori=True,
    )
    no_row = customers(4, "norow")
    people = synced + pending + busy + elsewhere + moved + no_row

    part = new_part()
    with CaptureQueriesContext(connection) as queries:
        claimed = claim_for_part(part, members(people) + members(pending[:1]), get_settings())

    expected = {c.email for c in synced + pending + no_row}
    assert claimed == expected
    rows = {s.email: s for s in SyncState.objects.all()}
    assert {e for e, s in rows.items() if s.bulk_part_id == part.pk} == expected
    assert all(rows[e].status == SyncStatus.IN_BULK for e in expected)
    assert all(rows[c.email].bulk_version == 3 for c in synced)
    assert all(rows[c.email].bulk_version == 5 for c in pending)
    assert all(rows[c.email].customer_id == c.pk for c in no_row)
    assert all(
        rows[c.email].status == SyncStatus.SENDING and rows[c.email].bulk_part_id is None
        for c in busy
    )
    assert all(rows[c.email].bulk_part_id == other_part.pk for c in elsewhere)
    handed = rows[moved[0].email]
    assert (handed.bulk_part_id, handed.status) == (None, SyncStatus.PENDING)
    assert handed.dispatched_at is not None
    assert dispatched == [handed.pk]
    if connection.vendor in ("sqlite", "postgresql"):
        claims = [
            q["sql"]
            for q in queries.captured_queries
            if q["sql"].startswith("UPDATE") and "bulk_part_id" in q["sql"].split("WHERE")[0]
        ]
        assert len(claims) == 1  # the whole part in one statement


def test_a_part_whose_rows_are_all_free_is_claimed_without_reading_them_back():
    people = customers(600, "free")
    outbox(people)
    part = new_part()
    with CaptureQueriesContext(connection) as queries:
        claimed = claim_for_part(part, members(people), get_settings())
    assert claimed == {c.email for c in people}
    assert SyncState.objects.filter(bulk_part=part, status=SyncStatus.IN_BULK).count() == 600
    if connection.vendor in ("sqlite", "postgresql"):
        assert len(queries.captured_queries) == 1


def test_rows_are_never_claimed_twice():
    people = customers(50, "twice")
    outbox(people[:40])
    first, second = new_part(1), new_part(2)
    assert len(claim_for_part(first, members(people), get_settings())) == 50
    assert claim_for_part(second, members(people), get_settings()) == set()
    assert SyncState.objects.filter(bulk_part=first).count() == 50
    assert not SyncState.objects.filter(bulk_part=second).exists()
    assert SyncState.objects.count() == 50


def test_without_create_unknown_customers_satori_does_not_know_are_not_claimed(dispatched):
    known = customers(2, "known")
    outbox(known[:1], in_satori=True)
    outbox(known[1:], hashcode="h-known")
    unknown = customers(2, "unknown")
    outbox(unknown, status=SyncStatus.PENDING)
    no_row = customers(2, "norow")
    part = new_part()
    with override_settings(SATORI={**settings.SATORI, "CREATE_UNKNOWN": False}):
        claimed = claim_for_part(part, members(known + unknown + no_row), get_settings())
    assert claimed == {c.email for c in known}
    rows = {s.email: s for s in SyncState.objects.all()}
    for c in unknown + no_row:
        assert (rows[c.email].status, rows[c.email].bulk_part_id) == (
            SyncStatus.NOT_IN_SATORI,
            None,
        )
    assert all("CREATE_UNKNOWN" in rows[c.email].last_error for c in unknown)
    assert dispatched == []


def test_an_export_claims_every_written_row_once_and_writes_only_claimed_rows():
    people = customers(1234, "export")
    outbox(people[:1000])  # the rest have no outbox row yet
    busy = people[5]
    SyncState.objects.filter(email=busy.email).update(
        status=SyncStatus.SENDING, lease_until=timezone.now() + dt.timedelta(minutes=5)
    )
    bad = people[700]
    Customer.objects.filter(pk=bad.pk).update(delivery_permission="maybe")

    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT, chunk_size=500)
    done = bulk.run_job(job.pk, on_part_ready=lambda part_id: None)

    assert (done.row_count, done.skipped_count, done.invalid_count) == (1232, 1, 1)
    parts = list(done.parts.order_by("number"))
    assert [p.row_count for p in parts] == [499, 500, 233]  # the invalid row is never written
    for part in parts:
        with bulk.bulk_storage().open(part.csv_file.name, "rb") as fileobj:
            emails = [cells[0] for _n, _columns, cells in bulk_csv.read_rows(fileobj)]
        assert len(emails) == len(set(emails)) == part.row_count
        assert set(emails) == set(
            SyncState.objects.filter(bulk_part=part).values_list("email", flat=True)
        )
    assert SyncState.objects.exclude(bulk_part=None).count() == 1232
    assert SyncState.objects.get(email=busy.email).bulk_part_id is None
    bad_row = SyncState.objects.get(email=bad.email)
    assert (bad_row.bulk_part_id, bad_row.status) == (None, SyncStatus.FAILED)


# --------------------------------------------------------------------------- encoder


def slow_encoder() -> bulk_csv.RowEncoder:
    """The same encoder with the custom-field fast paths switched off (the schema's rules)."""
    encoder = bulk_csv.RowEncoder(get_settings())
    encoder._integers = ()
    encoder._fast_keys = frozenset()
    return encoder


def row(custom) -> tuple:
    values = dict.fromkeys(bulk_csv.VALUE_FIELDS, "")
    values.update(
        pk=1,
        email="a@example.jp",
        collection_route="web",
        collection_date=None,
        tags=["x"],
        custom_fields=custom,
    )
    return tuple(values[name] for name in bulk_csv.VALUE_FIELDS)


@pytest.mark.parametrize(
    "custom",
    [
        {"age": 0},
        {"age": -12},
        {"age": 12345678901234567890},
        {"age": 3, "plan": "gold"},
        {"plan": "gold"},
        {},
        {"age": "42"},
        {"age": " 7 "},
        {"age": True},
        {"age": 1.5},
        {"age": "x"},
        {"age": None},
        {"age": ""},
        {"age": 5, "birthday": "2001-02-03"},
        {"age": 5, "plan": 9},
        {"age": 5, "nope": 1},
    ],
)
def test_the_integer_fast_path_gives_what_the_schema_gives(custom):
    fast, slow = bulk_csv.RowEncoder(get_settings()), slow_encoder()
    try:
        expected = slow.encode(row(custom))
    except SatoriValidationError as exc:
        with pytest.raises(SatoriValidationError) as info:
            fast.encode(row(custom))
        assert (info.value.field, info.value.message) == (exc.field, exc.message)
    else:
        assert fast.encode(row(custom)) == expected


@pytest.mark.parametrize("stored", ["a@example.jp\n", "a@example.jp ", "A@example.jp"])
def test_an_address_not_stored_normalised_is_refused_by_the_fast_check_too(stored):
    # update() and bulk_create() skip Customer.save(): a line break must not reach the file.
    values = list(row({}))
    values[bulk_csv.VALUE_FIELDS.index("email")] = stored
    with pytest.raises(SatoriValidationError) as info:
        bulk_csv.RowEncoder(get_settings()).encode(tuple(values))
    assert info.value.field == "email" and "normalised" in info.value.message


# --------------------------------------------------------------------------- parts


def test_cancel_leaves_its_customers_to_a_part_whose_upload_began_meanwhile():
    customers(4, "cancel")
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT, chunk_size=2)
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    first, second = job.parts.order_by("number")
    raced = False

    def upload_claims_first(execute, sql, params, many, context):
        # An upload task claims the first part after cancel_job has listed the parts
        # not yet uploaded, and before its UPDATE cancels them.
        nonlocal raced
        if not raced and sql.startswith("UPDATE") and "bulkpart" in sql:
            raced = True
            BulkPart.objects.filter(
                pk=first.pk, state=BulkState.UPLOADING, uploaded_at__isnull=True
            ).update(uploaded_at=timezone.now())
        return execute(sql, params, many, context)

    with connection.execute_wrapper(upload_claims_first):
        result = bulk.cancel_job(job)
    assert BulkPart.objects.get(pk=first.pk).state == BulkState.UPLOADING
    assert (result.cancelled_parts, result.uploaded_parts, result.released) == (1, 1, 2)
    assert SyncState.objects.filter(bulk_part=first, status=SyncStatus.IN_BULK).count() == 2
    assert BulkPart.objects.get(pk=second.pk).state == BulkState.CANCELLED
    assert not SyncState.objects.filter(bulk_part=second).exists()


def test_an_automatic_dry_run_settles_its_rows_when_the_selection_repeats_them():
    people = customers(2, "repeat")
    outbox(people, status=SyncStatus.PENDING)
    CustomerAction.objects.bulk_create(
        [
            CustomerAction(email=c.email, customer=c, name=name, occurred_at=timezone.now())
            for c in people
            for name in ("a", "b")
        ]
    )
    repeated = Customer.objects.filter(actions__name__in=["a", "b"])  # each customer twice
    job = bulk.start_bulk_job(repeated, mode=BulkMode.UPSERT, automatic=True, dry_run=True)
    done = bulk.run_job(job.pk)
    assert (done.state, done.row_count) == (BulkState.FINISHED, 2)
    # Settled like a single push under DRY_RUN, or the sweep starts this job every minute.
    assert list(SyncState.objects.values_list("status", flat=True)) == [SyncStatus.DRY_RUN] * 2


def test_an_export_that_fails_releases_the_part_it_was_writing(monkeypatch):
    people = customers(3, "broken")
    outbox(people, status=SyncStatus.PENDING, version=2, synced_version=1)

    class FullDisk:
        def save(self, name, content):
            raise OSError("no space left on device")

    # Where the parts are saved (bulk_files), the same storage bulk.bulk_storage() reads.
    monkeypatch.setattr(bulk_files, "bulk_storage", lambda conf=None: FullDisk())
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT)
    with pytest.raises(OSError):
        bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    job.refresh_from_db()
    part = job.parts.get()
    assert (part.state, part.error) == (BulkState.FAILED, "The export stopped with an error.")
    assert job.state == BulkState.FAILED and "OSError" in job.error
    assert (
        list(SyncState.objects.values_list("status", "bulk_part"))
        == [(SyncStatus.PENDING, None)] * 3
    )


def test_an_interrupted_export_starts_again_without_the_part_it_was_writing():
    people = customers(3, "again")
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT)
    # A worker died writing part 1: the job is still exporting, the part holds its claim.
    BulkJob.objects.filter(pk=job.pk).update(state=BulkState.EXPORTING)
    stale = BulkPart.objects.create(job=job, number=1, state=BulkState.EXPORTING)
    claim_for_part(stale, members(people), get_settings())
    BulkRowError.objects.create(job=job, email="bad@example.jp", message="x", before_upload=True)

    done = bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    part = done.parts.get()
    assert part.pk != stale.pk and (part.number, part.state) == (1, BulkState.UPLOADING)
    assert SyncState.objects.filter(bulk_part=part).count() == 3
    assert not done.row_errors.exists()


def _flush_table_statistics() -> None:
    # PostgreSQL 15+ reports a backend's table counters at most once a second; this makes
    # the next transaction end report them, so pg_stat_user_tables is current.
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
    Customer.objects.exists()  # a transaction end


def _analyzed_rows() -> float:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [SyncState._meta.db_table]
        )
        return float(cursor.fetchone()[0])


@pytest.mark.postgres
def test_an_export_refreshes_statistics_that_missed_a_large_change():
    from django_satori import rawsql

    people = customers(1500, "stale")
    rawsql.analyze(SyncState)  # planned as empty from now on...
    SyncState.objects.bulk_create(
        [SyncState(email=c.email, customer=c, version=1) for c in people]
    )  # ...though 1,500 rows arrived
    _flush_table_statistics()
    assert _analyzed_rows() <= 0
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT)
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    assert _analyzed_rows() == 1500
    # Current statistics are left alone: a job pays for no ANALYZE it does not need.
    _flush_table_statistics()  # the claims' changes, counted before the ANALYZE
    rawsql.analyze(SyncState, Customer)
    SyncState.objects.filter(
        pk__in=list(SyncState.objects.values_list("pk", flat=True)[:10])
    ).update(attempts=1)
    _flush_table_statistics()
    assert rawsql.analyze_if_stale(SyncState, Customer) is False


def test_statistics_are_a_postgresql_matter():
    from django_satori import rawsql

    if connection.vendor == "postgresql":
        pytest.skip("the PostgreSQL case is the test above")
    customers(1500, "lite")
    assert rawsql.analyze_if_stale(SyncState, Customer) is False
