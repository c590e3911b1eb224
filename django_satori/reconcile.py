"""Reconciliation: what differs between the local mirror and SATORI's last export.

Three lists, all computed from the database (nothing is asked of SATORI):

* **only in Django**: customers SATORI is not known to have (no sync state,
  or ``in_satori`` false);
* **only in SATORI**: customers that exist locally only because an import
  created them from the export, and that no project object is connected to;
* **different**: customers whose values differ, field by field, from the
  values SATORI held in the last export that contained them
  (``SyncState.remote_values``). Only the export's columns are compared.

Note for reading a difference: SATORI keeps a value when an empty one is
sent, so a difference where the local value is empty is *not* fixed by
pushing; :attr:`FieldDifference.push_fixes` says which ones a push fixes.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.db import models
from django.db.models import Q
from django.utils.timezone import localtime
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from .conf import get_settings
from .importing import RowError, parse_export_date
from .models import Customer, ImportRun, ImportRunStatus
from .schema import CUSTOM_PREFIX, DATA_FIELDS, custom_field_type
from .sync import mark_for_sync

CATEGORIES: tuple[str, ...] = ("only_in_django", "only_in_satori", "different")
CSV_HEADER: tuple[str, ...] = ("category", "email", "field", "django", "satori")


class Writable(Protocol):
    def write(self, text: str, /) -> Any: ...


@dataclass(frozen=True)
class FieldDifference:
    field: str
    local: str
    remote: str

    @property
    def push_fixes(self) -> bool:
        """Whether sending the local value would make SATORI agree (empty values are ignored)."""
        return self.local != "" or self.field == "tags"


@dataclass(frozen=True)
class CustomerDifferences:
    customer_id: int
    email: str
    sync_status: str
    differences: tuple[FieldDifference, ...]


@dataclass
class ReconcileSummary:
    only_in_django: int = 0
    only_in_satori: int = 0
    different: int = 0
    #: field -> number of customers differing in it
    by_field: Counter[str] = field(default_factory=Counter)
    last_import: ImportRun | None = None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.date):
        return value.isoformat()
    # Browsers submit CRLF, exports may hold either: line breaks are not a difference.
    return str(value).replace("\r\n", "\n").replace("\r", "\n").strip()


def _date_text(value: Any) -> str:

    text = _text(value)
    try:
        return parse_export_date(text)
    except RowError:
        return text


def _tags(value: Any) -> list[str]:
    return sorted({str(t).strip() for t in (value or []) if str(t).strip()})


def compare(customer: Customer, remote: Mapping[str, Any]) -> list[FieldDifference]:
    """Field-by-field differences between ``customer`` and SATORI's ``remote`` values."""
    local = {name: getattr(customer, name) for name in DATA_FIELDS}
    return _compare(local, customer.tags, customer.custom_fields or {}, remote, _Rules.current())


@dataclass(frozen=True)
class _Rules:
    separator: str
    #: custom keys still declared -> whether they hold dates
    custom: Mapping[str, bool]

    @classmethod
    def current(cls) -> _Rules:
        conf = get_settings()
        return cls(
            conf.TAG_SEPARATOR,
            {
                CUSTOM_PREFIX + identifier: custom_field_type(definition)[0] == "date"
                for identifier, definition in conf.CUSTOM_FIELDS.items()
            },
        )


_ORDER = {name: position for position, name in enumerate((*DATA_FIELDS, "tags"))}


def _field_order(key: str) -> tuple[int, str]:
    return _ORDER.get(key, len(_ORDER)), key


def _compare(
    local: Mapping[str, Any],
    tags: Any,
    custom: Mapping[str, Any],
    remote: Mapping[str, Any],
    rules: _Rules,
) -> list[FieldDifference]:
    differences: list[FieldDifference] = []
    # In the customer form's order, whatever order the JSON came back in (jsonb sorts keys).
    for key in sorted(remote, key=_field_order):
        remote_value = remote[key]
        if key == "tags":
            local_tags, remote_tags = _tags(tags), _tags(remote_value)
            if local_tags != remote_tags:
                differences.append(
                    FieldDifference(
                        key, rules.separator.join(local_tags), rules.separator.join(remote_tags)
                    )
                )
            continue
        if key in local:
            local_value = local[key]
            is_date = key == "collection_date"
        elif key in rules.custom:
            local_value = custom.get(key, "")
            is_date = rules.custom[key]
        else:
            continue  # not a compared item, or a custom field no longer declared
        if isinstance(local_value, dt.date):
            local_value = local_value.isoformat()
        elif local_value is None:
            local_value = ""
        if local_value == remote_value:
            continue  # the common case, before any normalisation
        norm = _date_text if is_date else _text
        local_text, remote_text = norm(local_value), norm(remote_value)
        if local_text != remote_text:
            differences.append(FieldDifference(key, local_text, remote_text))
    return differences


def only_in_django() -> models.QuerySet[Customer]:
    """Customers SATORI is not known to have."""
    return Customer.objects.filter(
        Q(sync_state__isnull=True) | Q(sync_state__in_satori=False)
    ).order_by("pk")


def only_in_satori() -> models.QuerySet[Customer]:
    """Customers created by an import that no project object is connected to."""
    return Customer.objects.filter(satori_import__isnull=False, source_model="").order_by("pk")


def with_remote_values() -> models.QuerySet[Customer]:
    return (
        Customer.objects.filter(sync_state__remote_seen_at__isnull=False)
        .select_related("sync_state")
        .order_by("pk")
    )


def different(
    queryset: models.QuerySet[Customer] | None = None, *, chunk_size: int = 2000
) -> Iterator[CustomerDifferences]:
    """Customers whose values differ from SATORI's last export, in pk order (streamed)."""
    customers = with_remote_values()
    if queryset is not None:
        customers = customers.filter(pk__in=queryset.values("pk"))
    rules = _Rules.current()
    # Plain tuples, not model instances: this runs over every imported customer.
    columns = (
        "pk",
        "email",
        "tags",
        "custom_fields",
        "sync_state__status",
        "sync_state__remote_values",
        *DATA_FIELDS,
    )
    for pk, email, tags, custom, status, remote, *values in customers.values_list(
        *columns
    ).iterator(chunk_size=chunk_size):
        diffs = _compare(
            dict(zip(DATA_FIELDS, values, strict=True)), tags, custom or {}, remote or {}, rules
        )
        if diffs:
            yield CustomerDifferences(pk, email, status, tuple(diffs))


def last_import() -> ImportRun | None:
    return ImportRun.objects.filter(status=ImportRunStatus.FINISHED).order_by("-pk").first()


def summarize() -> ReconcileSummary:
    summary = ReconcileSummary(
        only_in_django=only_in_django().count(),
        only_in_satori=only_in_satori().count(),
        last_import=last_import(),
    )
    for item in different():
        summary.different += 1
        summary.by_field.update(d.field for d in item.differences)
    return summary


def category_ids(category: str) -> Iterator[int]:
    """Customer ids in one category, for marking them all for sync."""
    if category == "only_in_django":
        yield from only_in_django().values_list("pk", flat=True).iterator(chunk_size=2000)
    elif category == "only_in_satori":
        yield from only_in_satori().values_list("pk", flat=True).iterator(chunk_size=2000)
    elif category == "different":
        yield from (item.customer_id for item in different())
    else:
        raise ValueError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")


def rows(
    categories: Iterable[str] = CATEGORIES, *, limit: int | None = None
) -> Iterator[tuple[str, str, str, str, str]]:
    """``(category, email, field, django value, SATORI value)``, one per difference.

    The two "only in" categories give one row per customer with empty field and values.
    ``limit`` caps the customers per category.
    """
    for category in categories:
        if category == "different":
            for count, item in enumerate(different()):
                if limit is not None and count >= limit:
                    break
                for diff in item.differences:
                    yield category, item.email, diff.field, diff.local, diff.remote
            continue
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}")
        queryset = only_in_django() if category == "only_in_django" else only_in_satori()
        emails = queryset.values_list("email", flat=True)
        if limit is not None:
            emails = emails[:limit]
        for email in emails.iterator(chunk_size=2000):
            yield category, email, "", "", ""


def write_csv(
    out: Writable, categories: Iterable[str] = CATEGORIES, *, limit: int | None = None
) -> int:
    """The report as CSV (header ``CSV_HEADER``); returns the number of data rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    count = 0
    for row in rows(categories, limit=limit):
        writer.writerow(row)
        count += 1
    return count


def write_text(
    out: Writable, categories: Iterable[str] = CATEGORIES, *, limit: int | None = 50
) -> None:
    """The report for people: counts, then up to ``limit`` customers per category."""
    categories = tuple(categories)
    summary = summarize()
    titles = {
        "only_in_django": (_("Only in Django (not known in SATORI)"), summary.only_in_django),
        "only_in_satori": (
            _("Only in SATORI (created by an import, no project object)"),
            summary.only_in_satori,
        ),
        "different": (_("In both, with different values"), summary.different),
    }
    run = summary.last_import
    if run is None:
        out.write(
            _(
                "No SATORI export has been imported yet: every customer is only in "
                "Django or was created by us."
            )
            + "\n"
        )
    else:
        out.write(
            ngettext(
                "Last import: #%(id)s %(file)s, %(time)s (%(rows)d row)",
                "Last import: #%(id)s %(file)s, %(time)s (%(rows)d rows)",
                run.rows,
            )
            % {
                "id": run.pk,
                "file": run.filename or "-",
                "time": localtime(run.started_at).strftime("%Y-%m-%d %H:%M"),
                "rows": run.rows,
            }
            + "\n"
        )
    for category in categories:
        title, total = titles[category]
        out.write(f"\n{title}: {total}\n")
        if category == "different" and summary.by_field:
            fields = ", ".join(f"{name} {n}" for name, n in summary.by_field.most_common())
            out.write("  " + _("by field: %(fields)s") % {"fields": fields} + "\n")
        shown = 0
        current = ""
        for _category, email, name, local, remote in rows([category], limit=limit):
            if email != current:
                shown += 1
                current = email
                out.write(f"  {email}\n")
            if name:
                out.write(
                    "    "
                    + _("%(field)s: Django %(local)r, SATORI %(remote)r")
                    % {"field": name, "local": local, "remote": remote}
                    + "\n"
                )
        if limit is not None and total > shown:
            out.write("  " + _("... and %(n)d more") % {"n": total - shown} + "\n")


def mark_ids_for_sync(ids: list[int], chunk: int = 500) -> int:
    """:func:`~django_satori.sync.mark_for_sync` for many customer ids, in chunks
    that every database accepts in one ``IN (...)``."""
    marked = 0
    for start in range(0, len(ids), chunk):
        # full: SATORI differs from what we last sent, so "unchanged" is no reason to skip.
        marked += mark_for_sync(
            Customer.objects.filter(pk__in=ids[start : start + chunk]), full=True
        )
    return marked
