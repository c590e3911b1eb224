"""The admin in a real browser: Debian's chromium driven by Playwright, a live server,
a real Celery worker and the sandbox. Screenshots go to test-artifacts/screenshots/.

Never ``playwright install``: the browser is the distribution's /usr/bin/chromium.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from django_satori.models import BulkJob, BulkState, Customer, SyncState, SyncStatus
from tests import services

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = (
    Path(
        os.environ.get("DJANGO_SATORI_TEST_ARTIFACTS")
        or Path(__file__).resolve().parent.parent / "test-artifacts"
    )
    / "screenshots"
)
FAST = {"BULK_POLL_INTERVAL_SECONDS": 0.2, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.5}


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    if not CHROMIUM.exists():
        if services.in_ci():
            pytest.fail("/usr/bin/chromium is required under CI=true (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium here")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the ORM calls the test
    # makes meanwhile are ordinary blocking ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="en-US")
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def test_bulk_upsert_from_the_admin_reaches_finished_and_shows_satoris_message(
    live_server, satori_sandbox, celery_worker, browser_page
):
    from playwright.sync_api import expect

    page = browser_page
    satori_sandbox.configure(bulk_processing_seconds=1.0, own_only=True)
    satori_sandbox.seed_customer("taken@example.jp", created_by="another-user")
    User.objects.create_superuser("admin", password="browser-pw")
    Customer.objects.bulk_create(
        [
            Customer(
                email=f"ok{i}@example.jp",
                last_name="山田",
                first_name=f"太郎{i}",
                collection_route="web",
            )
            for i in range(5)
        ]
        + [
            Customer(email="taken@example.jp", collection_route="web"),
            Customer(email="noroute@example.jp", last_name="経路なし"),
        ]
    )
    celery_worker(FAST)

    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_satori/customer/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "browser-pw")
    page.click("input[type=submit]")
    expect(page.locator("#result_list")).to_be_visible()
    page.screenshot(path=str(SHOTS / "bulk-1-customers.png"), full_page=True)

    page.check("#action-toggle")
    page.select_option("select[name=action]", "bulk_upsert")
    page.click("button[name=index]")
    expect(page.locator(".messagelist")).to_contain_text("Bulk job")
    page.click("text=Follow its progress")

    # The job page reloads itself while the job runs.
    expect(page.locator("#satori-job-progress h2")).to_contain_text("Finished", timeout=60_000)
    expect(page.locator("#satori-rows")).to_have_text("6")
    expect(page.locator("#satori-succeeded")).to_have_text("5")
    expect(page.locator("#satori-failed")).to_have_text("1")
    expect(page.locator("#satori-invalid")).to_have_text("1")
    page.screenshot(path=str(SHOTS / "bulk-2-job-finished.png"), full_page=True)
    job = BulkJob.objects.get()
    assert job.state == BulkState.FINISHED and job.started_by.username == "admin"

    page.click("#satori-row-errors >> text=taken@example.jp")
    expect(page.locator("#satori-sync")).to_contain_text(
        "他のユーザーが登録したカスタマーは操作できません"
    )
    expect(page.locator("#satori-sync .satori-badge")).to_have_text("Failed")
    page.screenshot(path=str(SHOTS / "bulk-3-failed-customer.png"), full_page=True)

    page.goto(f"{live_server.url}/admin/django_satori/customer/?sync_status=synced")
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    assert SyncState.objects.filter(status=SyncStatus.SYNCED).count() == 5
