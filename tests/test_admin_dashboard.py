"""The sync dashboard's numbers, and what the admin says about errors, retries and jobs.

Errors are produced by the real sync against the sandbox over HTTP: SATORI's refusal,
our own check before sending, and a call that got no answer.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.cache import caches
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from django_satori import admin_dashboard, mark_for_sync, status, sweep, sync
from django_satori.admin_status import Origin, error_origin, job_progress
from django_satori.models import (
    BulkJob,
    BulkPart,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
    SyncStatus,
)
from tests.syncing import drain

pytestmark = pytest.mark.django_db(transaction=True)

DASHBOARD = "admin:django_satori_dashboard"


def satori(**changes):
    return override_settings(SATORI={**settings.SATORI, **changes})


@pytest.fixture
def root() -> Client:
    User.objects.create_superuser("root", password="pw")
    client = Client()
    client.login(username="root", password="pw")
    return client


def set_status(email: str, status: str, **fields) -> None:
    SyncState.objects.filter(email=email).update(status=status, **fields)


def customers(prefix: str, n: int) -> list[Customer]:
    return [Customer.objects.create(email=f"{prefix}{i}@example.jp") for i in range(n)]


def log(minutes_ago: float, outcome: str = "ok", **fields) -> SyncLog:
    return SyncLog.objects.create(
        endpoint="customer/upsert.json",
        outcome=outcome,
        created_at=timezone.now() - dt.timedelta(minutes=minutes_ago),
        **fields,
    )


# --------------------------------------------------------------------------- counts


def test_counts_by_status_match_the_database_and_link_to_the_filtered_list(root):
    for c in customers("s", 3):
        set_status(c.email, SyncStatus.SYNCED)
    for c in customers("f", 2):
        set_status(c.email, SyncStatus.FAILED, last_error="boom")
    customers("p", 4)  # pending
    Customer.objects.bulk_create([Customer(email="never@example.jp")])  # no outbox row
    gone = Customer.objects.create(email="gone@example.jp")
    gone.delete()  # its outbox row stays, without a customer: not counted as a customer
    html = root.get(reverse(DASHBOARD)).content.decode()

    def tile(status: str) -> int:
        found = re.search(rf'id="satori-count-{status}"[^>]*data-count="(\d+)"', html)
        assert found, status
        return int(found.group(1))

    assert (tile("synced"), tile("failed"), tile("pending"), tile("none")) == (3, 2, 4, 1)
    assert tile("sending") == 0 and tile("not_in_satori") == 0
    changelist = reverse("admin:django_satori_customer_changelist")
    listing = root.get(changelist, {"sync_status": "failed"})
    assert listing.context["cl"].result_count == 2
    assert f'{changelist}?sync_status=failed"' in html


def test_failure_reasons_are_counted_and_link_to_exactly_those_customers(root):
    for c in customers("a", 3):
        set_status(c.email, SyncStatus.FAILED, last_error="SATORI status 403: 他のユーザー")
    for c in customers("b", 1):
        set_status(c.email, SyncStatus.FAILED, last_error="Tag separator")
    reasons = admin_dashboard.failure_reasons(reverse("admin:django_satori_customer_changelist"))
    assert [(r.message, r.count) for r in reasons] == [
        ("SATORI status 403: 他のユーザー", 3),
        ("Tag separator", 1),
    ]
    listing = root.get(reasons[0].url)
    assert listing.status_code == 200
    assert sorted(c.email for c in listing.context["cl"].result_list) == [
        "a0@example.jp",
        "a1@example.jp",
        "a2@example.jp",
    ]


def test_charts_count_calls_and_failures_per_hour_and_day(root):
    log(5)
    log(10, "failed", satori_status=400)
    log(70, "retry")
    log(60 * 30)  # yesterday or the day before: in the 7 days, not the 24 hours
    log(60 * 24 * 9)  # too old for both
    log(3, "skipped")  # a decision not to call: not a call
    log(4, "dry_run")
    charts = {c.id: c for c in admin_dashboard.charts(timezone.now())}
    day, week = charts["satori-chart-24h"], charts["satori-chart-7d"]
    assert (day.calls, day.fails) == (3, 2)
    assert (week.calls, week.fails) == (4, 2)
    assert len(day.buckets) == 24 and len(week.buckets) == 7
    assert day.buckets[-1].calls == 2 or day.buckets[-2].calls >= 1  # the hour boundary
    html = root.get(reverse(DASHBOARD)).content.decode()
    assert html.count('class="satori-bucket"') == 31
    assert re.search(r'class="satori-chart-calls">3<', html)
    assert re.search(r'class="satori-chart-calls">4<', html)
    assert "<script" not in html.split('id="satori-chart-24h"')[1].split("</svg>")[0]


def test_hourly_buckets_put_each_call_in_its_own_local_hour():
    now = timezone.now()
    log(0.5)
    log(61)
    log(62)
    buckets = admin_dashboard.call_buckets(now, hours=24)
    by_start = {b.start: b.calls for b in buckets if b.calls}
    local = timezone.localtime(now)
    this_hour = local.replace(minute=0, second=0, microsecond=0)
    expected: dict[dt.datetime, int] = {}
    for minutes in (0.5, 61, 62):
        moment = timezone.localtime(now - dt.timedelta(minutes=minutes))
        start = moment.replace(minute=0, second=0, microsecond=0)
        expected[start] = expected.get(start, 0) + 1
    assert by_start == expected
    assert buckets[-1].start == this_hour


def test_oldest_pending_and_sweep_evidence(root):
    caches["default"].delete(status.SWEEP_KEY)  # no sweep noted: judged from the rows
    now = timezone.now()
    c = Customer.objects.create(email="old@example.jp")
    long_ago = now - dt.timedelta(minutes=30)
    SyncState.objects.filter(email=c.email).update(
        status=SyncStatus.PENDING, updated_at=long_ago, dispatched_at=long_ago, not_before=None
    )
    oldest = admin_dashboard.oldest_pending(now)
    assert oldest is not None and oldest.count == 1 and oldest.since == long_ago
    sweep = admin_dashboard.sweep_health(now)
    assert sweep.state == "no" and "1" in sweep.text
    SyncState.objects.filter(email=c.email).update(dispatched_at=now, updated_at=now)
    assert admin_dashboard.sweep_health(now).state == "yes"
    SyncState.objects.all().delete()
    assert admin_dashboard.oldest_pending(now) is None
    assert admin_dashboard.sweep_health(now).state == "unknown"
    html = root.get(reverse(DASHBOARD)).content.decode()
    assert "SyncState.updated_at" in html or "Nothing is pending." in html
    assert "BulkJob.last_polled_at" in html


def test_an_unreachable_broker_does_not_hold_the_page():
    from celery import current_app

    old = current_app.conf.broker_url
    current_app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens there
    try:
        started = time.monotonic()
        health = admin_dashboard.worker_health(timeout=0.5)
        took = time.monotonic() - started
    finally:
        current_app.conf.broker_url = old
    assert took < 3.0
    assert health.state in ("no", "unknown")
    assert "127.0.0.1:1" not in health.text


def test_a_running_worker_answers_and_a_stopped_one_does_not(root, celery_worker):
    worker = celery_worker()
    health = admin_dashboard.worker_health(timeout=2.0)
    assert health.state == "yes" and worker.hostname in health.text
    html = root.get(reverse(DASHBOARD)).content.decode()
    assert 'class="satori-alive-yes"' in html
    worker.stop()
    health = admin_dashboard.worker_health(timeout=1.0)
    assert health.state == "no" and worker.hostname not in health.text


def test_the_dashboard_needs_view_permission_and_the_app_index_links_to_it(client):
    user = User.objects.create_user("staff", password="pw", is_staff=True)
    client.login(username="staff", password="pw")
    assert client.get(reverse(DASHBOARD)).status_code == 403
    user.user_permissions.add(
        Permission.objects.get(codename="view_customer", content_type__app_label="django_satori")
    )
    assert client.get(reverse(DASHBOARD)).status_code == 200
    index = client.get(reverse("admin:app_list", kwargs={"app_label": "django_satori"}))
    assert reverse(DASHBOARD) in index.content.decode()


def test_the_dashboard_in_japanese(client):
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    Customer.objects.create(email="ja@example.jp")
    html = client.get(reverse(DASHBOARD), HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    for text in ("SATORI同期ダッシュボード", "同期は動いていますか", "過去24時間", "失敗の理由"):
        assert text in html, text


# ------------------------------------------------------------- where an error comes from


def make_customer(email: str = "taro@example.jp", **fields) -> Customer:
    return Customer.objects.create(email=email, collection_route="web", **fields)


def test_satoris_refusal_is_labelled_satoris_words(root, satori_sandbox):
    satori_sandbox.configure(own_only=True)
    satori_sandbox.seed_customer("taken@example.jp", created_by="another-user")
    customer = make_customer("taken@example.jp")
    drain()
    state = SyncState.objects.get(email="taken@example.jp")
    assert state.status == SyncStatus.FAILED
    origin = error_origin(state)
    assert origin is not None and origin.kind == Origin.SATORI and origin.status is not None
    assert "他のユーザー" in origin.text and not origin.text.startswith("SATORI status")
    url = reverse("admin:django_satori_customer_change", args=[customer.pk])
    html = root.get(url, HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert "SATORIの原文" in html and "SATORIが拒否しました" in html


def test_our_own_check_is_not_called_satoris_words(root, satori_sandbox):
    with satori(TAG_SEPARATOR=";"):
        customer = make_customer()
        # Written by code past save() (which refuses it), not by the form.
        Customer.objects.filter(pk=customer.pk).update(tags=["VIP;重要"])
        mark_for_sync(Customer.objects.filter(pk=customer.pk))
        drain()
    state = SyncState.objects.get(email=customer.email)
    assert state.status == SyncStatus.FAILED
    assert error_origin(state).kind == Origin.LOCAL
    assert satori_sandbox.state.requests_for("upsert") == []
    url = reverse("admin:django_satori_customer_change", args=[customer.pk])
    html = root.get(url, HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    assert "SATORIの原文" not in html
    assert "SATORIへ送る前に、こちら側のチェックで拒否しました" in html
    html = root.get(url).content.decode()
    assert "as SATORI worded it" not in html and "Refused by our own check" in html


def test_no_answer_is_neither_satoris_nor_ours(root, satori_sandbox):
    satori_sandbox.faults.fail_first(5, kind="drop")
    with satori(MAX_ATTEMPTS=1):
        customer = make_customer()
        drain()
    state = SyncState.objects.get(email=customer.email)
    assert state.status == SyncStatus.FAILED
    assert error_origin(state).kind == Origin.UNREACHED
    html = root.get(reverse("admin:django_satori_customer_change", args=[customer.pk])).content
    assert b"No usable answer from SATORI" in html and b"as SATORI worded it" not in html


def test_a_retrying_customer_shows_its_attempts_and_next_try(root, satori_sandbox):
    satori_sandbox.faults.fail_first(1, kind="503")
    with satori(MAX_ATTEMPTS=5, RETRY_BACKOFF_SECONDS=600, RETRY_BACKOFF_MAX_SECONDS=600):
        customer = make_customer()
        state = SyncState.objects.get(email=customer.email)
        assert sync.push(state.pk)[0] is sync.PushOutcome.RETRY
        state.refresh_from_db()
        assert state.status == SyncStatus.PENDING and state.not_before is not None
        page = root.get(reverse("admin:django_satori_customer_change", args=[customer.pk]))
        listing = root.get(reverse("admin:django_satori_customer_changelist"))
    html = page.content.decode()
    assert re.search(r'id="satori-attempts">1 of 5', html)
    assert 'id="satori-next-try"' in html
    assert '<span class="satori-retry"' in listing.content.decode()
    assert ">1/5</span>" in listing.content.decode()


# --------------------------------------------------------------------------- bulk job progress


def test_a_finished_job_with_left_out_rows_does_not_read_as_clean(root):
    job = BulkJob.objects.create(
        mode="upsert",
        state=BulkState.FINISHED,
        row_count=5,
        succeeded_count=5,
        invalid_count=2,
        skipped_count=1,
    )
    progress = job_progress(job, [])
    assert (progress.selected, progress.left_out, progress.clean) == (8, 3, False)
    kinds = {s.kind: s.count for s in progress.segments}
    assert kinds == {"ok": 5, "out": 3}
    html = root.get(reverse("admin:django_satori_bulkjob_change", args=[job.pk])).content.decode()
    assert 'class="satori-not-clean"' in html
    assert "3 selected rows were not sent to SATORI" in html
    clean = BulkJob.objects.create(
        mode="upsert", state=BulkState.FINISHED, row_count=5, succeeded_count=5
    )
    assert job_progress(clean, []).clean


def test_a_processing_part_shows_its_status_checks_and_time_waited(root):
    job = BulkJob.objects.create(mode="upsert", state=BulkState.PROCESSING, row_count=10)
    BulkPart.objects.create(
        job=job,
        number=1,
        state=BulkState.PROCESSING,
        row_count=10,
        poll_count=6,
        uploaded_at=timezone.now() - dt.timedelta(minutes=3, seconds=5),
    )
    progress = job_progress(job)
    assert progress.in_satori == 10 and progress.percent_done == 0
    assert "6 status checks" in progress.stage and "3 min" in progress.stage
    listing = root.get(reverse("admin:django_satori_bulkjob_changelist")).content.decode()
    assert "6 status checks" in listing and "satori-seg-busy" in listing
    page = root.get(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))
    assert "6 status checks" in page.content.decode()
    ja = root.get(
        reverse("admin:django_satori_bulkjob_change", args=[job.pk]), HTTP_ACCEPT_LANGUAGE="ja"
    ).content.decode()
    assert "状況確認 6 回" in ja


def test_the_sweep_is_judged_by_its_last_noted_run(root):
    sweep.sweep()  # notes its run in SATORI['STATUS_CACHE']
    now = timezone.now()
    health = admin_dashboard.sweep_health(now)
    assert health.state == "yes" and "STATUS_CACHE" in health.basis
    status.record_sweep(now - dt.timedelta(minutes=10))
    assert admin_dashboard.sweep_health(now).state == "no"
    html = root.get(reverse(DASHBOARD)).content.decode()
    assert "is celery beat running?" in html
