"""``manage.py satori_status``: counts, thresholds, exit codes, worker ping, last sweep."""

from __future__ import annotations

import datetime as dt
import io
import json
import time

import pytest
from django.core.cache import caches
from django.core.management import CommandError, call_command
from django.utils import timezone

from django_satori import status, tasks
from django_satori.models import SyncState, SyncStatus

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_recorded_sweep():
    # The tests' cache is per process and outlives a test.
    caches["default"].delete(status.SWEEP_KEY)
    yield
    caches["default"].delete(status.SWEEP_KEY)


def rows(**counts: int) -> None:
    SyncState.objects.bulk_create(
        [
            SyncState(email=f"{state}{i}@example.jp", status=state)
            for state, n in counts.items()
            for i in range(n)
        ]
    )


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("satori_status", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), str(exc)
    return 0, out.getvalue(), err.getvalue()


def test_prints_counts_backlog_failed_and_the_oldest_pending_age():
    rows(pending=3, failed=2, synced=4, in_bulk=1)
    SyncState.objects.filter(email="pending0@example.jp").update(
        updated_at=timezone.now() - dt.timedelta(hours=2)
    )
    code, out, _err = run("--no-ping")
    assert code == 0
    assert "failed=2" in out and "pending=3" in out and "synced=4" in out
    assert "Backlog (pending, sending, in bulk): 4" in out
    assert "Failed: 2" in out
    age = int(out.split("Oldest pending change: ")[1].split(" s ago")[0])
    assert 7190 <= age <= 7300
    assert "Workers: not asked (--no-ping)" in out
    assert "Last sweep: never recorded" in out


def test_json_output_and_thresholds_set_the_exit_code():
    rows(pending=1, failed=3)
    SyncState.objects.filter(status=SyncStatus.PENDING).update(
        updated_at=timezone.now() - dt.timedelta(seconds=900)
    )
    code, out, _err = run("--no-ping", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["problems"] == []
    assert report["counts"]["failed"] == 3 and report["counts"]["sending"] == 0
    assert report["backlog"] == 1 and report["failed"] == 3
    assert 890 <= report["oldest_pending_seconds"] <= 990
    assert report["workers"] is None and report["last_sweep_seconds"] is None

    assert run("--no-ping", "--max-age", "3600", "--max-failed", "3")[0] == 0
    code, out, message = run("--no-ping", "--json", "--max-age", "600")
    assert code == 1 and "oldest pending change" in message
    assert json.loads(out)["ok"] is False
    code, _out, message = run("--no-ping", "--max-failed", "2")
    assert code == 1 and "3 customers have failed (more than 2)" in message


def test_nothing_pending_passes_any_max_age():
    rows(synced=2)
    code, out, _err = run("--no-ping", "--max-age", "0", "--json")
    assert code == 0 and json.loads(out)["oldest_pending_seconds"] is None


def test_the_sweep_task_and_command_record_their_run(satori_sandbox):
    assert run("--no-ping", "--max-sweep-age", "60")[0] == 1
    tasks.sweep.apply().get()
    code, out, _err = run("--no-ping", "--max-sweep-age", "60", "--json")
    assert code == 0 and json.loads(out)["last_sweep_seconds"] < 60
    # Run by cron instead of beat: the command notes its run too.
    caches["default"].delete(status.SWEEP_KEY)
    call_command("satori_sync", stdout=io.StringIO())
    assert run("--no-ping", "--max-sweep-age", "60")[0] == 0
    old = timezone.now() - dt.timedelta(seconds=600)
    status.record_sweep(old)
    code, _out, message = run("--no-ping", "--max-sweep-age", "60")
    assert code == 1 and "sweep has not run" in message


def test_require_worker_fails_when_no_worker_answers():
    started = time.monotonic()
    code, out, message = run("--require-worker", "--ping-timeout", "0.3")
    assert code == 1 and "No Celery worker answered" in message
    assert "Workers: none" in out
    assert time.monotonic() - started < 0.3 + status.PING_GRACE_SECONDS + 2
    code, _out, _msg = run("--require-worker", "--no-ping")
    assert code == 2


def test_a_running_worker_answers_and_a_stopped_broker_is_reported_quickly(
    celery_worker, redis_server
):
    worker = celery_worker()
    code, out, _err = run("--require-worker", "--ping-timeout", "2", "--json")
    report = json.loads(out)
    assert code == 0, report
    assert report["workers"] == [worker.hostname]

    redis_server.stop()
    started = time.monotonic()
    code, out, message = run("--require-worker", "--ping-timeout", "1", "--json")
    assert code == 1 and "No Celery worker answered" in message
    assert json.loads(out)["workers"] == []
    assert time.monotonic() - started < 1 + status.PING_GRACE_SECONDS + 2
