"""The import and reconciliation pages as a marketing operator reads them:
encodings in words, SATORI's item names instead of our keys, and never a
command-line option in the page text (the browser side is in test_browser_pages.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import translation

from django_satori.admin_import import encoding_label, field_label
from django_satori.importing import import_export
from django_satori.models import Customer, ImportRun
from tests.importfiles import export_row, write_export
from tests.test_importing import admin_urls  # the import pages on an admin site of their own

pytestmark = pytest.mark.django_db

#: What a web user must not be told: options of manage.py commands.
COMMAND_LINE = re.compile(r"(?<![\w-])--[a-z][\w-]*|manage\.py|satori_import")


def visible_text(html: str) -> str:
    """The page text a user reads: no tags, scripts or styles."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def options(html: str, name: str) -> list[tuple[str, str]]:
    select = re.search(rf'<select name="{name}".*?</select>', html, re.S)
    assert select, f"no <select name={name}>"
    return [
        (value, re.sub(r"\s+", " ", text).strip())
        for value, text in re.findall(r'<option value="([^"]*)"[^>]*>(.*?)</option>', select[0])
    ]


def plant(tmp_path: Path) -> None:
    """Two imported customers whose local values then differ from SATORI's."""
    import_export(write_export(tmp_path / "plant.csv", [export_row(1), export_row(2)]))
    Customer.objects.filter(email="user1@example.jp").update(lead_company_name="別会社")
    Customer.objects.filter(email="user2@example.jp").update(
        custom_fields={"custom:plan": "silver", "custom:birthday": "1991-01-01"}
    )


@pytest.fixture
def sandbox(satori_sandbox):
    yield satori_sandbox
    assert satori_sandbox.state.requests == [], "an import page sent something to SATORI"


@admin_urls
@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", [("auto", "Detect automatically"), ("utf-8", "UTF-8"), ("cp932", "Shift_JIS")]),
        ("ja", [("auto", "自動判定"), ("utf-8", "UTF-8"), ("cp932", "Shift_JIS")]),
    ],
)
def test_the_upload_form_offers_encodings_in_words(admin_client, language, expected):
    with translation.override(language):
        html = admin_client.get("/admin/import/", HTTP_ACCEPT_LANGUAGE=language).content.decode()
    assert options(html, "encoding") == expected
    assert not COMMAND_LINE.search(visible_text(html)), COMMAND_LINE.search(visible_text(html))


@admin_urls
@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("en", "Choose Shift_JIS under Encoding and upload the file again."),
        ("ja", "「文字コード」で Shift_JIS を選び、もう一度アップロードしてください。"),
    ],
)
def test_a_wrong_encoding_says_what_to_choose_on_the_page_not_which_flag(
    tmp_path, sandbox, admin_client, language, expected
):
    path = write_export(tmp_path / "e.csv", [export_row(i) for i in range(3)], encoding="cp932")
    with translation.override(language), open(path, "rb") as upload:
        page = admin_client.post(
            "/admin/import/",
            {"file": upload, "encoding": "utf-8", "columns": ""},
            HTTP_ACCEPT_LANGUAGE=language,
        )
    text = visible_text(page.content.decode())
    assert page.status_code == 200 and not ImportRun.objects.exists()
    assert expected in text
    assert not COMMAND_LINE.search(text), COMMAND_LINE.search(text)


def test_the_command_still_names_its_option(tmp_path, sandbox):
    path = write_export(tmp_path / "e.csv", [export_row(i) for i in range(3)], encoding="cp932")
    with pytest.raises(CommandError) as caught:
        call_command("satori_import", str(path), "--encoding", "utf-8")
    assert "Run again with --encoding cp932." in str(caught.value)


@admin_urls
def test_the_import_pages_show_the_encoding_in_words_and_no_command(
    tmp_path, sandbox, admin_client
):
    path = write_export(tmp_path / "e.csv", [export_row(1)], encoding="cp932")
    with open(path, "rb") as upload:
        dry = admin_client.post(
            "/admin/import/", {"file": upload, "encoding": "auto", "dry_run": "on", "columns": ""}
        )
    summary = visible_text(dry.content.decode())
    assert "Encoding Shift_JIS" in summary and "cp932" not in summary

    with open(path, "rb") as upload:
        done = admin_client.post("/admin/import/", {"file": upload, "encoding": "auto"})
    run = ImportRun.objects.get()
    # A run with more skipped rows than it keeps (the page used to send the user to manage.py).
    ImportRun.objects.filter(pk=run.pk).update(
        skipped_count=500, skipped_rows=[{"line": 2, "email": "x", "reason": "bad"}]
    )
    detail = visible_text(admin_client.get(done.url).content.decode())
    assert re.search(r"encoding Shift_JIS rows read", detail), detail
    assert "The first 1 skipped rows are listed; 500 were skipped in all." in detail
    for url in ("/admin/import/", done.url, "/admin/import/report/"):
        text = visible_text(admin_client.get(url).content.decode())
        assert not COMMAND_LINE.search(text), (url, COMMAND_LINE.search(text))


@admin_urls
@pytest.mark.parametrize(
    ("language", "company", "plan", "birthday"),
    [
        ("en", "Company", "Plan", "birthday (custom field)"),
        ("ja", "会社名", "Plan", "birthday（カスタム項目）"),
    ],
)
def test_the_reconciliation_names_items_as_satori_does(
    tmp_path, sandbox, admin_client, language, company, plan, birthday
):
    plant(tmp_path)
    custom = {**settings.SATORI["CUSTOM_FIELDS"], "plan": {"type": "text", "label": "Plan"}}
    with (
        override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": custom}),
        translation.override(language),
    ):
        page = admin_client.get("/admin/import/report/", HTTP_ACCEPT_LANGUAGE=language)
    html = page.content.decode()
    cells = re.findall(r'<td class="satori-field">(.*?)</td>', html)
    assert sorted(cells) == sorted([company, plan, birthday])
    by_item = visible_text(re.search(r'<p id="by-field">.*?</p>', html, re.S)[0])
    assert company in by_item and plan in by_item
    text = visible_text(html)
    for key in ("lead_company_name", "custom:plan", "custom:birthday"):
        assert key not in text


@pytest.mark.parametrize(
    ("key", "en", "ja"),
    [
        ("lead_company_name", "Company", "会社名"),
        ("last_name", "Last name", "苗字"),
        ("tags", "Tags", "タグ"),
        ("custom:plan", "plan (custom field)", "plan（カスタム項目）"),
        ("not_an_item", "not_an_item", "not_an_item"),
    ],
)
def test_field_labels(key: str, en: str, ja: str) -> None:
    with translation.override("en"):
        assert field_label(key) == en
    with translation.override("ja"):
        assert field_label(key) == ja


def test_encoding_labels() -> None:
    labels: dict[str, Any] = {code: encoding_label(code) for code in ("utf-8", "cp932", "x")}
    assert labels == {"utf-8": "UTF-8", "cp932": "Shift_JIS", "x": "x"}
    with translation.override("ja"):
        assert encoding_label("utf-8-sig") == "UTF-8（BOM付き）"
