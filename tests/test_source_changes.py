"""A connected model's save records a change; a worker builds the mirror from it.

What the save used to guarantee in the request (refusals naming the field, one
mirror per object, the last state wins, deletes follow, actions wait for their
customer) must still hold when the mirror is built later, by another process.
"""

from __future__ import annotations

import datetime as dt
import io
import threading
import time

import pytest
from django.db import close_old_connections, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from django_satori import add_action, sweep, sync
from django_satori.admin_dashboard import source_changes
from django_satori.exceptions import SatoriValidationError
from django_satori.models import (
    ActionStatus,
    Customer,
    CustomerAction,
    SourceChange,
    SyncState,
    SyncStatus,
)
from django_satori.schema import normalize_email
from django_satori.sync import dispatch, sources
from tests.syncing import drain
from tests.testapp.models import Member

pytestmark = pytest.mark.django_db


def member(email: str = "hanako@example.jp", **fields: str) -> Member:
    return Member.objects.create(
        email=email, **{"family_name": "佐藤", "given_name": "花子", **fields}
    )


def test_the_save_writes_one_change_record_and_nothing_else():
    hanako = member()
    sync.apply_source_changes()
    hanako.given_name = "葉子"
    with CaptureQueriesContext(connection) as queries:
        hanako.save()
    writes = [q["sql"] for q in queries if not q["sql"].startswith("SELECT")]
    change_table = SourceChange._meta.db_table
    if sources.outbox.can_update_returning(connection):
        # The member's UPDATE, and the change record with the address check in one INSERT.
        assert len(queries) == 2, [q["sql"] for q in queries]
        assert writes[1].startswith(f'INSERT INTO "{change_table}"')
    for table in (Customer._meta.db_table, SyncState._meta.db_table):
        assert not [sql for sql in writes if sql.split("(")[0].split('"')[1:2] == [table]]
    assert Customer.objects.get().first_name == "花子"  # the mirror waits for the worker
    recorded = SourceChange.objects.get()
    assert recorded.email == "hanako@example.jp"
    # The database's clock, read back as Django writes datetimes (UTC, aware).
    assert abs(recorded.created_at - timezone.now()) < dt.timedelta(seconds=5)
    assert sync.apply_source_changes() == 1
    assert Customer.objects.get().first_name == "葉子"
    assert SyncState.objects.get().status == SyncStatus.PENDING
    assert not SourceChange.objects.exists()


def test_the_mirror_takes_the_object_as_it_is_when_applied():
    hanako = member(plan="free")
    for plan in ("standard", "gold"):
        hanako.plan = plan
        hanako.save()
    assert SourceChange.objects.count() == 3
    assert sync.apply_source_changes() == 1  # one object, however many saves
    assert Customer.objects.get().custom_fields == {"custom:plan": "gold"}
    assert SyncState.objects.get().version == 1
    assert not SourceChange.objects.exists()


def test_only_the_changes_taken_are_deleted(monkeypatch):
    """A change recorded after the worker took the object's rows (a save committing
    meanwhile) is left for its own task: the worker may have read the object before it."""
    hanako = member()
    real = sources.sync_source

    def save_meanwhile(mapping, instance, **kwargs):
        real(mapping, instance, **kwargs)
        SourceChange.objects.create(source_model="testapp.member", source_pk=str(hanako.pk))

    monkeypatch.setattr(sources, "sync_source", save_meanwhile)
    sync.apply_source_changes()
    left = SourceChange.objects.get()
    assert left.error == "" and left.attempts == 0
    monkeypatch.setattr(sources, "sync_source", real)
    assert sync.apply_source_changes([left.pk]) == 1
    assert not SourceChange.objects.exists()


def test_an_object_deleted_before_its_change_is_applied_gets_no_customer(satori_sandbox):
    hanako = member()
    hanako.delete()
    assert sync.apply_source_changes() == 1
    assert not Customer.objects.exists() and not SourceChange.objects.exists()
    drain()
    assert satori_sandbox.state.customers == {}


def test_what_the_customer_would_refuse_is_still_refused_at_save_naming_the_field():
    cases = [({"email": "ユーザー@例え.jp"}, "email"), ({"tags": "a,b"}, "tags")]
    if connection.vendor == "sqlite":  # PostgreSQL refuses the member's own row first
        cases.append(({"company": "株式会社\x00"}, "lead_company_name"))
    for fields, named in cases:
        with pytest.raises(SatoriValidationError) as refused, transaction.atomic():
            Member.objects.create(**{"email": "ok@example.jp", **fields})
        assert refused.value.field == named, fields
    assert not Member.objects.exists() and not SourceChange.objects.exists()


def test_twins_saved_before_the_first_mirror_exists_are_refused_by_the_worker_and_shown(
    satori_sandbox, admin_client
):
    """The save's address check only sees mirrors already built: of two saves within the
    worker's latency the second is refused when applied, and an operator sees why."""
    first = member("ok.user@example.jp", family_name="一郎")
    second = member("OK.User@Example.jp", family_name="二郎")  # no mirror to clash with yet
    sync.apply_source_changes()
    refused = SourceChange.objects.get()
    assert refused.source_pk == str(second.pk)
    assert refused.error.startswith("email: ") and "upper and lower case" in refused.error
    assert Customer.objects.get().source_pk == str(first.pk)
    drain()
    assert satori_sandbox.state.customer("ok.user@example.jp").fields["last_name"] == "一郎"
    # Not retried by itself, and visible on the dashboard and in its admin list.
    assert sources.overdue_source_changes(timezone.now() + dt.timedelta(days=1), 10) == []
    shown = source_changes()
    assert shown is not None and (shown.waiting, shown.failed) == (0, 1)
    page = admin_client.get(shown.failed_url).content.decode()
    assert "upper and lower case" in page and str(second.pk) in page
    # Fixed by hand, then retried from the admin: the customer follows.
    Member.objects.filter(pk=second.pk).update(email="jiro@example.jp")
    response = admin_client.post(
        "/admin/django_satori/sourcechange/",
        {"action": "retry", "_selected_action": [str(refused.pk)], "index": "0"},
    )
    assert response.status_code == 302
    sync.apply_source_changes()
    assert Customer.objects.get(source_pk=str(second.pk)).email == "jiro@example.jp"
    assert not SourceChange.objects.exists()


def test_a_failing_mapping_is_kept_with_its_error(monkeypatch):
    hanako = member()
    mapping = sources.get_mappings()[Member]
    monkeypatch.setattr(
        type(mapping), "wants_sync", lambda self, instance: 1 / 0 if instance.plan else True
    )
    Member.objects.filter(pk=hanako.pk).update(plan="gold")  # the worker's read sees this
    sync.apply_source_changes()
    assert SourceChange.objects.get().error.startswith("ZeroDivisionError")
    assert not Customer.objects.exists()


def test_the_sweep_queues_changes_whose_task_was_lost(monkeypatch):
    member()
    queued: list[list[int]] = []
    monkeypatch.setattr(
        dispatch, "dispatch_source_changes", lambda ids: queued.append(list(ids)) or len(ids)
    )
    assert sweep.sweep()["source_changes"] == 0  # just saved: its own task is on its way
    SourceChange.objects.update(created_at=timezone.now() - dt.timedelta(minutes=10))
    assert sweep.sweep()["source_changes"] == 1
    assert queued[-1] == [SourceChange.objects.get().pk]
    assert sweep.sweep()["source_changes"] == 0  # queued again just now: not again at once
    SourceChange.objects.update(dispatched_at=timezone.now() - dt.timedelta(minutes=10))
    assert sweep.sweep()["source_changes"] == 1


def test_an_action_for_a_member_just_saved_waits_for_its_customer(satori_sandbox):
    """A sign-up saves the member and records an action: the action must not reach SATORI
    before the customer, which does not even exist until the worker builds the mirror."""
    member("signup@example.jp")
    action = add_action("signup@example.jp", "資料請求")
    outcome, again_in = sync.send_action(action.pk)
    assert outcome == "waiting" and again_in is not None
    drain()
    CustomerAction.objects.update(not_before=None)
    assert sync.send_action(action.pk)[0] == "sent"
    assert CustomerAction.objects.get().status == ActionStatus.SENT
    assert satori_sandbox.state.customer("signup@example.jp").actions


@pytest.mark.django_db(transaction=True)
def test_a_delete_waits_for_the_worker_building_the_mirror(postgres_only, monkeypatch):
    """The worker locks the object while it writes the mirror: a delete in between would
    otherwise leave a customer behind for an object that no longer exists."""
    hanako = member()
    building, release = threading.Event(), threading.Event()
    real = sources.sync_source

    def slow(mapping, instance, **kwargs):
        real(mapping, instance, **kwargs)
        building.set()
        release.wait(10)

    monkeypatch.setattr(sources, "sync_source", slow)

    def worker() -> None:
        try:
            sync.apply_source_changes()
        finally:
            close_old_connections()

    thread = threading.Thread(target=worker)
    thread.start()
    assert building.wait(10)
    deleted = threading.Event()

    def delete() -> None:
        try:
            Member.objects.get(pk=hanako.pk).delete()
            deleted.set()
        finally:
            close_old_connections()

    deleter = threading.Thread(target=delete)
    deleter.start()
    time.sleep(0.5)
    assert not deleted.is_set()  # waiting for the worker's lock
    release.set()
    thread.join(10)
    deleter.join(10)
    assert deleted.is_set()
    assert not Customer.objects.exists()  # the delete removed the mirror the worker built
    assert SyncState.objects.get().operation == "delete"


def test_satori_sync_now_builds_and_sends_connected_objects(satori_sandbox):
    """What docs/testing.md shows a project's own test doing, without a worker."""
    from django.core.management import call_command

    member("taro@example.jp", family_name="山田", plan="premium")
    call_command("satori_sync", "--now", stdout=io.StringIO(), stderr=io.StringIO())
    customer = satori_sandbox.state.customer("taro@example.jp")
    assert customer.fields["last_name"] == "山田"
    assert customer.custom["plan"] == "premium"


def test_a_worker_dying_while_building_leaves_the_change_for_the_next_attempt(monkeypatch):
    """Killed mid-way (here: an exception no handler takes), the worker's transaction
    rolls back: no half-built customer, and the change is still there to apply."""
    member()

    def killed(mapping, instance, **kwargs):
        Customer.objects.create(email="half@example.jp", source_model="testapp.member")
        raise SystemExit("killed")

    monkeypatch.setattr(sources, "sync_source", killed)
    with pytest.raises(SystemExit):
        sync.apply_source_changes()
    change = SourceChange.objects.get()
    assert (change.error, change.attempts) == ("", 0)
    assert not Customer.objects.exists()
    monkeypatch.undo()
    assert sync.apply_source_changes() == 1
    assert Customer.objects.get().email == "hanako@example.jp"


def test_an_address_of_the_longest_length_satori_takes_is_recorded():
    """255 characters pass the address check, and a project's own field may hold them
    (the test app's EmailField holds 254): the change row must take them too. PostgreSQL
    refused the INSERT, naming no field, when its column was shorter than Customer's."""
    longest = "a" * 64 + "@" + ".".join(["b" * 60] * 3) + "." + "c" * 7
    assert len(longest) == 255 and normalize_email(longest) == longest
    change_id = sources.record_source_change(
        sources.get_mappings()[Member], Member(pk=7, email=longest, family_name="長")
    )
    assert SourceChange.objects.get(pk=change_id).email == longest
