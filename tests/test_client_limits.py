"""Every call to SATORI ends: an overall time limit and a cap on the reply's size.

requests' ``timeout`` bounds each socket operation, so a reply trickling one
byte every few seconds, or an endless one, used to hold a worker far beyond
its claim on the customer. These tests play such replies from the capture
server of tests/test_client.py (real HTTP) and assert that the call ends
within the configured limit with a typed, retryable error naming the setting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from django.core.checks import Error, Warning
from django.test import override_settings
from django.utils import timezone

from django_satori import sync
from django_satori.checks import check_settings
from django_satori.client import SatoriClient, get_client
from django_satori.conf import get_settings
from django_satori.exceptions import (
    SatoriConfigurationError,
    SatoriResponseTooLargeError,
    SatoriTimeoutError,
    SatoriTransientError,
    SatoriValidationError,
)
from django_satori.models import Customer, SyncState, SyncStatus
from tests.test_client import CaptureServer, Reply, json_reply, serving

OK_BODY = json.dumps({"status": 200, "message": {"customer[hashcode]": "hc-1"}}).encode()
#: Slack for thread scheduling on a loaded 2-core machine; the limits tested are 1-2 s.
SLACK = 1.5


@pytest.fixture(name="capture")
def capture_server() -> Iterator[CaptureServer]:
    """The recording server of tests/test_client.py, which plays scripted replies."""
    with serving() as server:
        yield server


def make_client(server: CaptureServer, **overrides: Any) -> SatoriClient:
    conf = dataclasses.replace(get_settings(), BASE_URL=server.url, **overrides)
    return SatoriClient(conf)


def timed(call: Any) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    return info.value, time.monotonic() - started


# --------------------------------------------------------------------------- time limit


@pytest.mark.parametrize("headers_too", [False, True], ids=["body", "headers and body"])
def test_a_dribbling_reply_ends_at_total_timeout(capture: CaptureServer, headers_too: bool) -> None:
    # 0.3 s per byte is well inside the 5 s read timeout, so only an overall limit ends it.
    capture.reply(Reply(body=OK_BODY, dribble=0.3, dribble_headers=headers_too))
    with make_client(capture, TIMEOUT=5.0, TOTAL_TIMEOUT=1.0) as client:
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert isinstance(error, SatoriTimeoutError), repr(error)
    assert isinstance(error, SatoriTransientError) and error.retryable
    assert "within 1 second (SATORI['TOTAL_TIMEOUT'])" in str(error)
    assert 0.9 < elapsed < 1.0 + SLACK


def test_a_silent_server_ends_at_total_timeout_not_at_the_longer_read_timeout(
    capture: CaptureServer,
) -> None:
    capture.reply(Reply(delay=8.0))
    with make_client(capture, TIMEOUT=10.0, TOTAL_TIMEOUT=1.0) as client:
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert isinstance(error, SatoriTimeoutError) and "TOTAL_TIMEOUT" in str(error)
    assert elapsed < 1.0 + SLACK


def test_the_client_works_again_after_a_call_was_cut(capture: CaptureServer) -> None:
    capture.reply(Reply(body=OK_BODY, dribble=0.3), Reply())
    with make_client(capture, TIMEOUT=5.0, TOTAL_TIMEOUT=1.0) as client:
        with pytest.raises(SatoriTimeoutError):
            client.upsert_customer({"email": "a@b.jp"})
        assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "hc-1"


def test_a_prompt_reply_is_not_affected_by_the_time_limit(capture: CaptureServer) -> None:
    capture.reply(*[Reply() for _ in range(5)])
    with make_client(capture, TOTAL_TIMEOUT=0.5) as client:
        for _ in range(5):
            assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "hc-1"
        # Past the last call's limit: the idle pooled connection must not have been cut.
        time.sleep(0.7)
        capture.reply(Reply())
        assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "hc-1"
    # All six over one kept-alive connection: no timer cut it after its call.
    assert len({request.client_port for request in capture.requests}) == 1
    assert len(capture.requests) == 6


def test_bulk_uploads_have_their_own_longer_limit(capture: CaptureServer) -> None:
    accepted = json.dumps({"status": 200, "body": {"process_code": "P1"}}).encode()
    capture.reply(Reply(body=accepted, dribble=0.3))
    with make_client(capture, TIMEOUT=5.0, TOTAL_TIMEOUT=0.5, BULK_UPLOAD_TIMEOUT=2.0) as client:
        error, elapsed = timed(lambda: client.bulk_upsert(b"email\na@b.jp\n"))
    assert isinstance(error, SatoriTimeoutError)
    assert "SATORI['BULK_UPLOAD_TIMEOUT']" in str(error) and "TOTAL_TIMEOUT" not in str(error)
    assert 1.9 < elapsed < 2.0 + SLACK


def test_the_status_query_uses_total_timeout(capture: CaptureServer) -> None:
    capture.reply(Reply(body=OK_BODY, dribble=0.3))
    with make_client(capture, TIMEOUT=5.0, TOTAL_TIMEOUT=1.0) as client:
        error, elapsed = timed(lambda: client.bulk_status("P1"))
    assert isinstance(error, SatoriTimeoutError) and "TOTAL_TIMEOUT" in str(error)
    assert elapsed < 1.0 + SLACK


def test_an_injected_session_is_bounded_once_the_headers_are_in(capture: CaptureServer) -> None:
    capture.reply(Reply(body=OK_BODY, dribble=0.3))
    session = requests.Session()
    conf = dataclasses.replace(get_settings(), BASE_URL=capture.url, TIMEOUT=5.0, TOTAL_TIMEOUT=1.0)
    with SatoriClient(conf, session=session) as client:
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
    session.close()
    assert isinstance(error, SatoriTimeoutError)
    assert elapsed < 1.0 + SLACK


# --------------------------------------------------------------------------- size cap


def test_a_reply_announced_larger_than_the_cap_is_not_read(capture: CaptureServer) -> None:
    big = json.dumps({"status": 200, "message": "x" * 300_000}).encode()
    capture.reply(Reply(body=big), Reply())
    with make_client(capture, MAX_RESPONSE_BYTES=100_000) as client:
        with pytest.raises(SatoriResponseTooLargeError) as info:
            client.upsert_customer({"email": "a@b.jp"})
        error = info.value
        assert isinstance(error, SatoriTransientError) and error.retryable
        assert "larger than 100000 bytes (SATORI['MAX_RESPONSE_BYTES'])" in str(error)
        # The next call gets a fresh connection and works.
        assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "hc-1"


def test_a_reply_without_length_is_cut_at_the_cap(capture: CaptureServer) -> None:
    # 64 MB without Content-Length: reading it whole is what the cap prevents.
    capture.reply(Reply(action="endless"))
    with make_client(capture, MAX_RESPONSE_BYTES=1_000_000, TOTAL_TIMEOUT=20.0) as client:
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert isinstance(error, SatoriResponseTooLargeError), repr(error)
    assert elapsed < 3.0


def test_a_reply_just_under_the_cap_is_read(capture: CaptureServer) -> None:
    body = json.dumps({"status": 200, "message": {"customer[hashcode]": "h" * 900}}).encode()
    capture.reply(Reply(body=body))
    with make_client(capture, MAX_RESPONSE_BYTES=len(body)) as client:
        assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "h" * 900


# --------------------------------------------------------------------------- adversarial text


def test_a_huge_hostile_error_message_is_handled_in_linear_time(
    capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The review's case: 300 KB of address-like characters in an error reply
    # cost 95 s in the redaction of log lines. Now 1 MB must pass quickly.
    hostile = "a" * 1_000_000 + " taro@example.jp"
    capture.reply(json_reply({"status": 400, "message": hostile}, status=400))
    caplog.set_level(logging.DEBUG, logger="django_satori")
    with make_client(capture, MAX_RESPONSE_BYTES=2_000_000) as client:
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert isinstance(error, SatoriValidationError)
    assert elapsed < 2.0
    logged = [r.getMessage() for r in caplog.records if r.name == "django_satori.client"]
    assert logged and "taro@example.jp" not in logged[-1]


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOTAL_TIMEOUT", 0),
        ("TOTAL_TIMEOUT", float("inf")),
        ("BULK_UPLOAD_TIMEOUT", -1),
        ("MAX_RESPONSE_BYTES", 0),
    ],
)
def test_unusable_limits_are_configuration_errors(name: str, value: Any) -> None:
    conf = dataclasses.replace(get_settings(), **{name: value})
    with SatoriClient(conf) as client, pytest.raises(SatoriConfigurationError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert f"SATORI['{name}']" in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOTAL_TIMEOUT", "30"),
        ("TOTAL_TIMEOUT", 0),
        ("BULK_UPLOAD_TIMEOUT", -5),
        ("BULK_UPLOAD_TIMEOUT", None),
        ("MAX_RESPONSE_BYTES", 1.5),
        ("MAX_RESPONSE_BYTES", 0),
        ("MAX_RESPONSE_BYTES", True),
    ],
)
def test_checks_refuse_bad_limits(settings: Any, name: str, value: Any) -> None:
    with override_settings(SATORI={**settings.SATORI, name: value}):
        errors = [m for m in check_settings() if isinstance(m, Error)]
    assert any(m.id == "django_satori.E004" and name in m.msg for m in errors), errors


def test_checks_warn_when_a_call_can_outlive_the_claim(settings: Any) -> None:
    def warnings(**values: Any) -> list[str]:
        with override_settings(SATORI={**settings.SATORI, **values}):
            return [m.id for m in check_settings() if isinstance(m, Warning)]

    assert "django_satori.W004" in warnings(TOTAL_TIMEOUT=61, LEASE_SECONDS=120)
    assert "django_satori.W004" not in warnings(TOTAL_TIMEOUT=60, LEASE_SECONDS=120)
    assert "django_satori.W004" not in warnings()  # the defaults


def test_the_defaults() -> None:
    conf = get_settings()
    assert (conf.TOTAL_TIMEOUT, conf.BULK_UPLOAD_TIMEOUT, conf.MAX_RESPONSE_BYTES) == (
        30.0,
        300.0,
        10 * 1024 * 1024,
    )


# --------------------------------------------------------------------------- through the sandbox


def test_the_sandbox_dribble_fault_ends_at_total_timeout(satori_sandbox: Any) -> None:
    satori_sandbox.faults.dribble_seconds = 0.4
    satori_sandbox.faults.fail_first(1, "dribble")
    with override_settings(SATORI={**settings_satori(), "TIMEOUT": 5.0, "TOTAL_TIMEOUT": 1.0}):
        client = get_client()
        error, elapsed = timed(lambda: client.upsert_customer({"email": "a@b.jp"}))
        assert isinstance(error, SatoriTimeoutError) and "SATORI['TOTAL_TIMEOUT']" in str(error)
        assert elapsed < 1.0 + SLACK
        # The next call, on a new connection, goes through.
        assert client.upsert_customer({"email": "a@b.jp"}).hashcode
    assert satori_sandbox.state.faults_by_kind == {"dribble": 1}


def test_the_sandbox_oversized_fault_is_cut_at_max_response_bytes(satori_sandbox: Any) -> None:
    satori_sandbox.faults.oversized_bytes = 5_000_000
    satori_sandbox.faults.fail_first(1, "oversized", operations=["bulk_status"])
    with override_settings(SATORI={**settings_satori(), "MAX_RESPONSE_BYTES": 1_000_000}):
        error, elapsed = timed(lambda: get_client().bulk_status("P-1"))
    assert isinstance(error, SatoriResponseTooLargeError)
    assert "SATORI['MAX_RESPONSE_BYTES']" in str(error)
    assert elapsed < 3.0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["dribble", "oversized"])
def test_a_push_cut_by_a_limit_keeps_its_claim_and_stays_pending(
    satori_sandbox: Any, kind: str
) -> None:
    # The review's case: a reply dribbling for longer than the lease let the
    # claim expire mid-call. Now the call ends first and the row is retried.
    satori_sandbox.faults.dribble_seconds = 0.5
    satori_sandbox.faults.oversized_bytes = 3_000_000
    satori_sandbox.faults.fail_first(1, kind)
    limits = {
        "TIMEOUT": 5.0,
        "TOTAL_TIMEOUT": 1.0,
        "LEASE_SECONDS": 6.0,
        "MAX_RESPONSE_BYTES": 1_000_000,
        "RETRY_BACKOFF_SECONDS": 0.01,
        "RETRY_BACKOFF_MAX_SECONDS": 0.02,
    }
    with override_settings(SATORI={**settings_satori(), **limits}):
        customer = Customer.objects.create(email="taro@example.jp", last_name="山田")
        state = SyncState.objects.get(customer=customer)
        started = time.monotonic()
        outcome, again_in = sync.push(state.pk, ignore_window=True)
        elapsed = time.monotonic() - started
        assert outcome is sync.PushOutcome.RETRY and again_in is not None
        assert elapsed < limits["LEASE_SECONDS"] / 2  # the claim never came near expiring
        state.refresh_from_db()
        # Given back by the worker that claimed it: pending, one attempt, nobody's lease.
        assert state.status == SyncStatus.PENDING and state.attempts == 1
        assert state.lease_until is None or state.lease_until <= timezone.now()
        setting = "TOTAL_TIMEOUT" if kind == "dribble" else "MAX_RESPONSE_BYTES"
        assert f"SATORI['{setting}']" in state.last_error
        assert satori_sandbox.state.customer("taro@example.jp") is None
        time.sleep(0.05)
        assert sync.push(state.pk)[0] is sync.PushOutcome.SYNCED
    assert satori_sandbox.state.customer("taro@example.jp") is not None


def settings_satori() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.SATORI)


def test_the_limit_errors_are_worded_in_japanese_too(capture: CaptureServer) -> None:
    from django.utils import translation

    capture.reply(Reply(body=b"x" * 5000), Reply(delay=3.0))
    with (
        make_client(capture, MAX_RESPONSE_BYTES=1000, TOTAL_TIMEOUT=0.5) as client,
        translation.override("ja"),
    ):
        too_large = provoke(lambda: client.upsert_customer({"email": "a@b.jp"}))
        too_slow = provoke(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert "1000 バイト（SATORI['MAX_RESPONSE_BYTES']）を超えた" in str(too_large)
    assert "0.5 秒（SATORI['TOTAL_TIMEOUT']）以内に届き切らなかった" in str(too_slow)


def provoke(call: Any) -> BaseException:
    with pytest.raises(SatoriTransientError) as info:
        call()
    return info.value


def test_https_pools_report_their_connections_too() -> None:
    # The header-phase tests above run over http; SATORI is https. The adapter
    # gives both kinds of pool the connection class that tells the deadline.
    from django_satori.client import _DeadlineAdapter, _WatchedConnection

    adapter = _DeadlineAdapter()
    for url in ("https://api.satr.jp/x", "http://127.0.0.1:8765/x"):
        request = requests.Request("POST", url).prepare()
        pool = adapter.get_connection_with_tls_context(request, verify=True)
        assert issubclass(pool.ConnectionCls, _WatchedConnection), url
    adapter.close()


def test_deadlines_share_one_watchdog_thread_and_a_shorter_one_is_not_held_up():
    """A thread per call (threading.Timer) cost a fifth of a push; one thread serves all,
    and a deadline earlier than the one it waits for still fires on time."""
    import socket
    import threading

    from django_satori import client as client_module

    for _ in range(200):
        with client_module._Deadline(30):
            pass
    watchdogs = [t for t in threading.enumerate() if t.name == "django-satori-deadlines"]
    assert len(watchdogs) == 1
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]

    left, right = socket.socketpair()
    spare = socket.socket()
    try:
        with client_module._Deadline(60) as long_one:  # the thread now waits a minute
            long_one.attach(None, spare)
            started = time.monotonic()
            with client_module._Deadline(0.3) as short:
                short.attach(None, left)
                left.settimeout(5)
                assert left.recv(1) == b""  # woken by the shutdown, not the 5 s timeout
            assert short.expired and time.monotonic() - started < 2
            assert not long_one.expired
    finally:
        for sock in (left, right, spare):
            sock.close()


def test_a_forked_child_starts_its_own_watchdog():
    import os

    from django_satori import client as client_module

    with client_module._Deadline(30):
        pass
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is not here; a new one must serve it
        try:
            with client_module._Deadline(0.2) as deadline:
                time.sleep(0.6)
            os._exit(0 if deadline.expired else 1)
        except BaseException:
            os._exit(2)
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
