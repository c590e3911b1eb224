"""Importing the customer CSV that SATORI's admin screen exports.

SATORI's API cannot read customers back, so that export is the only way to
learn what SATORI already holds. Importing it:

* links every row to the local :class:`~django_satori.models.Customer` with
  the same normalised e-mail, or creates one (without ``save()``, so nothing
  is queued for sending);
* records on the customer's :class:`~django_satori.models.SyncState` that
  SATORI has it (``in_satori``), its ``hashcode`` and the values SATORI holds
  (``remote_values``), which the reconciliation report compares;
* never calls SATORI, and never changes an existing customer's data.

The file is streamed: bytes are split into lines, each line is decoded on
its own (so a bad byte sequence is reported with its line number), and
``csv.reader`` runs over those lines. Rows are applied in batches, each in
its own transaction, after every row of the batch has been checked; a bad
row is listed as skipped with its reason and never costs its batch.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import hashlib
import io
import re
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from .conf import SatoriSettings, get_settings
from .exceptions import SatoriValidationError
from .models import (
    Customer,
    ImportedCustomer,
    ImportRun,
    ImportRunStatus,
    Operation,
    SyncState,
    SyncStatus,
)
from .rawsql import analyze, insert_rows, pairs_in
from .schema import CUSTOM_PREFIX, STANDARD_FIELDS, custom_field_type, normalize_email
from .sync import outbox

#: ``--encoding`` choices. ``cp932`` is Windows-31J, the Shift_JIS that Japanese Windows writes.
ENCODINGS: tuple[str, ...] = ("auto", "utf-8", "utf-8-sig", "cp932")
#: Bytes looked at to detect (or check) the encoding; the rest is streamed.
SAMPLE_BYTES = 4 * 1024 * 1024
BATCH_SIZE = 1000
#: Rows per ``IN (...)`` lookup: below every backend's parameter limit.
_LOOKUP_CHUNK = 500
_BATCH_ATTEMPTS = 3

#: Keys a column can map to (besides ``custom:<identifier>``). ``tags`` is the
#: export's column of current tags; ``append_tags``/``delete_tags`` are send-only.
IMPORT_KEYS: tuple[str, ...] = (
    *(k for k in STANDARD_FIELDS if k not in ("append_tags", "delete_tags")),
    "tags",
)

#: Japanese column labels the admin screen may write, mapped to our keys.
#: None of them is confirmed by a real export (docs/importing.md lists them as
#: assumed); the English API keys are what SATORI is known to write.
JAPANESE_HEADERS: dict[str, str] = {
    "メールアドレス": "email",
    "ハッシュコード": "hashcode",
    "姓": "last_name",
    "苗字": "last_name",
    "名": "first_name",
    "名前": "first_name",
    "姓(ふりがな)": "last_name_reading",
    "苗字ふりがな": "last_name_reading",
    "セイ": "last_name_reading",
    "名(ふりがな)": "first_name_reading",
    "名前ふりがな": "first_name_reading",
    "メイ": "first_name_reading",
    "会社名": "lead_company_name",
    "企業名": "lead_company_name",
    "部署": "department",
    "部署名": "department",
    "電話番号": "phone_number",
    "携帯電話番号": "mobile_phone_number",
    "住所": "address",
    "メモ": "memo",
    "情報獲得経路": "collection_route",
    "情報獲得日": "collection_date",
    "配信許可": "delivery_permission",
    "メール配信可否": "delivery_permission",
    "メール配信許可": "delivery_permission",
    "タグ": "tags",
}

_DATE_RE = re.compile(r"^(\d{4})[/-](\d{1,2})[/-](\d{1,2})(?:[ T]\d{1,2}:\d{2}(?::\d{2})?)?$")
_TEXT_FIELDS_MAX: dict[str, int] = {
    f.name: f.max_length
    for f in Customer._meta.concrete_fields
    if f.max_length and f.name in IMPORT_KEYS
}


class ImportFileError(Exception):
    """The file cannot be imported. ``line`` when known; ``suggested_encoding`` (an
    :data:`ENCODINGS` value) when another encoding would read it.

    Raised before anything is written, except for a file cut by a quote that is
    never closed: that is found only at the end, after the rows before it were
    applied; the message says how many rows were read.

    The message names no command-line option: the admin shows it to operators, and
    the management command adds its ``--encoding`` hint itself.
    """

    def __init__(
        self, message: str, *, line: int | None = None, suggested_encoding: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.suggested_encoding = suggested_encoding

    def __str__(self) -> str:
        if self.line is None:
            return self.message
        return _("line %(line)d: %(message)s") % {"line": self.line, "message": self.message}


class RowError(Exception):
    """One row cannot be imported; it is skipped with this reason."""


@dataclass(frozen=True)
class SkippedRow:
    line: int
    email: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "email": self.email, "reason": self.reason}


@dataclass(frozen=True)
class IgnoredColumn:
    column: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"column": self.column, "reason": self.reason}


@dataclass
class ImportResult:
    """What an import did (or, for a dry run, would do)."""

    encoding: str
    dry_run: bool
    #: Header as written -> our key, for the columns used.
    columns: dict[str, str] = field(default_factory=dict)
    ignored_columns: list[IgnoredColumn] = field(default_factory=list)
    rows: int = 0
    #: New local customers, made from the export's values.
    created: int = 0
    #: Existing local customers not known in SATORI before (now ``in_satori``).
    linked: int = 0
    #: Existing local customers already known in SATORI; their remote values refreshed.
    refreshed: int = 0
    #: Hashcodes stored where we had none or a different one.
    hashcodes: int = 0
    #: Linked customers whose last push was refused as "not in SATORI".
    were_not_in_satori: int = 0
    skipped_count: int = 0
    #: The first ``ImportRun.MAX_STORED_SKIPS`` skipped rows (``on_skip`` sees all).
    skipped: list[SkippedRow] = field(default_factory=list)
    run: ImportRun | None = None
    seconds: float = 0.0

    @property
    def applied(self) -> int:
        return self.created + self.linked + self.refreshed


@dataclass(slots=True)
class ExportRow:
    """One data row, checked and converted to API values."""

    line: int
    email: str
    hashcode: str
    #: Our keys -> values as SATORI holds them (tags as a list, dates ``YYYY-MM-DD``).
    values: dict[str, Any]


ProgressCallback = Callable[[ImportResult], None]
SkipCallback = Callable[[SkippedRow], None]


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _bad_lines(sample: bytes, encoding: str, *, complete: bool) -> tuple[list[int], int, int]:
    """Lines of ``sample`` that do not decode: (bad line numbers, lines, non-ASCII lines).

    Line endings are byte 0x0A in UTF-8 and in cp932 alike (never part of a
    multi-byte character), so lines can be split before decoding.
    """
    bad: list[int] = []
    non_ascii = 0
    number = 0
    lines = io.BytesIO(sample)  # one line at a time: no second copy of the sample
    for raw in iter(lines.readline, b""):
        if not complete and not raw.endswith(b"\n"):
            break  # cut by the sample's end
        number += 1
        if raw.isascii():
            continue
        non_ascii += 1
        codec = "utf-8-sig" if number == 1 and encoding == "utf-8-sig" else encoding
        try:
            raw.decode(codec)
        except UnicodeDecodeError:
            bad.append(number)
    return bad, number, non_ascii


def _label(encoding: str) -> str:
    return "Shift_JIS (cp932)" if encoding == "cp932" else "UTF-8"


def choose_encoding(
    stream: IO[bytes], requested: str = "auto", sample_size: int | None = None
) -> str:
    """Detect (``auto``) or check the encoding from the start of ``stream``.

    BOM -> ``utf-8-sig``; a sample that is valid UTF-8 -> ``utf-8``; otherwise
    the codec with fewer undecodable lines (SATORI writes UTF-8 or Shift_JIS).
    A file whose non-ASCII lines mostly fail is refused as "wrong encoding";
    a few bad lines are left to the import, which skips those rows.
    The stream is put back where it was.
    """
    if requested not in ENCODINGS:
        raise ImportFileError(
            _("Unknown encoding %(name)r; use one of: %(choices)s.")
            % {"name": requested, "choices": ", ".join(ENCODINGS)}
        )
    sample_size = sample_size or SAMPLE_BYTES
    start = stream.tell()
    sample = stream.read(sample_size)
    stream.seek(start)
    complete = len(sample) < sample_size
    if requested == "auto":
        if sample.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"
        else:
            utf8 = _bad_lines(sample, "utf-8", complete=complete)[0]
            cp932 = _bad_lines(sample, "cp932", complete=complete)[0] if utf8 else []
            encoding = "cp932" if utf8 and len(cp932) < len(utf8) else "utf-8"
    else:
        encoding = requested
        if encoding == "utf-8" and sample.startswith(codecs.BOM_UTF8):
            encoding = "utf-8-sig"  # a BOM is never data: don't let it into the first header
    bad, _lines, non_ascii = _bad_lines(sample, encoding, complete=complete)
    if bad and (bad[0] == 1 or len(bad) * 2 > non_ascii):
        hint = "cp932" if encoding.startswith("utf-8") else "utf-8"
        raise ImportFileError(
            ngettext(
                "The file is not valid %(encoding)s (%(count)d undecodable line in the "
                "first part of the file); it is probably %(hint)s.",
                "The file is not valid %(encoding)s (%(count)d undecodable lines in the "
                "first part of the file); it is probably %(hint)s.",
                len(bad),
            )
            % {"encoding": _label(encoding), "count": len(bad), "hint": _label(hint)},
            line=bad[0],
            suggested_encoding=hint,
        )
    return encoding


class _Lines:
    """Decoded lines of a binary stream; remembers the numbers of undecodable lines.

    A line with bad bytes is decoded with replacement characters so that the
    CSV structure survives, and the row it belongs to is skipped later.
    """

    def __init__(self, stream: IO[bytes], encoding: str) -> None:
        self.stream = stream
        self.encoding = encoding
        self.number = 0
        self.bad: deque[int] = deque()
        #: Set once the last line was handed out: a CSV error then is the end of the file.
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        codec = self.encoding
        for raw in iter(self.stream.readline, b""):
            self.number += 1
            try:
                text = raw.decode(codec)
            except UnicodeDecodeError:
                self.bad.append(self.number)
                text = raw.decode(codec, "replace")
            if codec == "utf-8-sig":
                codec = "utf-8"  # only the first line can start with the BOM
            yield text
        self.exhausted = True

    def bad_between(self, first: int, last: int) -> int | None:
        """The first undecodable line in ``first..last``; forgets lines up to ``last``."""
        found = None
        while self.bad and self.bad[0] <= last:
            number = self.bad.popleft()
            if number >= first and found is None:
                found = number
        return found


@dataclass(slots=True)
class _Record:
    first_line: int
    values: list[str] | None
    error: str = ""
    #: A quoted value opened on ``first_line`` is never closed: every line up to the
    #: end of the file went into it, so nothing from there on can be read as rows.
    cut: bool = False


def _records(lines: _Lines) -> Iterator[_Record]:
    """CSV records with the physical line they start on (quoted newlines span lines)."""
    reader = csv.reader(lines, strict=True)
    previous = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            first, previous = previous + 1, reader.line_num
            lines.bad_between(first, previous)
            if lines.exhausted:
                # csv reached the end inside quotes ("unexpected end of data"): the
                # rest of the file was swallowed as one value, not one bad row.
                yield _Record(first, None, _cut_message(first, lines.number), cut=True)
                return
            error = _("malformed CSV (%(error)s)") % {"error": exc}
            if previous > first:
                # A stray quote ran on to a later line's quote: the rows on the lines
                # between went into this one record, and are lost with it.
                error = _("%(error)s; lines %(first)d to %(last)d were read as this one row") % {
                    "error": error,
                    "first": first,
                    "last": previous,
                }
            yield _Record(first, None, error)
            continue
        first, previous = previous + 1, reader.line_num
        bad = lines.bad_between(first, previous)
        if bad is not None:
            yield _Record(
                first,
                None,
                _("line %(line)d holds bytes that are not valid %(encoding)s")
                % {"line": bad, "encoding": _label(lines.encoding)},
            )
        elif values:  # blank lines are not rows
            yield _Record(first, values)


def _cut_message(first: int, last: int) -> str:
    lines = last - first + 1
    return ngettext(
        "a quoted value starts here and is never closed, so the file is cut here: the "
        "%(lines)d line from here to the end of the file (line %(last)d) was not read",
        "a quoted value starts here and is never closed, so the file is cut here: the "
        "%(lines)d lines from here to the end of the file (line %(last)d) were not read",
        lines,
    ) % {"lines": lines, "last": last}


# --------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------


def _header_key(
    name: str, conf: SatoriSettings, extra: Mapping[str, str]
) -> tuple[str | None, str]:
    """Our key for one header cell, or (None, why it is ignored)."""
    text = unicodedata.normalize("NFKC", name).strip()
    if name in extra:
        return extra[name], ""
    if text in extra:
        return extra[text], ""
    lowered = text.lower()
    if lowered in IMPORT_KEYS:
        return lowered, ""
    if lowered.startswith(CUSTOM_PREFIX):
        identifier = text[len(CUSTOM_PREFIX) :].strip()
        if identifier in conf.CUSTOM_FIELDS:
            return CUSTOM_PREFIX + identifier, ""
        return None, _("custom field not declared in SATORI['CUSTOM_FIELDS']")
    if text in JAPANESE_HEADERS:
        return JAPANESE_HEADERS[text], ""
    return None, _("unknown column")


def map_header(
    header: list[str], conf: SatoriSettings | None = None, extra: Mapping[str, str] | None = None
) -> tuple[list[str | None], dict[str, str], list[IgnoredColumn]]:
    """Map header cells to our keys: (key per column, used columns, ignored columns).

    ``extra`` maps further header names (for example a custom field's
    Japanese label) to keys. A key given by two columns is taken from the first.
    """
    conf = conf or get_settings()
    extra = dict(extra or {})
    for target in extra.values():
        if not _valid_target(target, conf):
            raise ImportFileError(
                _(
                    "Column mapping target %(key)r is not a customer item or a declared custom "
                    "field."
                )
                % {"key": target}
            )
    keys: list[str | None] = []
    used: dict[str, str] = {}
    ignored: list[IgnoredColumn] = []
    taken: dict[str, str] = {}
    for position, name in enumerate(header, start=1):
        shown = name.strip() or _("(column %(n)d, no name)") % {"n": position}
        key, reason = _header_key(name, conf, extra) if name.strip() else (None, _("no name"))
        if key is not None and key in taken:
            reason = _("same item as column %(name)r") % {"name": taken[key]}
            key = None
        keys.append(key)
        if key is None:
            ignored.append(IgnoredColumn(shown, reason))
        else:
            taken[key] = shown
            used[shown] = key
    if "email" not in taken:
        raise ImportFileError(
            _("No e-mail column: the header needs 'email' (or 'メールアドレス'). Found: %(found)s.")
            % {"found": ", ".join(h.strip() for h in header)[:500]},
            line=1,
        )
    return keys, used, ignored


def _valid_target(key: str, conf: SatoriSettings) -> bool:
    if key.startswith(CUSTOM_PREFIX):
        return key[len(CUSTOM_PREFIX) :] in conf.CUSTOM_FIELDS
    return key in IMPORT_KEYS


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def parse_export_date(value: str) -> str:
    """``YYYY/MM/DD`` or ``YYYY-MM-DD`` (a time part is dropped) -> ``YYYY-MM-DD``; '' stays ''."""
    text = unicodedata.normalize("NFKC", value).strip()
    if not text:
        return ""
    match = _DATE_RE.match(text)
    if match:
        try:
            return dt.date(*(int(part) for part in match.groups())).isoformat()
        except ValueError:
            pass
    raise RowError(_("%(value)r is not a date (YYYY/MM/DD or YYYY-MM-DD)") % {"value": text[:40]})


def parse_tags(value: str, separator: str) -> list[str]:
    """The export's tag cell -> tag names (separated by TAG_SEPARATOR or line breaks)."""
    parts = re.split("|".join(map(re.escape, (separator, "\r\n", "\n", "\r"))), value)
    tags: list[str] = []
    for part in parts:
        tag = part.strip()
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def delivery_permission(value: str, labels: Mapping[str, str]) -> str:
    """A display label (許可/拒否) or API value -> ``approval``/``reject``; '' stays ''."""
    text = value.strip()
    if not text:
        return ""
    if text in labels:
        return labels[text]
    folded = unicodedata.normalize("NFKC", text).lower()
    for label, api_value in labels.items():
        if unicodedata.normalize("NFKC", label).lower() == folded:
            return api_value
    raise RowError(
        _(
            "delivery permission %(value)r is not one of %(labels)s "
            "(see SATORI['DELIVERY_PERMISSION_LABELS'])"
        )
        % {"value": text[:40], "labels": ", ".join(labels)}
    )


class RowConverter:
    """Checks and converts records of one file; the per-column work is planned once."""

    def __init__(self, keys: list[str | None], conf: SatoriSettings) -> None:
        self.width = len(keys)
        self.email_at = keys.index("email")
        self.hashcode_at = keys.index("hashcode") if "hashcode" in keys else None
        self.plan: list[tuple[int, str, Callable[[str], Any]]] = [
            (position, key, self._converter(key, conf))
            for position, key in enumerate(keys)
            if key is not None and key not in ("email", "hashcode")
        ]

    @staticmethod
    def _converter(key: str, conf: SatoriSettings) -> Callable[[str], Any]:
        if key == "tags":
            separator = conf.TAG_SEPARATOR
            return lambda raw: parse_tags(raw, separator)
        if key == "collection_date":
            return parse_export_date
        if key == "delivery_permission":
            labels = conf.DELIVERY_PERMISSION_LABELS
            return lambda raw: delivery_permission(raw, labels)
        if key.startswith(CUSTOM_PREFIX):
            kind, _choices = custom_field_type(conf.CUSTOM_FIELDS[key[len(CUSTOM_PREFIX) :]])
            if kind == "date":
                return parse_export_date
            if kind == "integer":
                return lambda raw: unicodedata.normalize("NFKC", raw).strip()
            return str
        limit = _TEXT_FIELDS_MAX.get(key)
        if not limit:
            return str

        def text(raw: str) -> str:
            if len(raw) > limit:
                raise RowError(
                    _("%(key)s is longer than %(max)d characters") % {"key": key, "max": limit}
                )
            return raw

        return text

    def __call__(self, line: int, record: list[str]) -> ExportRow:
        """Check one record and convert it; raises :class:`RowError` with the reason."""
        if len(record) != self.width:
            raise RowError(
                _("expected %(expected)d columns, found %(found)d")
                % {"expected": self.width, "found": len(record)}
            )
        if any("\x00" in raw for raw in record):
            # PostgreSQL refuses NUL in text; found here, it costs one row, not a batch.
            raise RowError(_("the row contains a NUL character"))
        raw_email = record[self.email_at]
        try:
            email = normalize_email(raw_email)
        except SatoriValidationError as exc:
            raise RowError(
                _("e-mail %(value)r: %(error)s")
                % {"value": raw_email.strip()[:80], "error": exc.message}
            ) from None
        hashcode = ""
        if self.hashcode_at is not None:
            hashcode = record[self.hashcode_at].strip()
            if len(hashcode) > 128:
                raise RowError(_("the hashcode is longer than 128 characters"))
        values = {key: convert(record[position]) for position, key, convert in self.plan}
        return ExportRow(line=line, email=email, hashcode=hashcode, values=values)


#: Customer columns an import writes; the others get their defaults.
_CUSTOMER_COLUMNS: tuple[str, ...] = (
    "email",
    "custom_fields",
    *(k for k in IMPORT_KEYS if k not in ("email", "hashcode")),
)


def customer_fields(row: ExportRow) -> dict[str, Any]:
    """Customer model field values for a customer created from ``row``.

    Columns missing from the export get the field's empty value.
    """
    fields: dict[str, Any] = {key: "" for key in _CUSTOMER_COLUMNS}
    fields.update(email=row.email, collection_date=None, tags=[])
    custom: dict[str, Any] = {}
    for key, value in row.values.items():
        if key.startswith(CUSTOM_PREFIX):
            if value != "":
                custom[key] = value
        elif key == "collection_date":
            fields[key] = dt.date.fromisoformat(value) if value else None
        else:
            fields[key] = value
    fields["custom_fields"] = custom
    return fields


# --------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------


def import_export(
    source: str | Path | IO[bytes],
    *,
    encoding: str = "auto",
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    columns: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    progress_every: int = 10_000,
    on_skip: SkipCallback | None = None,
    filename: str = "",
    started_by: Any = None,
) -> ImportResult:
    """Import SATORI's admin customer export from a path or a binary file object.

    Raises :class:`ImportFileError` (before anything is written) when the
    file cannot be read at all, and at the end when a quote that is never
    closed cut the file (the rows before it are applied; the run is marked
    failed). Otherwise every row is applied or skipped with its reason;
    ``on_skip`` is called for each skipped row as it is found.
    """
    if isinstance(source, str | Path):
        with open(source, "rb") as stream:
            return import_export(
                stream,
                encoding=encoding,
                dry_run=dry_run,
                batch_size=batch_size,
                columns=columns,
                progress=progress,
                progress_every=progress_every,
                on_skip=on_skip,
                filename=filename or Path(source).name,
                started_by=started_by,
            )
    conf = get_settings()
    started = time.monotonic()
    chosen = choose_encoding(source, encoding)
    lines = _Lines(source, chosen)
    records = _records(lines)
    header = next(records, None)
    if header is None:
        raise ImportFileError(_("The file is empty."))
    if header.values is None:
        raise ImportFileError(
            _("The header cannot be read: %(error)s") % {"error": header.error},
            line=header.first_line,
        )
    keys, used, ignored = map_header(header.values, conf, columns)
    result = ImportResult(encoding=chosen, dry_run=dry_run, columns=used, ignored_columns=ignored)
    convert_row = RowConverter(keys, conf)
    importer = _Importer(result, conf, on_skip, started_by=started_by, filename=filename)
    try:
        batch: dict[str, ExportRow] = {}
        next_report = progress_every
        for record in records:
            if record.cut:
                # Rows before the cut are whole: applied as usual, so the run's counts
                # say what happened; the run itself fails with the reason.
                if batch:
                    importer.apply(list(batch.values()))
                    batch = {}
                raise ImportFileError(
                    _(
                        "%(reason)s. Rows read before it: %(rows)d. Close the quote and import "
                        "the file again."
                    )
                    % {"reason": record.error, "rows": result.rows},
                    line=record.first_line,
                )
            result.rows += 1
            if record.values is None:
                importer.skip(record.first_line, "", record.error)
            else:
                try:
                    row = convert_row(record.first_line, record.values)
                except RowError as exc:
                    importer.skip(record.first_line, _email_guess(record.values, keys), str(exc))
                else:
                    earlier = batch.get(row.email)
                    if earlier is not None:
                        importer.skip(
                            row.line,
                            row.email,
                            _("same e-mail address as line %(line)d") % {"line": earlier.line},
                        )
                    else:
                        batch[row.email] = row
            if len(batch) >= batch_size:
                importer.apply(list(batch.values()))
                batch = {}
            if progress and progress_every and result.rows >= next_report:
                next_report += progress_every
                result.seconds = time.monotonic() - started
                progress(result)
        if batch:
            importer.apply(list(batch.values()))
    except BaseException as exc:
        importer.finish(failed=str(exc) or type(exc).__name__)
        raise
    result.seconds = time.monotonic() - started
    importer.finish()
    if not dry_run:
        # The reconciliation report queries these tables next.
        analyze(Customer, SyncState, ImportedCustomer)
    if progress:
        progress(result)
    return result


def _email_guess(record: list[str], keys: list[str | None]) -> str:
    """The raw e-mail cell of a bad row, to help find it; '' when there is none."""
    for key, value in zip(keys, record, strict=False):
        if key == "email":
            return value.strip()[:255]
    return ""


class _Importer:
    """Applies checked rows in batches and keeps the run's record."""

    def __init__(
        self,
        result: ImportResult,
        conf: SatoriSettings,
        on_skip: SkipCallback | None,
        *,
        started_by: Any,
        filename: str,
    ) -> None:
        self.result = result
        self.conf = conf
        self.on_skip = on_skip
        self.stamp = timezone.now()
        # Rows seen in earlier batches: a real run finds those it applied by
        # ``remote_seen_at`` (flat memory) and keeps digests of those it skipped; a dry
        # run writes nothing, so it keeps a digest of every row.
        self.seen_digests: set[bytes] = set()
        self.run: ImportRun | None = None
        if not result.dry_run:
            self.run = ImportRun.objects.create(
                filename=filename[:255],
                encoding=result.encoding,
                started_at=self.stamp,
                started_by=started_by if getattr(started_by, "pk", None) else None,
                unknown_columns=[c.as_dict() for c in result.ignored_columns],
            )
            result.run = self.run

    def skip(self, line: int, email: str, reason: str) -> None:
        skipped = SkippedRow(line, email, reason)
        self.result.skipped_count += 1
        if len(self.result.skipped) < ImportRun.MAX_STORED_SKIPS:
            self.result.skipped.append(skipped)
        if self.on_skip:
            self.on_skip(skipped)

    def apply(self, rows: list[ExportRow]) -> None:
        for attempt in range(1, _BATCH_ATTEMPTS + 1):
            try:
                with transaction.atomic():
                    counts, skips = self._apply(rows)
            except IntegrityError:
                # A customer with one of these addresses was created meanwhile: read again.
                if attempt == _BATCH_ATTEMPTS:
                    raise
                continue
            break
        for name, value in counts.items():
            setattr(self.result, name, getattr(self.result, name) + value)
        for row, reason in skips:
            self.skip(row.line, row.email, reason)
            if not self.result.dry_run:  # only now: a retried batch sees its rows afresh
                self.seen_digests.add(_email_digest(row.email))

    def _apply(self, rows: list[ExportRow]) -> tuple[dict[str, int], list[tuple[ExportRow, str]]]:
        emails = [row.email for row in rows]
        states: dict[str, Any] = {}
        customers: dict[str, int] = dict(pairs_in(Customer, "email", emails, "id"))
        for chunk in _chunks(emails):
            states.update(
                (s["email"], s)
                for s in SyncState.objects.filter(email__in=chunk).values(
                    "pk",
                    "email",
                    "customer_id",
                    "operation",
                    "status",
                    "in_satori",
                    "hashcode",
                    "remote_seen_at",
                )
            )
        hash_owner = self._hashcode_owners(rows)
        # A customer's sync state is one row; it may sit under an older address.
        stateless = [pk for email, pk in customers.items() if email not in states]
        elsewhere: dict[int, str] = {}
        for chunk in _chunks(stateless):
            elsewhere.update(
                SyncState.objects.filter(customer_id__in=chunk).values_list("customer_id", "email")
            )
        counts = dict.fromkeys(
            ("created", "linked", "refreshed", "hashcodes", "were_not_in_satori"), 0
        )
        skips: list[tuple[ExportRow, str]] = []
        new_rows: list[ExportRow] = []
        changed: list[dict[str, Any]] = []
        new_states: list[dict[str, Any]] = []
        for row in rows:
            state = states.get(row.email)
            reason = self._conflict(row, state, customers, hash_owner)
            if reason:
                skips.append((row, reason))
                continue
            pk = customers.get(row.email)
            if pk is not None and state is None and pk in elsewhere:
                skips.append(
                    (
                        row,
                        _(
                            "the local customer's sync state is kept under another "
                            "address (%(email)s); save the customer once, then import "
                            "again"
                        )
                        % {"email": elsewhere[pk]},
                    )
                )
                continue
            if pk is None:
                new_rows.append(row)
                continue
            if state is None:
                new_states.append(self._state(row, pk, tags=None))
                counts["linked"] += 1
                counts["hashcodes"] += bool(row.hashcode)
                continue
            counts["refreshed" if state["in_satori"] else "linked"] += 1
            counts["were_not_in_satori"] += state["status"] == SyncStatus.NOT_IN_SATORI
            hashcode = state["hashcode"]
            if row.hashcode and row.hashcode != hashcode:
                counts["hashcodes"] += 1
                hashcode = row.hashcode
            changed.append(
                {
                    "pk": state["pk"],
                    "in_satori": True,
                    "hashcode": hashcode,
                    "remote_values": row.values,
                    "remote_seen_at": self.stamp,
                    "customer_id": pk,
                }
            )
        counts["created"] = len(new_rows)
        counts["hashcodes"] += sum(1 for row in new_rows if row.hashcode)
        if self.result.dry_run:
            return counts, skips
        if new_rows:
            insert_rows(Customer, _CUSTOMER_COLUMNS, [customer_fields(row) for row in new_rows])
            pks = dict(pairs_in(Customer, "email", [row.email for row in new_rows], "id"))
            run_id = self.run.pk if self.run else None
            insert_rows(
                ImportedCustomer,
                ("customer_id", "run_id"),
                [{"customer_id": pks[row.email], "run_id": run_id} for row in new_rows],
            )
            new_states.extend(
                self._state(row, pks[row.email], tags=row.values.get("tags")) for row in new_rows
            )
        outbox.link_imported(new_states, self.stamp)
        outbox.record_seen(changed)
        return counts, skips

    def _conflict(
        self,
        row: ExportRow,
        state: dict[str, Any] | None,
        customers: dict[str, int],
        hash_owner: dict[str, str],
    ) -> str:
        """Why ``row`` cannot be applied, or ''."""
        digest = _email_digest(row.email)
        if digest in self.seen_digests or (
            state is not None and state["remote_seen_at"] == self.stamp
        ):
            return _("the same e-mail address appeared earlier in the file")
        if self.result.dry_run:
            self.seen_digests.add(digest)
        owner = hash_owner.get(row.hashcode) if row.hashcode else None
        if owner:
            return _(
                "SATORI's hashcode of this row belongs locally to %(email)s: the e-mail "
                "address was probably changed on one side; resolve it by hand"
            ) % {"email": owner}
        if row.email not in customers and state is not None and state["customer_id"] is None:
            if state["operation"] == Operation.DELETE:
                return _(
                    "this customer was deleted locally (sync status: %(status)s); it is "
                    "not re-created from the export"
                ) % {"status": SyncStatus(state["status"]).label}
            return _(
                "this address was replaced by a local e-mail change; the customer is "
                "not re-created from the export"
            )
        return ""

    def _hashcode_owners(self, rows: list[ExportRow]) -> dict[str, str]:
        """hashcode -> e-mail of a *different* local customer that holds it."""
        by_hash = {row.hashcode: row.email for row in rows if row.hashcode}
        owners: dict[str, str] = {}
        for hashcode, email in pairs_in(SyncState, "hashcode", list(by_hash), "email"):
            if by_hash[hashcode] != email:
                owners[hashcode] = email
        return owners

    def _state(self, row: ExportRow, customer_id: int, *, tags: list[str] | None) -> dict[str, Any]:
        return {
            "email": row.email,
            "customer_id": customer_id,
            "hashcode": row.hashcode,
            "remote_values": row.values,
            # A new customer holds SATORI's tags; a tag removed locally later must go
            # out as delete_tags, exactly as if we had sent it.
            "sent_tags": list(tags or []),
        }

    def finish(self, *, failed: str = "") -> None:
        if self.run is None:
            return
        result = self.result
        ImportRun.objects.filter(pk=self.run.pk).update(
            status=ImportRunStatus.FAILED if failed else ImportRunStatus.FINISHED,
            finished_at=timezone.now(),
            rows=result.rows,
            created_count=result.created,
            linked_count=result.linked,
            refreshed_count=result.refreshed,
            skipped_count=result.skipped_count,
            skipped_rows=[s.as_dict() for s in result.skipped],
            message=failed[:2000],
        )
        self.run.refresh_from_db()


def _email_digest(email: str) -> bytes:
    return hashlib.blake2b(email.encode(), digest_size=8).digest()


def _chunks(items: list[Any], size: int = _LOOKUP_CHUNK) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
