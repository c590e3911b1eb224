"""Recording and dispatch on the save path: the one-statement outbox mark, the
publisher thread that batches after-commit dispatches, and the ``push_many`` task.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext

from django_satori import sync, tasks
from django_satori.conf import get_settings
from django_satori.models import Customer, Operation, SyncLog, SyncState, SyncStatus
from django_satori.sync import dispatch, history, outbox, pushing
from tests.syncing import drain

pytestmark = pytest.mark.django_db(transaction=True)


def make_customer(email: str = "taro@example.jp", **fields) -> Customer:
    return Customer.objects.create(email=email, last_name="山田", collection_route="web", **fields)


def mark(email: str, customer_id: int | None, operation: str) -> tuple[int, bool]:
    with transaction.atomic():  # as in Customer.save(): the row stays locked until commit
        return outbox.mark_pending(email, customer_id, operation, get_settings())


def row(email: str) -> dict:
    return (
        SyncState.objects.filter(email=email)
        .values("version", "status", "operation", "customer_id", "attempts")
        .get()
    )


@pytest.mark.parametrize("one_statement", [True, False], ids=["update-returning", "orm"])
def test_both_ways_of_marking_pending_agree(satori_sandbox, monkeypatch, one_statement):
    if one_statement and not outbox.can_update_returning(connection):
        pytest.skip("this database cannot return rows from an UPDATE")
    monkeypatch.setattr(outbox, "can_update_returning", lambda _connection: one_statement)
    customer = make_customer()
    state = SyncState.objects.get()
    assert row(customer.email) == {
        "version": 1,
        "status": SyncStatus.PENDING,
        "operation": Operation.UPSERT,
        "customer_id": customer.pk,
        "attempts": 0,
    }
    # Already pending: the version moves, the window and the dispatch stay.
    assert mark(customer.email, customer.pk, Operation.UPSERT) == (state.pk, False)
    assert row(customer.email)["version"] == 2
    drain()
    SyncState.objects.filter(pk=state.pk).update(attempts=3)
    # Synced: pending again, with a fresh window, attempts reset and a new dispatch.
    assert mark(customer.email, customer.pk, Operation.UPSERT) == (state.pk, True)
    marked = SyncState.objects.get()
    assert (marked.version, marked.status, marked.attempts) == (3, SyncStatus.PENDING, 0)
    assert marked.not_before is not None and marked.dispatched_at is not None
    # An upsert without a customer id keeps the link; a delete clears it.
    mark(customer.email, None, Operation.UPSERT)
    assert row(customer.email)["customer_id"] == customer.pk
    mark(customer.email, None, Operation.DELETE)
    assert row(customer.email) == {
        "version": 5,
        "status": SyncStatus.PENDING,
        "operation": Operation.DELETE,
        "customer_id": None,
        "attempts": 0,
    }


def test_saves_that_commit_meanwhile_share_one_message(satori_sandbox, monkeypatch):
    sent: list[list[int]] = []
    first_sent, release = threading.Event(), threading.Event()

    def slow_dispatch_many(state_ids, countdown=0):
        sent.append(list(state_ids))
        first_sent.set()
        release.wait(10)  # the broker is slow: ids of later saves gather meanwhile
        return len(state_ids)

    monkeypatch.setattr(dispatch, "dispatch_many", slow_dispatch_many)
    make_customer("first@example.jp")
    assert first_sent.wait(10)
    for i in range(20):
        make_customer(f"c{i}@example.jp")
    release.set()
    assert sync.wait_for_dispatch()
    ids = dict(SyncState.objects.values_list("email", "pk"))
    assert sent == [[ids["first@example.jp"]], [ids[f"c{i}@example.jp"] for i in range(20)]]


def test_ids_still_queued_at_exit_reach_the_broker(redis_server, tmp_path: Path):
    # Without the exit hook the daemon thread dies in its 50 ms linger and the message is lost.
    script = (
        "import django; django.setup()\n"
        "from django_satori.sync import dispatch\n"
        "dispatch._publisher.put(dispatch.PUSH, 4242, 0)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CELERY_BROKER_URL": redis_server.url,
    }
    subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        messages = [json.loads(raw) for raw in client.lrange("celery", 0, -1)]
    finally:
        client.close()
    assert [m["headers"]["task"] for m in messages] == ["django_satori.tasks.push_many"]
    assert messages[0]["headers"]["argsrepr"] == "([4242],)"


def test_a_forked_child_starts_its_own_publisher(monkeypatch):
    held = threading.Event()
    monkeypatch.setattr(dispatch, "dispatch_many", lambda ids, countdown=0: held.wait(10))
    dispatch._publisher.put(dispatch.PUSH, 1, 0)  # the parent's thread is busy and owes one id
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a fresh queue, no thread, nothing owed
        os.close(reader)
        fresh = dispatch._publisher._thread is None and dispatch._publisher.wait(0)
        os.write(writer, b"1" if fresh else b"0")
        os._exit(0)
    os.close(writer)
    assert os.read(reader, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(reader)
    held.set()
    assert sync.wait_for_dispatch()


def three_customers_the_second_failing(monkeypatch, error: Exception) -> list[int]:
    """Outbox ids of three pending customers; sending the second raises ``error``."""
    ids = [SyncState.objects.get(customer=make_customer(f"m{i}@example.jp")).pk for i in range(3)]
    real_send = pushing._send_upsert

    def send(state, token, conf):
        if state.pk == ids[1]:
            raise error
        return real_send(state, token, conf)

    monkeypatch.setattr(pushing, "_send_upsert", send)
    return ids


def test_push_many_goes_on_after_one_row_fails(satori_sandbox, monkeypatch, caplog):
    ids = three_customers_the_second_failing(monkeypatch, RuntimeError("a bug in a receiver"))
    outcomes = tasks.push_many.apply(args=(ids,)).get()
    assert outcomes == {"synced": 2, "error": 1}
    states = {s.pk: s for s in SyncState.objects.all()}
    assert [states[i].status for i in ids] == [
        SyncStatus.SYNCED,
        SyncStatus.PENDING,
        SyncStatus.SYNCED,
    ]
    assert states[ids[1]].lease_token == ""  # given back at once, not when the claim expires
    assert "a bug in a receiver" in caplog.text


def test_a_batch_claims_loads_writes_back_and_logs_its_rows_together(satori_sandbox):
    customers = [make_customer(f"q{i}@example.jp") for i in range(pushing.WRITE_BACK_BATCH + 5)]
    ids = [SyncState.objects.get(customer=c).pk for c in customers]
    with CaptureQueriesContext(connection) as queries:
        results = sync.push_batch(ids)
    statements = [q["sql"] for q in queries.captured_queries]
    # Django logs an executemany() as "<n> times: <sql>" (and PostgreSQL's COPY not at all).
    many = [sql.split(" times: ", 1) for sql in statements if " times: " in sql]
    write_backs = [int(n) for n, sql in many if sql.startswith("UPDATE")]
    log_writes = [int(n) for n, sql in many if sql.startswith("INSERT")]
    kinds = Counter(sql.split(None, 1)[0] for sql in statements if " times: " not in sql)
    # The claim (UPDATE), the load (SELECT), per WRITE_BACK_BATCH answers one executemany
    # and one SELECT for rows left pending, and the 25 log entries in one go.
    assert write_backs == [pushing.WRITE_BACK_BATCH, 5]
    assert (kinds["UPDATE"], kinds["SELECT"]) == (1, 1 + 2)
    assert kinds["INSERT"] == 0 and log_writes in ([], [25])
    assert {outcome for outcome, _again in results.values()} == {sync.PushOutcome.SYNCED}
    states = SyncState.objects.filter(pk__in=ids)
    assert {
        (s.status, s.lease_token, s.attempts, s.in_satori, s.synced_version == s.version)
        for s in states
    } == {(SyncStatus.SYNCED, "", 1, True, True)}
    assert all(s.hashcode and s.fingerprint and s.last_synced_at for s in states)
    logs = list(SyncLog.objects.order_by("pk").values_list("email", "created_at"))
    assert [email for email, _created in logs] == [c.email for c in customers]
    times = [created for _email, created in logs]
    assert times == sorted(times) and len(set(times)) > 1  # each entry keeps its own time


def test_a_database_error_gives_back_the_rows_not_yet_sent(satori_sandbox, monkeypatch):
    from django.db import OperationalError

    ids = three_customers_the_second_failing(
        monkeypatch, OperationalError("server closed the connection unexpectedly")
    )
    with pytest.raises(OperationalError):
        sync.push_batch(ids)
    states = {s.pk: s for s in SyncState.objects.all()}
    # The first was sent, but its answer was still waiting to be written back: it
    # goes back to pending too, and is sent again (an upsert repeats harmlessly).
    assert [(states[i].status, states[i].lease_token) for i in ids] == [
        (SyncStatus.PENDING, "")
    ] * 3
    assert SyncLog.objects.filter(email="m0@example.jp").exists()  # its log was kept
    monkeypatch.undo()  # the database is back
    drain()
    assert {s.status for s in SyncState.objects.all()} == {SyncStatus.SYNCED}


@pytest.mark.postgres
def test_answers_are_written_back_over_a_new_connection_when_the_old_one_drops(
    satori_sandbox, monkeypatch
):
    ids = [SyncState.objects.get(customer=make_customer(f"d{i}@example.jp")).pk for i in range(3)]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    real_send = pushing._send_upsert

    def send(state, token, conf):
        answered = real_send(state, token, conf)
        if state.pk == ids[-1]:  # SATORI has all three; now the server drops us
            other = connection.get_new_connection(connection.get_connection_params())
            try:
                other.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
            finally:
                other.close()
        return answered

    monkeypatch.setattr(pushing, "_send_upsert", send)
    results = sync.push_batch(ids)
    assert {outcome for outcome, _again in results.values()} == {sync.PushOutcome.SYNCED}
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != pid
    assert {s.status for s in SyncState.objects.all()} == {SyncStatus.SYNCED}
    # Nothing given back to be sent again.
    assert len(satori_sandbox.state.requests_for("upsert")) == 3


def test_only_the_row_changed_during_its_call_stays_pending(satori_sandbox):
    from django_satori import signals

    customers = [make_customer(f"v{i}@example.jp") for i in range(3)]
    ids = [SyncState.objects.get(customer=c).pk for c in customers]

    def edit_while_sending(sender, customer, payload, **kwargs):
        if customer.pk == customers[1].pk and payload.get("memo") != "newer":
            other = Customer.objects.get(pk=customer.pk)
            other.memo = "newer"
            other.save()

    signals.before_push.connect(edit_while_sending, dispatch_uid="edit")
    try:
        results = sync.push_batch(ids)
    finally:
        signals.before_push.disconnect(dispatch_uid="edit")
    assert [results[i][1] is not None for i in ids] == [False, True, False]
    states = {s.pk: s for s in SyncState.objects.all()}
    assert [states[i].status for i in ids] == [
        SyncStatus.SYNCED,
        SyncStatus.PENDING,
        SyncStatus.SYNCED,
    ]
    # What was sent is recorded all the same: the next push sends only the change.
    assert states[ids[1]].in_satori and states[ids[1]].synced_version < states[ids[1]].version


def answers_written_before_each_call(monkeypatch) -> tuple[list[int], list[bool]]:
    """Four pending rows; for each call, whether every earlier answer was written back."""
    ids = [SyncState.objects.get(customer=make_customer(f"w{i}@example.jp")).pk for i in range(4)]
    written: list[bool] = []
    real_send = pushing._send_upsert

    def send(state, token, conf):
        earlier = ids[: ids.index(state.pk)]
        written.append(
            not SyncState.objects.filter(pk__in=earlier).exclude(status=SyncStatus.SYNCED).exists()
        )
        return real_send(state, token, conf)

    monkeypatch.setattr(pushing, "_send_upsert", send)
    return ids, written


def test_answers_wait_for_the_write_back_at_most_write_back_seconds(satori_sandbox, monkeypatch):
    ids, written = answers_written_before_each_call(monkeypatch)
    sync.push_batch(ids)
    assert written == [True, False, False, False]  # held: written together at the end
    SyncState.objects.update(status=SyncStatus.PENDING, version=F("version") + 1)
    written.clear()
    monkeypatch.setattr(pushing, "WRITE_BACK_SECONDS", 0.0)  # as if every call were slow
    sync.push_batch(ids)
    assert written == [True] * 4


def test_a_failing_after_push_receiver_does_not_undo_a_push(satori_sandbox, caplog):
    from django_satori import signals

    state_id = SyncState.objects.get(customer=make_customer()).pk

    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    signals.after_push.connect(broken, dispatch_uid="broken")
    try:
        assert sync.push(state_id) == (sync.PushOutcome.SYNCED, None)
    finally:
        signals.after_push.disconnect(dispatch_uid="broken")
    assert SyncState.objects.get().status == SyncStatus.SYNCED
    assert "receiver bug" in caplog.text


@pytest.mark.parametrize(
    ("options", "threaded"),
    [
        ({}, False),
        ({"enable-threads": True}, True),
        ({"enable-threads": b"true"}, True),
        ({"enable-threads": b"false"}, False),
        ({"threads": b"4"}, True),
        ({"threads": b"1"}, False),
    ],
)
def test_under_uwsgi_without_threads_a_save_publishes_inline(monkeypatch, options, threaded):
    import types

    monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(opt=options))
    dispatch.threads_run.cache_clear()
    published: list[list[int]] = []
    monkeypatch.setattr(dispatch, "dispatch_many", lambda ids, countdown=0: published.append(ids))
    try:
        assert dispatch.threads_run() is threaded
        dispatch._publisher.put(dispatch.PUSH, 7, 0)
        if not threaded:
            assert published == [[7]]  # already sent when put() returns
        assert sync.wait_for_dispatch()
        assert published == [[7]]
    finally:
        dispatch.threads_run.cache_clear()


def test_a_long_batch_renews_its_claim_on_the_rows_still_to_come(satori_sandbox, monkeypatch):
    from django.conf import settings
    from django.test import override_settings
    from django.utils import timezone

    ids = [SyncState.objects.get(customer=make_customer(f"l{i}@example.jp")).pk for i in range(4)]
    satori_sandbox.faults.delay = 0.4  # each call outlasts half of the 1 s claim
    claim_left: list[bool] = []
    real_send = pushing._send_upsert

    def send(state, token, conf):
        lease_until = SyncState.objects.values_list("lease_until", flat=True).get(pk=state.pk)
        claim_left.append(lease_until > timezone.now())
        return real_send(state, token, conf)

    monkeypatch.setattr(pushing, "_send_upsert", send)
    try:
        with override_settings(SATORI={**settings.SATORI, "LEASE_SECONDS": 1.0}):
            results = sync.push_batch(ids)
    finally:
        satori_sandbox.faults.delay = 0
    # Without renewal the last rows' claim (taken at the start) would have run out
    # before their turn, and the sweep could hand them to another worker meanwhile.
    assert claim_left == [True] * 4
    assert {outcome for outcome, _again in results.values()} == {sync.PushOutcome.SYNCED}


def test_log_entries_written_together_keep_every_column():
    # _write_logs names the columns it writes: a new SyncLog field must be added there.
    assert set(history.LOG_FIELDS) == {f.name for f in SyncLog._meta.concrete_fields} - {"id"}
    entry = SyncLog(
        email="k@example.jp",
        endpoint="customer/upsert.json",
        outcome="ok",
        satori_status=200,
        attempt=2,
        duration_ms=7,
        request_summary={"fields": {"customer[memo]": "<redacted 3 chars>"}},
        response_summary={"status": 200},
        message="メッセージ",
    )
    history.write([entry])
    stored = SyncLog.objects.values(*history.LOG_FIELDS).get()
    assert stored == {name: getattr(entry, name) for name in history.LOG_FIELDS}
