"""The sync engine in-process: save -> outbox row -> push -> sandbox -> state.

Each test drives ``sync.push`` directly (what the Celery task runs) against
the sandbox over real HTTP; tests/test_worker.py repeats the essentials with
a real worker and a real Redis broker.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from django.core.exceptions import ValidationError
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from django_satori import add_action, mark_for_sync, signals, sweep, sync
from django_satori.client import SatoriClient
from django_satori.conf import get_settings
from django_satori.exceptions import SatoriTransientError, SatoriValidationError
from django_satori.models import (
    ActionStatus,
    Customer,
    CustomerAction,
    Operation,
    SyncLog,
    SyncState,
    SyncStatus,
)
from django_satori.sync import dispatch, outbox, pushing, sources
from tests.syncing import drain
from tests.testapp.models import Member

pytestmark = pytest.mark.django_db(transaction=True)


def satori(**changes):
    from django.conf import settings

    return override_settings(SATORI={**settings.SATORI, **changes})


def customer_requests(sandbox, operation="upsert"):
    return sandbox.state.requests_for(operation)


def make_customer(**fields) -> Customer:
    defaults = {
        "email": "taro@example.jp",
        "last_name": "山田",
        "first_name": "太郎",
        "collection_route": "自社フォーム",
    }
    return Customer.objects.create(**{**defaults, **fields})


def test_a_save_sends_exactly_one_upsert_with_the_right_fields(satori_sandbox):
    make_customer(
        lead_company_name="Example株式会社",
        collection_date=dt.date(2026, 1, 31),
        delivery_permission="approval",
        tags=["資料請求", "セミナー"],
        custom_fields={"custom:plan": "gold"},
    )
    assert drain() == 1
    (request,) = customer_requests(satori_sandbox)
    form = request.form_dict()
    assert form["customer[identity_type]"] == "email"
    assert form["customer[email]"] == "taro@example.jp"
    assert form["customer[last_name]"] == "山田"
    assert form["customer[lead_company_name]"] == "Example株式会社"
    assert form["customer[collection_date]"] == "2026-01-31"
    assert form["customer[delivery_permission]"] == "approval"
    assert form["customer[append_tags]"] == "資料請求,セミナー"
    assert form["customer[custom:plan]"] == "gold"
    assert "customer[memo]" not in form  # empty values are not sent
    remote = satori_sandbox.state.customer("taro@example.jp")
    assert remote.fields["last_name"] == "山田"
    assert remote.tags == {"資料請求", "セミナー"}
    state = SyncState.objects.get(email="taro@example.jp")
    assert state.status == SyncStatus.SYNCED
    assert state.hashcode == remote.hashcode
    assert state.in_satori and state.attempts == 1 and state.last_synced_at
    assert state.synced_version == state.version
    assert SyncLog.objects.filter(outcome=SyncLog.Outcome.OK).count() == 1


def test_email_is_normalised_before_it_is_stored():
    customer = make_customer(email="  ＴＡＲＯ@Example.JP ")
    assert customer.email == "taro@example.jp"


def test_hundred_saves_in_one_transaction_give_one_dispatch_and_one_call(
    satori_sandbox, monkeypatch
):
    dispatched = []
    real_dispatch = sync.dispatch_many
    monkeypatch.setattr(
        dispatch, "dispatch_many", lambda *a: dispatched.append(a) or real_dispatch(*a)
    )
    with transaction.atomic():
        customer = make_customer()
        for i in range(100):
            customer.memo = f"edit {i}"
            customer.save()
        assert sync.wait_for_dispatch()
        assert dispatched == []  # nothing leaves before commit
    assert sync.wait_for_dispatch()
    assert [ids for ids, _countdown in dispatched] == [[SyncState.objects.get().pk]]
    assert drain() == 1
    (request,) = customer_requests(satori_sandbox)
    assert request.form_dict()["customer[memo]"] == "edit 99"
    assert SyncState.objects.get().version == 101


def test_saves_within_the_coalescing_window_wait_and_ride_along(satori_sandbox):
    with satori(COALESCE_SECONDS=30):
        customer = make_customer()
        customer.memo = "second save"
        customer.save()
        state = SyncState.objects.get()
        outcome, again_in = sync.push(state.pk)
        assert outcome is sync.PushOutcome.NOT_DUE and 25 < again_in <= 30
        assert customer_requests(satori_sandbox) == []
        SyncState.objects.update(not_before=timezone.now())
        assert sync.push(state.pk)[0] is sync.PushOutcome.SYNCED
    (request,) = customer_requests(satori_sandbox)
    assert request.form_dict()["customer[memo]"] == "second save"


def test_unchanged_data_is_not_sent_again(satori_sandbox):
    customer = make_customer()
    drain()
    customer.save()  # same data
    drain()
    assert len(customer_requests(satori_sandbox)) == 1
    assert SyncState.objects.get().status == SyncStatus.SYNCED
    assert SyncLog.objects.filter(outcome=SyncLog.Outcome.SKIPPED).count() == 1


def test_delete_sends_delete_json_after_the_row_is_gone(satori_sandbox):
    customer = make_customer()
    drain()
    customer.delete()
    state = SyncState.objects.get()
    assert state.operation == Operation.DELETE and state.customer_id is None
    drain()
    (request,) = customer_requests(satori_sandbox, "delete")
    assert request.form_dict()["customer[hashcode]"] or request.form_dict()["customer[email]"]
    assert satori_sandbox.state.customer("taro@example.jp") is None
    state.refresh_from_db()
    assert state.status == SyncStatus.DELETED and not state.in_satori


def test_a_customer_deleted_before_it_was_sent_costs_no_call(satori_sandbox):
    with transaction.atomic():
        make_customer().delete()
    drain()
    assert satori_sandbox.state.requests == []
    assert SyncState.objects.get().status == SyncStatus.DELETED


def test_delete_after_update_wins_and_update_after_delete_recreates(satori_sandbox):
    customer = make_customer()
    drain()
    with transaction.atomic():
        customer.memo = "changed"
        customer.save()
        customer.delete()
    drain()
    assert satori_sandbox.state.customer("taro@example.jp") is None
    assert customer_requests(satori_sandbox) != [] and len(customer_requests(satori_sandbox)) == 1
    make_customer(memo="back again")
    drain()
    assert satori_sandbox.state.customer("taro@example.jp").fields["memo"] == "back again"
    assert SyncState.objects.get().status == SyncStatus.SYNCED


def test_deleting_an_already_deleted_customer_counts_as_done(satori_sandbox):
    customer = make_customer()
    drain()
    satori_sandbox.state.customers.clear()  # someone deleted it in SATORI's admin
    customer.delete()
    drain()
    assert SyncState.objects.get().status == SyncStatus.DELETED


def test_three_500s_then_success_is_synced_with_attempts_recorded(satori_sandbox):
    satori_sandbox.faults.fail_first(3, kind="500")
    with satori(RETRY_BACKOFF_SECONDS=0.01, RETRY_BACKOFF_MAX_SECONDS=0.02):
        make_customer()
        drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.SYNCED and state.attempts == 4
    assert satori_sandbox.state.customer("taro@example.jp") is not None
    outcomes = list(SyncLog.objects.order_by("id").values_list("outcome", flat=True))
    assert outcomes == ["retry", "retry", "retry", "ok"]


def test_retries_stop_after_max_attempts_with_the_error_visible(satori_sandbox):
    satori_sandbox.faults.fail_first(10, kind="503")
    with satori(RETRY_BACKOFF_SECONDS=0.01, RETRY_BACKOFF_MAX_SECONDS=0.02, MAX_ATTEMPTS=3):
        make_customer()
        drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED and state.attempts == 3
    assert "503" in state.last_error


def test_retry_after_is_honoured(satori_sandbox):
    satori_sandbox.faults.retry_after = 7
    satori_sandbox.faults.fail_first(1, kind="429")
    with satori(RETRY_BACKOFF_SECONDS=0.01):
        make_customer()
        state = SyncState.objects.get()
        outcome, again_in = sync.push(state.pk)
    assert outcome is sync.PushOutcome.RETRY and again_in >= 7
    state.refresh_from_db()
    assert state.status == SyncStatus.PENDING
    assert state.not_before >= timezone.now() + dt.timedelta(seconds=6)


def test_a_400_fails_at_once_with_satoris_message_and_no_retry(satori_sandbox):
    # SATORI's custom field is an integer; this project (wrongly) declared it as text.
    satori_sandbox.configure(custom_fields={"plan": "integer"})
    make_customer(custom_fields={"custom:plan": "gold"})
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED and state.attempts == 1
    assert "custom:plan" in state.last_error
    assert len(customer_requests(satori_sandbox)) == 1


def test_a_permission_error_fails_at_once(satori_sandbox):
    satori_sandbox.configure(deny_operations={"edit"})
    satori_sandbox.state.seed_customer("taro@example.jp", created_by="someone-else")
    make_customer()
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED and state.attempts == 1
    assert "403" in state.last_error


def test_local_validation_fails_without_a_call(satori_sandbox):
    make_customer(custom_fields={"custom:age": "twenty"})
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED
    assert "custom:age" in state.last_error
    assert satori_sandbox.state.requests == []


def test_a_change_during_the_call_leaves_the_row_pending_for_the_newer_version(satori_sandbox):
    customer = make_customer()

    def edit_while_sending(sender, customer, payload, **kwargs):
        if payload.get("memo") != "newer":
            other = Customer.objects.get(pk=customer.pk)
            other.memo = "newer"
            other.save()

    signals.before_push.connect(edit_while_sending)
    try:
        state = SyncState.objects.get()
        outcome, again_in = sync.push(state.pk)
        assert outcome is sync.PushOutcome.SYNCED and again_in is not None
        state.refresh_from_db()
        assert state.status == SyncStatus.PENDING  # the version sent is already stale
        drain()
    finally:
        signals.before_push.disconnect(edit_while_sending)
    assert satori_sandbox.state.customer(customer.email).fields["memo"] == "newer"
    assert SyncState.objects.get().status == SyncStatus.SYNCED


def test_a_claimed_row_is_not_sent_twice(satori_sandbox):
    make_customer()
    state = SyncState.objects.get()
    SyncState.objects.filter(pk=state.pk).update(
        status=SyncStatus.SENDING, lease_until=timezone.now() + dt.timedelta(minutes=1)
    )
    assert sync.push(state.pk)[0] is sync.PushOutcome.BUSY
    # The claim of a killed worker expires and the sweep hands the row back.
    SyncState.objects.filter(pk=state.pk).update(
        lease_until=timezone.now() - dt.timedelta(seconds=1)
    )
    assert sweep.sweep()["reclaimed"] == 1
    drain()
    assert len(customer_requests(satori_sandbox)) == 1


def test_removed_tags_become_delete_tags(satori_sandbox):
    customer = make_customer(tags=["a", "b"])
    drain()
    customer.tags = ["b", "c"]
    customer.save()
    drain()
    form = customer_requests(satori_sandbox)[-1].form_dict()
    assert form["customer[append_tags]"] == "b,c"
    assert form["customer[delete_tags]"] == "a"
    assert satori_sandbox.state.customer(customer.email).tags == {"b", "c"}


def test_an_email_change_is_followed_by_hashcode(satori_sandbox):
    customer = make_customer()
    drain()
    hashcode = SyncState.objects.get(email="taro@example.jp").hashcode
    customer.email = "taro.yamada@example.jp"
    customer.save()
    drain()
    form = customer_requests(satori_sandbox)[-1].form_dict()
    assert form["customer[identity_type]"] == "hashcode"
    assert form["customer[hashcode]"] == hashcode
    assert satori_sandbox.state.customer("taro@example.jp") is None
    assert satori_sandbox.state.customer("taro.yamada@example.jp").hashcode == hashcode
    new_state = SyncState.objects.get(email="taro.yamada@example.jp")
    assert new_state.status == SyncStatus.SYNCED and not new_state.previous_email


def test_an_email_change_queues_its_push_after_commit(satori_sandbox, monkeypatch):
    """Without this dispatch the new address waited for the sweep (a minute with beat,
    for ever without): drain() above pushes everything pending, so it cannot tell."""
    customer = make_customer()
    member = Member.objects.create(email="hanako@example.jp", family_name="佐藤")
    drain()
    assert sync.wait_for_dispatch()  # the creations' own dispatches are out
    dispatched: list[int] = []
    monkeypatch.setattr(
        dispatch, "dispatch_many", lambda ids, countdown=0: dispatched.extend(ids) or len(ids)
    )
    with transaction.atomic():
        customer.email = "taro.yamada@example.jp"
        customer.save()
        member.email = "hanako.sato@example.jp"
        member.save()
        assert sync.wait_for_dispatch()
        assert dispatched == []  # nothing leaves before commit
    assert sync.wait_for_dispatch()
    moved = SyncState.objects.filter(email__in=["taro.yamada@example.jp", "hanako.sato@example.jp"])
    assert sorted(dispatched) == sorted(moved.values_list("pk", flat=True))
    assert set(moved.values_list("status", flat=True)) == {SyncStatus.PENDING}


def test_registration_mode_does_not_overwrite(satori_sandbox):
    satori_sandbox.state.seed_customer("taro@example.jp", last_name="既存")
    with satori(PUSH_ENDPOINT="registration"):
        make_customer(memo="filled in")
        drain()
    assert customer_requests(satori_sandbox, "registration")
    remote = satori_sandbox.state.customer("taro@example.jp")
    assert remote.fields["last_name"] == "既存" and remote.fields["memo"] == "filled in"


def test_create_unknown_false_only_updates_known_customers(satori_sandbox):
    with satori(CREATE_UNKNOWN=False):
        make_customer()
        known = make_customer(email="known@example.jp")
        SyncState.objects.filter(email=known.email).update(in_satori=True)
        drain()
    assert SyncState.objects.get(email="taro@example.jp").status == SyncStatus.NOT_IN_SATORI
    assert SyncState.objects.get(email="known@example.jp").status == SyncStatus.SYNCED
    assert [r.form_dict()["customer[email]"] for r in customer_requests(satori_sandbox)] == [
        "known@example.jp"
    ]


def test_dry_run_records_what_would_be_sent_and_sends_nothing(satori_sandbox):
    with satori(DRY_RUN=True):
        make_customer()
        drain()
    assert satori_sandbox.state.requests == []
    assert SyncState.objects.get().status == SyncStatus.DRY_RUN
    entry = SyncLog.objects.get()
    assert entry.outcome == SyncLog.Outcome.DRY_RUN
    assert "last_name" in entry.request_summary["fields"]
    assert "山田" not in str(entry.request_summary)  # personal data redacted by default


def test_sync_disabled_records_nothing(satori_sandbox):
    with satori(SYNC_ENABLED=False):
        make_customer()
    assert not SyncState.objects.exists()


def test_before_push_may_change_or_veto_the_payload(satori_sandbox):
    def add_route(sender, payload, **kwargs):
        payload["memo"] = "added by a receiver"

    def veto(sender, customer, **kwargs):
        return False if customer.email.startswith("no") else None

    failures = []
    signals.before_push.connect(add_route)
    signals.before_push.connect(veto)
    signals.push_failed.connect(
        lambda sender, **kw: failures.append(kw["final"]), weak=False, dispatch_uid="t"
    )
    try:
        make_customer()
        make_customer(email="no@example.jp")
        drain()
    finally:
        signals.before_push.disconnect(add_route)
        signals.before_push.disconnect(veto)
        signals.push_failed.disconnect(dispatch_uid="t")
    assert satori_sandbox.state.customer("taro@example.jp").fields["memo"] == "added by a receiver"
    assert satori_sandbox.state.customer("no@example.jp") is None
    assert SyncState.objects.get(email="no@example.jp").status == SyncStatus.STOPPED
    assert failures == []


def test_push_failed_and_after_push_signals(satori_sandbox):
    seen = []
    signals.after_push.connect(
        lambda sender, **kw: seen.append(("ok", kw["endpoint"])), weak=False, dispatch_uid="a"
    )
    signals.push_failed.connect(
        lambda sender, **kw: seen.append(("failed", kw["final"])), weak=False, dispatch_uid="f"
    )
    satori_sandbox.faults.fail_first(1, kind="500")
    try:
        with satori(RETRY_BACKOFF_SECONDS=0.01, RETRY_BACKOFF_MAX_SECONDS=0.02):
            make_customer()
            drain()
    finally:
        signals.after_push.disconnect(dispatch_uid="a")
        signals.push_failed.disconnect(dispatch_uid="f")
    assert seen == [("failed", False), ("ok", "customer/upsert.json")]


def test_rate_limit_defers_without_counting_an_attempt(satori_sandbox):
    from django.core.cache import cache

    cache.clear()
    with satori(RATE_LIMIT_PER_MINUTE=2):
        for i in range(3):
            make_customer(email=f"user{i}@example.jp")
        results = [sync.push(s.pk) for s in SyncState.objects.order_by("id")]
    assert [r[0] for r in results] == [
        sync.PushOutcome.SYNCED,
        sync.PushOutcome.SYNCED,
        sync.PushOutcome.RETRY,
    ]
    assert results[2][1] > 0
    deferred = SyncState.objects.get(email="user2@example.jp")
    assert deferred.status == SyncStatus.PENDING and deferred.attempts == 0
    assert len(customer_requests(satori_sandbox)) == 2


def test_action_is_recorded_in_the_transaction_and_sent(satori_sandbox):
    customer = make_customer()
    drain()
    with transaction.atomic():
        action = add_action(
            customer.email, "資料請求", content="製品カタログ", url="https://example.jp/catalog"
        )
    assert action.customer == customer
    outcome, _delay = sync.send_action(action.pk)
    assert outcome == "sent"
    (request,) = satori_sandbox.state.requests_for("action")
    form = request.form_dict()
    assert form["customer[email]"] == customer.email
    assert form["action[name]"] == "資料請求"
    assert form["action[url]"] == "https://example.jp/catalog"
    action.refresh_from_db()
    assert action.status == ActionStatus.SENT and action.sent_at


def test_an_action_waits_until_its_new_customer_reached_satori(satori_sandbox):
    with transaction.atomic():
        customer = make_customer()
        action = add_action(customer.email, "会員登録")
    outcome, delay = sync.send_action(action.pk)
    assert outcome == "waiting" and delay > 0
    drain()
    CustomerAction.objects.filter(pk=action.pk).update(not_before=None)
    assert sync.send_action(action.pk)[0] == "sent"
    assert len(satori_sandbox.state.customer(customer.email).actions) == 1


def test_an_action_with_a_bad_email_names_the_field():
    from django_satori.exceptions import SatoriValidationError

    with pytest.raises(SatoriValidationError) as info:
        add_action("not an address", "x")
    assert info.value.field == "email"


def test_a_connected_model_save_updates_its_customer_in_the_same_transaction(satori_sandbox):
    with transaction.atomic():
        member = Member.objects.create(
            email="Hanako@Example.jp",
            family_name="佐藤",
            given_name="花子",
            company="佐藤商事",
            plan="gold",
            tags="vip newsletter",
        )
        assert not Customer.objects.exists()  # the save records the change only
    assert sync.apply_source_changes() == 1  # the worker's part, after commit
    customer = Customer.objects.get()
    assert customer.email == "hanako@example.jp"
    assert (customer.source_model, customer.source_pk) == ("testapp.member", str(member.pk))
    assert customer.custom_fields == {"custom:plan": "gold"}
    assert customer.tags == ["newsletter", "vip"]
    drain()
    remote = satori_sandbox.state.customer("hanako@example.jp")
    assert remote.fields["lead_company_name"] == "佐藤商事"
    member.email = "hanako.sato@example.jp"
    member.save()
    sync.apply_source_changes()
    assert Customer.objects.get().email == "hanako.sato@example.jp"
    drain()
    assert satori_sandbox.state.customer("hanako.sato@example.jp") is not None
    member.delete()
    assert not Customer.objects.exists()
    drain()
    assert satori_sandbox.state.customers == {}


def test_a_connected_model_can_only_stop_syncing_on_delete(satori_sandbox, settings):
    mappings = dict(settings.SATORI["MAPPINGS"])
    mappings["testapp.Member"] = {**mappings["testapp.Member"], "on_delete": "stop"}
    with satori(MAPPINGS=mappings):
        member = Member.objects.create(email="keep@example.jp", family_name="残")
        drain()
        member.delete()
        drain()
    assert Customer.objects.filter(email="keep@example.jp").exists()
    assert SyncState.objects.get().status == SyncStatus.STOPPED
    assert satori_sandbox.state.customer("keep@example.jp") is not None


def test_mark_for_sync_catches_up_after_queryset_update(satori_sandbox):
    customers = [make_customer(email=f"u{i}@example.jp") for i in range(3)]
    drain()
    Customer.objects.update(memo="bulk edited")  # sends no signals
    assert SyncState.objects.filter(status=SyncStatus.PENDING).count() == 0
    assert mark_for_sync(Customer.objects.all()) == 3
    drain()
    for c in customers:
        assert satori_sandbox.state.customer(c.email).fields["memo"] == "bulk edited"


def test_mark_for_sync_marks_customers_with_and_without_an_outbox_row(satori_sandbox):
    synced = [make_customer(email=f"s{i}@example.jp") for i in range(2)]
    drain()
    Customer.objects.bulk_create(
        [
            Customer(email=f"b{i}@example.jp", last_name="一括", collection_route="web")
            for i in range(3)
        ]
    )
    before = dict(SyncState.objects.values_list("email", "version"))
    assert mark_for_sync(Customer.objects.all()) == 5
    rows = {s.email: s for s in SyncState.objects.all()}
    assert {(s.status, s.operation, s.attempts) for s in rows.values()} == {
        (SyncStatus.PENDING, Operation.UPSERT, 0)
    }
    assert [rows[c.email].version for c in synced] == [before[c.email] + 1 for c in synced]
    assert [rows[f"b{i}@example.jp"].version for i in range(3)] == [1, 1, 1]
    assert all(s.customer_id is not None and s.not_before is not None for s in rows.values())
    drain()
    assert len(satori_sandbox.state.customers) == 5
    assert {s.status for s in SyncState.objects.all()} == {SyncStatus.SYNCED}


def test_mark_for_sync_takes_over_the_outbox_row_of_a_deleted_customer(satori_sandbox):
    old = make_customer(email="again@example.jp")
    drain()
    old.delete()
    drain()
    assert SyncState.objects.get().customer_id is None  # kept: the address's history
    (new,) = Customer.objects.bulk_create(
        [Customer(email="again@example.jp", last_name="再登録", collection_route="web")]
    )
    assert mark_for_sync(Customer.objects.all()) == 1
    state = SyncState.objects.get()
    assert (state.customer_id, state.status, state.operation) == (
        new.pk,
        SyncStatus.PENDING,
        Operation.UPSERT,
    )
    drain()
    assert satori_sandbox.state.customer("again@example.jp").fields["last_name"] == "再登録"


def test_mark_for_sync_on_a_connected_model_after_bulk_create(satori_sandbox):
    Member.objects.bulk_create(
        [Member(email=f"m{i}@example.jp", family_name="一括") for i in range(4)]
    )
    assert not Customer.objects.exists()
    assert mark_for_sync(Member.objects.all()) == 4
    drain()
    assert len(satori_sandbox.state.customers) == 4


def test_sweep_redispatches_pending_rows_whose_task_was_lost(satori_sandbox):
    make_customer()
    long_ago = timezone.now() - dt.timedelta(minutes=10)
    SyncState.objects.update(updated_at=long_ago, not_before=long_ago, dispatched_at=None)
    counts = sweep.sweep()
    assert counts["dispatched"] == 1
    assert SyncState.objects.get().dispatched_at is not None
    # Dispatched just now: the next sweep leaves it alone.
    assert sweep.sweep()["dispatched"] == 0


def test_model_validation_names_the_field():
    from django.core.exceptions import ValidationError

    customer = Customer(
        email="ｈａｎａｋｏ@example.jp", custom_fields={"custom:age": "x"}, tags="not a list"
    )
    with pytest.raises(ValidationError) as info:
        customer.full_clean()
    assert set(info.value.message_dict) == {"custom_fields", "tags"}
    assert "custom:age" in info.value.message_dict["custom_fields"][0]
    assert customer.email == "hanako@example.jp"  # full-width is normalised, not refused
    with pytest.raises(ValidationError) as info:
        Customer(email="山田@example.jp").full_clean()
    assert "email" in info.value.message_dict


def test_eager_mode_sends_at_once_without_recursing(satori_sandbox):
    from tests.celery_app import app

    app.conf.task_always_eager = True
    try:
        with satori(COALESCE_SECONDS=2), transaction.atomic():
            customer = make_customer()
            add_action(customer.email, "資料請求")
    finally:
        app.conf.task_always_eager = False
    assert SyncState.objects.get().status == SyncStatus.SYNCED
    assert CustomerAction.objects.get().status == ActionStatus.SENT
    assert len(satori_sandbox.state.customer(customer.email).actions) == 1


def test_beat_schedule_is_importable_without_django():
    import subprocess
    import sys

    code = "from django_satori.beat import BEAT_SCHEDULE; print(sorted(BEAT_SCHEDULE))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "django-satori-sweep" in out.stdout


def test_a_failed_publish_pauses_publishing_and_the_sweep_catches_up(satori_sandbox, monkeypatch):
    from tests.celery_app import app

    calls = []

    def broker_down(*args, **kwargs):
        calls.append(args)
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(app.amqp, "send_task_message", broker_down)
    for i in range(5):
        make_customer(email=f"p{i}@example.jp")
        assert sync.wait_for_dispatch()
    assert len(calls) == 1  # later saves skip publishing while the broker is paused
    monkeypatch.undo()
    dispatch.resume()
    with satori(SWEEP_AFTER_SECONDS=0):
        assert sweep.sweep()["dispatched"] == 5


def test_a_large_mark_for_sync_goes_to_one_bulk_job_at_the_next_sweep(satori_sandbox):
    from django_satori.models import BulkJob

    with satori(BULK_THRESHOLD=2):
        Customer.objects.bulk_create(
            [Customer(email=f"b{i}@example.jp", collection_route="web") for i in range(3)]
        )
        assert mark_for_sync(Customer.objects.all()) == 3
        counts = sweep.sweep()  # what the sweep queued by mark_for_sync does, at once
    assert counts["bulk"] and counts["dispatched"] == 0
    job = BulkJob.objects.get()
    assert job.automatic


def test_the_mirror_of_a_connected_object_is_found_through_the_index():
    from django.db import connection

    from django_satori.mapping import get_mappings

    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL picks its plan by statistics; SQLite's is fixed")
    mapping = get_mappings()[Member]
    plan = sources.mirrors(mapping, "5").explain()
    # Without the partial index's own condition in the query, SQLite scans the table.
    assert "USING INDEX django_satori_customer_unique_source" in plan, plan


def test_a_connected_save_that_changes_nothing_mapped_writes_nothing(satori_sandbox):
    member = Member.objects.create(
        email="taro@example.jp",
        family_name="山田",
        given_name="太郎",
        plan="gold",
        tags="vip newsletter",
    )
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.SYNCED
    member.save()  # e.g. a field SATORI does not get: nothing to send
    sync.apply_source_changes()
    assert SyncState.objects.get().version == state.version
    member.given_name = "次郎"
    member.save()
    sync.apply_source_changes()
    changed = SyncState.objects.get()
    assert (changed.version, changed.status) == (state.version + 1, SyncStatus.PENDING)
    drain()
    # A failed mirror is marked again by any save, so saving can restart it.
    SyncState.objects.update(status=SyncStatus.FAILED)
    member.save()
    sync.apply_source_changes()
    assert SyncState.objects.get().status == SyncStatus.PENDING
    # mark_for_sync() marks even when nothing changed.
    drain()
    assert mark_for_sync(Member.objects.all()) == 1
    assert SyncState.objects.get().status == SyncStatus.PENDING


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"memo": "a\x00b"}, "memo"),
        ({"tags": ["ok", "b\x00d"]}, "append_tags"),
        ({"custom_fields": {"custom:plan": "x\x00"}}, "custom:plan"),
    ],
)
def test_save_refuses_a_nul_character_and_names_the_field(fields, named):
    from django_satori.exceptions import SatoriValidationError

    with pytest.raises(SatoriValidationError) as caught:
        make_customer(**fields)
    assert caught.value.field == named and "NUL" in str(caught.value)
    # Refused on every database alike (PostgreSQL would fail without naming a field).
    assert not Customer.objects.exists() and not SyncState.objects.exists()


@pytest.mark.parametrize(
    ("tags", "reason"),
    [
        ("sales", "list of strings"),  # was sent as the tags s,a,l,e
        (["ok", 3], "list of strings"),
        (["two\nlines"], "line break"),
        (["a,b"], "separator"),
    ],
)
def test_tags_of_the_wrong_shape_are_refused_at_save_naming_the_field(tags, reason):
    with pytest.raises(SatoriValidationError) as refused:
        make_customer(tags=tags)
    assert refused.value.field == "tags" and reason in refused.value.message
    assert not Customer.objects.exists() and not SyncState.objects.exists()
    customer = make_customer(tags=["ok"])
    customer.tags = tags
    with pytest.raises(ValidationError) as invalid:
        customer.full_clean()
    assert "tags" in invalid.value.message_dict


def test_two_members_whose_addresses_differ_only_in_case_are_not_one_customer(satori_sandbox):
    """They used to share one mirror: each save overwrote the other's data in SATORI, and
    deleting the second deleted the first one's SATORI customer."""
    first = Member.objects.create(email="ok.user@example.jp", family_name="一郎")
    drain()
    with pytest.raises(SatoriValidationError) as refused, transaction.atomic():
        Member.objects.create(email="OK.User@Example.jp", family_name="二郎")
    assert refused.value.field == "email" and "upper and lower case" in refused.value.message
    assert Member.objects.count() == 1
    mirror = Customer.objects.get()
    assert (mirror.source_pk, mirror.last_name) == (str(first.pk), "一郎")
    # An address changed onto the other's: refused too, and nothing else moved.
    second = Member.objects.create(email="other@example.jp", family_name="二郎")
    second.email = "OK.USER@example.jp"
    with pytest.raises(SatoriValidationError), transaction.atomic():
        second.save()
    drain()
    assert satori_sandbox.state.customer("ok.user@example.jp").fields["last_name"] == "一郎"
    # A customer made directly (no connected object) is still taken over by a member.
    Customer.objects.create(email="plain@example.jp", last_name="三郎")
    third = Member.objects.create(email="Plain@Example.jp", family_name="三郎")
    sync.apply_source_changes()
    assert Customer.objects.get(email="plain@example.jp").source_pk == str(third.pk)


class _AnswerLost:
    """The real client, except that the next upsert's answer is lost after SATORI
    applied it (a read timeout, a proxy cutting the reply)."""

    lose_next = False

    def __init__(self) -> None:
        self.real = SatoriClient()

    def upsert_customer(self, *args, **kwargs):
        result = self.real.upsert_customer(*args, **kwargs)
        if _AnswerLost.lose_next:
            _AnswerLost.lose_next = False
            raise SatoriTransientError("Read timed out.")
        return result


@pytest.mark.parametrize(
    ("first", "second", "third"),
    [
        # A -> B -> A: the revert looked unchanged (it equals the last acknowledged push).
        (["y", "z"], ["z"], ["y", "z"]),
        # The removal was computed from the list before the lost push: y stayed in SATORI.
        (["x"], ["y", "z"], ["z"]),
    ],
)
def test_after_an_answer_lost_satori_ends_equal_to_django(
    satori_sandbox, monkeypatch, first, second, third
):
    monkeypatch.setattr(pushing, "get_client", _AnswerLost)
    with satori(RETRY_BACKOFF_SECONDS=0.01, RETRY_BACKOFF_MAX_SECONDS=0.02):
        customer = make_customer(tags=first, memo="A")
        drain()
        customer.tags, customer.memo = second, "B"
        customer.save()
        state = SyncState.objects.get()
        _AnswerLost.lose_next = True
        assert sync.push(state.pk, ignore_window=True)[0] is sync.PushOutcome.RETRY
        assert satori_sandbox.state.customer(customer.email).fields["memo"] == "B"  # applied
        customer.tags, customer.memo = third, "A"
        customer.save()
        drain()
    remote = satori_sandbox.state.customer(customer.email)
    assert (remote.fields["memo"], remote.tags) == ("A", set(third))
    assert SyncState.objects.get().status == SyncStatus.SYNCED


@pytest.mark.parametrize("then", ["saved while claimed", "reclaimed by the sweep", "taken over"])
def test_a_worker_killed_after_satori_applied_its_call_does_not_hide_a_revert(satori_sandbox, then):
    """The dead worker's answer never reached the row, whose fingerprint still described
    the push before: reverting to that state was skipped as unchanged."""
    customer = make_customer(memo="A")
    drain()
    customer.memo = "B"
    customer.save()
    state = SyncState.objects.get()
    with satori(LEASE_SECONDS=0.3, SWEEP_AFTER_SECONDS=0):
        # What the dead worker did: claimed the row, and SATORI applied its call.
        _token, claimed = outbox.claim([state.pk], get_settings(), ignore_window=True)
        assert list(claimed) == [state.pk]
        SatoriClient().upsert_customer({"email": customer.email, "memo": "B"})
        time.sleep(0.4)  # its claim expires
        if then == "saved while claimed":
            customer.memo = "A"
            customer.save()
            drain()
        elif then == "reclaimed by the sweep":
            assert sweep.sweep()["reclaimed"] == 1
            customer.memo = "A"
            customer.save()
            drain()
        else:  # a duplicate task takes the expired claim over; A was written by update()
            Customer.objects.filter(pk=customer.pk).update(memo="A")
            assert sync.push(state.pk, ignore_window=True)[0] is sync.PushOutcome.SYNCED
    assert satori_sandbox.state.customer(customer.email).fields["memo"] == "A"


# A lone surrogate is what ``json.loads('"\\ud800"')`` gives for a broken JSON body;
# no UTF-8 encoder takes it, so the database driver or requests used to fail on it
# with a bare UnicodeEncodeError naming no field.
SURROGATE_MESSAGE = "lone surrogate"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"last_name": "山\ud800田"}, "last_name"),
        ({"memo": "\udfff"}, "memo"),
        ({"tags": ["ok", "b\ud83d"]}, "append_tags"),
        ({"custom_fields": {"custom:plan": "x\ud800"}}, "custom:plan"),
    ],
)
def test_save_refuses_a_lone_surrogate_and_names_the_field(fields, named):
    from django_satori.exceptions import SatoriValidationError

    with pytest.raises(SatoriValidationError) as caught:
        make_customer(**fields)
    assert caught.value.field == named and SURROGATE_MESSAGE in str(caught.value)
    assert not Customer.objects.exists() and not SyncState.objects.exists()


def test_a_surrogate_in_a_custom_field_name_is_named_in_a_storable_form():
    from django_satori.exceptions import SatoriValidationError

    with pytest.raises(SatoriValidationError) as caught:
        make_customer(custom_fields={"custom:\ud800": "x"})
    # The error's own text is stored as last_error and logged: it must encode.
    assert caught.value.field == "custom:\\ud800"
    str(caught.value).encode("utf-8")


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"name": "資料\ud800請求"}, "name"), ({"content": "\udc00"}, "content")],
)
def test_an_action_with_a_lone_surrogate_names_the_field_and_stores_nothing(changes, named):
    from django_satori.exceptions import SatoriValidationError

    make_customer()
    with pytest.raises(SatoriValidationError) as caught:
        add_action("taro@example.jp", **{"name": "資料請求", **changes})
    assert caught.value.field == named and SURROGATE_MESSAGE in str(caught.value)
    assert not CustomerAction.objects.exists()


@pytest.mark.parametrize(
    ("stored", "named"),
    [
        ({"tags": ["ok", "b\ud83d"]}, "append_tags"),
        ({"custom_fields": {"custom:plan": "x\ud800"}}, "custom:plan"),
    ],
)
def test_a_stored_surrogate_fails_the_push_with_the_field_instead_of_crashing(
    satori_sandbox, stored, named
):
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's jsonb refuses a lone surrogate, so none can be stored")
    customer = make_customer()
    drain()
    # update() bypasses save(); SQLite's JSON keeps the surrogate as an \ud800 escape.
    Customer.objects.filter(pk=customer.pk).update(**stored)
    mark_for_sync(Customer.objects.all())
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED
    assert repr(named) in state.last_error and SURROGATE_MESSAGE in state.last_error
    assert len(customer_requests(satori_sandbox)) == 1  # only the first, clean push


def test_an_internationalised_address_is_refused_naming_email_on_every_path(satori_sandbox):
    from django_satori.exceptions import SatoriValidationError

    # From code: the customer's save and a connected object's save.
    for save in (
        lambda: make_customer(email="user@bücher.de"),
        lambda: Member.objects.create(email="ユーザー@例え.jp", family_name="山田"),
    ):
        with pytest.raises(SatoriValidationError) as caught, transaction.atomic():
            save()
        assert caught.value.field == "email"
    assert not Customer.objects.exists()
    # Stored without save() (update()): the worker fails the push naming the field.
    customer = make_customer()
    drain()
    Customer.objects.filter(pk=customer.pk).update(email="user@bücher.de")
    mark_for_sync(Customer.objects.all())
    drain()
    state = SyncState.objects.get()
    assert state.status == SyncStatus.FAILED and "'email'" in state.last_error
    assert "user@xn--bcher-kva.de" in state.last_error
    assert len(customer_requests(satori_sandbox)) == 1


class _Killed(BaseException):
    """The worker process dying (SIGKILL): no handler runs."""


def test_a_tag_added_by_a_push_whose_worker_died_is_removed_later(satori_sandbox, monkeypatch):
    """SATORI applied the push that added y, then its worker died before the answer was
    written: sent_tags did not know y, so removing y again later sent no delete_tags."""
    customer = make_customer(tags=["x"])
    drain()
    customer.tags = ["x", "y"]
    customer.save()
    state = SyncState.objects.get()

    class DiesAfterSatoriApplied:
        def upsert_customer(self, *args, **kwargs):
            SatoriClient().upsert_customer(*args, **kwargs)
            raise _Killed

    monkeypatch.setattr(pushing, "get_client", DiesAfterSatoriApplied)
    with satori(LEASE_SECONDS=0.3, SWEEP_AFTER_SECONDS=0):
        token, claimed = outbox.claim([state.pk], get_settings(), ignore_window=True)
        with pytest.raises(_Killed):
            pushing._send(claimed[state.pk], token, get_settings())
        assert satori_sandbox.state.customer(customer.email).tags == {"x", "y"}
        monkeypatch.undo()
        time.sleep(0.4)  # the dead worker's claim expires
        sweep.sweep()
        customer.tags = ["x"]
        customer.save()
        drain()
    assert satori_sandbox.state.customer(customer.email).tags == {"x"}


def test_a_connected_save_updates_only_the_mirror_columns_that_changed(satori_sandbox):
    """Building and sending the UPDATE of every column was a third of what a connected
    save added; what did not change is not written (and the mirror read back is exact)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    member = Member.objects.create(
        email="taro@example.jp", family_name="山田", given_name="太郎", tags="vip"
    )
    drain()
    member.given_name = "次郎"
    member.save()
    with CaptureQueriesContext(connection) as queries:
        assert sync.apply_source_changes() == 1
    table = Customer._meta.db_table
    updates = [q["sql"] for q in queries if q["sql"].startswith(f'UPDATE "{table}"')]
    assert len(updates) == 1, updates
    assert '"first_name"' in updates[0] and '"updated_at"' in updates[0]
    assert '"last_name"' not in updates[0] and '"tags"' not in updates[0]
    mirror = Customer.objects.get()
    assert (mirror.first_name, mirror.last_name, mirror.tags) == ("次郎", "山田", ["vip"])
    assert SyncState.objects.get().status == SyncStatus.PENDING
    # The mirror as the save read it (its own SELECT) equals what the ORM reads.
    found = sources._mirror(get_mappings_for_member(), str(member.pk))
    assert found is not None
    for field in Customer._meta.concrete_fields:
        assert getattr(found, field.attname) == getattr(mirror, field.attname), field.name
    assert found._loaded_email == mirror.email
    assert sources._mirror(get_mappings_for_member(), "no-such-member") is None


def get_mappings_for_member():
    from django_satori.mapping import get_mappings

    return get_mappings()[Member]


def test_a_push_is_validated_once(satori_sandbox, monkeypatch):
    """The engine checks the payload against SATORI's rules; the client took the
    checked payload and checked it again."""
    from django_satori import client as client_module
    from django_satori import schema

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return schema.clean_customer(*args, **kwargs)

    monkeypatch.setattr(client_module, "clean_customer", counting)
    monkeypatch.setattr(pushing, "clean_customer", counting)
    make_customer(tags=["x"])
    drain()
    assert len(calls) == 1
    assert satori_sandbox.state.customer("taro@example.jp").tags == {"x"}


def test_a_batch_records_the_tags_it_will_add_with_one_statement_before_its_first_call(
    satori_sandbox, monkeypatch
):
    """Each push wrote its new tags to its row before its call: one UPDATE each. The
    batch writes them all at once, still before any call (a worker dying after SATORI
    applied a call leaves the tags known, so a later removal is sent)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    emails = [f"tag{i}@example.jp" for i in range(3)]
    for email in emails:
        make_customer(email=email, tags=["a", "b"])
    ids = list(SyncState.objects.order_by("pk").values_list("pk", flat=True))
    seen_at_call: list[list[str]] = []
    real = pushing.get_client

    class Watching:
        def upsert_customer(self, wire, **kwargs):
            state = SyncState.objects.get(email=wire["email"])
            seen_at_call.append(list(state.sent_tags))
            return real().upsert_customer(wire, **kwargs)

    monkeypatch.setattr(pushing, "get_client", Watching)
    with CaptureQueriesContext(connection) as queries:
        results = pushing.push_batch(ids, ignore_window=True)
    assert {outcome for outcome, _delay in results.values()} == {pushing.PushOutcome.SYNCED}
    assert seen_at_call == [["a", "b"]] * 3
    # One statement records them for the whole batch (before: one per push).
    assert len([q for q in queries if 'SET "sent_tags" = ' in q["sql"]]) == 1
    assert all(satori_sandbox.state.customer(e).tags == {"a", "b"} for e in emails)
