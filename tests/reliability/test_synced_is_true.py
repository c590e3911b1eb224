"""Scenario 6: "synced" is true after everything goes wrong at once.

A fault run as a new user met it: SATORI failing 30% of the calls (errors,
dropped connections, replies slower than the client's timeout, and answers
lost after SATORI applied the call), the worker killed, the broker stopped and
restarted empty, a backlog large enough for the bulk API, and meanwhile the
customers changed: tags removed, and changes reverted (A -> B -> A). At the end
every customer must be synced and SATORI must hold exactly what Django holds,
field by field, tags included: 0 lost, 0 stale, 0 stuck.
"""

from __future__ import annotations

import time

import pytest

from django_satori.models import BulkPart, SyncState, SyncStatus
from django_satori.sync import dispatch
from tests.reliability.helpers import (
    compare_with_sandbox,
    create_customers,
    describe_differences,
    log_outcomes,
    record_figures,
    satori_settings,
    status_counts,
    update_customers,
    wait_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CUSTOMERS = 300
FAULT_RATE = 0.3
#: "timeout": answered after the client gave up, not applied; "lost_answer": applied,
#: then no reply (the case that made "synced" untrue).
FAULT_KINDS = ("500", "503", "drop", "timeout", "lost_answer")
SETTINGS = {
    "TIMEOUT": 1.0,
    "TOTAL_TIMEOUT": 2.0,
    "MAX_ATTEMPTS": 50,
    "RETRY_BACKOFF_SECONDS": 0.05,
    "RETRY_BACKOFF_MAX_SECONDS": 0.5,
    "RATE_LIMIT_PER_MINUTE": None,
    "LEASE_SECONDS": 5,
    "COALESCE_SECONDS": 0,
    "SWEEP_AFTER_SECONDS": 2,
    # A backlog above this goes through bulk jobs, which cannot remove tags.
    "BULK_THRESHOLD": 40,
    "BULK_POLL_INTERVAL_SECONDS": 0.2,
    "BULK_POLL_MAX_INTERVAL_SECONDS": 1.0,
    "BULK_RESEND_WAIT_SECONDS": 0.5,
}


def synced_share(emails: list[str]) -> float:
    done = SyncState.objects.filter(email__in=emails, status=SyncStatus.SYNCED).count()
    return done / len(emails)


@pytest.mark.slow
def test_after_every_fault_at_once_satori_equals_django(
    satori_sandbox, celery_worker, redis_server, monkeypatch
):
    monkeypatch.setattr("django_satori.sandbox.state.MAX_RECORDED_REQUESTS", 10**6)
    faults = satori_sandbox.faults
    faults.set_random(
        FAULT_RATE, kinds=FAULT_KINDS, seed=20261207, operations=["upsert", "bulk_upsert"]
    )
    faults.timeout_seconds = 1.5  # past the client's TIMEOUT
    satori_sandbox.configure(bulk_processing_seconds=0.3)
    try:
        with satori_settings(**SETTINGS):
            worker = celery_worker(concurrency=2)
            started = time.monotonic()
            emails = create_customers(CUSTOMERS)
            worker.wait_until(lambda: synced_share(emails) >= 0.3, timeout=300, interval=0.2)
            # B: every text field changes and a tag is added, for a third of them.
            changed = emails[::3]
            update_customers(changed, revision=1)
            worker.kill()  # SIGKILL mid-run: claims held, answers not written back
            worker.start()
            worker.wait_until(lambda: synced_share(emails) >= 0.6, timeout=300, interval=0.2)
            redis_server.stop()
            # Back to A while the broker is down: the rev1 tag must be removed from
            # SATORI, and A equals what SATORI may have acknowledged before.
            reverted = changed[::2]
            update_customers(reverted, revision=0)
            # And a tag removed for others: revision 2 has tags [tag, rev2] ...
            update_customers(emails[1::7], revision=2)
            time.sleep(3)
            redis_server.start()  # empty: every queued task is gone
            dispatch.resume()
            update_customers(emails[1::7], revision=3)  # ... then [tag, rev3]: rev2 goes
            # The worker may have exited while Redis was away (a supervisor restarts it).
            waited = wait_settled(emails, timeout=600, alive=worker.supervise, sweep_every=2)
            duration = time.monotonic() - started
    finally:
        injected = dict(satori_sandbox.state.faults_by_kind)
        faults.clear()

    result = compare_with_sandbox(satori_sandbox, emails)
    problems = result["missing"] + result["stale"] + result["unsettled"]
    assert not problems, describe_differences(satori_sandbox, problems)
    assert result["failed"] == [] and result["failed_without_reason"] == []
    assert len(result["synced"]) == CUSTOMERS, status_counts(emails)
    assert set(injected) >= {"lost_answer", "timeout"}, injected
    record_figures(
        "synced_is_true",
        {
            "customers": CUSTOMERS,
            "fault_rate": FAULT_RATE,
            "faults_injected": dict(sorted(injected.items())),
            "changed_then_reverted": len(reverted),
            "tags_removed": len(emails[1::7]),
            "bulk_parts": BulkPart.objects.count(),
            "worker_restarts": worker.restarts,
            "single_calls": len(satori_sandbox.state.requests_for("upsert")),
            "retried": log_outcomes().get("retry", 0),
            "lost": len(result["missing"]),
            "stale": len(result["stale"]),
            "stuck": len(result["unsettled"]),
            "synced": len(result["synced"]),
            "seconds_to_settle_after_broker": round(waited, 1),
            "seconds_total": round(duration, 1),
        },
    )
