"""The sync engine end to end: a real Celery worker process, a real Redis broker,
the sandbox over real HTTP, and the test database shared with the worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from django.db import transaction
from django.test import override_settings

from django_satori import add_action, sweep, sync
from django_satori.models import ActionStatus, Customer, CustomerAction, SyncState, SyncStatus
from django_satori.sync import dispatch
from tests.testapp.models import Member

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def make_customer(email: str = "taro@example.jp", **fields) -> Customer:
    return Customer.objects.create(
        email=email, last_name="山田", collection_route="自社フォーム", **fields
    )


def synced(*emails: str) -> bool:
    return SyncState.objects.filter(email__in=emails, status=SyncStatus.SYNCED).count() == len(
        emails
    )


def test_a_save_reaches_the_sandbox_through_a_real_worker(satori_sandbox, celery_worker):
    worker = celery_worker()
    make_customer(memo="こんにちは")
    worker.wait_until(lambda: synced("taro@example.jp"))
    (request,) = satori_sandbox.state.requests_for("upsert")
    assert request.form_dict()["customer[memo]"] == "こんにちは"


def test_hundred_saves_in_one_transaction_give_one_call(satori_sandbox, celery_worker):
    worker = celery_worker()
    with transaction.atomic():
        customer = make_customer()
        for i in range(100):
            customer.memo = f"edit {i}"
            customer.save()
    worker.wait_until(lambda: synced("taro@example.jp"))
    time.sleep(0.5)  # nothing else may follow
    (request,) = satori_sandbox.state.requests_for("upsert")
    assert request.form_dict()["customer[memo]"] == "edit 99"


def test_delete_and_action_through_the_worker(satori_sandbox, celery_worker):
    worker = celery_worker()
    customer = make_customer()
    worker.wait_until(lambda: synced("taro@example.jp"))
    with transaction.atomic():
        action = add_action(customer.email, "資料請求", content="カタログ")
    worker.wait_until(lambda: CustomerAction.objects.get(pk=action.pk).status == ActionStatus.SENT)
    assert satori_sandbox.state.customer(customer.email).actions[0].name == "資料請求"
    customer.delete()
    worker.wait_until(lambda: SyncState.objects.get().status == SyncStatus.DELETED)
    assert satori_sandbox.state.requests_for("delete")
    assert satori_sandbox.state.customer("taro@example.jp") is None


def test_an_email_change_reaches_satori_through_a_worker_without_beat(
    satori_sandbox, celery_worker
):
    worker = celery_worker()  # no beat: nothing but the save's own dispatch sends it
    customer = make_customer()
    member = Member.objects.create(email="hanako@example.jp", family_name="佐藤")
    worker.wait_until(lambda: synced("taro@example.jp", "hanako@example.jp"))
    customer.email = "taro.yamada@example.jp"
    customer.save()
    member.email = "hanako.sato@example.jp"
    member.save()
    worker.wait_until(
        lambda: synced("taro.yamada@example.jp", "hanako.sato@example.jp"), timeout=15
    )
    for old, new in [
        ("taro@example.jp", "taro.yamada@example.jp"),
        ("hanako@example.jp", "hanako.sato@example.jp"),
    ]:
        assert satori_sandbox.state.customer(old) is None
        assert satori_sandbox.state.customer(new) is not None


def test_three_500s_then_success_and_a_400_fails_at_once(satori_sandbox, celery_worker):
    worker = celery_worker({"RETRY_BACKOFF_SECONDS": 0.2, "RETRY_BACKOFF_MAX_SECONDS": 0.5})
    satori_sandbox.faults.fail_first(3, kind="500", operations=["upsert"])
    make_customer()
    worker.wait_until(lambda: synced("taro@example.jp"))
    assert SyncState.objects.get().attempts == 4
    satori_sandbox.configure(custom_fields={"plan": "integer"})
    make_customer("bad@example.jp", custom_fields={"custom:plan": "gold"})
    worker.wait_until(
        lambda: SyncState.objects.get(email="bad@example.jp").status == SyncStatus.FAILED
    )
    state = SyncState.objects.get(email="bad@example.jp")
    assert state.attempts == 1 and "custom:plan" in state.last_error
    assert (
        len(
            [
                r
                for r in satori_sandbox.state.requests_for("upsert")
                if r.form_dict()["customer[email]"] == "bad@example.jp"
            ]
        )
        == 1
    )


def test_broker_down_while_saving_loses_nothing(satori_sandbox, celery_worker, redis_server):
    redis_server.stop()
    emails = [f"down{i}@example.jp" for i in range(20)]
    for email in emails:
        make_customer(email)  # the save succeeds; only the enqueue fails
    assert sync.wait_for_dispatch()  # the publisher thread has given up on them
    assert SyncState.objects.filter(status=SyncStatus.PENDING).count() == 20
    redis_server.start()
    worker = celery_worker()
    dispatch.resume()  # as if the pause after the outage had run out
    with override_settings(SATORI={**_satori(), "SWEEP_AFTER_SECONDS": 0}):
        counts = sweep.sweep()  # what beat runs every minute
    assert counts["dispatched"] == 20
    worker.wait_until(lambda: synced(*emails), timeout=30)
    assert {e for e in emails if satori_sandbox.state.customer(e)} == set(emails)


def test_a_worker_killed_mid_task_loses_no_change(satori_sandbox, celery_worker):
    worker = celery_worker({"LEASE_SECONDS": 2})
    satori_sandbox.faults.delay = 1.5
    customer = make_customer()
    worker.wait_until(lambda: SyncState.objects.get().status == SyncStatus.SENDING)
    worker.kill()
    satori_sandbox.faults.delay = 0
    customer.memo = "changed while no worker ran"
    customer.save()
    time.sleep(2.1)  # the dead worker's claim expires
    worker.start()
    with override_settings(SATORI={**_satori(), "SWEEP_AFTER_SECONDS": 0}):
        sweep.sweep()
    worker.wait_until(lambda: synced("taro@example.jp"), timeout=30)
    remote = satori_sandbox.state.customer("taro@example.jp")
    assert remote.fields["memo"] == "changed while no worker ran"


@pytest.mark.postgres
def test_concurrent_writers_end_with_the_latest_state_in_satori(
    satori_sandbox, celery_worker, postgres_only
):
    worker = celery_worker(concurrency=2)
    emails = [f"c{i}@example.jp" for i in range(3)]
    for email in emails:
        make_customer(email)
    env = dict(worker.env)
    writers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.concurrent_writer", str(n), "40", *emails],
            env=env,
            cwd=os.getcwd(),
        )
        for n in range(2)
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    worker.wait_until(lambda: synced(*emails), timeout=60)
    for customer in Customer.objects.all():
        remote = satori_sandbox.state.customer(customer.email)
        assert remote.fields["memo"] == customer.memo
        assert remote.fields["department"] == customer.department


def _satori() -> dict:
    from django.conf import settings

    return dict(settings.SATORI)
