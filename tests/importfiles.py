"""SATORI admin-export CSV files, as ``satori_import`` reads them (standard library only).

Shared by the import tests (tests/test_importing.py) and the import benchmark
(bench/importing.py), so both read the same kind of file: CRLF line ends,
quoted where needed, a multi-line memo on every tenth row, Japanese values,
in the encodings and header styles SATORI's admin screen may write.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

KEYS = [
    "email",
    "hashcode",
    "last_name",
    "first_name",
    "last_name_reading",
    "first_name_reading",
    "lead_company_name",
    "department",
    "phone_number",
    "mobile_phone_number",
    "address",
    "memo",
    "collection_route",
    "collection_date",
    "delivery_permission",
    "tags",
    "custom:plan",
    "custom:birthday",
    "rank",
]
ENGLISH = {key: key for key in KEYS} | {"rank": "会員ランク"}
JAPANESE = {
    "email": "メールアドレス",
    "hashcode": "ハッシュコード",
    "last_name": "苗字",
    "first_name": "名前",
    "last_name_reading": "苗字ふりがな",
    "first_name_reading": "名前ふりがな",
    "lead_company_name": "会社名",
    "department": "部署",
    "phone_number": "電話番号",
    "mobile_phone_number": "携帯電話番号",
    "address": "住所",
    "memo": "メモ",
    "collection_route": "情報獲得経路",
    "collection_date": "情報獲得日",
    "delivery_permission": "メール配信可否",
    "tags": "タグ",
    "custom:plan": "custom:plan",
    "custom:birthday": "custom:birthday",
    "rank": "会員ランク",
}


def export_row(i: int, **changes: str) -> dict[str, str]:
    """One customer as SATORI's admin export writes it (display values)."""
    row = {
        "email": f"user{i}@example.jp",
        "hashcode": f"h{i:010d}",
        "last_name": "山田",
        "first_name": f"太郎{i}",
        "last_name_reading": "やまだ",
        "first_name_reading": "たろう",
        "lead_company_name": "株式会社ＳＡＴＯＲＩ",
        "department": "営業部",
        "phone_number": "03-1234-5678",
        "mobile_phone_number": "",
        "address": "東京都渋谷区神南1-2-3",
        "memo": "一行目\r\n二行目" if i % 10 == 0 else "",
        "collection_route": "[お問い合わせ]自社サイト",
        "collection_date": "2024/01/05",
        "delivery_permission": "許可" if i % 3 else "拒否",
        "tags": "展示会,資料請求",
        "custom:plan": "gold",
        "custom:birthday": "1990/02/03",
        "rank": "A",
    }
    row.update(changes)
    return row


def write_export(
    target: Path,
    rows: Iterable[dict[str, str]],
    *,
    encoding: str = "utf-8",
    labels: dict[str, str] = ENGLISH,
    keys: list[str] = KEYS,
) -> Path:
    """Write an export like SATORI's admin screen: CRLF, quoted where needed."""
    with open(target, "w", encoding=encoding, newline="") as out:
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow([labels[k] for k in keys])
        for row in rows:
            writer.writerow([row[k] for k in keys])
    return target
