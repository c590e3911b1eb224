"""The export's own reading and writing, without the sandbox: the rows it reads must be what
``values_list`` gives, and a part's file what writing every column and then leaving out the
empty ones gave (the way parts were written before they were kept as cells).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import threading
import time

import pytest
from django.db import connection, connections, transaction
from django.db.models import Count, Value

from django_satori import bulk, bulk_csv
from django_satori.conf import get_settings
from django_satori.models import (
    BulkMode,
    BulkPart,
    BulkState,
    Customer,
    CustomerAction,
    SyncState,
    SyncStatus,
)
from django_satori.sync import outbox

pytestmark = pytest.mark.django_db(transaction=True)


def varied_customers() -> list[Customer]:
    """bulk_create: values as stored, whatever save() would have made of them."""
    rows = [
        {"tags": ["a", "b"], "custom_fields": {"custom:age": 7, "custom:plan": "gold"}},
        {"tags": [], "custom_fields": {}, "collection_date": dt.date(2026, 2, 28)},
        {"tags": ["新規", "顧客 \u00e9"], "custom_fields": {"custom:plan": '日本語,"x"\r\n'}},
        {"tags": "", "custom_fields": 0},  # JSON scalars in the columns
        {"tags": "not a list", "custom_fields": {"custom:birthday": "2000/01/02", "n": [1, {}]}},
        {"tags": ["x"], "custom_fields": {"custom:age": 1.5, "custom:big": 12345678901234567890}},
        {"memo": "line\rbreak", "delivery_permission": "reject"},
    ]
    return Customer.objects.bulk_create(
        [
            Customer(email=f"read{i}@example.jp", last_name="山田", **fields)
            for i, fields in enumerate(rows)
        ]
    )


def read_through_the_orm(customers, page):
    """The reader as it was: ``values_list`` tuples, paged by primary key on SQLite (so a
    row the selection repeats across a page boundary is read once there)."""
    rows = customers.order_by("pk").values_list(*bulk_csv.VALUE_FIELDS)
    if connection.vendor != "sqlite":
        yield from rows.iterator(chunk_size=page)
        return
    last = None
    while True:
        chunk = list((rows if last is None else rows.filter(pk__gt=last))[:page])
        yield from chunk
        if len(chunk) < page:
            return
        last = chunk[-1][0]


@pytest.mark.parametrize("page", [1, 2, 3, 1000])
def test_the_export_reads_what_values_list_gives(page):
    people = varied_customers()
    CustomerAction.objects.bulk_create(
        [
            CustomerAction(
                email=c.email, customer=c, name=name, occurred_at=dt.datetime.now(dt.UTC)
            )
            for c in people[:3]
            for name in ("a", "b")
        ]
    )
    selections = [
        Customer.objects.all(),
        Customer.objects.filter(email__in=[c.email for c in people[1:5]]),
        Customer.objects.filter(actions__name__in=["a", "b"]),  # each of three twice
        Customer.objects.annotate(n=Count("actions")).filter(n__gte=0),
        Customer.objects.annotate(one=Value(1)),
        Customer.objects.none(),
    ]
    for selection in selections:
        expected = [list(row) for row in read_through_the_orm(selection, page)]
        read = [list(row) for row in bulk._selection_rows(selection, page)]
        assert read == expected
        assert [type(v) for row in read for v in row] == [type(v) for row in expected for v in row]


def test_json_that_is_not_an_object_or_list_decodes_as_django_decodes_it():
    scan = __import__("json").JSONDecoder().scan_once
    for raw in ['{"a": 1}', "[1, 2]", " [1]", "[1] ", "null", '"x"', "1", "[1] x", "{bad", ""]:
        field = Customer._meta.get_field("tags")
        assert bulk._json_value(raw, scan) == field.from_db_value(raw, None, None)
    assert bulk._json_value(None, scan) is None


def written_the_old_way(columns, rows, keep):
    """Every column first, then the file rewritten with the kept columns (as before)."""
    text = io.StringIO(newline="")
    writer = bulk_csv._RowWriter(text)
    writer.writerow(columns)
    for cells in rows:
        writer.writerow(cells)
    text.seek(0)
    names, *records = list(csv.reader(text))
    if isinstance(keep, str):
        filled = {n for n, name in enumerate(names) if name in bulk_csv.ALWAYS_KEPT}
        for cells in records:
            filled.update(n for n, cell in enumerate(cells) if cell)
        chosen = sorted(filled)
    else:
        chosen = [names.index(name) for name in keep if name in names]
    out = io.StringIO(newline="")
    writer = bulk_csv._RowWriter(out)
    for cells in [names, *records]:
        writer.writerow([cells[n] for n in chosen])
    return out.getvalue().encode()


@pytest.mark.parametrize(
    "keep", ["filled", ["email"], ["append_tags", "email", "nope"], bulk_csv.header(get_settings())]
)
def test_a_part_is_written_once_with_the_columns_it_keeps(keep):
    encoder = bulk_csv.RowEncoder(get_settings())
    columns = encoder.header
    blank = dict.fromkeys(columns, "")
    rows = []
    for i, fields in enumerate(
        [
            {"last_name": "山田", "collection_route": "web"},
            {"memo": "bare\rCR", "append_tags": "a"},
            {"memo": 'quote " and, comma\n'},
            {"custom:plan": "gold"},
            {"last_name": "dropped"},
            {"memo": "dropped\ralso"},
        ]
    ):
        cells = {**blank, **fields, "email": f"w{i}@example.jp"}
        rows.append([cells[name] for name in columns])
    writer = bulk_csv.PartWriter(list(columns), keep)
    for n, cells in enumerate(rows):
        if n % 2:
            writer.add(n, cells)  # the writer finds the CR itself
        elif "\r" in "".join(cells):
            writer.add(n, cells, True)
        else:
            writer.write_plain(cells)
            writer.members.append((n, cells[0]))
    writer.add(99, rows[0])  # e-mail twice: keep_only keeps the first
    assert writer.duplicates()
    writer.keep_only({row[0] for row in rows[:4]})
    assert [pk for pk, _email in writer.members] == [0, 1, 2, 3]
    data = writer.finish().read()
    writer.close()
    assert data == written_the_old_way(columns, rows[:4], keep)
    if keep == "filled":
        assert "last_name" in writer.columns and "department" not in writer.columns


# --------------------------------------------------------------------------- claims


def pending_customers(n: int) -> list[Customer]:
    people = Customer.objects.bulk_create(
        [
            Customer(email=f"claim{i}@example.jp", last_name="山田", collection_route="web")
            for i in range(n)
        ]
    )
    SyncState.objects.bulk_create(
        [
            SyncState(
                email=c.email, customer=c, status=SyncStatus.PENDING, version=2, synced_version=1
            )
            for c in people
        ]
    )
    return people


def test_an_export_that_stops_between_parts_leaves_customers_only_to_parts_handed_over():
    pending_customers(5)
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT, chunk_size=2)

    def progress(job, seen):
        if seen == 3:  # part 1 is claimed and handed over, part 2 is being written
            raise RuntimeError("the worker is going away")

    with pytest.raises(RuntimeError):
        bulk.run_job(
            job.pk, on_part_ready=lambda part_id: None, progress=progress, progress_every=1
        )
    # Only a part that was handed over keeps customers; the rest are still pending.
    holders = SyncState.objects.exclude(bulk_part=None).values_list("bulk_part__state", flat=True)
    assert list(holders) == [BulkState.UPLOADING] * 2
    assert set(SyncState.objects.filter(bulk_part=None).values_list("status", flat=True)) <= {
        SyncStatus.PENDING
    }
    assert not BulkPart.objects.filter(state=BulkState.EXPORTING).exists()


def test_an_export_run_inside_a_transaction_claims_in_that_transaction():
    with transaction.atomic():
        pending_customers(3)
        job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT, run_here=True)
        done = bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
        assert (done.row_count, done.skipped_count) == (3, 0)
    assert SyncState.objects.filter(bulk_part__isnull=False).count() == 3


@pytest.mark.postgres
def test_a_save_while_its_part_is_being_claimed_stays_pending_for_its_newer_version(
    monkeypatch,
):
    people = pending_customers(3)
    saved = people[1]
    real = outbox.claim_for_part
    saving: list[threading.Thread] = []

    def claim_then_save(part, members, conf):
        claimed = real(part, members, conf)
        # The claim holds the rows until it commits: a save now waits for it, then makes
        # the row pending with a newer version.
        thread = threading.Thread(target=save_one)
        thread.start()
        saving.append(thread)
        time.sleep(0.3)
        return claimed

    def save_one():
        try:
            customer = Customer.objects.get(pk=saved.pk)
            customer.last_name = "佐藤"
            customer.save()
        finally:
            connections.close_all()

    monkeypatch.setattr(outbox, "claim_for_part", claim_then_save)
    job = bulk.start_bulk_job(Customer.objects.all(), mode=BulkMode.UPSERT)
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    saving[0].join(10)
    part = job.parts.get()
    row = SyncState.objects.get(email=saved.email)
    assert (row.bulk_part_id, row.status, row.bulk_version, row.version) == (
        part.pk,
        SyncStatus.PENDING,
        2,
        3,
    )
    BulkPart.objects.filter(pk=part.pk).update(state=BulkState.PROCESSING)
    with transaction.atomic():
        pending = outbox.write_part_results(part, outbox.part_members(part), {}, {})
    assert pending == [row.pk]
    row.refresh_from_db()
    assert (row.status, row.synced_version, row.version) == (SyncStatus.PENDING, 2, 3)
    others = SyncState.objects.exclude(pk=row.pk)
    assert set(others.values_list("status", "synced_version")) == {(SyncStatus.SYNCED, 2)}
