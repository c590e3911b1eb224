"""Management commands: exit codes, output, and that they run jobs without a worker."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.utils import timezone, translation

from django_satori import bulk
from django_satori.models import BulkJob, BulkState, Customer, SyncState, SyncStatus
from django_satori.sync import dispatch

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parent.parent
FAST = {"BULK_POLL_INTERVAL_SECONDS": 0.05, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.2}


@pytest.fixture(autouse=True)
def _fast_polls():
    with override_settings(SATORI={**settings.SATORI, **FAST}):
        yield


def command(name: str, *args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def failing(name: str, *args: str) -> tuple[int, str]:
    with pytest.raises(CommandError) as info:
        command(name, *args)
    return info.value.returncode, str(info.value)


def customers(n: int, prefix: str = "user", **fields) -> list[Customer]:
    fields = {"collection_route": "web", **fields}
    return Customer.objects.bulk_create(
        [Customer(email=f"{prefix}{i}@example.jp", **fields) for i in range(n)]
    )


def manage(*args: str, satori: dict | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, on this test's database (committed rows only)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DJANGO_SATORI_WORKER_DB_NAME": str(connection.settings_dict["NAME"]),
        "DJANGO_SATORI_TEST_SATORI": json.dumps(satori or {}),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --------------------------------------------------------------------------- bulk


def test_bulk_upsert_without_a_selection_is_a_usage_error_with_exit_code_2():
    result = manage("satori_bulk_upsert")
    assert result.returncode == 2
    assert "--all, --pending" in result.stderr
    assert failing("satori_bulk_upsert", "--all", "--chunk-size", "0")[0] == 2
    assert failing("satori_bulk_upsert", "--all", "--timeout", "5")[0] == 2
    assert failing("satori_bulk_upsert", "--created-since", "yesterday")[0] == 2


def test_dry_run_writes_parts_and_lists_invalid_rows(satori_sandbox):
    customers(5)
    customers(1, prefix="noroute", collection_route="")
    out, err = command(
        "satori_bulk_upsert", "--all", "--dry-run", "--chunk-size", "2", "--progress-every", "3"
    )
    job = BulkJob.objects.get()
    assert job.dry_run and job.state == BulkState.FINISHED
    assert "Rows: 5" in out and "left out as invalid: 1" in out and "parts: 3" in out
    assert "noroute0@example.jp [before upload] collection_route" in err
    assert "… 3 rows read" in err and "… 6 rows read" in err
    assert not satori_sandbox.state.requests_for("bulk_upsert")
    assert not SyncState.objects.exists()  # a dry run claims nothing


def test_wait_runs_the_job_in_process_and_exits_0(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=0.3)
    customers(6, tags=["x"])
    Customer.objects.bulk_create([Customer(email="x@elsewhere.example", collection_route="web")])
    out, err = command("satori_bulk_upsert", "--email-domain", "@Example.jp", "--wait")
    job = BulkJob.objects.get()
    assert job.state == BulkState.FINISHED
    assert f"Job #{job.pk}: Finished. Rows: 6, succeeded: 6, failed: 0" in out
    assert "Processing in SATORI" in err  # progress while waiting
    assert len(satori_sandbox.state.customers) == 6


@pytest.mark.parametrize("option", ["--wait", "--dry-run"])
def test_a_job_run_by_the_command_is_not_also_handed_to_a_worker(
    satori_sandbox, monkeypatch, option
):
    """With a worker running, --wait exported the job twice: the worker took the export
    queued after commit while the command ran it too (an IntegrityError, and a job error
    that blamed the export)."""
    asked: list[int] = []
    monkeypatch.setattr(dispatch, "dispatch_bulk_run", lambda job_id: asked.append(job_id))
    customers(3)
    command("satori_bulk_upsert", "--all", option)
    job = BulkJob.objects.get()
    assert asked == []
    assert job.state == BulkState.FINISHED and not job.error


def test_filters_select_by_status_domain_and_creation_time(satori_sandbox):
    old, new = customers(2)
    Customer.objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=30))
    Customer.objects.bulk_create([Customer(email="x@other.example", collection_route="web")])
    since = (timezone.now() - dt.timedelta(days=1)).date().isoformat()
    command(
        "satori_bulk_upsert", "--created-since", since, "--email-domain", "example.jp", "--dry-run"
    )
    job = BulkJob.objects.latest("pk")
    assert list(bulk.job_queryset(job).values_list("email", flat=True)) == [new.email]
    SyncState.objects.create(email=old.email, customer=old, status=SyncStatus.FAILED)
    command("satori_bulk_register", "--status", "failed", "--dry-run")
    job = BulkJob.objects.latest("pk")
    assert job.mode == "registration"
    assert list(bulk.job_queryset(job).values_list("email", flat=True)) == [old.email]


def test_a_refused_upload_exits_1_and_says_why(satori_sandbox):
    satori_sandbox.configure(deny_operations={"bulk_registration"})
    customers(2)
    SyncState.objects.bulk_create(
        [SyncState(email=c.email, customer=c) for c in Customer.objects.all()]
    )
    code, message = failing("satori_bulk_register", "--pending", "--wait")
    assert code == 1
    assert "permission denied for bulk_registration" in message
    assert set(SyncState.objects.values_list("status", flat=True)) == {SyncStatus.PENDING}


def test_row_failures_are_listed_on_stderr(satori_sandbox):
    satori_sandbox.configure(own_only=True)
    satori_sandbox.seed_customer("user1@example.jp")
    customers(3)
    out, err = command("satori_bulk_upsert", "--all", "--wait")
    assert "succeeded: 2, failed: 1" in out
    assert "user1@example.jp [part 1 row 3] email:" in err
    assert "他のユーザーが登録したカスタマーは操作できません" in err
    assert "1 row error:" in err.splitlines()


@pytest.mark.parametrize(
    ("language", "expected"), [("en", "3 row errors:"), ("ja", "行エラー 3 件:")]
)
def test_the_row_error_count_is_worded_for_several(satori_sandbox, language, expected):
    satori_sandbox.configure(own_only=True)
    for i in range(3):
        satori_sandbox.seed_customer(f"user{i}@example.jp")
    customers(4)
    with translation.override(language):
        _out, err = command("satori_bulk_upsert", "--all", "--wait")
    assert expected in err.splitlines()
    assert len([line for line in err.splitlines() if line.startswith("  user")]) == 3


def test_bulk_status_refreshes_processing_parts_and_prints_a_table(satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(3)
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    out, _err = command("satori_bulk_status", "--no-refresh")
    assert "job" in out.splitlines()[0] and f"{job.pk}" in out and "processing" in out

    satori_sandbox.finish_bulk_jobs()
    out, err = command("satori_bulk_status", "--job", str(job.pk))
    assert "finished" in err
    assert "finished" in out and "3 rows (3 ok, 0 failed)" in out
    assert failing("satori_bulk_status", "--job", "999999")[0] == 1


def test_bulk_status_on_the_command_line_exits_0_and_lists_jobs():
    BulkJob.objects.create(mode="upsert", description="from cron", state=BulkState.FINISHED)
    result = manage("satori_bulk_status", "--no-refresh")
    assert result.returncode == 0, result.stderr
    assert "from cron" in result.stdout


@pytest.mark.parametrize(
    ("count", "language", "read", "done", "part"),
    [
        (1, "en", "… 1 row read", "of 1 row done in SATORI", "  part 1: Finished, 1 row, file "),
        (2, "en", "… 2 rows read", "of 2 rows done in SATORI", "  part 1: Finished, 2 rows, file "),
        (
            2,
            "ja",
            "… 2 行を読み込みました",
            "SATORIで 2 行中 2 行を処理済み",
            "  パート 1: 完了、2 行、ファイル ",
        ),
    ],
)
def test_bulk_progress_and_parts_are_worded_for_their_row_count(
    satori_sandbox, count, language, read, done, part
):
    customers(count)
    with translation.override(language):
        out, err = command("satori_bulk_upsert", "--all", "--wait", "--progress-every", str(count))
    assert read in err.splitlines()
    assert any(line.endswith(done) for line in err.splitlines()), err
    assert any(line.startswith(part) for line in out.splitlines()), out


@pytest.mark.parametrize(
    ("count", "language", "expected"),
    [
        (1, "en", "part 1: Finished, 1 row (1 ok, 0 failed), process code {code}, 1 check"),
        (2, "en", "part 1: Finished, 2 rows (2 ok, 0 failed), process code {code}, 2 checks"),
        (2, "ja", "パート 1: 完了、2 行（成功 2、失敗 0）、プロセスコード {code}、状況確認 2 回"),
    ],
)
def test_bulk_status_words_rows_and_checks_each_for_its_count(
    satori_sandbox, count, language, expected
):
    satori_sandbox.configure(bulk_processing_seconds=30)
    customers(count)
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    for _check in range(count - 1):  # still processing: one status check each
        command("satori_bulk_status", "--job", str(job.pk))
    satori_sandbox.finish_bulk_jobs()
    with translation.override(language):
        out, _err = command("satori_bulk_status", "--job", str(job.pk))
    part = job.parts.get()
    assert part.poll_count == count
    assert expected.format(code=part.process_code) in out.splitlines()


# --------------------------------------------------------------------------- sync


def test_satori_sync_runs_the_sweep_and_prints_counts(satori_sandbox):
    out, _err = command("satori_sync")
    assert "dispatched=0" in out and "Sync states:" in out


def test_satori_sync_now_sends_pending_customers_without_a_worker(satori_sandbox):
    for i in range(3):
        Customer.objects.create(email=f"now{i}@example.jp", collection_route="web")
    out, err = command("satori_sync", "--now", "--progress-every", "2")
    assert "3 customers pending." in err and "… 2 sent or tried" in err
    assert "synced=3" in out
    assert set(SyncState.objects.values_list("status", flat=True)) == {SyncStatus.SYNCED}
    assert len(satori_sandbox.state.requests_for("upsert")) == 3


def test_satori_sync_now_keeps_to_the_rate_limit(satori_sandbox, settings):
    from django.core.cache import cache

    cache.clear()
    settings.SATORI = {**settings.SATORI, "RATE_LIMIT_PER_MINUTE": 2}
    for i in range(3):
        Customer.objects.create(email=f"rl{i}@example.jp", collection_route="web")
    started = timezone.now()
    code, message = failing("satori_sync", "--now", "--timeout", "1.5")
    # Two calls this minute; the third waits for the next window, here in the command.
    assert code == 1 and message == "Stopped after 1 second; the rest stays pending."
    assert (timezone.now() - started).total_seconds() >= 1.4
    assert len(satori_sandbox.state.requests_for("upsert")) == 2
    assert SyncState.objects.filter(status=SyncStatus.PENDING).count() == 1


def test_satori_sync_retry_failed_and_all_mark_customers(satori_sandbox):
    a, b = customers(2)
    SyncState.objects.create(email=a.email, customer=a, status=SyncStatus.FAILED)
    SyncState.objects.create(email=b.email, customer=b, status=SyncStatus.SYNCED)
    out, _err = command("satori_sync", "--retry-failed", "--now")
    assert "1 failed customer marked for sync." in out
    assert SyncState.objects.get(email=a.email).status == SyncStatus.SYNCED
    out, _err = command("satori_sync", "--all")
    assert "2 customers marked for sync." in out


def test_satori_sync_now_exits_1_when_customers_fail(satori_sandbox):
    satori_sandbox.configure(deny_operations={"upsert"})
    Customer.objects.create(email="denied@example.jp", collection_route="web")
    code, message = failing("satori_sync", "--now")
    assert code == 1 and message == "1 customer failed; see its last error in the admin."
    assert failing("satori_sync", "--timeout", "1")[0] == 2


@pytest.mark.parametrize(
    ("failed", "language", "retried", "marked"),
    [
        (1, "en", "1 failed customer marked for sync.", "1 customer marked for sync."),
        (3, "en", "3 failed customers marked for sync.", "3 customers marked for sync."),
        (
            3,
            "ja",
            "失敗した 3 件のカスタマーを送信待ちにしました。",
            "3 件のカスタマーを送信待ちにしました。",
        ),
    ],
)
def test_satori_sync_words_the_marked_count(satori_sandbox, failed, language, retried, marked):
    for customer in customers(failed):
        SyncState.objects.create(email=customer.email, customer=customer, status=SyncStatus.FAILED)
    with translation.override(language):
        retry_out, _err = command("satori_sync", "--retry-failed")
        all_out, _err = command("satori_sync", "--all")
    assert retry_out.splitlines()[0] == retried
    assert all_out.splitlines()[0] == marked


@pytest.mark.parametrize(
    ("count", "language", "pending", "failed"),
    [
        (1, "en", "1 customer pending.", "1 customer failed; see its last error in the admin."),
        (2, "en", "2 customers pending.", "2 customers failed; see their last error in the admin."),
        (
            2,
            "ja",
            "送信待ちのカスタマー: 2 件。",
            "2 件のカスタマーが失敗しました。最終エラーを管理画面で確認してください。",
        ),
    ],
)
def test_satori_sync_now_words_the_pending_and_failed_counts(
    satori_sandbox, count, language, pending, failed
):
    satori_sandbox.configure(deny_operations={"upsert"})
    for i in range(count):
        Customer.objects.create(email=f"denied{i}@example.jp", collection_route="web")
    err = io.StringIO()
    with translation.override(language), pytest.raises(CommandError) as info:
        call_command("satori_sync", "--now", stdout=io.StringIO(), stderr=err)
    assert pending in err.getvalue().splitlines()
    assert info.value.returncode == 1 and str(info.value) == failed


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", "Stopped after 0 seconds; the rest stays pending."),
        ("ja", "0 秒で停止しました。残りは送信待ちのままです。"),
    ],
)
def test_satori_sync_now_words_the_seconds_it_stopped_after(satori_sandbox, language, expected):
    # One second, the singular, is checked with the rate limit above (--timeout 1.5).
    for i in range(2):
        Customer.objects.create(email=f"late{i}@example.jp", collection_route="web")
    with translation.override(language):
        assert failing("satori_sync", "--now", "--timeout", "0") == (1, expected)
    assert SyncState.objects.filter(status=SyncStatus.PENDING).exists()
