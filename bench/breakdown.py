"""Where a save with sync on spends its time: each step alone, CPU and wall per call.

Run with ``--proposals``; RESULTS.md uses it to say which part of the save
overhead each proposed fix removes.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.test.utils import override_settings
from django.utils import timezone

from django_satori import sync
from django_satori.conf import get_settings
from django_satori.models import Customer, SyncState
from django_satori.tasks import push_customer

from . import data
from .measure import cpu_seconds


def _measure(step: Callable[[int], Any], count: int) -> dict[str, float]:
    step(0)  # connections, caches and imports are not what is measured
    cpu, wall = cpu_seconds(), time.perf_counter()
    for i in range(1, count + 1):
        step(i)
    return {"cpu_us": (cpu_seconds() - cpu) / count * 1e6,
            "wall_us": (time.perf_counter() - wall) / count * 1e6}


def run(count: int = 1000) -> dict[str, Any]:
    import redis

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    conf = get_settings()
    customers = list(Customer.objects.filter(source_model="").order_by("pk")[:count + 1])
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
            sync._mark_pending(customers[i].email, customers[i].pk, "upsert", conf)

    data.mark_all_synced()
    steps["sync._mark_pending (two ORM statements)"] = _measure(mark, count)

    table = connection.ops.quote_name(SyncState._meta.db_table)
    adapt = connection.ops.adapt_datetimefield_value

    def one_statement(i: int) -> None:
        now = timezone.now()
        due = now + dt.timedelta(seconds=conf.COALESCE_SECONDS)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET version = version + 1, status = %s, updated_at = %s, "
                "not_before = CASE WHEN status = %s THEN not_before ELSE %s END "
                "WHERE email = %s RETURNING id, not_before = %s",
                ["pending", adapt(now), "pending", adapt(due), customers[i].email, adapt(due)])
            cursor.fetchone()

    data.mark_all_synced()
    steps["the same as one UPDATE ... RETURNING"] = _measure(one_statement, count)

    broker.flushdb()
    steps["push_customer.apply_async() (one message)"] = _measure(
        lambda i: push_customer.apply_async((i,), countdown=conf.COALESCE_SECONDS,
                                            retry_policy=sync.PUBLISH_RETRY), count)
    steps["Redis LPUSH of 1 KB (the broker's own cost)"] = _measure(
        lambda i: broker.lpush("bench-breakdown", b"x" * 1024), count)
    broker.flushdb()
    data.mark_all_synced()
    return {"count": count, "steps": steps}
