"""Sync throughput and coalescing, through a real worker and the sandbox process.

bench.run starts both (``celery worker`` and ``python -m django_satori.sandbox``)
before it starts these children; this process only marks customers pending,
saves, and watches the outbox until the worker has done its part.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import requests
from django.db.models import Count

from django_satori import sync
from django_satori.conf import AUTH_KEYS, get_settings
from django_satori.models import (
    BulkJob,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
    SyncStatus,
)
from django_satori.schema import clean_customer, customer_form_fields

from .measure import timed, wait_for

UPSERT_PATH = "/api/v4/public/customer/upsert.json"
#: The wire names of the four keys, in the order the client sends them.
AUTH_FIELDS = ("user_key", "user_secret", "company_key", "company_secret")


# -- the sandbox's control endpoints -------------------------------------------------


def sandbox_reset(url: str) -> None:
    requests.post(url + "/_sandbox/reset", timeout=30).raise_for_status()


def sandbox_state(url: str) -> dict[str, Any]:
    response = requests.get(url + "/_sandbox/state", timeout=300)
    response.raise_for_status()
    return dict(response.json())


def _calls(state: dict[str, Any]) -> dict[str, int]:
    """SATORI API requests the sandbox recorded, by operation (it keeps the last 5,000)."""
    counts: dict[str, int] = {}
    for request in state["requests"]:
        operation = request.get("operation") or "other"
        counts[operation] = counts.get(operation, 0) + 1
    return counts


# -- single pushes: the engine against a bare loop -----------------------------------


def _fresh_outbox() -> None:
    """No outbox rows and no history: every customer is new to SATORI again."""
    SyncLog.objects.all().delete()
    SyncState.objects.all().delete()


def run_engine(count: int, sandbox: str) -> dict[str, Any]:
    """Time from marking ``count`` customers pending until all are synced by the worker."""
    conf = get_settings()
    if conf.RATE_LIMIT_PER_MINUTE is not None or count > conf.BULK_THRESHOLD:
        raise RuntimeError("run with the rate limit off and BULK_THRESHOLD above the count")
    _fresh_outbox()
    sandbox_reset(sandbox)
    customers = Customer.objects.filter(
        pk__in=list(Customer.objects.order_by("pk").values_list("pk", flat=True)[:count])
    )

    synced = SyncState.objects.filter(status=SyncStatus.SYNCED)
    stuck = SyncState.objects.filter(status=SyncStatus.FAILED)

    def done() -> bool:
        if stuck.exists():
            raise RuntimeError(f"{stuck.count()} pushes failed: {stuck.first().last_error}")
        return synced.count() >= count

    with timed() as span:
        marked = sync.mark_for_sync(customers)
        finished = wait_for(done, timeout=1800, interval=0.1, what=f"{count} customers synced")
    seconds = span.seconds - (time.perf_counter() - finished)
    state = sandbox_state(sandbox)
    sent = SyncLog.objects.filter(outcome=SyncLog.Outcome.OK).count()
    if marked != count or len(state["customers"]) != count or sent != count:
        raise RuntimeError(
            f"marked {marked}, sandbox has {len(state['customers'])} customers, "
            f"{sent} calls logged; expected {count} each"
        )
    return {
        "seconds": seconds,
        "count": count,
        "per_second": count / seconds,
        "calls_logged": sent,
        "sandbox_customers": len(state["customers"]),
    }


def wire_bodies(count: int) -> list[bytes]:
    """The exact request bodies the client sends for the first ``count`` customers."""
    conf = get_settings()
    auth = [(name, getattr(conf, key)) for name, key in zip(AUTH_FIELDS, AUTH_KEYS, strict=True)]
    bodies = []
    for customer in Customer.objects.order_by("pk")[:count]:
        payload = sync.build_payload(customer, SyncState(email=customer.email), conf)
        wire = clean_customer(payload, custom_fields=conf.CUSTOM_FIELDS)
        pairs = customer_form_fields("email", wire)
        bodies.append(urlencode([*auth, *pairs], encoding="utf-8").encode("ascii"))
    return bodies


def run_bare(count: int, sandbox: str) -> dict[str, Any]:
    """The practical limit: one ``requests.Session`` posting the same bodies in a loop."""
    bodies = wire_bodies(count)
    sandbox_reset(sandbox)
    url = sandbox + UPSERT_PATH
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    with requests.Session() as session, timed() as span:
        for body in bodies:
            response = session.post(url, data=body, headers=headers, timeout=30)
            if response.status_code != 200:
                raise RuntimeError(
                    f"sandbox answered {response.status_code}: {response.text[:200]}"
                )
    state = sandbox_state(sandbox)
    if len(state["customers"]) != count:
        raise RuntimeError(f"sandbox has {len(state['customers'])} customers, expected {count}")
    return {
        "seconds": span.seconds,
        "count": count,
        "per_second": count / span.seconds,
        "sandbox_customers": len(state["customers"]),
    }


# -- coalescing ------------------------------------------------------------------------


def run_coalesce(saves: int, customers: int, sandbox: str, proposal: str = "") -> dict[str, Any]:
    """``saves`` saves spread round-robin over ``customers`` customers, then count calls."""
    conf = get_settings()
    if proposal:
        from . import proposals

        proposals.apply(proposal)
    _fresh_outbox()
    sandbox_reset(sandbox)
    targets = list(Customer.objects.filter(source_model="").order_by("pk")[:customers])
    with timed() as burst:
        for i in range(saves):
            customer = targets[i % customers]
            customer.first_name = f"coalesce-{i}"
            customer.save()
    settled = SyncState.objects.filter(customer__in=targets, status=SyncStatus.SYNCED)
    burst_end = time.perf_counter()
    settle = (
        wait_for(lambda: settled.count() == customers, timeout=300, what="coalesced pushes")
        - burst_end
    )
    # Anything still to come would be due within one window: wait it out, then count.
    time.sleep(conf.COALESCE_SECONDS + 1.0)
    state = sandbox_state(sandbox)
    calls = _calls(state)
    outcomes = dict(SyncLog.objects.values_list("outcome").annotate(n=Count("pk")))
    newest = {c["email"]: c["fields"].get("first_name") for c in state["customers"]}
    last_values = {t.email: f"coalesce-{saves - customers + n}" for n, t in enumerate(targets)}
    current = all(newest.get(email) == value for email, value in last_values.items())
    return {
        "seconds": burst.seconds,
        "saves": saves,
        "customers": customers,
        "calls": sum(calls.values()),
        "calls_by_operation": calls,
        "settle_seconds": settle,
        "coalesce_seconds": conf.COALESCE_SECONDS,
        "sync_log_outcomes": outcomes,
        "sandbox_has_last_values": current,
        "proposal": proposal,
    }


# -- a backlog through bulk uploads ------------------------------------------------------


def run_bulk(count: int, sandbox: str) -> dict[str, Any]:
    """Mark ``count`` customers pending (default threshold): time until all are synced."""
    from django_satori.models import BulkPart, BulkRowError

    conf = get_settings()
    # The previous run's jobs go too: only this run's job and parts are counted.
    BulkRowError.objects.all().delete()
    BulkPart.objects.all().delete()
    BulkJob.objects.all().delete()
    _fresh_outbox()
    sandbox_reset(sandbox)
    customers = Customer.objects.filter(source_model="")
    finished_jobs = BulkJob.objects.filter(state=BulkState.FINISHED)
    broken_jobs = BulkJob.objects.filter(state__in=(BulkState.FAILED, BulkState.CANCELLED))
    synced = SyncState.objects.filter(status=SyncStatus.SYNCED)

    def done() -> bool:
        if broken_jobs.exists():
            job = broken_jobs.first()
            raise RuntimeError(f"bulk job {job.pk} {job.state}: {job.error}")
        return (
            synced.count() >= count
            and not BulkJob.objects.exclude(state=BulkState.FINISHED).exists()
        )

    with timed() as span:
        marked = sync.mark_for_sync(customers)
        finished = wait_for(done, timeout=3600, interval=0.5, what=f"{count} customers via bulk")
    seconds = span.seconds - (time.perf_counter() - finished)
    state = sandbox_state(sandbox)
    calls = _calls(state)
    statuses = dict(SyncState.objects.values_list("status").annotate(n=Count("pk")))
    return {
        "seconds": seconds,
        "count": count,
        "marked": marked,
        "per_second": count / seconds,
        "calls": sum(calls.values()),
        "calls_by_operation": calls,
        "jobs": finished_jobs.count(),
        "parts": sum(job.part_count for job in finished_jobs),
        "statuses": statuses,
        "sandbox_customers": len(state["customers"]),
        "bulk_threshold": conf.BULK_THRESHOLD,
    }
