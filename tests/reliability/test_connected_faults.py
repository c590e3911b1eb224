"""Scenario 7: connected objects, whose customers the worker builds from recorded changes,
through the faults of scenario 6: SATORI failing 30% of the calls, the worker killed
while it applies changes, and saves made while the broker is down (their tasks never
reach it). At the end every object's customer holds the object's last state, and
SATORI holds exactly that: no change lost with its task, no older state written last.
"""

from __future__ import annotations

import time

import pytest

from django_satori import sweep
from django_satori.mapping import get_mappings
from django_satori.models import Customer, SourceChange
from django_satori.sync import dispatch
from tests.reliability.helpers import (
    compare_with_sandbox,
    describe_differences,
    record_figures,
    satori_settings,
    status_counts,
    wait_settled,
)
from tests.reliability.test_synced_is_true import FAULT_RATE, SETTINGS, synced_share
from tests.testapp.models import Member

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

MEMBERS = 60


def save_members(members: list[Member], revision: int) -> None:
    """Each save its own transaction, as a web request without ATOMIC_REQUESTS."""
    for member in members:
        member.given_name = f"太郎 r{revision}"
        member.company = f"株式会社{member.pk} r{revision}"
        member.tags = f"member rev{revision}" if revision else "member"
        member.save()


def wait_applied(timeout: float, alive) -> float:
    """Until no change waits for its customer, sweeping every 2 s as beat would."""
    started = last_sweep = time.monotonic()
    while SourceChange.objects.exists():
        if time.monotonic() - started > timeout:
            raise AssertionError(list(SourceChange.objects.values()))
        if not alive():
            raise AssertionError("the worker died")
        if time.monotonic() - last_sweep >= 2:
            sweep.sweep()
            last_sweep = time.monotonic()
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.mark.slow
def test_connected_objects_through_every_fault_end_equal_in_satori(
    satori_sandbox, celery_worker, redis_server
):
    faults = satori_sandbox.faults
    faults.set_random(
        FAULT_RATE, kinds=("500", "503", "drop", "lost_answer"), seed=7, operations=["upsert"]
    )
    try:
        with satori_settings(**SETTINGS):
            worker = celery_worker(concurrency=2)
            members = [
                Member.objects.create(email=f"member{i:03d}@example.jp", family_name=f"会員{i}")
                for i in range(MEMBERS)
            ]
            emails = [m.email for m in members]
            worker.wait_until(
                lambda: Customer.objects.count() == MEMBERS and synced_share(emails) >= 0.3,
                timeout=120,
                interval=0.2,
            )
            save_members(members[::3], revision=1)
            worker.kill()  # SIGKILL while it applies those changes
            worker.start()
            redis_server.stop()
            # Recorded, but their tasks cannot be queued: only the sweep finds them.
            save_members(members[1::3], revision=2)
            save_members(members[::6], revision=3)  # changed again: the last one must win
            time.sleep(1)
            redis_server.start()  # empty
            dispatch.resume()
            applied = wait_applied(120, alive=worker.supervise)
            settled = wait_settled(emails, timeout=300, alive=worker.supervise, sweep_every=2)
    finally:
        injected = dict(satori_sandbox.state.faults_by_kind)
        faults.clear()

    mapping = get_mappings()[Member]
    for member in Member.objects.all():
        mirror = Customer.objects.get(source_model=mapping.label, source_pk=str(member.pk))
        wanted = mapping.customer_values(member)
        assert {name: getattr(mirror, name) for name in wanted} == wanted, member.email
    result = compare_with_sandbox(satori_sandbox, emails)
    problems = result["missing"] + result["stale"] + result["unsettled"]
    assert not problems, describe_differences(satori_sandbox, problems)
    assert len(result["synced"]) == MEMBERS, status_counts(emails)
    record_figures(
        "connected_objects_through_faults",
        {
            "members": MEMBERS,
            "fault_rate": FAULT_RATE,
            "faults_injected": dict(sorted(injected.items())),
            "worker_restarts": worker.restarts,
            "seconds_to_apply_after_broker": round(applied, 1),
            "seconds_to_settle_after_that": round(settled, 1),
            "synced": len(result["synced"]),
        },
    )
