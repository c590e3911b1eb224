"""Save overhead: N ``save()`` calls with sync on against sync off.

Each save runs in autocommit mode, so it is its own transaction, as in a web
request: with sync on that is the outbox write plus the after-commit publish
of the push task to Redis. Whether sync is on comes from ``SATORI["SYNC_ENABLED"]``
in the environment bench.run gives this process; the loop is the same.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connection

from django_satori import sync
from django_satori.conf import get_settings
from django_satori.models import Customer, SourceChange, SyncState, SyncStatus
from tests.testapp.models import Member

from . import data
from .measure import timed


def _broker() -> Any:
    import redis

    return redis.Redis.from_url(settings.CELERY_BROKER_URL)


def run(model: str, count: int, tag: str, profile: str = "", proposal: str = "") -> dict[str, Any]:
    """Save ``count`` objects of ``model`` ("customer" or "member") once each.

    Every object is in a synced state first, so that with sync on every save
    makes its outbox row pending and queues its push: the full cost, no coalescing.
    A member's save records its change and queues the task that builds its mirror
    (the mirror and the push are the worker's work, measured in the sync group).
    The time runs until the publisher thread has handed the last push to Redis.
    ``proposal`` applies prototypes from :mod:`bench.proposals` first.
    """
    sync_on = get_settings().SYNC_ENABLED
    if proposal:
        from . import proposals

        proposals.apply(proposal)
    data.mark_all_synced()
    broker = _broker()
    broker.flushdb()
    if model == "customer":
        objects: list[Any] = list(Customer.objects.filter(source_model="").order_by("pk")[:count])
        field = "first_name"
    else:
        objects = list(Member.objects.order_by("pk")[:count])
        field = "given_name"
    if len(objects) != count:
        raise RuntimeError(f"only {len(objects)} {model} rows seeded, {count} needed")
    if not connection.get_autocommit():
        raise RuntimeError("saves must run in autocommit mode")

    profiler = _profiler(profile)
    with timed() as span:
        for i, obj in enumerate(objects):
            setattr(obj, field, f"{tag}-{i}")
            obj.save()
        # Until the publisher thread has queued the last push: all of the work is counted.
        if not sync.wait_for_dispatch(timeout=120):
            raise RuntimeError("the publisher thread did not finish")
    if profiler is not None:
        profiler.stop()
        with open(profile, "w", encoding="utf-8") as out:
            out.write(profiler.output_text(unicode=True, color=False, show_all=False))

    if model == "customer":
        pending = SyncState.objects.filter(status=SyncStatus.PENDING).count()
    else:
        # A connected save records the change; the worker builds the mirror and marks it.
        pending = SourceChange.objects.count()
    messages = broker.llen("celery")
    queued = _queued_ids(broker)
    expected = count if sync_on else 0
    if pending != expected or queued != expected:
        raise RuntimeError(
            f"expected {expected} pending rows and queued tasks, found {pending} and {queued}"
        )
    broker.flushdb()
    return {
        **span.figures(),
        "count": count,
        "per_second": count / span.seconds,
        "sync": sync_on,
        "pending": pending,
        "queued": queued,
        "messages": messages,
        "proposal": proposal,
    }


def _queued_ids(broker: Any) -> int:
    """How many state ids the queued messages carry (a batch message carries several)."""
    import base64
    import json

    total = 0
    for raw in broker.lrange("celery", 0, -1):
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        total += len(body[0][0]) if isinstance(body[0][0], list) else 1
    return total


def _profiler(path: str) -> Any:
    if not path:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005)
    profiler.start()
    return profiler
