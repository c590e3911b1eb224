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
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, cast

from django.core.files import File
from django.core.files.uploadedfile import TemporaryUploadedFile
from django.utils.translation import gettext as _

from .conf import SatoriSettings
from .exceptions import SatoriValidationError
from .schema import (
    _CUSTOM_ID_RE,
    _EMAIL_RE,
    CUSTOM_PREFIX,
    DATA_FIELDS,
    DELIVERY_PERMISSIONS,
    EMAIL_MAX_LENGTH,
    clean_customer,
    custom_field_type,
    join_tags,
    normalize_email,
    refuse_unencodable,
)

#: ``values_list`` fields of Customer read for each row, in this order.
VALUE_FIELDS: tuple[str, ...] = ("pk", "email", *DATA_FIELDS, "tags", "custom_fields")
LINE_TERMINATOR = "\n"

_ROUTE = DATA_FIELDS.index("collection_route")
_DATE = DATA_FIELDS.index("collection_date")
_PERMISSION = DATA_FIELDS.index("delivery_permission")
_TEXT = tuple(i for i in range(len(DATA_FIELDS)) if i not in (_DATE, _PERMISSION))
_N = len(DATA_FIELDS)
_ONLY_STR = {str}


#: Columns a part keeps under BULK_CSV_COLUMNS = "filled" even when no row fills them.
ALWAYS_KEPT: tuple[str, ...] = ("email", "collection_route")


def extra_keys(conf: SatoriSettings) -> tuple[str, ...]:
    """EXTRA_STANDARD_ITEMS's wire keys (stored in Customer.custom_fields, like custom fields)."""
    items = conf.EXTRA_STANDARD_ITEMS
    return tuple(str(k) for k in items) if isinstance(items, dict) else ()


def header(conf: SatoriSettings) -> list[str]:
    """Every column a row is encoded into: email, the data fields, one ``custom:<id>`` per
    declared custom field, the EXTRA_STANDARD_ITEMS, append_tags. A part's file keeps
    those BULK_CSV_COLUMNS selects (:meth:`PartWriter.finish`)."""
    return [
        "email",
        *DATA_FIELDS,
        *(CUSTOM_PREFIX + i for i in conf.CUSTOM_FIELDS),
        *extra_keys(conf),
        "append_tags",
    ]


def explicit_columns(conf: SatoriSettings) -> list[str] | None:
    """BULK_CSV_COLUMNS when it is an explicit list of column names, else None ("filled")."""
    value = conf.BULK_CSV_COLUMNS
    if isinstance(value, str):
        return None
    return [str(name) for name in value]


class RowEncoder:
    """Turns one ``VALUE_FIELDS`` tuple into CSV cells, or raises SatoriValidationError."""

    def __init__(self, conf: SatoriSettings) -> None:
        self.header = header(conf)
        #: The keys read from Customer.custom_fields: custom fields, then extra items.
        self._custom_keys = (*(CUSTOM_PREFIX + i for i in conf.CUSTOM_FIELDS), *extra_keys(conf))
        self._custom_set = frozenset(self._custom_keys)
        self._no_custom = ("",) * len(self._custom_keys)
        self._definitions = dict(conf.CUSTOM_FIELDS)
        #: Keys whose values need no conversion when they are strings (plain text).
        self._plain_text = frozenset(
            CUSTOM_PREFIX + i
            for i, d in conf.CUSTOM_FIELDS.items()
            if custom_field_type(d)[0] == "text"
        ) | frozenset(
            key
            for key, d in dict(conf.EXTRA_STANDARD_ITEMS).items()
            # A length limit is the schema's to check.
            if isinstance(d, dict) and d.get("type", "text") == "text" and not d.get("max_length")
        )
        #: Positions and keys of integer fields: an ``int`` value needs only ``str()``.
        self._integers = tuple(
            (n, CUSTOM_PREFIX + i)
            for n, (i, d) in enumerate(conf.CUSTOM_FIELDS.items())
            if custom_field_type(d)[0] == "integer" and _CUSTOM_ID_RE.match(i)
        )
        self._fast_keys = self._plain_text | {key for _n, key in self._integers}
        self._route = conf.BULK_DEFAULT_COLLECTION_ROUTE
        explicit = explicit_columns(conf)
        #: Positions of the columns an explicit BULK_CSV_COLUMNS leaves out.
        self._left_out = (
            ()
            if explicit is None
            else tuple((n, name) for n, name in enumerate(self.header) if name not in explicit)
        )
        # The bulk API's need for a route is our assumption: a list without the column
        # says SATORI does not want it, so rows are not refused for lacking one.
        self._need_route = explicit is None or "collection_route" in explicit
        self._separator = conf.TAG_SEPARATOR
        #: Whether the row last encoded holds a CR (see _RowWriter), for PartWriter.add().
        self.row_has_cr: bool | None = None
        self._encode = self._build()

    def encode(self, values: Sequence[Any]) -> list[str]:
        """The row's cells; raises SatoriValidationError naming the first bad field."""
        return self._encode(values)

    def _build(self) -> Callable[[Sequence[Any]], list[str]]:
        # A closure over locals: cheaper than attribute lookups, once per exported row.
        route = self._route
        need_route = self._need_route
        separator = self._separator
        no_custom = self._no_custom
        custom_cells = self._custom
        email_ok = _EMAIL_RE.fullmatch  # match() would let a trailing "\n" through ($)
        permissions = frozenset(DELIVERY_PERMISSIONS)
        c_route, c_date, c_permission = 1 + _ROUTE, 1 + _DATE, 1 + _PERMISSION
        c_tags, c_custom, stop = 2 + _N, 3 + _N, 2 + _N

        def encode(values: Sequence[Any]) -> list[str]:
            cells: list[Any] = list(values[1:stop])  # all str once encoded
            email = cells[0]
            # Customer.save() stored it normalised, so checking the pattern is enough;
            # the full normalisation (NFKC, trimming, case) runs only when that fails.
            if (
                not (
                    email.isascii()
                    and email.islower()
                    and len(email) <= EMAIL_MAX_LENGTH
                    and ".." not in email
                    and email_ok(email)
                )
                and normalize_email(email) != email
            ):
                self._not_normalised(email)
            if not cells[c_route] and need_route:
                if not route:
                    raise SatoriValidationError(
                        _(
                            "The bulk API refuses rows without a collection route: set it on "
                            "the customer or set SATORI['BULK_DEFAULT_COLLECTION_ROUTE']."
                        ),
                        field="collection_route",
                    )
                cells[c_route] = route
            date = cells[c_date]
            cells[c_date] = date.isoformat() if date else ""
            permission = cells[c_permission]
            if permission and permission not in permissions:
                raise SatoriValidationError(
                    _("delivery_permission must be 'approval' or 'reject' (got %(value)r).")
                    % {"value": str(permission)[:40]},
                    field="delivery_permission",
                )
            custom = values[c_custom]
            cells.extend(custom_cells(custom) if custom else no_custom)
            tags = values[c_tags]
            cells.append(join_tags(tags, separator) if tags else "")
            # One join for all the searches; which cell it was is worked out only on a hit.
            joined = "".join(cells)
            if "\x00" in joined:
                self._unencodable(cells)
            if not joined.isascii():
                try:
                    # A lone surrogate: cheaper found by encoding than by a regex search.
                    joined.encode()
                except UnicodeEncodeError:
                    self._unencodable(cells)
            self.row_has_cr = "\r" in joined
            return cells

        if not self._left_out:
            return encode
        left_out = self._left_out

        def encode_listed(values: Sequence[Any]) -> list[str]:
            cells = encode(values)
            for n, name in left_out:
                if cells[n]:
                    # Leaving the value out would mark the customer synced without it.
                    raise SatoriValidationError(
                        _(
                            "SATORI['BULK_CSV_COLUMNS'] leaves out the column %(column)s, "
                            "which this customer fills; the bulk API cannot send it."
                        )
                        % {"column": name},
                        field=name,
                    )
            return cells

        return encode_listed

    def _unencodable(self, cells: list[str]) -> None:
        # A NUL would cut the row for SATORI; a lone surrogate would make writing the
        # part fail with a UnicodeEncodeError: either way the row is left out, named.
        for name, cell in zip(self.header, cells, strict=True):
            refuse_unencodable(cell, name)

    def _not_normalised(self, email: str) -> None:
        # Customer.save() normalises; update() and bulk_create() do not.
        raise SatoriValidationError(
            _(
                "The stored e-mail address %(stored)r is not in normalised form (%(normal)r); "
                "save the customer to fix it."
            )
            % {"stored": str(email)[:80], "normal": normalize_email(email)},
            field="email",
        )

    def _custom(self, custom: Any) -> list[str]:
        if not isinstance(custom, dict):
            raise SatoriValidationError(
                _("Custom fields must be a JSON object."), field="custom_fields"
            )
        if custom.keys() <= self._fast_keys:
            get = custom.get
            cells = [get(key, "") for key in self._custom_keys]
            for n, key in self._integers:
                value = cells[n]
                if type(value) is int:  # not bool: the schema refuses those
                    cells[n] = str(value)  # what the schema's integer rule gives
                elif key in custom:
                    break  # anything else is the schema's to judge
            else:
                if set(map(type, cells)) == _ONLY_STR:
                    return cells  # plain text and whole numbers: nothing else to convert
        checked: dict[str, Any] = {}
        for key, value in custom.items():
            if key not in self._custom_set:
                raise SatoriValidationError(
                    _(
                        "Unknown custom field %(key)s: declare it in SATORI['CUSTOM_FIELDS'] "
                        "with the identifier set in SATORI's admin screen."
                    )
                    % {"key": key},
                    field=str(key)[:100],
                )
            if not (key in self._plain_text and isinstance(value, str)):
                checked[key] = value  # integers, dates, choices: the schema's rules
        cleaned = (
            clean_customer(checked, custom_fields=self._definitions, require_email=False)
            if checked
            else {}
        )
        cells = []
        for key in self._custom_keys:
            if key in cleaned:
                cells.append(cleaned[key])
            else:
                value = custom.get(key)
                cells.append(value if isinstance(value, str) and key in self._plain_text else "")
        return cells


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

    def writerow(self, cells: Sequence[str], has_cr: bool | None = None) -> None:
        """``has_cr``: whether a cell holds a CR, when the caller knows already."""
        if has_cr is None:
            has_cr = "\r" in "".join(cells)
        if not has_cr:
            self._plain.writerow(cells)
            return
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(cells)
        self._text.write(buffer.getvalue()[:-2] + LINE_TERMINATOR)


class PartWriter:
    """One part's rows, kept as cells until :meth:`finish` writes its CSV, plus who is in it.

    A part holds at most ``bulk.MAX_CHUNK_SIZE`` rows, so memory stays flat
    whatever the size of the export. :meth:`finish` writes the file once, in a
    temporary file, with the columns ``keep`` selects: "filled" (those at least
    one row fills, plus :data:`ALWAYS_KEPT`) or an explicit list, in its order.
    (Writing every column first and rewriting the file without the empty ones
    took a quarter of an export's time.)
    """

    def __init__(self, columns: list[str], keep: str | Sequence[str] = "filled") -> None:
        self.columns = columns
        self.keep = keep
        #: The cells of each data row, in file order (all ``str``: the encoder joins them).
        self.rows: list[list[str]] = []
        #: Positions in ``rows`` of the rows holding a CR (written with CRLF quoting).
        self._with_cr: set[int] = set()
        #: (customer pk, e-mail) of each data row, in file order.
        self.members: list[tuple[int, str]] = []
        self._file: TemporaryUploadedFile | None = None

    def __len__(self) -> int:
        return len(self.members)

    def add(self, pk: int, cells: list[str], has_cr: bool | None = None) -> None:
        if has_cr is None:
            has_cr = "\r" in "".join(cells)
        if has_cr:
            self._with_cr.add(len(self.rows))
        self.rows.append(cells)
        self.members.append((pk, cells[0]))

    @property
    def write_plain(self) -> Any:
        """Adds the cells of a row known to hold no CR (the export's hot loop); the caller
        appends the row's member to :attr:`members` itself."""
        return self.rows.append

    def duplicates(self) -> bool:
        """Whether an e-mail is in the part twice (a row seen twice by the database scan)."""
        return len({email for _pk, email in self.members}) != len(self.members)

    def keep_only(self, emails: set[str]) -> None:
        """Keep only the rows whose e-mail is in ``emails``, each once."""
        rows: list[list[str]] = []
        kept: list[tuple[int, str]] = []
        with_cr: set[int] = set()
        seen: set[str] = set()
        for n, (member, cells) in enumerate(zip(self.members, self.rows, strict=True)):
            if member[1] in emails and member[1] not in seen:
                seen.add(member[1])
                if n in self._with_cr:
                    with_cr.add(len(rows))
                rows.append(cells)
                kept.append(member)
        self.rows, self.members, self._with_cr = rows, kept, with_cr

    def _chosen(self) -> list[int]:
        """Positions of the columns the file keeps (see the class)."""
        names = self.columns
        if not isinstance(self.keep, str):
            return [names.index(name) for name in self.keep if name in names]
        rows = self.rows
        # A cell is a str: empty is the only falsy value. any() stops at the first
        # filled row, so a column costs a scan only when no row fills it.
        return [
            n
            for n, name in enumerate(names)
            if name in ALWAYS_KEPT or any(map(operator.itemgetter(n), rows))
        ]

    def finish(self) -> File:
        """The finished file, rewound, for ``storage.save()`` (the caller closes it).

        A file on disk with ``temporary_file_path()``: FileSystemStorage moves it
        into place instead of copying it.
        """
        chosen = self._chosen()
        rows: Iterable[Sequence[str]] = self.rows
        if chosen != list(range(len(self.columns))):
            pick = operator.itemgetter(*chosen)
            if len(chosen) == 1:
                rows = [[cells[chosen[0]]] for cells in self.rows]
            else:
                rows = map(pick, self.rows)
            self.columns = [self.columns[n] for n in chosen]
        self._file = _temporary()
        raw = _unwrapped(self._file)
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = _RowWriter(text)
        writer.writerow(self.columns)
        if not self._with_cr:
            writer._plain.writerows(rows)
        else:
            with_cr = self._with_cr
            for n, cells in enumerate(rows):
                writer.writerow(cells, n in with_cr)
        text.flush()
        text.detach()  # never closed: closing the wrapper would close the file under it
        self.rows = []  # written: the part's cells are not needed any more
        self._file.seek(0)
        self._file.size = os.fstat(raw.fileno()).st_size
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _unwrapped(upload: TemporaryUploadedFile) -> IO[bytes]:
    # The real file under tempfile's wrapper, whose __getattr__ would run on every write.
    return cast(IO[bytes], getattr(upload.file, "file", upload.file))


def _temporary() -> TemporaryUploadedFile:
    # In FILE_UPLOAD_TEMP_DIR; removed on close() unless the storage moved it away.
    return TemporaryUploadedFile("part.csv", "text/csv", 0, "utf-8")


def read_rows(fileobj: IO[bytes]) -> Iterator[tuple[int, list[str], list[str]]]:
    """``(row_number, header, cells)`` of a stored part; row numbers count the header as 1.

    Record numbers, not line numbers: a quoted cell may hold a newline.
    """
    reader = csv.reader(io.TextIOWrapper(fileobj, encoding="utf-8", newline=""))
    columns = next(reader, [])
    for row_number, cells in enumerate(reader, start=2):
        if cells:
            yield row_number, columns, cells


def read_header(fileobj: IO[bytes]) -> Iterator[list[str]]:
    """The header row of a stored part (one item; none for an empty file)."""
    reader = csv.reader(io.TextIOWrapper(fileobj, encoding="utf-8", newline=""))
    columns = next(reader, None)
    if columns is not None:
        yield columns
