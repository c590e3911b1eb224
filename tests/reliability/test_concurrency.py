"""Scenario 3 (PostgreSQL): 4 processes each make 250 updates to the same 10 customers
while a worker with 4 threads sends them; SATORI must end with the final state of all 10.
The same for connected objects, whose mirrors the worker builds from recorded changes."""

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


@pytest.mark.slow
def test_four_writers_saving_connected_objects_end_with_their_final_state_in_satori(
    satori_sandbox, celery_worker, postgres_only
):
    """Each save records a change; two worker processes build the mirrors while the
    writers keep saving. No save may be lost, and no older state may win."""
    from django_satori import sync
    from django_satori.mapping import get_mappings
    from django_satori.models import Customer, SourceChange
    from tests.testapp.models import Member

    with satori_settings(
        RATE_LIMIT_PER_MINUTE=None,
        COALESCE_SECONDS=0,
        BULK_THRESHOLD=100_000,
        RETRY_BACKOFF_SECONDS=0.05,
        RETRY_BACKOFF_MAX_SECONDS=0.5,
    ):
        satori_sandbox.faults.delay = 0.01
        worker = celery_worker(pool="prefork", concurrency=2)
        emails = [f"member{i}@example.jp" for i in range(CUSTOMERS)]
        for email in emails:
            Member.objects.create(email=email, family_name="会員", given_name="初期")
        writers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.concurrent_writer",
                    "--members",
                    str(n),
                    "100",
                    *emails,
                ],
                env=dict(worker.env),
                cwd=os.getcwd(),
            )
            for n in range(WRITERS)
        ]
        assert [w.wait(timeout=240) for w in writers] == [0] * WRITERS
        deadline = time.monotonic() + 60
        while SourceChange.objects.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not SourceChange.objects.exists(), list(SourceChange.objects.values())
        wait_settled(emails, timeout=120, alive=worker.is_running)
    mapping = get_mappings()[Member]
    for member in Member.objects.all():
        mirror = Customer.objects.get(source_model=mapping.label, source_pk=str(member.pk))
        wanted = mapping.customer_values(member)
        got = {name: getattr(mirror, name) for name in wanted}
        assert got == wanted, member.email  # the last save, not an older one
    result = compare_with_sandbox(satori_sandbox, emails)
    assert sorted(result["synced"]) == sorted(emails), describe_differences(
        satori_sandbox, result["stale"] + result["missing"] + result["unsettled"]
    )
    assert sync.pending_counts().get("pending", 0) == 0
