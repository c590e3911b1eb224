"""The bulk CSV API: checking an uploaded file, then applying its rows.

The file is checked as a whole when it arrives (encoding, header, size) and
refused with HTTP 400 if wrong; rows are checked one by one when the job's
processing time is over, and each bad row is reported by its record number
(the header is row 1), which is not its line number when a quoted cell holds
a newline.
"""

from __future__ import annotations

import csv
import io
import time

from .config import SandboxConfig
from .rules import CustomerInput, SandboxError, bad, check_header_item, parse_customer
from .state import BulkJob, SandboxState

MAX_DATA_ROWS = 10_000
FILE_FIELD = "customer_csv_file"
_BOM = b"\xef\xbb\xbf"


def parse_csv(
    data: bytes, identity_type: str, config: SandboxConfig
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Return ``(header, [(row_number, cells), ...])`` or raise a 400 SandboxError."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(
            FILE_FIELD,
            f"CSVファイルの文字コードはUTF-8にしてください (the file is not "
            f"valid UTF-8: bad byte at offset {exc.start})",
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    try:
        header = next(reader, None)
        if not header:
            raise bad(FILE_FIELD, "ヘッダー行がありません (the file has no header row)")
        _check_header(header, identity_type, config)
        for row_number, cells in enumerate(reader, start=2):
            if not cells:  # a blank line: nothing to apply, but it is still a record
                continue
            records.append((row_number, cells))
            if len(records) > MAX_DATA_ROWS:
                raise bad(
                    FILE_FIELD,
                    f"1リクエストあたり{MAX_DATA_ROWS}件までです "
                    f"(more than {MAX_DATA_ROWS} data rows)",
                )
    except csv.Error as exc:
        raise bad(
            FILE_FIELD,
            f"CSVの形式が正しくありません (malformed CSV near line {reader.line_num}: {exc})",
        ) from None
    if not records:
        raise bad(FILE_FIELD, "データ行がありません (the file has no data rows)")
    return header, records


def _check_header(header: list[str], identity_type: str, config: SandboxConfig) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise bad(name, "ヘッダーが重複しています (duplicate column)")
        seen.add(name)
        if name == "":
            raise bad(FILE_FIELD, "空のヘッダーがあります (empty column name)")
        check_header_item(name, name, config)
        if name in config.refused_columns:
            raise bad(name, "この項目は一括登録できません (column not accepted by the bulk API)")
    if identity_type in ("email", "hashcode") and identity_type not in seen:
        raise bad(
            identity_type,
            f"identity_type が {identity_type} の場合は必須の列です "
            f"(column required when identity_type is {identity_type})",
        )


def new_job(
    operation: str,
    identity_type: str,
    header: list[str],
    rows: list[tuple[int, list[str]]],
    user_key: str,
    config: SandboxConfig,
    process_code: str,
) -> BulkJob:
    now = time.time()
    return BulkJob(
        process_code=process_code,
        operation=operation,
        identity_type=identity_type,
        header=header,
        rows=rows,
        created_by=user_key,
        config=config,
        submitted_at=now,
        ready_at=now + config.bulk_processing_seconds,
    )


def _label(key: str) -> str:
    return key


def apply_job(state: SandboxState, job: BulkJob) -> None:
    """Apply every row (caller holds ``state.lock``); a failed row changes nothing."""
    seen: set[str] = set()
    for row_number, cells in job.rows:
        try:
            if len(cells) != len(job.header):
                raise bad(
                    FILE_FIELD,
                    f"列数がヘッダーと一致しません (expected {len(job.header)} "
                    f"columns, got {len(cells)})",
                )
            values = dict(zip(job.header, cells, strict=True))
            identity = values.get(job.identity_type, "")
            key = state.key(identity) if job.identity_type == "email" else identity
            if key and key in seen:
                raise bad(
                    job.identity_type,
                    "同じファイル内で重複しています (already in an earlier row of this file)",
                )
            if key:
                seen.add(key)
            data: CustomerInput = parse_customer(
                values,
                job.identity_type,
                job.config,
                label=_label,
                require_collection_route=True,
            )
            state.write_customer(job.operation, data, job.created_by, job.config, label=_label)
        except SandboxError as exc:
            job.failed_rows.append({"row_number": row_number, "message": exc.message})
        else:
            job.succeeded_rows.append({"row_number": row_number})
