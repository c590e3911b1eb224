"""Scenario 3 (PostgreSQL): 4 processes each make 250 updates to the same 10 customers
while a worker with 4 threads sends them; SATORI must end with the final state of all 10."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from django_satori.models import SyncLog, SyncState, SyncStatus
from tests.reliability.helpers import (
    RequestCounter,
    compare_with_sandbox,
    create_customers,
    describe_differences,
    record_figures,
    satori_settings,
    status_counts,
    wait_settled,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]

WRITERS = 4
UPDATES_EACH = 250
CUSTOMERS = 10


@pytest.mark.slow
def test_four_writers_250_updates_each_end_with_the_final_state_in_satori(
    satori_sandbox, celery_worker, postgres_only
):
    counter = RequestCounter(satori_sandbox).install()
    try:
        with satori_settings(
            RATE_LIMIT_PER_MINUTE=None,
            COALESCE_SECONDS=0,
            BULK_THRESHOLD=100_000,
            LEASE_SECONDS=10,
            RETRY_BACKOFF_SECONDS=0.05,
            RETRY_BACKOFF_MAX_SECONDS=0.5,
        ):
            # A little latency so sends overlap with commits, as over a real network.
            satori_sandbox.faults.delay = 0.01
            worker = celery_worker(concurrency=4)
            emails = create_customers(CUSTOMERS)
            started = time.monotonic()
            writers = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.concurrent_writer",
                        str(n),
                        str(UPDATES_EACH),
                        *emails,
                    ],
                    env=dict(worker.env),
                    cwd=os.getcwd(),
                )
                for n in range(WRITERS)
            ]
            codes = [w.wait(timeout=240) for w in writers]
            writing = time.monotonic() - started
            assert codes == [0] * WRITERS
            waited = wait_settled(emails, timeout=120, alive=worker.is_running)
    finally:
        counter.uninstall()
    result = compare_with_sandbox(satori_sandbox, emails)
    assert sorted(result["synced"]) == sorted(emails), describe_differences(
        satori_sandbox, result["stale"] + result["missing"] + result["unsettled"]
    )
    versions = dict(SyncState.objects.values_list("email", "version"))
    assert sum(versions.values()) == CUSTOMERS + WRITERS * UPDATES_EACH  # no save lost
    assert status_counts(emails) == {SyncStatus.SYNCED: CUSTOMERS}
    record_figures(
        "concurrent_writers",
        {
            "writers": WRITERS,
            "updates_each": UPDATES_EACH,
            "customers": CUSTOMERS,
            "saves": sum(versions.values()),
            "calls": counter.by_operation["upsert"],
            "unchanged_skips": SyncLog.objects.filter(outcome=SyncLog.Outcome.SKIPPED).count(),
            "sent": len(result["synced"]),
            "stale": len(result["stale"]),
            "lost": len(result["missing"]),
            "seconds_writing": round(writing, 1),
            "seconds_to_settle_after_writers": round(waited, 1),
        },
    )
