"""Importing SATORI's admin customer export, and the reconciliation report.

The export files are generated here (``write_export``) in the encodings and
header styles SATORI's admin screen may use. Every test that imports runs
with the sandbox up, and checks that SATORI received nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.contrib import admin
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import path

from django_satori import importing, reconcile, sync
from django_satori.admin_import import import_urls
from django_satori.importing import ImportFileError, choose_encoding, import_export
from django_satori.models import (
    Customer,
    ImportedCustomer,
    ImportRun,
    ImportRunStatus,
    SyncLog,
    SyncState,
    SyncStatus,
)
from tests.syncing import drain
from tests.testapp.models import Member

pytestmark = pytest.mark.django_db

KEYS = ["email", "hashcode", "last_name", "first_name", "last_name_reading",
        "first_name_reading", "lead_company_name", "department", "phone_number",
        "mobile_phone_number", "address", "memo", "collection_route", "collection_date",
        "delivery_permission", "tags", "custom:plan", "custom:birthday", "rank"]
ENGLISH = {key: key for key in KEYS} | {"rank": "会員ランク"}
JAPANESE = {
    "email": "メールアドレス", "hashcode": "ハッシュコード", "last_name": "苗字",
    "first_name": "名前", "last_name_reading": "苗字ふりがな",
    "first_name_reading": "名前ふりがな", "lead_company_name": "会社名", "department": "部署",
    "phone_number": "電話番号", "mobile_phone_number": "携帯電話番号", "address": "住所",
    "memo": "メモ", "collection_route": "情報獲得経路", "collection_date": "情報獲得日",
    "delivery_permission": "メール配信可否", "tags": "タグ", "custom:plan": "custom:plan",
    "custom:birthday": "custom:birthday", "rank": "会員ランク",
}


def export_row(i: int, **changes: str) -> dict[str, str]:
    """One customer as SATORI's admin export writes it (display values)."""
    row = {
        "email": f"user{i}@example.jp", "hashcode": f"h{i:010d}", "last_name": "山田",
        "first_name": f"太郎{i}", "last_name_reading": "やまだ", "first_name_reading": "たろう",
        "lead_company_name": "株式会社ＳＡＴＯＲＩ", "department": "営業部",
        "phone_number": "03-1234-5678", "mobile_phone_number": "",
        "address": "東京都渋谷区神南1-2-3", "memo": "一行目\r\n二行目" if i % 10 == 0 else "",
        "collection_route": "[お問い合わせ]自社サイト", "collection_date": "2024/01/05",
        "delivery_permission": "許可" if i % 3 else "拒否", "tags": "展示会,資料請求",
        "custom:plan": "gold", "custom:birthday": "1990/02/03", "rank": "A",
    }
    row.update(changes)
    return row


def write_export(target: Path, rows: Iterable[dict[str, str]], *, encoding: str = "utf-8",
                 labels: dict[str, str] = ENGLISH, keys: list[str] = KEYS) -> Path:
    """Write an export like SATORI's admin screen: CRLF, quoted where needed."""
    with open(target, "w", encoding=encoding, newline="") as out:
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow([labels[k] for k in keys])
        for row in rows:
            writer.writerow([row[k] for k in keys])
    return target


def satori(**changes: Any) -> override_settings:
    return override_settings(SATORI={**settings.SATORI, **changes})


@pytest.fixture
def sandbox(satori_sandbox):
    """The sandbox; at the end of the test it must not have received a single request."""
    yield satori_sandbox
    assert satori_sandbox.state.requests == [], "the import sent something to SATORI"


def states() -> dict[str, SyncState]:
    return {s.email: s for s in SyncState.objects.all()}


# --------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("encoding", "labels", "expected"),
    [("utf-8-sig", JAPANESE, "utf-8-sig"), ("utf-8", ENGLISH, "utf-8"),
     ("cp932", JAPANESE, "cp932"), ("cp932", ENGLISH, "cp932")],
)
def test_import_creates_customers_and_records_what_satori_holds(
        tmp_path, sandbox, django_capture_on_commit_callbacks, encoding, labels, expected):
    rows = [export_row(0, email="ＵＳＥＲ０@Ｅｘａｍｐｌｅ.jp"), export_row(1),
            export_row(2, tags="", collection_date="", **{"custom:plan": ""})]
    path = write_export(tmp_path / "export.csv", rows, encoding=encoding, labels=labels)
    with django_capture_on_commit_callbacks() as callbacks:
        result = import_export(path)

    assert callbacks == []  # nothing was queued for sending
    assert result.encoding == expected
    assert (result.rows, result.created, result.linked, result.skipped_count) == (3, 3, 0, 0)
    assert [(c.column, c.reason) for c in result.ignored_columns] == [
        ("会員ランク", "unknown column")]
    taro = Customer.objects.get(email="user0@example.jp")  # full-width address normalised
    assert taro.last_name == "山田" and taro.first_name == "太郎0"
    assert taro.lead_company_name == "株式会社ＳＡＴＯＲＩ"  # only the e-mail is normalised
    assert taro.memo == "一行目\r\n二行目"  # the quoted line break survived
    assert taro.delivery_permission == "reject"  # 拒否
    assert taro.collection_date == dt.date(2024, 1, 5)
    assert taro.tags == ["展示会", "資料請求"]
    assert taro.custom_fields == {"custom:plan": "gold", "custom:birthday": "1990-02-03"}
    assert Customer.objects.get(email="user1@example.jp").delivery_permission == "approval"
    assert Customer.objects.get(email="user2@example.jp").tags == []

    state = SyncState.objects.get(email="user0@example.jp")
    assert state.customer_id == taro.pk
    assert state.status == SyncStatus.SYNCED and state.in_satori
    assert state.hashcode == "h0000000000"
    assert state.fingerprint == "" and state.version == state.synced_version == 0
    assert state.sent_tags == ["展示会", "資料請求"]
    assert state.remote_seen_at == result.run.started_at
    assert state.remote_values["delivery_permission"] == "reject"
    assert state.remote_values["collection_date"] == "2024-01-05"
    assert state.remote_values["custom:birthday"] == "1990-02-03"
    assert "email" not in state.remote_values and "hashcode" not in state.remote_values

    run = result.run
    assert run.status == ImportRunStatus.FINISHED and run.encoding == expected
    assert (run.rows, run.created_count, run.skipped_count) == (3, 3, 0)
    assert run.unknown_columns == [{"column": "会員ランク", "reason": "unknown column"}]
    assert ImportedCustomer.objects.filter(run=run).count() == 3
    assert not SyncLog.objects.exists()
    assert drain() == 0  # nothing pending for a worker either


def test_existing_customers_are_linked_without_touching_their_data(tmp_path, sandbox):
    known = Customer.objects.create(email="user1@example.jp", last_name="鈴木")
    with satori(SYNC_ENABLED=False):  # made by bulk tools: no sync state at all
        stateless = Customer.objects.create(email="user2@example.jp", first_name="花子")
    SyncState.objects.filter(email=known.email).update(status=SyncStatus.NOT_IN_SATORI)
    before = SyncState.objects.values("status", "version", "not_before").get(email=known.email)

    result = import_export(write_export(tmp_path / "e.csv", [export_row(1), export_row(2)]))

    assert (result.created, result.linked, result.refreshed) == (0, 2, 0)
    assert result.were_not_in_satori == 1
    known.refresh_from_db()
    assert known.last_name == "鈴木" and known.first_name == ""  # SATORI's values not copied
    assert Customer.objects.get(pk=stateless.pk).last_name == ""
    state = SyncState.objects.get(email=known.email)
    assert state.in_satori and state.hashcode == "h0000000001"
    assert state.remote_values["last_name"] == "山田"
    assert SyncState.objects.values("status", "version", "not_before").get(
        email=known.email) == before  # the outbox itself is left alone
    new_state = SyncState.objects.get(email=stateless.email)
    assert new_state.customer_id == stateless.pk and new_state.status == SyncStatus.SYNCED
    assert new_state.in_satori and new_state.sent_tags == []  # never sent by us
    assert not ImportedCustomer.objects.exists()

    again = import_export(write_export(tmp_path / "e2.csv", [export_row(1, hashcode="hNEW")]))
    assert (again.created, again.linked, again.refreshed, again.hashcodes) == (0, 0, 1, 1)
    assert SyncState.objects.get(email=known.email).hashcode == "hNEW"


@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_rows_are_skipped_with_their_line_and_reason(tmp_path, sandbox, dry_run):
    lines = [
        ",".join(KEYS),                                                   # 1
        _csv(export_row(0)),                                              # 2-3 (memo: 2 lines)
        _csv(export_row(1, email="not-an-e-mail")),                       # 4
        "user2@example.jp,h2,山田",                                        # 5
        _csv(export_row(3)),                                              # 6
        _csv(export_row(4, collection_date="2024/13/01")),                # 7
        _csv(export_row(5, delivery_permission="不明")),                  # 8
        _csv(export_row(6, last_name="BROKEN")),                          # 9
        _csv(export_row(7, email="ＵＳＥＲ０@example.jp")),                 # 10
        _csv(export_row(8)),                                              # 11
        _csv(export_row(9, last_name="x" * 300)),                         # 12
        '"user10@example.jp,"unterminated',                               # 13
    ]
    data = "\r\n".join(lines).encode("cp932").replace(b"BROKEN", b"\x82\x20")
    path = tmp_path / "bad.csv"
    path.write_bytes(data)
    seen: list[tuple[int, str]] = []

    result = import_export(path, batch_size=2, dry_run=dry_run,
                           on_skip=lambda s: seen.append((s.line, s.reason)))

    assert result.encoding == "cp932"
    reasons = dict(seen)
    assert sorted(reasons) == [4, 5, 7, 8, 9, 10, 12, 13]
    assert "not a valid e-mail address" in reasons[4]
    assert reasons[5] == "expected 19 columns, found 3"
    assert "'2024/13/01' is not a date" in reasons[7]
    assert "'不明'" in reasons[8] and "DELIVERY_PERMISSION_LABELS" in reasons[8]
    assert reasons[9] == "line 9 holds bytes that are not valid Shift_JIS (cp932)"
    assert reasons[10] == "the same e-mail address appeared earlier in the file"
    assert reasons[12] == "last_name is longer than 255 characters"
    assert reasons[13].startswith("malformed CSV")
    assert [s.line for s in result.skipped] == sorted(reasons)
    assert (result.rows, result.created, result.skipped_count) == (11, 3, 8)
    if dry_run:
        assert not Customer.objects.exists() and not SyncState.objects.exists()
        assert result.run is None and not ImportRun.objects.exists()
    else:
        assert set(Customer.objects.values_list("email", flat=True)) == {
            "user0@example.jp", "user3@example.jp", "user8@example.jp"}
        assert set(states()) == {"user0@example.jp", "user3@example.jp", "user8@example.jp"}
        run = ImportRun.objects.get()
        assert [r["line"] for r in run.skipped_rows] == sorted(reasons)
        assert run.skipped_rows[0]["email"] == "not-an-e-mail"


def _csv(row: dict[str, str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow([row[k] for k in KEYS])
    return out.getvalue().removesuffix("\r\n")


def test_dry_run_reports_changes_and_writes_nothing(tmp_path, sandbox):
    Customer.objects.create(email="user1@example.jp")
    before = list(SyncState.objects.values())
    path = write_export(tmp_path / "e.csv", [export_row(i) for i in range(4)], encoding="cp932")

    result = import_export(path, dry_run=True)

    assert (result.created, result.linked, result.hashcodes) == (3, 1, 4)
    assert Customer.objects.count() == 1 and list(SyncState.objects.values()) == before
    assert not ImportRun.objects.exists() and not ImportedCustomer.objects.exists()


def test_an_interrupted_import_leaves_whole_batches_and_can_be_run_again(tmp_path, sandbox):
    path = write_export(tmp_path / "e.csv", [export_row(i) for i in range(7)])

    def stop_after_two_batches(result):
        if result.rows >= 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        import_export(path, batch_size=2, progress=stop_after_two_batches, progress_every=1)
    run = ImportRun.objects.get()
    assert run.status == ImportRunStatus.FAILED and run.message == "interrupted"
    # Each customer written has its sync state, its origin and SATORI's values.
    assert Customer.objects.count() == SyncState.objects.filter(in_satori=True).count() == 4
    assert ImportedCustomer.objects.count() == 4

    result = import_export(path)
    assert (result.created, result.refreshed) == (3, 4)
    assert Customer.objects.count() == 7


def test_a_file_without_an_e_mail_column_is_refused(tmp_path, sandbox):
    path = write_export(tmp_path / "e.csv", [export_row(1)], keys=KEYS[1:])
    with pytest.raises(ImportFileError) as caught:
        import_export(path)
    assert caught.value.line == 1 and "No e-mail column" in str(caught.value)
    assert not ImportRun.objects.exists() and not Customer.objects.exists()


def test_a_wrongly_chosen_encoding_is_refused_with_the_line(tmp_path, sandbox):
    path = write_export(tmp_path / "e.csv", [export_row(i) for i in range(5)], encoding="cp932",
                        keys=KEYS[:-1])
    with pytest.raises(ImportFileError) as caught:
        import_export(path, encoding="utf-8")
    assert caught.value.line == 2  # the header is ASCII; the first customer is not
    assert "not valid UTF-8" in str(caught.value) and "cp932" in str(caught.value)
    assert not ImportRun.objects.exists()


def test_encoding_detection_looks_at_a_sample_only():
    head = (",".join(KEYS) + "\r\n").encode() + b"a@example.jp\r\n" * 10
    stream = io.BytesIO(head + "山田".encode("cp932") + b"\r\n")
    # The Shift_JIS bytes lie beyond the sample: UTF-8 is chosen from what was read,
    # and the stream is back at its start for the import.
    assert choose_encoding(stream, sample_size=len(head)) == "utf-8"
    assert stream.tell() == 0
    assert choose_encoding(stream) == "cp932"
    assert choose_encoding(io.BytesIO(b"\xef\xbb\xbfemail\r\n")) == "utf-8-sig"


def test_a_bom_is_never_part_of_the_first_header(tmp_path, sandbox):
    path = write_export(tmp_path / "e.csv", [export_row(1)], encoding="utf-8-sig")
    result = import_export(path, encoding="utf-8")
    assert result.encoding == "utf-8-sig" and result.created == 1


def test_extra_column_names_map_to_custom_fields(tmp_path, sandbox):
    labels = ENGLISH | {"custom:plan": "プラン", "custom:birthday": "custom:undeclared"}
    path = write_export(tmp_path / "e.csv", [export_row(1)], labels=labels)
    result = import_export(path, columns={"プラン": "custom:plan"})
    assert result.columns["プラン"] == "custom:plan"
    assert ("custom:undeclared", "custom field not declared in SATORI['CUSTOM_FIELDS']") in [
        (c.column, c.reason) for c in result.ignored_columns]
    assert Customer.objects.get().custom_fields == {"custom:plan": "gold"}
    with pytest.raises(ImportFileError):
        import_export(path, columns={"プラン": "custom:nope"})


def test_a_local_delete_is_not_undone_by_the_export(tmp_path, sandbox):
    Customer.objects.create(email="user1@example.jp").delete()
    result = import_export(write_export(tmp_path / "e.csv", [export_row(1)]))
    assert result.created == 0 and result.skipped_count == 1
    assert "deleted locally" in result.skipped[0].reason
    assert not Customer.objects.exists()


def test_a_hashcode_held_by_another_local_customer_is_not_imported(tmp_path, sandbox):
    Customer.objects.create(email="old@example.jp")
    SyncState.objects.filter(email="old@example.jp").update(hashcode="h0000000001")
    result = import_export(write_export(tmp_path / "e.csv", [export_row(1)]))
    assert result.skipped_count == 1 and "old@example.jp" in result.skipped[0].reason
    assert not Customer.objects.filter(email="user1@example.jp").exists()


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------

def test_command_imports_prints_skips_and_the_report(tmp_path, sandbox):
    rows = [export_row(i) for i in range(5)] + [export_row(5, email="bad")]
    path = write_export(tmp_path / "e.csv", rows, encoding="cp932", labels=JAPANESE)
    out, err = io.StringIO(), io.StringIO()
    call_command("satori_import", str(path), "--dry-run", "--progress-every", "2",
                 stdout=out, stderr=err)
    assert "Dry run: nothing was written" in out.getvalue()
    assert "Customers created: 5" in out.getvalue()
    assert "Column ignored: 会員ランク (unknown column)" in out.getvalue()
    assert "line 8 skipped (bad):" in err.getvalue()
    assert "2 rows read" in err.getvalue() and "6 rows read" in err.getvalue()
    assert not Customer.objects.exists()

    out = io.StringIO()
    call_command("satori_import", str(path), "--encoding", "cp932", "--report",
                 "--progress-every", "0", stdout=out, stderr=io.StringIO())
    text = out.getvalue()
    assert "Customers created: 5" in text and "Nothing was sent to SATORI" in text
    assert "Only in SATORI (created by an import, no project object): 5" in text

    with pytest.raises(CommandError, match="No e-mail column"):
        call_command("satori_import", str(write_export(tmp_path / "x.csv", rows, keys=KEYS[1:])))
    with pytest.raises(CommandError, match="No such file"):
        call_command("satori_import", str(tmp_path / "missing.csv"))


# --------------------------------------------------------------------------
# Reconciliation
# --------------------------------------------------------------------------

def plant_differences(tmp_path: Path, count: int = 20, encoding: str = "utf-8") -> set[tuple]:
    """Import ``count`` customers, then change some locally; returns the expected report."""
    local_only = Customer.objects.create(email="local@example.jp", last_name="田中")
    Customer.objects.create(email="user1@example.jp", first_name="一郎")  # linked, differs
    import_export(write_export(tmp_path / "plant.csv", (export_row(i) for i in range(count)),
                               encoding=encoding))
    # Local edits with update(): they differ from SATORI without a push.
    Customer.objects.filter(email="user2@example.jp").update(last_name="佐藤")
    Customer.objects.filter(email="user3@example.jp").update(tags=["展示会"])
    Customer.objects.filter(email="user4@example.jp").update(
        custom_fields={"custom:plan": "silver", "custom:birthday": "1990-02-03"})
    Customer.objects.filter(email="user5@example.jp").update(collection_date=dt.date(2025, 5, 6))
    Customer.objects.filter(email="user10@example.jp").update(memo="一行目\n二行目")  # same
    Customer.objects.filter(email="user6@example.jp").update(delivery_permission="approval")
    # A project object connected to user7: it now exists in Django too.
    Member.objects.create(email="user7@example.jp", family_name="山田", given_name="太郎7",
                          company="別会社", plan="gold", tags="展示会 資料請求")
    expected = {
        ("only_in_django", local_only.email, "", "", ""),
        ("different", "user1@example.jp", "first_name", "一郎", "太郎1"),
        ("different", "user1@example.jp", "last_name", "", "山田"),
        ("different", "user2@example.jp", "last_name", "佐藤", "山田"),
        ("different", "user3@example.jp", "tags", "展示会", "展示会,資料請求"),
        ("different", "user4@example.jp", "custom:plan", "silver", "gold"),
        ("different", "user5@example.jp", "collection_date", "2025-05-06", "2024-01-05"),
        ("different", "user6@example.jp", "delivery_permission", "approval", "reject"),
        ("different", "user7@example.jp", "lead_company_name", "別会社", "株式会社ＳＡＴＯＲＩ"),
        ("different", "user7@example.jp", "custom:birthday", "", "1990-02-03"),
    }
    # user1's other fields are empty locally and set in SATORI: each one is a difference.
    for key in ("last_name_reading", "first_name_reading", "lead_company_name", "department",
                "phone_number", "address", "collection_route", "collection_date",
                "delivery_permission", "tags", "custom:plan", "custom:birthday"):
        remote = {"collection_date": "2024-01-05", "delivery_permission": "approval",
                  "tags": "展示会,資料請求", "custom:plan": "gold",
                  "custom:birthday": "1990-02-03"}.get(key, export_row(1)[key])
        expected.add(("different", "user1@example.jp", key, "", remote))
    expected |= {("only_in_satori", f"user{i}@example.jp", "", "", "")
                 for i in range(count) if i not in (1, 7)}
    return expected


def test_the_report_lists_exactly_the_planted_differences(tmp_path, sandbox):
    expected = plant_differences(tmp_path)
    assert set(reconcile.rows()) == expected
    assert len(list(reconcile.rows())) == len(expected)  # and nothing twice

    out = io.StringIO()
    call_command("satori_reconcile", "--format", "csv", stdout=out)
    lines = list(csv.reader(io.StringIO(out.getvalue())))
    assert tuple(lines[0]) == reconcile.CSV_HEADER
    assert {tuple(line) for line in lines[1:]} == expected

    summary = reconcile.summarize()
    assert (summary.only_in_django, summary.only_in_satori, summary.different) == (1, 18, 7)
    text = io.StringIO()
    call_command("satori_reconcile", "--category", "different", "--limit", "3", stdout=text)
    assert "In both, with different values: 7" in text.getvalue()
    assert "... and 4 more" in text.getvalue()
    differing = {d.email: d for d in reconcile.different()}
    user1 = differing["user1@example.jp"].differences
    assert [d.field for d in user1][:3] == ["last_name", "first_name", "last_name_reading"]
    assert [d.field for d in user1][-3:] == ["tags", "custom:birthday", "custom:plan"]
    assert not user1[0].push_fixes  # empty locally: sending it would not clear SATORI's
    assert user1[1].push_fixes and differing["user2@example.jp"].differences[0].push_fixes


def test_mark_for_sync_from_the_report(tmp_path, sandbox):
    plant_differences(tmp_path)
    SyncState.objects.update(status=SyncStatus.SYNCED)
    out = io.StringIO()
    call_command("satori_reconcile", "--category", "different", "--mark-for-sync", stdout=out)
    assert "7 customer(s) marked for sync" in out.getvalue()
    pending = set(SyncState.objects.filter(status=SyncStatus.PENDING)
                  .values_list("email", flat=True))
    assert pending == {f"user{i}@example.jp" for i in (1, 2, 3, 4, 5, 6, 7)}
    with pytest.raises(CommandError):
        call_command("satori_reconcile", "--mark-for-sync")


def test_with_create_unknown_false_only_customers_known_in_satori_are_pushed(
        tmp_path, satori_sandbox):
    for i in (1, 2):
        satori_sandbox.state.seed_customer(f"user{i}@example.jp", hashcode=f"h{i:010d}",
                                           last_name="山田")
    Customer.objects.create(email="user1@example.jp", last_name="山田", first_name="一郎")
    Customer.objects.create(email="local@example.jp", last_name="田中")
    import_export(write_export(tmp_path / "e.csv", [export_row(1), export_row(2)]))
    assert satori_sandbox.state.requests == []

    with satori(CREATE_UNKNOWN=False):
        sync.mark_for_sync(Customer.objects.all())
        drain()

    upserts = satori_sandbox.state.requests_for("upsert")
    assert sorted(r.form_dict()["customer[email]"] for r in upserts) == [
        "user1@example.jp", "user2@example.jp"]
    assert len(satori_sandbox.state.requests) == 2  # nothing else at all
    assert satori_sandbox.state.customer("local@example.jp") is None
    by_email = states()
    assert by_email["local@example.jp"].status == SyncStatus.NOT_IN_SATORI
    assert by_email["user1@example.jp"].status == SyncStatus.SYNCED
    assert by_email["user2@example.jp"].status == SyncStatus.SYNCED
    assert satori_sandbox.state.customer("user1@example.jp").fields["first_name"] == "一郎"


# --------------------------------------------------------------------------
# Admin pages
# --------------------------------------------------------------------------

class _ImportSite(admin.AdminSite):
    def get_urls(self) -> list[Any]:
        return import_urls(self) + super().get_urls()


test_site = _ImportSite(name="satori_import_test")
test_site.register(Customer)
urlpatterns = [path("admin/", test_site.urls)]
admin_urls = override_settings(ROOT_URLCONF=__name__)


@admin_urls
def test_admin_upload_dry_run_then_import(tmp_path, sandbox, admin_client):
    page = admin_client.get("/admin/import/")
    assert page.status_code == 200 and b"satori-import-form" in page.content
    path = write_export(tmp_path / "e.csv", [export_row(1), export_row(2, email="x")],
                        encoding="cp932", labels=JAPANESE)

    with open(path, "rb") as upload:
        page = admin_client.post("/admin/import/", {"file": upload, "encoding": "auto",
                                                    "dry_run": "on", "columns": ""})
    assert page.status_code == 200
    assert "Dry run: nothing was written" in page.content.decode()
    assert page.context["result"].created == 1 and not Customer.objects.exists()

    with open(path, "rb") as upload:
        page = admin_client.post("/admin/import/", {"file": upload, "encoding": "auto",
                                                    "columns": ""})
    run = ImportRun.objects.get()
    assert page.status_code == 302 and page.url == f"/admin/import/{run.pk}/"
    assert run.filename == "e.csv" and run.started_by.is_superuser
    detail = admin_client.get(page.url).content.decode()
    assert "skipped-rows" in detail and "会員ランク" in detail
    assert Customer.objects.filter(email="user1@example.jp").exists()


@admin_urls
def test_admin_refuses_a_bad_file_with_the_reason(tmp_path, sandbox, admin_client):
    path = write_export(tmp_path / "e.csv", [export_row(1)], keys=KEYS[1:])
    with open(path, "rb") as upload:
        page = admin_client.post("/admin/import/", {"file": upload, "encoding": "auto"})
    assert page.status_code == 200 and "No e-mail column" in page.content.decode()
    assert not ImportRun.objects.exists()


@admin_urls
def test_admin_report_shows_differences_and_marks_the_chosen_for_sync(
        tmp_path, sandbox, admin_client):
    plant_differences(tmp_path)
    SyncState.objects.update(status=SyncStatus.SYNCED)
    page = admin_client.get("/admin/import/report/")
    html = page.content.decode()
    assert page.status_code == 200 and 'id="reconcile-different"' in html
    assert "佐藤" in html and "user2@example.jp" in html and "local@example.jp" not in html
    assert [item["email"] for item in page.context["items"]] == [
        f"user{i}@example.jp" for i in (1, 2, 3, 4, 5, 6, 7)]
    only = admin_client.get("/admin/import/report/?category=only_in_django")
    assert [item["email"] for item in only.context["items"]] == ["local@example.jp"]

    user2 = Customer.objects.get(email="user2@example.jp")
    page = admin_client.post("/admin/import/report/",
                             {"category": "different", "ids": [str(user2.pk)],
                              "mark_selected": "1"})
    assert page.status_code == 302
    assert list(SyncState.objects.filter(status=SyncStatus.PENDING)
                .values_list("email", flat=True)) == ["user2@example.jp"]


@admin_urls
def test_admin_pages_need_permissions(client, django_user_model, tmp_path, sandbox):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)
    assert client.get("/admin/import/").status_code == 403
    assert client.get("/admin/import/report/").status_code == 403


# --------------------------------------------------------------------------
# Volume
# --------------------------------------------------------------------------

@pytest.mark.slow
def test_100000_row_shift_jis_export_imports_and_reconciles_exactly(tmp_path, satori_sandbox):
    # How long it takes is measured by `make bench` (bench/RESULTS.md), not here.
    count = 100_000
    expected = plant_differences(tmp_path, count=20)  # a first, small export
    path = write_export(tmp_path / "big.csv", (export_row(i) for i in range(count)),
                        encoding="cp932", labels=JAPANESE)
    result = import_export(path)
    assert (result.rows, result.skipped_count, result.encoding) == (count, 0, "cp932")
    assert (result.created, result.refreshed) == (count - 20, 20)
    assert Customer.objects.count() == count + 1
    assert satori_sandbox.state.requests == []
    # The 20 customers of the first export are unchanged; the rest match SATORI.
    expected |= {("only_in_satori", f"user{i}@example.jp", "", "", "")
                 for i in range(20, count)}
    assert set(reconcile.rows()) == expected


@pytest.mark.slow
def test_memory_stays_flat_as_the_file_grows(tmp_path, satori_sandbox, monkeypatch):
    # The encoding sample (4 MiB by default) is the one buffer that grows with a
    # small file; made small here so that both files are larger than it.
    monkeypatch.setattr(importing, "SAMPLE_BYTES", 256 * 1024)
    peaks = []
    for offset, count in ((0, 5_000), (100_000, 20_000)):
        path = write_export(tmp_path / f"e{count}.csv",
                            (export_row(offset + i) for i in range(count)), encoding="cp932")
        tracemalloc.start()
        import_export(path)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    small, large = peaks
    assert large < small * 1.25, f"peak {small} bytes for 5,000 rows, {large} for 20,000"


def test_the_pages_are_reachable_from_the_customer_admin(tmp_path, sandbox, admin_client):
    """The project's own admin (tests/urls.py) includes the pages under the Customer admin."""
    changelist = admin_client.get("/admin/django_satori/customer/").content.decode()
    assert "/admin/django_satori/customer/import/" in changelist
    assert "/admin/django_satori/customer/import/report/" in changelist
    path = write_export(tmp_path / "e.csv", [export_row(1)])
    with open(path, "rb") as upload:
        page = admin_client.post("/admin/django_satori/customer/import/",
                                 {"file": upload, "encoding": "auto"})
    assert page.status_code == 302
    page = admin_client.get(page.url)
    assert page.status_code == 200
    report = admin_client.get(
        "/admin/django_satori/customer/import/report/?category=only_in_satori")
    assert report.status_code == 200 and "user1@example.jp" in report.content.decode()
    # The customer's change page is linked from the report.
    customer = Customer.objects.get()
    assert f"/admin/django_satori/customer/{customer.pk}/change/" in report.content.decode()
