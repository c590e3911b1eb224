"""Bulk CSV export of every customer, three ways, same rows and same columns.

* ``satori``: the app's own path, exactly as the admin action and the
  commands run it up to the upload: ``bulk.start_bulk_job`` then
  ``bulk.run_job`` (stream, check each row, write parts of 10,000 rows,
  claim the outbox rows, save each file to the storage). Only the upload is
  left out: ``on_part_ready`` does nothing.
* ``plain``: the practical limit, a ``csv.writer`` over
  ``values_list(...).iterator()`` of the same columns into one file.
* ``import_export``: django-import-export 4.x, a ``ModelResource`` with the
  same columns exported to CSV (``resource.export(queryset).csv``).

Peak memory is the child process's ``ru_maxrss`` (peak RSS; a fresh process
per run), beside the RSS just before the export began.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

from django.db import transaction

from django_satori import bulk, bulk_csv, bulk_files
from django_satori.conf import get_settings
from django_satori.models import BulkJob, BulkPart, BulkRowError, BulkState, Customer, SyncState
from django_satori.schema import DATA_FIELDS

from . import data
from .measure import peak_rss_kib, profiled, timed

#: Read from the database by the plain baseline (and, as fields, by import-export).
PLAIN_FIELDS = ("email", *DATA_FIELDS, "tags", "custom_fields")


def _selection() -> Any:
    return Customer.objects.order_by("pk")


def export_satori(outdir: Path, prepared: Any) -> int:
    """Returns the data rows written (all parts)."""
    with transaction.atomic():
        job = bulk.start_bulk_job(_selection(), mode="upsert", description="bench")
    done = bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    if done.invalid_count or done.skipped_count:
        raise RuntimeError(
            f"job left out rows: {done.invalid_count} invalid, {done.skipped_count} skipped"
        )
    return int(done.row_count)


def export_satori_no_claim(outdir: Path, prepared: Any) -> int:
    """The same job as a dry run: the same CSV parts, but no outbox row is claimed.

    A diagnostic, not a user path: it splits the export's cost into writing the
    CSV and claiming the outbox rows for the parts.
    """
    with transaction.atomic():
        job = bulk.start_bulk_job(_selection(), mode="upsert", description="bench", dry_run=True)
    done = bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    if done.invalid_count or done.skipped_count:
        raise RuntimeError(
            f"job left out rows: {done.invalid_count} invalid, {done.skipped_count} skipped"
        )
    return int(done.row_count)


def export_plain(outdir: Path, prepared: Any) -> int:
    conf = get_settings()
    custom_keys = [f"custom:{identifier}" for identifier in conf.CUSTOM_FIELDS]
    rows = 0
    with open(outdir / "plain.csv", "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(bulk_csv.header(conf))
        for *values, tags, custom in (
            _selection().values_list(*PLAIN_FIELDS).iterator(chunk_size=2000)
        ):
            writer.writerow(
                [
                    *values,
                    *(custom.get(key, "") for key in custom_keys),
                    conf.TAG_SEPARATOR.join(tags),
                ]
            )
            rows += 1
    return rows


def _resource_class() -> type:
    from import_export import fields, resources

    conf = get_settings()
    separator = conf.TAG_SEPARATOR

    def custom_field(identifier: str) -> Any:
        key = f"custom:{identifier}"
        return fields.Field(
            column_name=key, dehydrate_method=lambda c: c.custom_fields.get(key, "")
        )

    attrs: dict[str, Any] = {
        "__module__": __name__,
        "append_tags": fields.Field(
            column_name="append_tags", dehydrate_method=lambda c: separator.join(c.tags)
        ),
    }
    names = []
    for identifier in conf.CUSTOM_FIELDS:
        attrs[f"custom_{identifier}"] = custom_field(identifier)
        names.append(f"custom_{identifier}")
    columns = ("email", *DATA_FIELDS, *names, "append_tags")

    class Meta:
        model = Customer
        fields = columns
        export_order = columns

    attrs["Meta"] = Meta
    return type("CustomerResource", (resources.ModelResource,), attrs)


def export_import_export(outdir: Path, resource: Any) -> int:
    dataset = resource.export(queryset=_selection())
    with open(outdir / "import_export.csv", "w", encoding="utf-8", newline="") as out:
        out.write(dataset.csv)
    return len(dataset)


VARIANTS = {
    "satori": export_satori,
    "plain": export_plain,
    "import_export": export_import_export,
    "satori_no_claim": export_satori_no_claim,
}


def _prepare(variant: str) -> Any:
    """Imports and class building happen before the clock starts."""
    if variant == "import_export":
        return _resource_class()()
    return None


def _reset_bulk_state() -> None:
    """Undo a previous export: no jobs, no parts, every outbox row free and synced."""
    BulkRowError.objects.all().delete()
    SyncState.objects.exclude(bulk_part=None).update(bulk_part=None, bulk_version=0)
    BulkPart.objects.all().delete()
    BulkJob.objects.all().delete()
    data.mark_all_synced()
    shutil.rmtree(Path(bulk_files.private_dir()) / bulk_files.FOLDER, ignore_errors=True)


def run(
    variant: str, rows: int, outdir: str, profile: str = "", proposal: str = ""
) -> dict[str, Any]:
    if proposal:
        from . import proposals

        proposals.apply(proposal)
    out = Path(outdir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _reset_bulk_state()
    if Customer.objects.count() != rows:
        raise RuntimeError(f"expected {rows} customers seeded")
    prepared = _prepare(variant)
    with profiled(profile), timed() as span:
        written = VARIANTS[variant](out, prepared)
    peak = peak_rss_kib()
    if written != rows:
        raise RuntimeError(f"{variant} wrote {written} rows, expected {rows}")
    size = sum(f.stat().st_size for f in _files(variant, out))
    if variant == "satori_no_claim":
        parts = BulkPart.objects.count()
    elif variant == "satori":
        parts = BulkPart.objects.filter(state=BulkState.UPLOADING).count()
        claimed = SyncState.objects.exclude(bulk_part=None).count()
        if claimed != rows:
            raise RuntimeError(f"{claimed} outbox rows claimed, expected {rows}")
    else:
        parts = 1
    _reset_bulk_state()
    shutil.rmtree(out, ignore_errors=True)
    return {
        **span.figures(),
        "rows": rows,
        "per_second": rows / span.seconds,
        "peak_rss_kib": peak,
        "bytes": size,
        "proposal": proposal,
        "files": parts,
    }


def _files(variant: str, out: Path) -> list[Path]:
    if not variant.startswith("satori"):
        return list(out.iterdir())
    folder = Path(bulk_files.private_dir()) / bulk_files.FOLDER
    return [folder / name for name in os.listdir(folder)]
