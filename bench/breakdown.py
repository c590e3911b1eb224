"""Where a save with sync on spends its time: each step alone, CPU and wall per call.

Run with ``--proposals`` (it measures the ORM fallback of ``_mark_pending``
beside the one-statement path); RESULTS.md uses it to say where the save
overhead comes from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import transaction
from django.test.utils import override_settings
from django.utils import timezone

from django_satori.conf import get_settings
from django_satori.mapping import get_mappings
from django_satori.models import Customer, SourceChange, SyncState
from django_satori.sync import dispatch, history, outbox, pushing, sources
from django_satori.tasks import push_many
from tests.testapp.models import Member

from . import data
from .measure import cpu_seconds


def _measure(step: Callable[[int], Any], count: int) -> dict[str, float]:
    step(0)  # connections, caches and imports are not what is measured
    cpu, wall = cpu_seconds(), time.perf_counter()
    for i in range(1, count + 1):
        step(i)
    return {
        "cpu_us": (cpu_seconds() - cpu) / count * 1e6,
        "wall_us": (time.perf_counter() - wall) / count * 1e6,
    }


def run(count: int = 1000) -> dict[str, Any]:
    import redis

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    conf = get_settings()
    customers = list(Customer.objects.filter(source_model="").order_by("pk")[: count + 1])
    if len(customers) <= count:
        raise RuntimeError(f"need {count + 1} customers")
    steps: dict[str, dict[str, float]] = {}

    def save(i: int) -> None:
        customers[i].first_name = f"breakdown-{i}"
        customers[i].save()

    with override_settings(SATORI={**settings.SATORI, "SYNC_ENABLED": False}):
        steps["Customer.save(), sync off"] = _measure(save, count)

    def mark(i: int) -> None:
        with transaction.atomic():
            outbox.mark_pending(customers[i].email, customers[i].pk, "upsert", conf)

    data.mark_all_synced()
    steps["outbox.mark_pending (one UPDATE ... RETURNING)"] = _measure(mark, count)
    can_return = outbox.can_update_returning
    outbox.can_update_returning = lambda _connection: False  # type: ignore[assignment]
    try:
        data.mark_all_synced()
        steps["outbox.mark_pending, ORM path (two statements; MySQL, SQLite < 3.35)"] = _measure(
            mark, count
        )
    finally:
        outbox.can_update_returning = can_return  # type: ignore[assignment]

    members = list(Member.objects.order_by("pk")[: count + 1])
    mapping = get_mappings()[Member]

    def save_member(i: int) -> None:
        members[i].given_name = f"breakdown-{i}"
        members[i].save()

    with override_settings(SATORI={**settings.SATORI, "SYNC_ENABLED": False}):
        steps["Member.save(), sync off"] = _measure(save_member, count)
    steps["sources.record_source_change (one INSERT ... SELECT with the address check)"] = _measure(
        lambda i: sources.record_source_change(mapping, members[i]), count
    )
    # The changes just recorded: each member's given_name differs from its mirror's.
    changes = list(SourceChange.objects.order_by("pk").values_list("pk", flat=True))
    steps["the worker: apply_source_changes, one object (mirror UPDATE, outbox mark)"] = _measure(
        lambda i: sources.apply_source_changes([changes[i]]), count
    )
    data.mark_all_synced()

    broker.flushdb()
    steps["push_many.apply_async() (one message; the publisher thread's work)"] = _measure(
        lambda i: push_many.apply_async(
            ([i],), countdown=conf.COALESCE_SECONDS, retry_policy=dispatch.PUBLISH_RETRY
        ),
        count,
    )
    steps["Redis LPUSH of 1 KB (the broker's own cost)"] = _measure(
        lambda i: broker.lpush("bench-breakdown", b"x" * 1024), count
    )
    broker.flushdb()
    data.mark_all_synced()
    return {"count": count, "steps": steps}


def run_push(count: int, sandbox: str) -> dict[str, Any]:
    """``pushing.push_batch`` in this process (no Celery) for ``count`` pending customers in
    batches of ``DISPATCH_BATCH`` (as the ``push_many`` task gets them), by step.

    The steps are timed by wrapping the functions ``push_batch`` calls; the
    two derived rows are what is left around them. Figures are per customer.
    """
    import requests

    from django_satori import client as client_module
    from django_satori.models import SyncLog, SyncStatus

    SyncLog.objects.all().delete()
    SyncState.objects.all().delete()
    requests.post(sandbox + "/_sandbox/reset", timeout=30).raise_for_status()
    now = timezone.now()
    SyncState.objects.bulk_create(
        SyncState(email=email, customer_id=pk, version=1, not_before=now)
        for pk, email in Customer.objects.filter(source_model="")
        .order_by("pk")
        .values_list("pk", "email")[:count]
    )
    ids = list(SyncState.objects.order_by("pk").values_list("pk", flat=True))
    totals: dict[str, list[float]] = {}

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = totals.setdefault(label, [0.0, 0.0])
                spent[0] += time.thread_time() - cpu
                spent[1] += time.perf_counter() - wall

        setattr(owner, name, timed_call)

    wrap(client_module.SatoriClient, "_call", "HTTP call (requests + parse)")
    wrap(pushing, "_write_back", "_write_back: the answers, WRITE_BACK_BATCH at a time")
    wrap(pushing, "_send_upsert", "one row: payload, checks, call")
    wrap(history, "write", "SyncLog INSERT (one per batch)")
    wrap(pushing, "push_batch", "push_batch, total")
    # One log INSERT per batch, at its end: outside the rows it would be counted in twice.
    history.LOG_BATCH = dispatch.DISPATCH_BATCH
    pushing.push_batch(ids[:1])  # the client's first connection is not what is measured
    totals.clear()
    rest = ids[1:]
    for start in range(0, len(rest), dispatch.DISPATCH_BATCH):  # as push_many messages carry them
        pushing.push_batch(rest[start : start + dispatch.DISPATCH_BATCH])
    if SyncState.objects.filter(status=SyncStatus.SYNCED).count() != len(ids):
        raise RuntimeError("not every push succeeded")
    n = len(rest)
    steps = {
        label: {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}
        for label, (cpu, wall) in totals.items()
    }

    def minus(total: str, *parts: str) -> dict[str, float]:
        return {
            key: steps[total][key] - sum(steps[p][key] for p in parts)
            for key in ("cpu_us", "wall_us")
        }

    steps["claim and load (one UPDATE, one SELECT per batch)"] = minus(
        "push_batch, total",
        "one row: payload, checks, call",
        "_write_back: the answers, WRITE_BACK_BATCH at a time",
        "SyncLog INSERT (one per batch)",
    )
    steps["payload, checks, log entry (the rest of a row)"] = minus(
        "one row: payload, checks, call", "HTTP call (requests + parse)"
    )
    return {"count": n, "steps": steps}
