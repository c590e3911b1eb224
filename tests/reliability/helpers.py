"""Shared pieces of the reliability suites: data, settling, comparison and figures.

The figures each scenario measures are merged into
``test-artifacts/reliability-<database>.json`` so docs/reliability.md can quote
real numbers (see ``record_figures``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings

from django_satori import sweep, sync
from django_satori.models import Customer, SyncLog, SyncState, SyncStatus
from django_satori.sandbox import state as sandbox_state
from django_satori.sandbox.server import SandboxServer
from django_satori.schema import CUSTOM_PREFIX, DATA_FIELDS

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = Path(os.environ.get("DJANGO_SATORI_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")

#: Rows in these states are still on their way; anything left here at the end is "stuck".
UNSETTLED = (SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK)
#: SyncLog outcomes that stand for one real call to SATORI.
CALL_OUTCOMES = (SyncLog.Outcome.OK, SyncLog.Outcome.RETRY, SyncLog.Outcome.FAILED)


def database_vendor() -> str:
    return "postgresql" if connection.vendor == "postgresql" else connection.vendor


@contextlib.contextmanager
def satori_settings(**changes: Any) -> Iterator[dict[str, Any]]:
    """``settings.SATORI`` with ``changes`` in this process; workers started inside see them too
    (the ``celery_worker`` fixture passes every changed key on)."""
    values = {**settings.SATORI, **changes}
    with override_settings(SATORI=values):
        yield values


# --------------------------------------------------------------------------- data


def customer_values(i: int, revision: int = 0) -> dict[str, Any]:
    """Varied, valid data for customer ``i``: Japanese text, tags, custom fields and dates.

    ``revision`` changes every text field, so a stale push shows in the comparison.
    No field is ever emptied: SATORI does not clear a value for an empty one.
    """
    return {
        "email": f"rel{i:05d}@example.jp",
        "last_name": f"山田{i}",
        "first_name": f"太郎 r{revision}",
        "lead_company_name": f"株式会社テスト{i % 37}",
        "department": f"営業{revision}部",
        "phone_number": f"03-{i % 10000:04d}-{revision:04d}",
        "memo": f'revision {revision}, "quoted", comma, 改行\nline two',
        "collection_route": "自社フォーム",
        "collection_date": dt.date(2025, 1 + i % 12, 1 + i % 28),
        "delivery_permission": "approval" if i % 3 else "reject",
        "tags": [f"tag{i % 5}", f"rev{revision}"] if revision else [f"tag{i % 5}"],
        "custom_fields": {
            "custom:plan": f"plan-{revision}",
            "custom:age": str(20 + i % 50),
            "custom:birthday": f"19{50 + i % 50}-0{1 + i % 9}-1{i % 10}",
        },
    }


def create_customers(count: int, *, start: int = 0, singly: bool = True) -> list[str]:
    """Create customers ``start``..``start+count``; returns their e-mails.

    ``singly``: each through ``save()`` in its own transaction (one task each, as a
    project's views would); otherwise ``bulk_create`` plus ``mark_for_sync``.
    """
    emails = []
    if singly:
        for i in range(start, start + count):
            customer = Customer.objects.create(**customer_values(i))
            emails.append(customer.email)
        return emails
    batch = [Customer(**customer_values(i)) for i in range(start, start + count)]
    emails = [c.email for c in batch]
    with transaction.atomic():
        Customer.objects.bulk_create(batch, batch_size=500)
        sync.mark_for_sync(Customer.objects.filter(email__in=emails))
    return emails


def update_customers(emails: Iterable[str], revision: int) -> int:
    """Change every text field of these customers (each save its own transaction)."""
    changed = 0
    for email in emails:
        i = int(email.removeprefix("rel").split("@")[0])
        values = customer_values(i, revision)
        customer = Customer.objects.get(email=email)
        for name, value in values.items():
            setattr(customer, name, value)
        customer.save()
        changed += 1
    return changed


# --------------------------------------------------------------------------- comparison


def expected_remote(customer: Customer) -> dict[str, Any]:
    """What SATORI must hold for ``customer``, in the sandbox's terms."""
    fields: dict[str, str] = {}
    for name in DATA_FIELDS:
        value = getattr(customer, name)
        if value in (None, ""):
            continue
        fields[name] = value.isoformat() if isinstance(value, dt.date) else str(value)
    custom = {
        key.removeprefix(CUSTOM_PREFIX): str(value)
        for key, value in (customer.custom_fields or {}).items()
        if value not in (None, "")
    }
    return {"fields": fields, "custom": custom, "tags": sorted(set(customer.tags or []))}


def remote_view(remote: sandbox_state.Customer) -> dict[str, Any]:
    return {
        "fields": dict(remote.fields),
        "custom": dict(remote.custom),
        "tags": sorted(remote.tags),
    }


def compare_with_sandbox(sandbox: SandboxServer, emails: Iterable[str]) -> dict[str, list[str]]:
    """Field-by-field check of the database against the sandbox.

    ``missing``: synced locally but absent in SATORI; ``stale``: present but
    different; ``unsettled``: still pending/sending; ``failed``: failed with its
    reason; ``failed_without_reason``: failed and nobody could tell why.
    """
    result: dict[str, list[str]] = {
        "missing": [],
        "stale": [],
        "unsettled": [],
        "failed": [],
        "failed_without_reason": [],
        "synced": [],
    }
    states = {s.email: s for s in SyncState.objects.filter(email__in=list(emails))}
    for customer in Customer.objects.filter(email__in=list(states)).iterator(chunk_size=1000):
        state = states[customer.email]
        if state.status in UNSETTLED:
            result["unsettled"].append(customer.email)
            continue
        if state.status == SyncStatus.FAILED:
            key = "failed" if state.last_error.strip() else "failed_without_reason"
            result[key].append(customer.email)
            continue
        remote = sandbox.state.customer(customer.email)
        if remote is None:
            result["missing"].append(customer.email)
        elif remote_view(remote) != expected_remote(customer):
            result["stale"].append(customer.email)
        elif state.status == SyncStatus.SYNCED and state.synced_version == state.version:
            result["synced"].append(customer.email)
        else:
            result["stale"].append(customer.email)
    result["missing"] += sorted(set(emails) - set(states))  # no outbox row at all
    return result


def describe_differences(sandbox: SandboxServer, emails: Iterable[str], limit: int = 5) -> str:
    """A readable diff for an assertion message."""
    lines = []
    for email in list(emails)[:limit]:
        customer = Customer.objects.filter(email=email).first()
        state = (
            SyncState.objects.filter(email=email)
            .values("status", "version", "synced_version", "attempts", "last_error")
            .first()
        )
        remote = sandbox.state.customer(email)
        local = expected_remote(customer) if customer else None
        lines.append(
            f"{email}: state={state}\n  db={local}"
            f"\n  satori={remote_view(remote) if remote else None}"
        )
    return "\n".join(lines)


def status_counts(emails: Iterable[str] | None = None) -> dict[str, int]:
    rows = SyncState.objects.all()
    if emails is not None:
        rows = rows.filter(email__in=list(emails))
    counts: dict[str, int] = collections.Counter(rows.values_list("status", flat=True))
    return dict(counts)


def log_calls_by_email() -> dict[str, int]:
    """Calls to SATORI per e-mail as the SyncLog records them."""
    rows = SyncLog.objects.filter(
        outcome__in=CALL_OUTCOMES, endpoint__startswith="customer/"
    ).values_list("email", flat=True)
    return dict(collections.Counter(rows))


def log_outcomes() -> dict[str, int]:
    return dict(collections.Counter(SyncLog.objects.values_list("outcome", flat=True)))


class RequestCounter:
    """Counts every request the sandbox receives, by operation and e-mail, without limit.

    The sandbox keeps only its last few thousand requests; a long run needs all.
    """

    def __init__(self, sandbox: SandboxServer) -> None:
        self.by_email: collections.Counter[tuple[str, str]] = collections.Counter()
        self.by_operation: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._state = sandbox.state
        self._original = sandbox.state.record

    def install(self) -> RequestCounter:
        original = self._original

        def record(request: sandbox_state.RecordedRequest) -> None:
            original(request)
            email = dict(request.form).get("customer[email]", "")
            with self._lock:
                self.by_operation[request.operation or "?"] += 1
                self.by_email[(request.operation or "?", email.lower())] += 1

        self._state.record = record  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        self._state.record = self._original  # type: ignore[method-assign]

    def calls(self, operation: str, email: str) -> int:
        return self.by_email[(operation, email.lower())]


# --------------------------------------------------------------------------- waiting


def wait_settled(
    emails: Iterable[str],
    *,
    timeout: float,
    alive: Callable[[], bool] = lambda: True,
    sweep_every: float | None = None,
    on_tick: Callable[[], None] | None = None,
    interval: float = 0.5,
) -> float:
    """Wait until none of ``emails`` is pending/sending/in a bulk job; returns seconds waited.

    ``sweep_every``: run ``sweep.sweep()`` that often, as Celery beat would in
    production (it is the designed safety net for lost tasks and dead workers).
    """
    emails = list(emails)
    started = last_sweep = time.monotonic()
    while True:
        left = SyncState.objects.filter(email__in=emails, status__in=UNSETTLED).count()
        if not left:
            return time.monotonic() - started
        now = time.monotonic()
        if now - started > timeout:
            raise AssertionError(
                f"{left} customers still unsettled after {timeout}s: {status_counts(emails)}"
            )
        if not alive():
            raise AssertionError("the worker died")
        if sweep_every is not None and now - last_sweep >= sweep_every:
            sweep.sweep()
            last_sweep = now
        if on_tick is not None:
            on_tick()
        time.sleep(interval)


# --------------------------------------------------------------------------- figures


def record_figures(scenario: str, figures: dict[str, Any]) -> Path:
    """Merge one scenario's measured figures into test-artifacts/reliability-<db>.json."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / f"reliability-{database_vendor()}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        data = {}
    data[scenario] = {
        **figures,
        "database": database_vendor(),
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    path.write_text(
        json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8"
    )
    return path
