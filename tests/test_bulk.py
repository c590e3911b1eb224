"""Bulk CSV jobs against the sandbox over real HTTP.

Most tests drive the steps in-process (``bulk.drive_job`` runs the same
functions the Celery tasks run); ``test_a_real_worker_runs_the_whole_job``
does it with a worker subprocess and Redis.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import sqlite3
import threading
import time

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone, translation

from django_satori import bulk, sweep, sync
from django_satori.models import (
    BulkJob,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
    SyncStatus,
)
from tests.syncing import drain

pytestmark = pytest.mark.django_db(transaction=True)

FAST = {"BULK_POLL_INTERVAL_SECONDS": 0.05, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.2}


@pytest.fixture(autouse=True)
def _fast_polls():
    # Entered before the sandbox fixture, which keeps these when it sets BASE_URL.
    with override_settings(SATORI={**settings.SATORI, **FAST}):
        yield


def satori(**changes):
    return override_settings(SATORI={**settings.SATORI, **FAST, **changes})


def customers(n: int, prefix: str = "user", **fields) -> list[Customer]:
    """Many customers fast: bulk_create skips save(), so they have no outbox row yet."""
    defaults = {"last_name": "山田", "collection_route": "web"}
    return Customer.objects.bulk_create(
        [Customer(email=f"{prefix}{i}@example.jp", **{**defaults, **fields}) for i in range(n)],
        batch_size=2000,
    )


def run(job: BulkJob, **kwargs) -> BulkJob:
    return bulk.drive_job(job.pk, timeout=30, **kwargs)


def start(queryset=None, **kwargs) -> BulkJob:
    kwargs.setdefault("mode", "upsert")
    with transaction.atomic():
        return bulk.start_bulk_job(
            queryset if queryset is not None else Customer.objects.all(), **kwargs
        )


def stored_bytes(part: BulkPart) -> bytes:
    with bulk.bulk_storage().open(part.csv_file.name, "rb") as fileobj:
        return fileobj.read()


def statuses() -> dict[str, int]:
    return sync.pending_counts()


# --------------------------------------------------------------------------- format


def test_csv_has_the_api_header_rfc4180_quoting_and_reaches_satori_intact(satori_sandbox):
    memo = '改行\r\nと "引用符", カンマ 🎉' + "x" * 10_000
    Customer.objects.create(
        email="taro@example.jp",
        last_name="山田, 太郎",
        first_name='"Taro"',
        lead_company_name="Example株式会社",
        memo=memo,
        collection_route="",
        collection_date=dt.date(2026, 1, 31),
        delivery_permission="reject",
        tags=["資料請求", "セミナー"],
        custom_fields={"custom:plan": "gold", "custom:age": 42},
    )
    Customer.objects.create(
        email="cr@example.jp", collection_route="web", memo="bare\rCR", address="x"
    )
    Customer.objects.create(
        email="hanako@example.jp",
        collection_route="展示会",
        custom_fields={"custom:birthday": dt.date(1990, 5, 1).isoformat()},
    )
    with satori(BULK_DEFAULT_COLLECTION_ROUTE="API連携"):
        job = run(start(description="format"))

    assert job.state == BulkState.FINISHED, job.error
    (part,) = job.parts.all()
    data = stored_bytes(part)
    assert not data.startswith(b"\xef\xbb\xbf")  # UTF-8 without a BOM
    header_line = data.split(b"\n", 1)[0].decode()
    # Only the columns some row fills (BULK_CSV_COLUMNS = "filled"), in the usual order.
    assert header_line == (
        "email,last_name,first_name,lead_company_name,address,memo,collection_route,"
        "collection_date,delivery_permission,custom:plan,custom:age,custom:birthday,append_tags"
    )
    # Quotes doubled, the cell with the comma quoted, the CRLF kept inside the quotes.
    assert '"山田, 太郎","""Taro"""'.encode() in data
    assert '"改行\r\nと ""引用符"", カンマ 🎉'.encode() in data
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))
    by_email = {row["email"]: row for row in rows}
    taro = by_email["taro@example.jp"]
    assert taro["memo"] == memo
    assert taro["collection_route"] == "API連携"  # the default fills an empty route
    assert taro["collection_date"] == "2026-01-31"
    assert taro["custom:age"] == "42" and taro["custom:plan"] == "gold"
    assert taro["append_tags"] == "資料請求,セミナー"
    assert by_email["hanako@example.jp"]["collection_route"] == "展示会"
    assert by_email["hanako@example.jp"]["custom:birthday"] == "1990-05-01"
    # A lone CR is quoted too, so it cannot end the record early.
    assert b'"bare\rCR"' in data and by_email["cr@example.jp"]["memo"] == "bare\rCR"
    assert data.count(b"\r\n") == 1 and data.endswith(b"\n")  # LF endings; the CRLF is the memo's

    remote = satori_sandbox.state.customer("taro@example.jp")
    assert remote.fields["memo"] == memo
    assert remote.fields["last_name"] == "山田, 太郎"
    assert remote.custom["age"] == "42"
    assert remote.tags == {"資料請求", "セミナー"}
    state = SyncState.objects.get(email="taro@example.jp")
    assert state.status == SyncStatus.SYNCED and state.in_satori
    assert state.synced_version == state.version
    assert sorted(state.sent_tags) == sorted(["資料請求", "セミナー"])
    assert state.bulk_part is None


def test_invalid_rows_are_left_out_reported_and_the_rest_goes_ahead(satori_sandbox):
    customers(3, prefix="fine")
    Customer.objects.create(email="noroute@example.jp", collection_route="")
    Customer.objects.create(
        email="plan@example.jp", collection_route="web", custom_fields={"custom:age": "forty"}
    )
    Customer.objects.create(
        email="unknown@example.jp", collection_route="web", custom_fields={"custom:color": "red"}
    )
    bypassing_save = [
        # save() refuses a tag holding the separator; bulk_create() does not.
        Customer(email="tagsep@example.jp", collection_route="web", tags=["a,b"]),
        Customer(email="Upper@Example.jp", collection_route="web"),
        Customer(email="no-at-sign", collection_route="web"),
        Customer(email="perm@example.jp", collection_route="web", delivery_permission="maybe"),
    ]
    nul_possible = connection.vendor != "postgresql"  # PostgreSQL cannot store NUL at all
    if nul_possible:
        bypassing_save.append(
            Customer(email="nul@example.jp", collection_route="web", memo="a\x00b")
        )
    Customer.objects.bulk_create(bypassing_save)

    job = run(start())

    assert job.state == BulkState.FINISHED
    assert (job.row_count, job.succeeded_count, job.invalid_count) == (3, 3, 7 + nul_possible)
    errors = {e.email: e for e in BulkRowError.objects.filter(job=job)}
    assert all(e.before_upload and e.row_number is None for e in errors.values())
    assert errors["noroute@example.jp"].field == "collection_route"
    assert errors["plan@example.jp"].field == "custom:age"
    assert errors["unknown@example.jp"].field == "custom:color"
    assert errors["tagsep@example.jp"].field == "append_tags"
    assert errors["Upper@Example.jp"].field == "email"
    assert "normalised" in errors["Upper@Example.jp"].message
    assert errors["no-at-sign"].field == "email"
    assert errors["perm@example.jp"].field == "delivery_permission"
    if nul_possible:
        assert errors["nul@example.jp"].field == "memo"
    assert errors["plan@example.jp"].customer.email == "plan@example.jp"
    # Nothing invalid reached SATORI; the valid rows did.
    (request,) = satori_sandbox.state.requests_for("bulk_upsert")
    sent = request.files[0].content.decode()
    assert "noroute@" not in sent and "fine0@example.jp" in sent
    # The outbox rows of invalid customers say why (so the sweep does not retry them forever).
    state = SyncState.objects.get(email="noroute@example.jp")
    assert state.status == SyncStatus.FAILED
    assert "collection route" in state.last_error


def test_a_row_with_a_lone_surrogate_is_left_out_naming_its_field(satori_sandbox):
    if connection.vendor == "postgresql":
        pytest.skip("PostgreSQL's jsonb refuses a lone surrogate, so none can be stored")
    customers(2, prefix="fine", memo="日本語のメモ")
    # bulk_create skips save(); SQLite's JSON keeps a surrogate as an \\ud800 escape and
    # hands it back, and writing it into the part failed with a UnicodeEncodeError.
    Customer.objects.bulk_create(
        [
            Customer(email="tag@example.jp", collection_route="web", tags=["ok", "t\ud800"]),
            Customer(
                email="plan@example.jp",
                collection_route="web",
                custom_fields={"custom:plan": "gold\udfff"},
            ),
        ]
    )

    job = run(start())

    assert job.state == BulkState.FINISHED, job.error
    assert (job.row_count, job.succeeded_count, job.invalid_count) == (2, 2, 2)
    errors = {e.email: e for e in BulkRowError.objects.filter(job=job)}
    assert errors["tag@example.jp"].field == "append_tags"
    assert errors["plan@example.jp"].field == "custom:plan"
    assert all("lone surrogate" in e.message and e.before_upload for e in errors.values())
    (request,) = satori_sandbox.state.requests_for("bulk_upsert")
    sent = request.files[0].content.decode()
    assert "fine1@example.jp" in sent and "tag@example.jp" not in sent


def test_25000_customers_become_three_parts_and_all_are_synced(satori_sandbox):
    customers(25_000)
    job = run(start())
    assert job.state == BulkState.FINISHED, job.error
    parts = list(job.parts.values_list("number", "row_count", "state"))
    assert parts == [(1, 10_000, "finished"), (2, 10_000, "finished"), (3, 5_000, "finished")]
    assert (job.row_count, job.succeeded_count, job.failed_count, job.part_count) == (
        25_000,
        25_000,
        0,
        3,
    )
    assert statuses() == {SyncStatus.SYNCED: 25_000}
    assert len(satori_sandbox.state.customers) == 25_000
    assert len(satori_sandbox.state.requests_for("bulk_upsert")) == 3


def test_chunk_size_splits_parts_and_registration_mode_uses_its_endpoint(satori_sandbox):
    customers(7)
    job = run(start(mode="registration", chunk_size=3))
    assert list(job.parts.values_list("row_count", flat=True)) == [3, 3, 1]
    assert len(satori_sandbox.state.requests_for("bulk_registration")) == 3
    assert not satori_sandbox.state.requests_for("bulk_upsert")


# --------------------------------------------------------------------------- status


def test_status_is_polled_until_finished_with_the_right_counts(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=1.0)
    customers(12)
    ticks: list[tuple[str, int]] = []
    job = run(start(chunk_size=5), on_tick=lambda j: ticks.append((j.state, j.succeeded_count)))
    assert job.state == BulkState.FINISHED
    assert (job.row_count, job.succeeded_count, job.failed_count, job.part_count) == (12, 12, 0, 3)
    assert (BulkState.PROCESSING, 0) in ticks  # seen while SATORI was still working
    for part in job.parts.all():
        assert part.process_code and part.poll_count >= 2
        assert part.finished_at and part.uploaded_at
    assert len(satori_sandbox.state.requests_for("bulk_status")) >= 6


def test_failed_rows_map_to_the_right_customers_despite_a_quoted_newline(satori_sandbox):
    # "Own records only": rows for customers another SATORI user created are refused.
    satori_sandbox.configure(own_only=True)
    satori_sandbox.seed_customer("taken@example.jp", created_by="another-user")
    Customer.objects.bulk_create(
        [
            Customer(
                email="first@example.jp",
                memo="line one\nline two\nline three",
                collection_route="web",
            ),
            Customer(email="taken@example.jp", collection_route="web"),
            Customer(email="last@example.jp", collection_route="web"),
        ]
    )
    job = run(start())

    assert (job.state, job.succeeded_count, job.failed_count) == (BulkState.FINISHED, 2, 1)
    (error,) = BulkRowError.objects.filter(job=job)
    # The first record spans three lines, yet SATORI counts records: taken@ is row 3.
    assert (error.row_number, error.email, error.before_upload) == (3, "taken@example.jp", False)
    assert error.customer.email == "taken@example.jp"
    assert "他のユーザーが登録したカスタマーは操作できません" in error.message
    assert error.field == "email"
    taken = SyncState.objects.get(email="taken@example.jp")
    assert taken.status == SyncStatus.FAILED
    assert taken.last_error == error.message
    assert taken.attempts == 1 and taken.bulk_part is None
    assert SyncState.objects.get(email="first@example.jp").status == SyncStatus.SYNCED
    assert SyncState.objects.get(email="last@example.jp").status == SyncStatus.SYNCED


def test_an_expired_process_code_fails_the_part_and_puts_its_customers_back(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(4)
    job = start()
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    assert SyncState.objects.filter(status=SyncStatus.IN_BULK).count() == 4
    satori_sandbox.state.forget_process_codes()  # as if SATORI dropped the job's results

    outcome, delay = bulk.poll_part(job.parts.get().pk, force=True)

    assert (outcome, delay) == ("failed", None)
    job.refresh_from_db()
    part = job.parts.get()
    assert job.state == BulkState.FAILED and part.state == BulkState.FAILED
    assert part.process_code in part.error and "expired or unknown" in part.error
    assert statuses() == {SyncStatus.PENDING: 4}
    state = SyncState.objects.first()
    assert state.bulk_part is None and "expired or unknown" in state.last_error
    # Held back a while, so the sweep does not hammer a failing SATORI.
    assert state.not_before > timezone.now()


def test_the_deadline_fails_a_part_that_never_finishes(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=60)
    customers(2)
    job = start()
    with satori(BULK_DEADLINE_SECONDS=0.2):
        bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
        part = job.parts.get()
        assert bulk.poll_part(part.pk, force=True)[0] == "processing"
        BulkPart.objects.filter(pk=part.pk).update(
            uploaded_at=timezone.now() - dt.timedelta(seconds=5)
        )
        assert bulk.poll_part(part.pk, force=True)[0] == "failed"
    part.refresh_from_db()
    assert "BULK_DEADLINE_SECONDS" in part.error
    assert statuses() == {SyncStatus.PENDING: 2}


def test_a_save_during_the_job_sends_the_newer_version_afterwards(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    first, second = customers(2)
    job = start()
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    state = SyncState.objects.get(email=first.email)
    in_bulk_version = state.version
    first = Customer.objects.get(pk=first.pk)
    first.last_name = "佐藤"
    first.save()  # while SATORI processes the file
    # A single push must not send it meanwhile: the row belongs to the bulk part.
    assert sync.push(state.pk)[0] is sync.PushOutcome.BUSY
    satori_sandbox.finish_bulk_jobs()

    assert bulk.poll_part(job.parts.get().pk, force=True)[0] == "finished"

    state.refresh_from_db()
    assert state.status == SyncStatus.PENDING  # the newer version still has to go
    assert state.synced_version == in_bulk_version < state.version
    assert state.bulk_part is None and state.in_satori
    assert SyncState.objects.get(email=second.email).status == SyncStatus.SYNCED
    assert sync.push(state.pk)[0] is sync.PushOutcome.SYNCED
    assert satori_sandbox.state.customer(first.email).fields["last_name"] == "佐藤"


def test_rows_being_sent_singly_are_left_out_and_counted(satori_sandbox):
    busy, free = customers(2)
    SyncState.objects.create(
        email=busy.email,
        customer=busy,
        status=SyncStatus.SENDING,
        lease_until=timezone.now() + dt.timedelta(minutes=5),
    )
    job = run(start())
    assert (job.row_count, job.skipped_count, job.succeeded_count) == (1, 1, 1)
    assert SyncState.objects.get(email=busy.email).status == SyncStatus.SENDING
    assert satori_sandbox.state.customer(busy.email) is None
    assert satori_sandbox.state.customer(free.email) is not None


# --------------------------------------------------------------------------- uploads


def test_a_transient_upload_error_is_retried_with_a_note_about_duplicates(satori_sandbox):
    satori_sandbox.faults.fail_first(1, "503", operations=["bulk_upsert"])
    customers(3)
    job = start()
    ready: list[int] = []
    bulk.run_job(job.pk, on_part_ready=ready.append)
    (part_id,) = ready

    outcome, delay = bulk.upload_part(part_id)
    assert outcome == "retry" and delay > 0
    part = BulkPart.objects.get(pk=part_id)
    assert part.state == BulkState.UPLOADING and part.uploaded_at is None
    assert "attempt 1" in part.error and "twice" in part.error

    assert bulk.upload_part(part_id)[0] == "uploaded"
    assert bulk.poll_part(part_id, force=True)[0] == "finished"
    assert statuses() == {SyncStatus.SYNCED: 3}
    assert BulkPart.objects.get(pk=part_id).upload_attempts == 2


def test_a_refused_upload_fails_the_part_with_satoris_message(satori_sandbox):
    satori_sandbox.configure(deny_operations={"bulk_upsert"})
    customers(3)
    job = run(start())
    assert job.state == BulkState.FAILED
    part = job.parts.get()
    assert part.state == BulkState.FAILED
    assert "permission denied for bulk_upsert" in part.error
    assert statuses() == {SyncStatus.PENDING: 3}
    assert "permission denied" in SyncState.objects.first().last_error


def test_a_second_upload_task_for_the_same_part_does_nothing(satori_sandbox):
    customers(2)
    job = start()
    ready: list[int] = []
    bulk.run_job(job.pk, on_part_ready=ready.append)
    assert bulk.upload_part(ready[0])[0] == "uploaded"
    assert bulk.upload_part(ready[0]) == ("busy", None)
    assert len(satori_sandbox.state.requests_for("bulk_upsert")) == 1


# --------------------------------------------------------------------------- cancel


def test_cancel_before_upload_releases_the_customers(satori_sandbox):
    customers(5)
    Customer.objects.create(email="synced@example.jp", collection_route="web")
    assert (
        sync.push(SyncState.objects.get(email="synced@example.jp").pk)[0] is sync.PushOutcome.SYNCED
    )
    job = start(chunk_size=3)
    ready: list[int] = []
    bulk.run_job(job.pk, on_part_ready=ready.append)
    assert SyncState.objects.filter(status=SyncStatus.IN_BULK).count() == 6

    result = bulk.cancel_job(job)

    assert (result.cancelled_parts, result.uploaded_parts, result.released) == (2, 0, 6)
    job.refresh_from_db()
    assert job.state == BulkState.CANCELLED and job.finished_at
    assert set(job.parts.values_list("state", flat=True)) == {BulkState.CANCELLED}
    # Back where they were: never-sent ones pending, the synced one synced.
    assert statuses() == {SyncStatus.PENDING: 5, SyncStatus.SYNCED: 1}
    assert all(bulk.upload_part(pk) == ("busy", None) for pk in ready)
    assert not satori_sandbox.state.requests_for("bulk_upsert")
    assert bulk.cancel_job(job).already_done


def test_an_uploaded_part_cannot_be_recalled_but_its_results_are_kept(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(4)
    job = start(chunk_size=2)
    ready: list[int] = []
    bulk.run_job(job.pk, on_part_ready=ready.append)
    bulk.upload_part(ready[0])

    result = bulk.cancel_job(job)

    assert (result.cancelled_parts, result.uploaded_parts) == (1, 1)
    assert "recall" in result.message()
    satori_sandbox.finish_bulk_jobs()
    assert bulk.poll_part(ready[0], force=True)[0] == "finished"
    job.refresh_from_db()
    assert job.state == BulkState.CANCELLED and job.succeeded_count == 2
    assert statuses() == {SyncStatus.SYNCED: 2, SyncStatus.PENDING: 2}


# --------------------------------------------------------------------------- the rest


RECALL = "SATORI offers no way to recall an upload"


@pytest.mark.parametrize(
    ("counts", "language", "expected"),
    [
        ((1, 0, 1), "en", "Cancelled 1 part not yet uploaded. 1 customer released."),
        ((3, 0, 3), "en", "Cancelled 3 parts not yet uploaded. 3 customers released."),
        (
            (0, 1, 0),
            "en",
            "Cancelled 0 parts not yet uploaded. 0 customers released. 1 part had "
            f"already been uploaded: {RECALL}, so it runs to the end and its results "
            "are still recorded.",
        ),
        (
            (1, 3, 2),
            "en",
            "Cancelled 1 part not yet uploaded. 2 customers released. 3 parts had "
            f"already been uploaded: {RECALL}, so they run to the end and their "
            "results are still recorded.",
        ),
        (
            (3, 3, 5),
            "ja",
            "未アップロードの 3 件のパートをキャンセルしました。"
            "5 件のカスタマーを解放しました。3 件のパートはアップロード済みです。"
            "SATORIにはアップロードを取り消す手段がないため、最後まで処理され、"
            "結果も記録されます。",
        ),
    ],
)
def test_the_cancel_message_is_worded_for_each_count(counts, language, expected):
    with translation.override(language):
        assert bulk.CancelResult(*counts).message() == expected


def test_failed_row_numbers_missing_from_the_file_are_noted_on_the_part(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(3)
    job = start(chunk_size=1)
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    one, three, japanese = job.parts.order_by("number")
    assert bulk.apply_results(one, [(90, "?")])
    assert bulk.apply_results(three, [(92, "?"), (91, "?"), (93, "?")])
    with translation.override("ja"):
        assert bulk.apply_results(japanese, [(91, "?"), (92, "?"), (93, "?")])
    for part in (one, three, japanese):
        part.refresh_from_db()
    assert one.error == "SATORI reported 1 failed row number that is not in the file: 90."
    assert three.error == (
        "SATORI reported 3 failed row numbers that are not in the file: 91, 92, 93."
    )
    assert japanese.error == (
        "SATORIがファイルに存在しない失敗行番号を 3 件報告しました: 91, 92, 93。"
    )
    assert three.state == BulkState.FINISHED and three.succeeded_count == 1


def test_the_upload_log_counts_the_rows_of_each_part(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(5)
    job = start(chunk_size=2)
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    two, japanese, one = job.parts.order_by("number")
    assert (two.row_count, japanese.row_count, one.row_count) == (2, 2, 1)
    assert bulk.upload_part(one.pk)[0] == bulk.upload_part(two.pk)[0] == "uploaded"
    with translation.override("ja"):
        assert bulk.upload_part(japanese.pk)[0] == "uploaded"
    logged = SyncLog.objects.filter(outcome=SyncLog.Outcome.OK).order_by("pk")
    assert list(logged.values_list("message", flat=True)) == [
        f"Job {job.pk} part 3: 1 row uploaded.",
        f"Job {job.pk} part 1: 2 rows uploaded.",
        f"ジョブ {job.pk} パート 2: 2 行をアップロードしました。",
    ]


def test_dry_run_writes_parts_but_uploads_and_claims_nothing(satori_sandbox):
    customers(4)
    Customer.objects.create(email="noroute@example.jp", collection_route="")
    before = statuses()
    job = start(dry_run=True)
    job = bulk.run_job(job.pk)
    assert job.state == BulkState.FINISHED and job.dry_run
    assert (job.row_count, job.invalid_count) == (4, 1)
    part = job.parts.get()
    assert part.state == BulkState.CREATED and b"user3@example.jp" in stored_bytes(part)
    assert statuses() == before
    assert not satori_sandbox.state.requests_for("bulk_upsert")


def test_the_sweep_sends_a_large_backlog_through_a_bulk_job(satori_sandbox):
    customers(12)
    with satori(BULK_THRESHOLD=5, SWEEP_AFTER_SECONDS=0):
        sync.mark_for_sync(Customer.objects.all())
        counts = sweep.sweep()
        job = BulkJob.objects.get()
        assert counts["bulk"] == job.pk and job.automatic
        job = run(job)
    assert job.state == BulkState.FINISHED and job.succeeded_count == 12
    assert statuses() == {SyncStatus.SYNCED: 12}
    assert not satori_sandbox.state.requests_for("upsert")  # no single calls at all


def test_poll_overdue_parts_requeues_lost_work(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(2)
    job = start()
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    part = job.parts.get()
    long_ago = timezone.now() - dt.timedelta(hours=1)
    BulkPart.objects.filter(pk=part.pk).update(next_poll_at=long_ago)
    never_started = start()
    BulkJob.objects.filter(pk=never_started.pk).update(created_at=long_ago)
    assert bulk.poll_overdue_parts(timezone.now()) == 2  # one poll, one export
    assert bulk.poll_overdue_parts(timezone.now() - dt.timedelta(hours=2)) == 0


def test_an_interrupted_upload_is_sent_once_more_then_its_part_fails(satori_sandbox):
    """A worker claimed the upload and died before SATORI's answer arrived: SATORI may
    have the file. It used to fail the part at once (and the sweep sent the rows again
    in another job, blindly); now it counts as a lost answer: one more upload, then the
    part fails."""
    customers(2)
    job = start()
    ready: list[int] = []
    bulk.run_job(job.pk, on_part_ready=ready.append)
    with satori(BULK_RESEND_WAIT_SECONDS=0):
        for interrupted in (1, 2):
            BulkPart.objects.filter(pk=ready[0]).update(
                uploaded_at=timezone.now() - dt.timedelta(hours=1)
            )
            bulk.poll_overdue_parts(timezone.now())
            part = BulkPart.objects.get(pk=ready[0])
            assert part.unanswered_uploads == interrupted
            if interrupted == 1:
                assert part.state == BulkState.UPLOADING and part.uploaded_at is None
                assert "answer was lost" in part.error and "once more" in part.error
    assert part.state == BulkState.FAILED and "third time" in part.error
    assert statuses() == {SyncStatus.PENDING: 2}


def test_a_lost_upload_answer_is_sent_again_once_after_the_wait(satori_sandbox):
    satori_sandbox.faults.fail_first(1, "lost_answer", operations=["bulk_upsert"])
    customers(3)
    with satori(BULK_RESEND_WAIT_SECONDS=0.3):
        job = run(start())
    assert job.state == BulkState.FINISHED and job.succeeded_count == 3
    part = job.parts.get()
    assert (part.upload_attempts, part.unanswered_uploads) == (2, 1)
    uploads = satori_sandbox.state.requests_for("bulk_upsert")
    assert len(uploads) == 2  # SATORI applied both: the first answer was lost
    outcomes = list(
        SyncLog.objects.filter(endpoint__startswith="bulk_customers/upsert")
        .order_by("id")
        .values_list("outcome", flat=True)
    )
    assert outcomes == [SyncLog.Outcome.FAILED, SyncLog.Outcome.OK]  # both attempts shown
    assert statuses() == {SyncStatus.SYNCED: 3}


def test_two_lost_upload_answers_fail_the_part_after_two_uploads_not_four(satori_sandbox):
    satori_sandbox.faults.fail_first(2, "lost_answer", operations=["bulk_upsert"])
    customers(3)
    with satori(BULK_RESEND_WAIT_SECONDS=0):
        job = run(start())
    part = job.parts.get()
    assert job.state == BulkState.FAILED and part.state == BulkState.FAILED
    assert len(satori_sandbox.state.requests_for("bulk_upsert")) == 2
    assert part.error.count("answer was lost") == 2
    assert statuses() == {SyncStatus.PENDING: 3}  # put back, to be sent again


@pytest.mark.parametrize("decision", ["resend", "give up"])
def test_never_resend_holds_the_part_for_a_person(satori_sandbox, decision):
    satori_sandbox.faults.fail_first(1, "lost_answer", operations=["bulk_upsert"])
    customers(3)
    with satori(BULK_RESEND_UNANSWERED="never"):
        job = run(start())
        part = job.parts.get()
        assert part.held and part.state == BulkState.UPLOADING and "never" in part.error
        # Nothing sends it again by itself, however long it waits.
        BulkJob.objects.filter(pk=job.pk).update(started_at=timezone.now() - dt.timedelta(days=1))
        BulkPart.objects.filter(pk=part.pk).update(
            uploaded_at=timezone.now() - dt.timedelta(days=1)
        )
        assert bulk.poll_overdue_parts(timezone.now()) == 0
        assert bulk.upload_part(part.pk)[0] == "busy"
        assert statuses() == {SyncStatus.IN_BULK: 3}  # still the part's
        if decision == "resend":
            assert bulk.resend_held(job) == 1
            assert bulk.upload_part(part.pk)[0] == "uploaded"
            assert bulk.poll_part(part.pk, force=True)[0] == "finished"
            assert statuses() == {SyncStatus.SYNCED: 3}
        else:
            assert bulk.give_up_held(job) == 1
            assert BulkPart.objects.get(pk=part.pk).state == BulkState.FAILED
            assert statuses() == {SyncStatus.PENDING: 3}
    assert len(satori_sandbox.state.requests_for("bulk_upsert")) == (
        2 if decision == "resend" else 1
    )


def test_start_returns_at_once_and_stores_a_query_not_a_list(django_assert_max_num_queries):
    selection = Customer.objects.filter(email__endswith="@example.jp", last_name="山田")
    with django_assert_max_num_queries(3):
        job = start(selection)
    rebuilt = bulk.job_queryset(job)
    assert str(rebuilt.query) == str(selection.query)
    with pytest.raises(ValueError):
        start(mode="delete")
    with pytest.raises(ValueError):
        start(chunk_size=10_001)


def test_a_real_worker_runs_the_whole_job(satori_sandbox, celery_worker):
    satori_sandbox.configure(bulk_processing_seconds=0.5)
    customers(23)
    customers(1, prefix="noroute", collection_route="")
    worker = celery_worker(FAST)
    job = start(chunk_size=10)  # committed: on_commit queues the export for the worker

    def done():
        job.refresh_from_db()
        return job.state in bulk.TERMINAL_STATES

    worker.wait_until(done, timeout=60)
    assert job.state == BulkState.FINISHED, job.error
    assert (job.row_count, job.succeeded_count, job.invalid_count, job.part_count) == (23, 23, 1, 3)
    assert statuses()[SyncStatus.SYNCED] == 23
    assert len(satori_sandbox.state.customers) == 23
    # The worker polled from re-scheduled tasks: several checks per part.
    assert sum(job.parts.values_list("poll_count", flat=True)) >= 3


def test_eager_mode_exports_and_uploads_without_recursing(satori_sandbox):
    from tests.celery_app import app

    satori_sandbox.faults.fail_first(1, "503", operations=["bulk_upsert"])
    customers(3)
    app.conf.task_always_eager = True
    try:
        job = start()  # on commit: export, upload (refused once), no retry loop
    finally:
        app.conf.task_always_eager = False
    part = job.parts.get()
    assert part.state == BulkState.UPLOADING and part.upload_attempts == 1
    # The sweep's safety net uploads it later, then a status check finishes it.
    BulkJob.objects.filter(pk=job.pk).update(started_at=timezone.now() - dt.timedelta(hours=1))
    assert bulk.poll_overdue_parts(timezone.now()) == 1  # queued (memory broker, no worker)
    assert bulk.upload_part(part.pk)[0] == "uploaded"
    assert bulk.refresh_job(job) == 1
    job.refresh_from_db()
    assert job.state == BulkState.FINISHED and job.succeeded_count == 3


# --------------------------------------------------------------------------- SQLite


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_an_export_on_sqlite_lets_other_processes_write_between_parts(satori_sandbox, journal_mode):
    """The export used to hold its read cursor open while it claimed each part. In
    rollback-journal mode that kept every other process (the sweep, the web server)
    from committing until its busy timeout, and the export then met "database is
    locked"; in WAL mode the export's own next claim failed at once. The example
    project on SQLite locked a 25,000-row job out for 13 minutes."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's locking")
    with connection.cursor() as cursor:
        cursor.execute(f"PRAGMA journal_mode={journal_mode}")
    try:
        people = customers(120)
        job = start(chunk_size=50)
        # Fewer rows a fetch than a part, as with any selection above 2,000 rows.
        path = connection.settings_dict["NAME"]
        other_writes: list[str] = []

        def another_process_writes(part_id: int) -> None:
            # What the sweep or a save does meanwhile, from its own connection.
            other = sqlite3.connect(path, timeout=2)
            try:
                with other:
                    other.execute(
                        "UPDATE django_satori_customer SET memo = ? WHERE id = ?",
                        (f"edited during part {part_id}", people[-1].pk),
                    )
                other_writes.append("ok")
            except sqlite3.OperationalError as exc:
                other_writes.append(str(exc))
            finally:
                other.close()

        with satori(BULK_EXPORT_ITERATOR_CHUNK=20):
            finished = bulk.run_job(job.pk, on_part_ready=another_process_writes)
        assert other_writes == ["ok", "ok", "ok"]
        assert finished.part_count == 3 and finished.row_count == 120
        assert finished.state == BulkState.UPLOADING and not finished.error
    finally:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=delete")


@pytest.mark.integration
@pytest.mark.slow
def test_sqlite_a_bulk_job_finishes_with_a_worker_and_a_poller_beside_it(
    satori_sandbox, celery_worker
):
    """The example project's situation on SQLite: a prefork worker with two processes
    runs the job while something else (beat's sweep, ``satori_bulk_status``) reads and
    writes the same file every fraction of a second."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's locking")
    satori_sandbox.configure(bulk_processing_seconds=0.3)
    customers(3000)
    worker = celery_worker(
        {**FAST, "BULK_EXPORT_ITERATOR_CHUNK": 200}, pool="prefork", concurrency=2
    )
    job = start(chunk_size=1000)
    stop = threading.Event()
    errors: list[str] = []

    def poll() -> None:
        try:
            while not stop.is_set():
                sweep.sweep()
                call_command("satori_bulk_status", "--job", str(job.pk), stdout=io.StringIO())
                time.sleep(0.2)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            connection.close()

    poller = threading.Thread(target=poll)
    poller.start()
    try:

        def done() -> bool:
            job.refresh_from_db()
            return job.state in bulk.TERMINAL_STATES

        worker.wait_until(done, timeout=120)
    finally:
        stop.set()
        poller.join(30)
    assert job.state == BulkState.FINISHED, job.error
    assert job.succeeded_count == 3000 and not errors
    assert "database is locked" not in worker.log_text()


def test_a_tag_removed_locally_is_removed_in_satori_after_a_bulk_job(satori_sandbox):
    """The bulk CSV can only add tags: such rows were marked synced while SATORI kept the
    dropped tag. They stay pending for one single push, which sends delete_tags."""
    kept = Customer.objects.create(
        email="kept@example.jp", tags=["keep", "drop"], collection_route="web"
    )
    plain = Customer.objects.create(email="plain@example.jp", tags=["keep"], collection_route="web")
    drain()
    Customer.objects.filter(pk=kept.pk).update(tags=["keep"])
    Customer.objects.filter(pk=plain.pk).update(memo="changed")
    job = run(start())
    assert job.state == BulkState.FINISHED and job.succeeded_count == 2
    state = SyncState.objects.get(email="kept@example.jp")
    assert state.status == SyncStatus.PENDING and state.removal_pending
    assert SyncState.objects.get(email="plain@example.jp").status == SyncStatus.SYNCED
    assert satori_sandbox.state.customer("kept@example.jp").tags == {"keep", "drop"}
    drain()
    assert satori_sandbox.state.customer("kept@example.jp").tags == {"keep"}
    state.refresh_from_db()
    assert state.status == SyncStatus.SYNCED and not state.removal_pending


def test_rows_with_tags_to_remove_are_never_put_into_another_bulk_job(satori_sandbox):
    people = customers(4, tags=["a", "b"])
    sync.mark_for_sync(Customer.objects.all())
    drain()
    Customer.objects.filter(pk__in=[p.pk for p in people]).update(tags=["a"])
    run(start())
    assert SyncState.objects.filter(removal_pending=True).count() == 4
    with satori(BULK_THRESHOLD=2, SWEEP_AFTER_SECONDS=0):
        counts = sweep.sweep()  # a backlog above the threshold, but not for the bulk API
        assert counts["bulk"] == 0 and counts["dispatched"] == 4
        again = run(start())  # an explicit job hands them to single pushes instead
    assert again.row_count == 0
    drain()
    assert all(satori_sandbox.state.customer(p.email).tags == {"a"} for p in people)
