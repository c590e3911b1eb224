"""The admin an operator lives in, in a real browser at 1280x800 and 1920x1080, in
Japanese and English: lists that fit, the tag input, custom field widgets, the sync
dashboard and a bulk job's progress. Debian's /usr/bin/chromium, never a download.

Screenshots go to test-artifacts/screenshots/admin-*.png.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import override_settings
from django.utils import timezone

from django_satori.models import (
    BulkJob,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
    SyncStatus,
)
from tests import services
from tests.test_browser import CHROMIUM, SHOTS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SIZES = {"1280": {"width": 1280, "height": 800}, "1920": {"width": 1920, "height": 1080}}
LONG_ERROR = (
    "SATORI status 400, field 'lead_company_name': 会社名は255文字以内で入力してください。"
    "入力内容をご確認のうえ、もう一度お試しください。"
)
SELECT = {"type": "select", "choices": ["free", "standard", "premium"]}
CUSTOM = {"plan": SELECT, "age": "integer", "birthday": "date"}


@pytest.fixture
def chromium(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not CHROMIUM.exists():
        if services.in_ci():
            pytest.fail("/usr/bin/chromium is required under CI=true (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium here")
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_admin(browser: Any, live_server: Any, size: str, language: str) -> Any:
    User.objects.filter(username="admin").exists() or User.objects.create_superuser(
        "admin", password="browser-pw"
    )
    context = browser.new_context(
        viewport=SIZES[size],
        locale=language,
        timezone_id="Asia/Tokyo",
        extra_http_headers={"Accept-Language": language},
    )
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "browser-pw")
    page.click("input[type=submit]")
    page.wait_for_selector("#content")
    return page


def operator_data() -> None:
    """Demo-like data: long Japanese names, a failure, a retry, a job with rows left out."""
    now = timezone.now()
    for i in range(12):
        Customer.objects.create(
            email=f"yamada.taro.{i}@long-company-domain.example.co.jp",
            last_name="山田",
            first_name=f"太郎{i}",
            lead_company_name="株式会社サンプルマーケティングソリューションズ東日本支社",
            collection_route="web",
        )
    failed = Customer.objects.create(email="failed@example.jp", last_name="失敗", first_name="花子")
    SyncState.objects.filter(email=failed.email).update(
        status=SyncStatus.FAILED, attempts=1, last_error=LONG_ERROR, last_error_at=now
    )
    SyncLog.objects.create(
        email=failed.email,
        endpoint="customer/upsert.json",
        outcome=SyncLog.Outcome.FAILED,
        satori_status=400,
        message=LONG_ERROR,
        request_summary={"customer[email]": "<17 chars>"},
        response_summary={"status": 400, "message": "会社名は255文字以内で入力してください。"},
    )
    retrying = Customer.objects.create(email="retry@example.jp", last_name="再試行")
    SyncState.objects.filter(email=retrying.email).update(
        status=SyncStatus.PENDING,
        attempts=3,
        last_error="Timeout talking to SATORI",
        last_error_at=now,
        not_before=now + dt.timedelta(minutes=4),
    )
    SyncState.objects.exclude(status__in=[SyncStatus.FAILED, SyncStatus.PENDING]).update(
        status=SyncStatus.SYNCED, last_synced_at=now
    )
    SyncState.objects.filter(email__startswith="yamada.taro.1").update(
        status=SyncStatus.SYNCED, last_synced_at=now
    )
    job = BulkJob.objects.create(
        mode="upsert",
        state=BulkState.FINISHED,
        description="管理画面: 選択した 7 件",
        row_count=5,
        succeeded_count=4,
        failed_count=1,
        invalid_count=2,
        part_count=1,
        finished_at=now,
    )
    BulkPart.objects.create(
        job=job, number=1, state=BulkState.FINISHED, row_count=5, succeeded_count=4, failed_count=1
    )
    BulkRowError.objects.create(
        job=job, email="bad@example.jp", message="collection_route は必須です", before_upload=True
    )
    running = BulkJob.objects.create(
        mode="upsert", state=BulkState.PROCESSING, description="Backlog", row_count=3, part_count=1
    )
    BulkPart.objects.create(
        job=running,
        number=1,
        state=BulkState.PROCESSING,
        row_count=3,
        poll_count=4,
        uploaded_at=now - dt.timedelta(seconds=95),
    )


def no_sideways_scroll(page: Any) -> None:
    width = page.viewport_size["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width, page.url


#: How many lines of text an element's content box holds (its height without padding).
LINES_JS = """el => {
    const style = getComputedStyle(el);
    const size = parseFloat(style.fontSize);
    const line = parseFloat(style.lineHeight) || size * 1.3;
    const inner = el.clientHeight - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    return inner / line;
}"""


def fits(page: Any, columns: list[str]) -> None:
    """Each listed column, header and every cell: one line high, and within the viewport's
    width and the list's own visible box (which scrolls sideways rather than overlap the
    filters)."""
    results = page.locator("#changelist-form .results").bounding_box()
    width = min(page.viewport_size["width"], results["x"] + results["width"])
    for column in columns:
        header = page.locator(f"#result_list thead th.column-{column}")
        box = header.bounding_box()
        assert box is not None, column
        lines = header.locator(".text > *").first.evaluate(LINES_JS)
        assert lines < 1.5, (column, "header lines", lines)
        assert box["x"] >= 0 and box["x"] + box["width"] <= width, (column, box, width)
        cells = page.locator(f"#result_list tbody :is(td, th).field-{column}")
        assert cells.count(), column
        for index in range(cells.count()):
            cell = cells.nth(index)
            cell_box = cell.bounding_box()
            assert cell_box["x"] + cell_box["width"] <= width, (column, index, cell_box, width)
            # A badge is a little taller than a line of text; two lines would be twice.
            lines = cell.evaluate(LINES_JS)
            assert lines < 1.6, (column, index, "cell lines", lines)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("language", ["ja", "en"])
def test_lists_fit_and_show_the_whole_value_on_hover(live_server, chromium, size, language):
    from playwright.sync_api import expect

    operator_data()
    page = open_admin(chromium, live_server, size, language)
    page.goto(f"{live_server.url}/admin/django_satori/customer/")
    page.screenshot(path=str(SHOTS / f"admin-customers-{language}-{size}.png"))
    fits(page, ["sync_status", "email_cell", "name", "last_error", "last_synced"])
    error = page.locator("tr:has-text('failed@example.jp') td.field-last_error .satori-cut")
    expect(error).to_have_attribute("title", LONG_ERROR)
    retry = page.locator("td.field-sync_status .satori-retry")
    expect(retry).to_have_text("3/8")

    page.goto(f"{live_server.url}/admin/django_satori/synclog/")
    page.screenshot(path=str(SHOTS / f"admin-synclog-{language}-{size}.png"))
    fits(page, ["created_at", "outcome_badge", "email_cell", "short_message"])

    page.goto(f"{live_server.url}/admin/django_satori/bulkjob/")
    page.screenshot(path=str(SHOTS / f"admin-bulkjobs-{language}-{size}.png"))
    fits(page, ["id", "state_badge", "progress", "stage"])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("language", ["ja", "en"])
def test_dashboard_counts_and_charts_match_the_database(live_server, chromium, size, language):
    from playwright.sync_api import expect

    operator_data()
    now = timezone.now()
    SyncLog.objects.bulk_create(
        [
            SyncLog(
                email="x@example.jp",
                endpoint="customer/upsert.json",
                outcome=SyncLog.Outcome.OK,
                created_at=now - dt.timedelta(hours=h),
            )
            for h in (1, 2, 2, 30, 50)
        ]
    )
    page = open_admin(chromium, live_server, size, language)
    page.goto(f"{live_server.url}/admin/django_satori/")
    page.click("#satori-dashboard-link a")
    expect(page.locator("#satori-status-counts")).to_be_visible()
    for status in ("synced", "pending", "failed"):
        expected = SyncState.objects.filter(status=status, customer__isnull=False).count()
        expect(page.locator(f"#satori-count-{status} .satori-tile-count")).to_have_text(
            str(expected)
        )
    calls = SyncLog.objects.filter(outcome__in=["ok", "retry", "failed"])
    day = calls.filter(created_at__gte=now - dt.timedelta(hours=23, minutes=59))
    expect(page.locator("#satori-chart-24h-module .satori-chart-calls")).to_have_text(
        str(day.count())
    )
    expect(page.locator("#satori-chart-7d-module .satori-chart-calls")).to_have_text(
        str(calls.count())
    )
    bars = page.locator("#satori-chart-24h .satori-bucket")
    expect(bars).to_have_count(24)
    drawn = sum(int(bars.nth(i).get_attribute("data-calls")) for i in range(24))
    assert drawn == day.count()
    page.screenshot(path=str(SHOTS / f"admin-dashboard-{language}-{size}.png"), full_page=True)
    no_sideways_scroll(page)
    page.click("#satori-reasons td a")
    expect(page.locator("#result_list tbody tr")).to_have_count(1)
    expect(page.locator("#result_list")).to_contain_text("failed@example.jp")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("language", ["ja", "en"])
def test_tag_input_round_trip_and_custom_field_widgets(live_server, chromium, size, language):
    from playwright.sync_api import expect

    with override_settings(SATORI={**settings.SATORI, "CUSTOM_FIELDS": CUSTOM}):
        page = open_admin(chromium, live_server, size, language)
        page.goto(f"{live_server.url}/admin/django_satori/customer/add/")
        page.fill("#id_email", "tags@example.jp")
        entry = page.locator("#id_tags_entry")
        entry.click()
        entry.type("VIP")
        entry.press("Enter")
        entry.type("重要,")
        expect(page.locator(".satori-tag")).to_have_count(2)
        assert page.get_attribute("#id_satori_custom__age", "type") == "number"
        assert page.get_attribute("#id_satori_custom__birthday", "type") == "date"
        assert page.locator("select#id_satori_custom__plan option").count() == 4
        page.select_option("#id_satori_custom__plan", "premium")
        page.fill("#id_satori_custom__age", "42")
        page.fill("#id_satori_custom__birthday", "1990-04-01")
        page.screenshot(
            path=str(SHOTS / f"admin-customer-form-{language}-{size}.png"), full_page=True
        )
        no_sideways_scroll(page)
        page.click("input[name=_save]")
        expect(page.locator(".messagelist")).to_be_visible()
    customer = Customer.objects.get(email="tags@example.jp")
    assert customer.tags == ["VIP", "重要"]
    assert customer.custom_fields == {
        "custom:plan": "premium",
        "custom:age": 42,
        "custom:birthday": "1990-04-01",
    }


def test_tag_input_without_javascript_is_a_comma_separated_field(live_server, chromium):
    context = chromium.new_context(java_script_enabled=False, viewport=SIZES["1280"])
    User.objects.create_superuser("admin", password="browser-pw")
    page = context.new_page()
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "browser-pw")
    page.click("input[type=submit]")
    page.goto(f"{live_server.url}/admin/django_satori/customer/add/")
    page.fill("#id_email", "nojs@example.jp")
    page.fill("#id_tags", "VIP, 重要")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist")
    assert Customer.objects.get(email="nojs@example.jp").tags == ["VIP", "重要"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("language", ["ja", "en"])
def test_job_and_customer_pages_say_what_happened(live_server, chromium, size, language):
    from playwright.sync_api import expect

    operator_data()
    page = open_admin(chromium, live_server, size, language)
    job = BulkJob.objects.get(state=BulkState.FINISHED)
    page.goto(f"{live_server.url}/admin/django_satori/bulkjob/{job.pk}/change/")
    expect(page.locator("#satori-selected")).to_have_text("7")
    expect(page.locator("#satori-summary")).to_have_class("satori-not-clean")
    segments = page.locator("#satori-job-progress .satori-seg")
    kinds = [segments.nth(i).get_attribute("class") for i in range(segments.count())]
    assert any("satori-seg-out" in k for k in kinds)
    page.screenshot(path=str(SHOTS / f"admin-bulk-job-{language}-{size}.png"), full_page=True)
    no_sideways_scroll(page)

    running = BulkJob.objects.get(state=BulkState.PROCESSING)
    page.goto(f"{live_server.url}/admin/django_satori/bulkjob/{running.pk}/change/")
    expect(page.locator("td.satori-part-stage")).to_contain_text("4")
    page.screenshot(
        path=str(SHOTS / f"admin-bulk-job-running-{language}-{size}.png"), full_page=True
    )

    failed = Customer.objects.get(email="failed@example.jp")
    page.goto(f"{live_server.url}/admin/django_satori/customer/{failed.pk}/change/")
    original = "SATORIの原文" if language == "ja" else "as SATORI worded it"
    expect(page.locator("#satori-error-label")).to_contain_text(original)
    expect(page.locator("#satori-last-error")).to_contain_text("会社名は255文字以内")
    page.screenshot(
        path=str(SHOTS / f"admin-customer-failed-{language}-{size}.png"), full_page=True
    )
    no_sideways_scroll(page)

    retrying = Customer.objects.get(email="retry@example.jp")
    page.goto(f"{live_server.url}/admin/django_satori/customer/{retrying.pk}/change/")
    expect(page.locator("#satori-error-label")).not_to_contain_text(original)
    expect(page.locator("#satori-attempts")).to_contain_text("3")
    expect(page.locator("#satori-attempts")).to_contain_text("8")
    expect(page.locator("#satori-next-try")).to_be_visible()


@pytest.mark.parametrize("language", ["ja", "en"])
def test_the_connection_diagnosis_runs_from_its_page(
    live_server, chromium, satori_sandbox, language
):
    from playwright.sync_api import expect

    page = open_admin(chromium, live_server, "1280", language)
    page.goto(f"{live_server.url}/admin/django_satori/")
    page.click("a[href$='/customer/diagnosis/']")
    expect(page.locator("#satori-diagnosis-run")).to_be_visible()
    page.click("#satori-diagnosis-run input[type=submit]")
    probe = page.locator("tr", has=page.locator("code", has_text="probe"))
    expect(probe).to_have_class("satori-check-ok")
    accepted = "SATORIはキーを受け付けました" if language == "ja" else "SATORI accepted the keys"
    expect(probe).to_contain_text(accepted)
    expect(page.locator("tr.satori-check-fail").first).to_be_visible()  # no worker here
    page.screenshot(path=str(SHOTS / f"admin-diagnosis-{language}-1280.png"), full_page=True)
    no_sideways_scroll(page)
    for value in (settings.SATORI[name] for name in ("USER_KEY", "USER_SECRET")):
        assert value not in page.content()
