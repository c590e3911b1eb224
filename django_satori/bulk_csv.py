"""The bulk CSV format: which columns, and one customer row as cells.

Kept apart from the job machinery (:mod:`django_satori.bulk`) because it is
the hot loop of an export of a million rows: rows arrive as ``values_list``
tuples (never model instances) and are checked with the same rules as a
single push (:mod:`django_satori.schema`), in a path that costs little when
the row is fine.

The file SATORI gets is UTF-8 without a BOM, RFC 4180 quoting (a cell with a
comma, a quote, CR or LF is quoted; quotes are doubled) and LF line endings,
which is what clients known to work against SATORI send.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any

from django.utils.translation import gettext as _

from .conf import SatoriSettings
from .exceptions import SatoriValidationError
from .schema import (
    CUSTOM_PREFIX,
    DELIVERY_PERMISSIONS,
    clean_customer,
    join_tags,
    normalize_email,
)
from .sync import DATA_FIELDS

#: ``values_list`` fields of Customer read for each row, in this order.
VALUE_FIELDS: tuple[str, ...] = ("pk", "email", *DATA_FIELDS, "tags", "custom_fields")
LINE_TERMINATOR = "\n"

_ROUTE = DATA_FIELDS.index("collection_route")
_DATE = DATA_FIELDS.index("collection_date")
_PERMISSION = DATA_FIELDS.index("delivery_permission")
_TEXT = tuple(i for i in range(len(DATA_FIELDS)) if i not in (_DATE, _PERMISSION))
_N = len(DATA_FIELDS)


def header(conf: SatoriSettings) -> list[str]:
    """email, the data fields, one ``custom:<id>`` per declared custom field, append_tags."""
    return ["email", *DATA_FIELDS, *(CUSTOM_PREFIX + i for i in conf.CUSTOM_FIELDS),
            "append_tags"]


class RowEncoder:
    """Turns one ``VALUE_FIELDS`` tuple into CSV cells, or raises SatoriValidationError."""

    def __init__(self, conf: SatoriSettings) -> None:
        self.header = header(conf)
        self._custom_keys = tuple(CUSTOM_PREFIX + i for i in conf.CUSTOM_FIELDS)
        self._custom_set = frozenset(self._custom_keys)
        self._definitions = dict(conf.CUSTOM_FIELDS)
        self._route = conf.BULK_DEFAULT_COLLECTION_ROUTE
        self._separator = conf.TAG_SEPARATOR

    def encode(self, values: Sequence[Any]) -> list[str]:
        email = values[1]
        if normalize_email(email) != email:
            self._not_normalised(email)
        cells: list[str] = [email, *values[2:2 + _N]]
        for i in _TEXT:
            if "\x00" in cells[1 + i]:
                raise SatoriValidationError(_("The value contains a NUL character."),
                                            field=DATA_FIELDS[i])
        if not cells[1 + _ROUTE]:
            if not self._route:
                raise SatoriValidationError(
                    _("The bulk API refuses rows without a collection route: set it on the "
                      "customer or set SATORI['BULK_DEFAULT_COLLECTION_ROUTE']."),
                    field="collection_route")
            cells[1 + _ROUTE] = self._route
        date = cells[1 + _DATE]
        cells[1 + _DATE] = date.isoformat() if date is not None else ""
        permission = cells[1 + _PERMISSION]
        if permission and permission not in DELIVERY_PERMISSIONS:
            raise SatoriValidationError(
                _("delivery_permission must be 'approval' or 'reject' (got %(value)r).")
                % {"value": str(permission)[:40]}, field="delivery_permission")
        custom = values[3 + _N]
        if custom:
            cells.extend(self._custom(custom))
        else:
            cells.extend("" for _key in self._custom_keys)
        tags = values[2 + _N]
        cells.append(join_tags(tags, self._separator) if tags else "")
        return cells

    def _not_normalised(self, email: str) -> None:
        # Customer.save() normalises; update() and bulk_create() do not.
        raise SatoriValidationError(
            _("The stored e-mail address %(stored)r is not in normalised form (%(normal)r); "
              "save the customer to fix it.")
            % {"stored": str(email)[:80], "normal": normalize_email(email)},
            field="email")

    def _custom(self, custom: Any) -> list[str]:
        if not isinstance(custom, dict):
            raise SatoriValidationError(_("Custom fields must be a JSON object."),
                                        field="custom_fields")
        for key in custom:
            if key not in self._custom_set:
                raise SatoriValidationError(
                    _("Unknown custom field %(key)s: declare it in SATORI['CUSTOM_FIELDS'] "
                      "with the identifier set in SATORI's admin screen.") % {"key": key},
                    field=str(key)[:100])
        cleaned = clean_customer(custom, custom_fields=self._definitions, require_email=False)
        return [cleaned.get(key, "") for key in self._custom_keys]


class _RowWriter:
    """``csv.writer`` with LF line endings that also quotes a cell holding a bare CR.

    Python before 3.13 quotes a cell only for the characters of the line
    terminator, so with LF endings a lone ``\r`` went out unquoted and ended
    the record early: the rest of the row became a row of its own, which a
    crafted memo could fill with another customer's e-mail and values. Rows
    with a CR are written with CRLF quoting rules and their CRLF terminator
    turned back into LF (the terminator is the only unquoted line break).
    """

    def __init__(self, text: IO[str]) -> None:
        self._text = text
        self._plain = csv.writer(text, lineterminator=LINE_TERMINATOR)

    def writerow(self, cells: Sequence[Any]) -> None:
        if not any("\r" in cell for cell in cells if isinstance(cell, str)):
            self._plain.writerow(cells)
            return
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(cells)
        self._text.write(buffer.getvalue()[:-2] + LINE_TERMINATOR)


class PartWriter:
    """One part's CSV in a temporary file (memory stays flat), plus who is in it."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns
        # Lives until finish()/close(): a context manager cannot span the part.
        self.raw: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._text = io.TextIOWrapper(self.raw, encoding="utf-8", newline="")
        self._writer = _RowWriter(self._text)
        self._writer.writerow(columns)
        #: (customer pk, e-mail) of each data row, in file order.
        self.members: list[tuple[int, str]] = []
        self._emails: set[str] = set()

    def __len__(self) -> int:
        return len(self.members)

    def add(self, pk: int, cells: list[str]) -> None:
        email = cells[0]
        if email in self._emails:  # defensive: a row seen twice by the database scan
            return
        self._emails.add(email)
        self._writer.writerow(cells)
        self.members.append((pk, email))

    def keep_only(self, emails: set[str]) -> None:
        """Rewrite the file without the rows whose e-mail is not in ``emails``."""
        self._text.flush()
        self._text.detach()
        self.raw.seek(0)
        source = io.TextIOWrapper(self.raw, encoding="utf-8", newline="")
        reader = csv.reader(source)
        fresh: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        text = io.TextIOWrapper(fresh, encoding="utf-8", newline="")
        writer = _RowWriter(text)
        writer.writerow(next(reader))
        kept: list[tuple[int, str]] = []
        for member, cells in zip(self.members, reader, strict=True):
            if member[1] in emails:
                writer.writerow(cells)
                kept.append(member)
        source.detach()
        self.raw.close()
        self.raw, self._text, self._writer = fresh, text, writer
        self.members = kept
        self._emails = {email for _pk, email in kept}

    def finish(self) -> IO[bytes]:
        """The finished file, rewound, as bytes (the caller saves and closes it)."""
        self._text.flush()
        self._text.detach()
        self.raw.seek(0)
        return self.raw

    def close(self) -> None:
        self.raw.close()


def read_rows(fileobj: IO[bytes]) -> Iterator[tuple[int, list[str], list[str]]]:
    """``(row_number, header, cells)`` of a stored part; row numbers count the header as 1.

    Record numbers, not line numbers: a quoted cell may hold a newline.
    """
    reader = csv.reader(io.TextIOWrapper(fileobj, encoding="utf-8", newline=""))
    columns = next(reader, [])
    for row_number, cells in enumerate(reader, start=2):
        if cells:
            yield row_number, columns, cells
