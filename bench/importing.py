"""Importing SATORI's admin export: ``satori_import`` beside the practical limit.

The file is the one the import tests use (``tests.importfiles``): a Shift_JIS
(cp932) export with Japanese headers, CRLF line ends, a two-line memo on every
tenth row, 19 columns of which 17 are read (``custom:birthday`` declared as a
date custom field for this group; 会員ランク is an unknown column, ignored).
Every run starts from empty tables and creates every customer: a first import.

* ``satori``: ``manage.py satori_import FILE`` (``call_command``, default
  options: encoding detected, batches of 1,000 rows). Per row it checks and
  converts the values (e-mail normalised, dates, delivery permission, tags,
  lengths), looks the batch's addresses and hashcodes up, and writes a
  Customer, its SyncState (``remote_values``, hashcode, ``in_satori``) and an
  ImportedCustomer row; then ANALYZE, and its ImportRun record.
* ``plain``: the practical limit, ``csv.reader`` over the same file opened as
  cp932, then ``Customer.objects.bulk_create`` of the same values in batches of
  1,000, each in its own transaction. Only what storing needs is converted
  (``YYYY/MM/DD`` to a date, tags split, 許可/拒否 to the API value, custom
  fields into the JSON column); nothing is checked or looked up.
* ``plain_states``: ``plain`` plus a ``bulk_create`` of each customer's SyncState
  with the same values the import stores (hashcode, ``remote_values``,
  ``in_satori``, ``sent_tags``): the two tables the import fills, without its
  checks, lookups, ImportedCustomer rows and ANALYZE.

Peak memory is the child process's ``ru_maxrss`` (a fresh process per run).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from django_satori.models import (
    Customer,
    ImportedCustomer,
    ImportRun,
    Operation,
    SyncState,
    SyncStatus,
)
from tests.importfiles import JAPANESE, export_row, write_export

from . import data
from .measure import peak_rss_kib, profiled, timed

ENCODING = "cp932"
#: Rows per transaction, on both sides (the import's default batch).
BATCH = 1000
_KEY_BY_LABEL = {label: key for key, label in JAPANESE.items()}
_PERMISSION = {"許可": "approval", "拒否": "reject"}
_TEXT_FIELDS = {
    f.name
    for f in Customer._meta.concrete_fields
    if f.get_internal_type() in ("CharField", "TextField")
}


def make_file(path: str, rows: int) -> dict[str, Any]:
    """Write the export once; later runs (and the other database) reuse it."""
    target = Path(path)
    started = time.perf_counter()
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        write_export(
            partial, (export_row(i) for i in range(rows)), encoding=ENCODING, labels=JAPANESE
        )
        partial.rename(target)
    return {"seconds": time.perf_counter() - started, "rows": rows, "bytes": target.stat().st_size}


def import_satori(path: Path, rows: int) -> int:
    out, err = io.StringIO(), io.StringIO()
    call_command("satori_import", str(path), stdout=out, stderr=err)
    run = ImportRun.objects.get()
    if (run.rows, run.created_count, run.skipped_count, run.encoding) != (rows, rows, 0, ENCODING):
        raise RuntimeError(
            f"import: {run.rows} rows, {run.created_count} created, "
            f"{run.skipped_count} skipped, {run.encoding}\n{err.getvalue()[-2000:]}"
        )
    return int(run.created_count)


def _plain(path: Path, rows: int, *, states: bool) -> int:
    written = 0
    now = timezone.now()
    with open(path, encoding=ENCODING, newline="") as stream:
        reader = csv.reader(stream)
        keys = [_KEY_BY_LABEL[label] for label in next(reader)]
        at = {key: position for position, key in enumerate(keys)}
        text = [
            (key, at[key]) for key in keys if key in _TEXT_FIELDS and key != "delivery_permission"
        ]
        custom = [(key, at[key]) for key in keys if key.startswith("custom:")]
        date_at, permission_at, tags_at = (
            at["collection_date"],
            at["delivery_permission"],
            at["tags"],
        )
        hashcode_at = at["hashcode"]
        used = [
            (key, at[key])
            for key in keys
            if key in _TEXT_FIELDS or key.startswith("custom:") or key == "tags"
        ]

        def customer(record: list[str]) -> Customer:
            fields: dict[str, Any] = {key: record[i] for key, i in text}
            permission = record[permission_at]
            return Customer(
                **fields,
                collection_date=record[date_at].replace("/", "-") or None,
                delivery_permission=_PERMISSION.get(permission, permission),
                tags=record[tags_at].split(",") if record[tags_at] else [],
                custom_fields={key: record[i].replace("/", "-") for key, i in custom},
            )

        def flush(batch: list[list[str]]) -> None:
            with transaction.atomic():
                created = Customer.objects.bulk_create([customer(r) for r in batch])
                if states:
                    SyncState.objects.bulk_create(
                        SyncState(
                            email=c.email,
                            customer_id=c.pk,
                            hashcode=r[hashcode_at],
                            operation=Operation.UPSERT,
                            status=SyncStatus.SYNCED,
                            version=0,
                            synced_version=0,
                            in_satori=True,
                            remote_values={key: r[i] for key, i in used if key != "email"},
                            remote_seen_at=now,
                            sent_tags=c.tags,
                        )
                        for c, r in zip(created, batch, strict=True)
                    )

        batch: list[list[str]] = []
        for record in reader:
            batch.append(record)
            if len(batch) >= BATCH:
                flush(batch)
                written += len(batch)
                batch = []
        if batch:
            flush(batch)
            written += len(batch)
    return written


def import_plain(path: Path, rows: int) -> int:
    return _plain(path, rows, states=False)


def import_plain_states(path: Path, rows: int) -> int:
    return _plain(path, rows, states=True)


VARIANTS: dict[str, Callable[[Path, int], int]] = {
    "satori": import_satori,
    "plain": import_plain,
    "plain_states": import_plain_states,
}


def _empty() -> None:
    """No customers, outbox rows or import records: every run is a first import."""
    data.wipe()
    ImportRun.objects.all().delete()
    if connection.vendor == "postgresql":
        data.analyze()


def run(variant: str, path: str, rows: int, profile: str = "") -> dict[str, Any]:
    source = Path(path)
    _empty()
    with profiled(profile), timed() as span:
        written = VARIANTS[variant](source, rows)
    peak = peak_rss_kib()
    customers = Customer.objects.count()
    if written != rows or customers != rows:
        raise RuntimeError(
            f"{variant}: {written} rows written, {customers} customers, expected {rows}"
        )
    counts = {"states": SyncState.objects.count(), "imported": ImportedCustomer.objects.count()}
    _empty()
    return {
        **span.figures(),
        "rows": rows,
        "per_second": rows / span.seconds,
        "peak_rss_kib": peak,
        "bytes": os.path.getsize(source),
        **counts,
    }
