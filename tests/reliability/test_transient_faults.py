"""Scenario 1: 1,000 customers through a real worker while 20% of SATORI calls fail.

The fault mix is every kind the sandbox knows: JSON 500 and 503, 429 with
Retry-After, a timeout (the sandbox holds the request longer than the client
waits), a dropped connection and a proxy's HTML 502 page. A fifth of the
customers are changed again while the sync runs, so a push with old data
would show up as a difference. Figures: test-artifacts/reliability-*.json.
"""

from __future__ import annotations

import time

import pytest

from django_satori.models import SyncLog, SyncState, SyncStatus
from django_satori.sandbox.faults import FAULT_KINDS
from tests.reliability.helpers import (
    RequestCounter,
    compare_with_sandbox,
    create_customers,
    describe_differences,
    log_calls_by_email,
    log_outcomes,
    record_figures,
    satori_settings,
    status_counts,
    update_customers,
    wait_settled,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

#: Every fault a retry gets through; an HTML 403 (a proxy refusing) is a configuration
#: problem, failed at once, not a transient one.
TRANSIENT_KINDS = tuple(kind for kind in FAULT_KINDS if kind != "html_403")
CUSTOMERS = 1000
CHANGED_DURING_SYNC = 200
FAULT_RATE = 0.2
#: The client gives up after CLIENT_TIMEOUT; a "timeout" fault answers only after HELD_FOR.
CLIENT_TIMEOUT = 1.0
HELD_FOR = 1.5
SETTINGS = {
    "TIMEOUT": CLIENT_TIMEOUT,
    "MAX_ATTEMPTS": 15,  # 0.2**15: no customer should run out of attempts
    "RETRY_BACKOFF_SECONDS": 0.05,
    "RETRY_BACKOFF_MAX_SECONDS": 0.5,
    "RATE_LIMIT_PER_MINUTE": None,
    "BULK_THRESHOLD": 100_000,  # single calls only: this scenario is about retries
    "LEASE_SECONDS": 30,
    "COALESCE_SECONDS": 0,
}


@pytest.mark.slow
def test_thousand_customers_survive_twenty_percent_random_faults(satori_sandbox, celery_worker):
    counter = RequestCounter(satori_sandbox).install()
    faults = satori_sandbox.faults
    faults.set_random(FAULT_RATE, kinds=TRANSIENT_KINDS, seed=20260701, operations=["upsert"])
    faults.timeout_seconds = HELD_FOR
    faults.retry_after = 1
    try:
        with satori_settings(**SETTINGS):
            worker = celery_worker(concurrency=4)
            started = time.monotonic()
            emails = create_customers(CUSTOMERS)
            created_in = time.monotonic() - started
            # Change some customers once a good part has been sent: some of them
            # are synced already, some in flight, some waiting for a retry.
            worker.wait_until(
                lambda: (
                    SyncState.objects.filter(email__in=emails, status=SyncStatus.SYNCED).count()
                    >= CUSTOMERS * 0.4
                ),
                timeout=300,
                interval=0.2,
            )
            changed = update_customers(emails[:: CUSTOMERS // CHANGED_DURING_SYNC], revision=1)
            waited = wait_settled(emails, timeout=400, alive=worker.is_running)
            duration = time.monotonic() - started
    finally:
        counter.uninstall()
        faults.clear()

    result = compare_with_sandbox(satori_sandbox, emails)
    problems = result["missing"] + result["stale"] + result["unsettled"]
    assert not problems, describe_differences(satori_sandbox, problems)
    assert result["failed"] == [] and result["failed_without_reason"] == []
    assert len(result["synced"]) == CUSTOMERS

    # Every call that reached SATORI is in the SyncLog, and only those.
    logged = log_calls_by_email()
    received = {email: counter.calls("upsert", email) for email in emails}
    mismatched = {
        e: (logged.get(e, 0), received[e]) for e in emails if logged.get(e, 0) != received[e]
    }
    assert not mismatched, f"SyncLog calls != calls received (log, sandbox): {mismatched}"
    # attempts counts calls since the last change; customers never changed again
    # must show exactly the calls made for them.
    unchanged = set(emails) - set(emails[:: CUSTOMERS // CHANGED_DURING_SYNC])
    attempts = dict(SyncState.objects.filter(email__in=unchanged).values_list("email", "attempts"))
    wrong = {e: (attempts[e], received[e]) for e in unchanged if attempts[e] != received[e]}
    assert not wrong, f"SyncState.attempts != calls made: {wrong}"
    # The fault mix really happened, every kind of it.
    injected = satori_sandbox.state.faults_by_kind
    assert set(injected) == set(TRANSIENT_KINDS), injected
    outcomes = log_outcomes()
    # Each injected fault cost one retry (a slow reply may add a genuine timeout).
    assert outcomes.get(SyncLog.Outcome.RETRY, 0) >= sum(injected.values())

    record_figures(
        "transient_faults",
        {
            "customers": CUSTOMERS,
            "changed_during_sync": changed,
            "fault_rate": FAULT_RATE,
            "faults_injected": dict(sorted(injected.items())),
            "calls": counter.by_operation["upsert"],
            "sent": len(result["synced"]),
            "retried": outcomes.get(SyncLog.Outcome.RETRY, 0),
            "customers_retried": sum(1 for e in emails if received[e] > 1),
            "max_calls_for_one_customer": max(received.values()),
            "failed": len(result["failed"]),
            "lost": len(result["missing"]),
            "stale": len(result["stale"]),
            "stuck": len(result["unsettled"]),
            "final_statuses": status_counts(emails),
            "worker": "1 worker, threads pool, concurrency 4",
            "client_timeout_s": CLIENT_TIMEOUT,
            "seconds_creating": round(created_in, 1),
            "seconds_to_settle_after_changes": round(waited, 1),
            "seconds_total": round(duration, 1),
        },
    )
