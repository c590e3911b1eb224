"""The pages operators and demo visitors read, in Debian's chromium through
Playwright, at 1280x800 and 1920x1080, in Japanese and English: the import
and reconciliation pages, the sandbox page, the example sign-up form.

Never ``playwright install``: the browser is the distribution's /usr/bin/chromium.
Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth.models import User

from django_satori.models import Customer, ImportRun
from django_satori.sandbox.state import Action
from tests import services
from tests.importfiles import export_row, write_export
from tests.test_browser import CHROMIUM, SHOTS
from tests.test_example_project import MANAGE, REPO_ROOT, example_env, free_port, manage

pytestmark = [pytest.mark.browser]

VIEWPORTS = {"1280x800": (1280, 800), "1920x1080": (1920, 1080)}
LANGUAGES = ("ja", "en")
#: What a web user must not be told: options of manage.py commands.
COMMAND_LINE = re.compile(r"(?<![\w-])--[a-z][\w-]*|manage\.py|satori_import")
WORDS = {
    "ja": {
        "auto": "自動判定",
        "company": "会社名",
        "plan": "プラン",
        "wrong": "「文字コード」で Shift_JIS を選び",
        "required": "必須",
        "time": "日時（日本時間）",
        "config": "設定",
    },
    "en": {
        "auto": "Detect automatically",
        "company": "Company",
        "plan": "プラン",
        "wrong": "Choose Shift_JIS under Encoding",
        "required": "Required",
        "time": "Time (JST)",
        "config": "Configuration",
    },
}


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        if services.in_ci():
            pytest.fail("/usr/bin/chromium is required under CI=true (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium here")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread for the whole module;
    # the ORM calls made meanwhile (test database set-up included) are ordinary
    # blocking ones.
    saved = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()
            if saved is None:
                os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
            else:
                os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = saved


@dataclass
class Tab:
    page: Any  # playwright's Page
    language: str
    #: For screenshot names: "ja-1280x800".
    suffix: str


@pytest.fixture(
    params=[(v, lang) for v in VIEWPORTS for lang in LANGUAGES], ids=lambda p: f"{p[1]}-{p[0]}"
)
def tab(request: pytest.FixtureRequest, chromium: Any) -> Iterator[Tab]:
    viewport, language = request.param
    SHOTS.mkdir(parents=True, exist_ok=True)
    width, height = VIEWPORTS[viewport]
    context = chromium.new_context(
        viewport={"width": width, "height": height},
        locale=language,
        timezone_id="Asia/Tokyo",
        extra_http_headers={"Accept-Language": language},
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield Tab(page, language, f"{language}-{viewport}")
    context.close()


def text_of(page: Any) -> str:
    return str(page.locator("body").inner_text())


def no_command_line(page: Any) -> None:
    found = COMMAND_LINE.search(text_of(page))
    assert found is None, f"{page.url} points to the command line: {found[0]!r}"


# --------------------------------------------------------------------------- import pages


@pytest.mark.django_db(transaction=True)
def test_import_pages(live_server, satori_sandbox, tab, tmp_path, settings):
    from playwright.sync_api import expect

    page, words = tab.page, WORDS[tab.language]
    settings.SATORI = {
        **settings.SATORI,
        "CUSTOM_FIELDS": {**settings.SATORI["CUSTOM_FIELDS"], "plan": {"label": "プラン"}},
    }
    User.objects.create_superuser("admin", password="browser-pw")
    shift_jis = write_export(
        tmp_path / "satori.csv", [export_row(i) for i in range(3)], encoding="cp932"
    )
    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_satori/customer/import/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "browser-pw")
    page.click("input[type=submit]")

    # Encodings in words; the admin's form layout (fieldset.module.aligned, forms.css).
    expect(page.locator("#satori-import-form fieldset.module.aligned")).to_be_visible()
    assert page.locator("#id_encoding option").all_inner_texts() == [
        words["auto"],
        "UTF-8",
        "Shift_JIS",
    ]
    no_command_line(page)
    page.screenshot(path=str(SHOTS / f"import-upload-{tab.suffix}.png"), full_page=True)

    # A Shift_JIS file read as UTF-8: the page says what to choose, never a flag.
    page.set_input_files("#id_file", str(shift_jis))
    page.select_option("#id_encoding", "utf-8")
    page.uncheck("#id_dry_run")
    page.click("#satori-import-form input[type=submit]")
    expect(page.locator(".errorlist")).to_contain_text(words["wrong"])
    no_command_line(page)
    assert not ImportRun.objects.exists()

    page.set_input_files("#id_file", str(shift_jis))
    page.select_option("#id_encoding", "auto")
    page.uncheck("#id_dry_run")
    page.click("#satori-import-form input[type=submit]")
    expect(page.locator("#import-run-encoding")).to_have_text("Shift_JIS")
    no_command_line(page)
    page.screenshot(path=str(SHOTS / f"import-run-{tab.suffix}.png"), full_page=True)

    Customer.objects.filter(email="user1@example.jp").update(
        lead_company_name="別会社",
        custom_fields={"custom:plan": "silver", "custom:birthday": "1990-02-03"},
    )
    page.goto(f"{live_server.url}/admin/django_satori/customer/import/report/")
    labels = page.locator("#reconcile-different td.satori-field").all_inner_texts()
    assert sorted(labels) == sorted([words["company"], words["plan"]])
    body = text_of(page)
    assert "lead_company_name" not in body and "custom:plan" not in body
    no_command_line(page)
    # Nothing of the report is cut off or pushed sideways at this width.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(SHOTS / f"import-report-{tab.suffix}.png"), full_page=True)


# --------------------------------------------------------------------------- sandbox page


def test_sandbox_page(satori_sandbox, tab):
    from playwright.sync_api import expect

    page, words = tab.page, WORDS[tab.language]
    state = satori_sandbox.state
    old = satori_sandbox.seed_customer("old@example.jp", last_name="古田")
    new = satori_sandbox.seed_customer("new@example.jp", last_name="新井")
    old.updated_at = dt.datetime(2026, 3, 1, 23, 30, tzinfo=dt.UTC).timestamp()
    new.updated_at = dt.datetime(2026, 3, 2, 1, 0, 5, tzinfo=dt.UTC).timestamp()
    with state.lock:
        old.actions.append(
            Action(
                name="資料請求",
                content="料金表",
                url="",
                date="",
                created_by="sandbox-user-key",
                received_at=dt.datetime(2026, 3, 2, 2, 0, tzinfo=dt.UTC).timestamp(),
            )
        )

    page.goto(f"{satori_sandbox.url}/")
    customers = page.locator("#customers tbody tr")
    expect(customers).to_have_count(2)
    assert customers.nth(0).locator("td").first.inner_text() == "new@example.jp"
    assert customers.nth(0).locator("td").last.inner_text() == "2026-03-02 10:00:05"
    assert customers.nth(1).locator("td").last.inner_text() == "2026-03-02 08:30:00"
    action = page.locator("#actions tbody tr").first.locator("td")
    assert action.all_inner_texts()[:4] == [
        "2026-03-02 11:00:00",
        "old@example.jp",
        "資料請求",
        "料金表",
    ]
    expect(page.locator("#actions thead")).to_contain_text(words["time"])
    expect(page.get_by_role("heading", name=words["config"])).to_be_visible()
    expect(page.locator("#configuration tbody tr")).to_have_count(len(satori_sandbox.describe()))
    assert "sandbox-user-secret" not in page.content()
    page.screenshot(path=str(SHOTS / f"sandbox-{tab.suffix}.png"), full_page=True)

    # It reloads itself: a customer arriving now shows up without any click.
    satori_sandbox.seed_customer("later@example.jp", last_name="後藤")
    expect(page.locator("#customers tbody tr").first).to_contain_text(
        "later@example.jp", timeout=15_000
    )


# --------------------------------------------------------------------------- sign-up form


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The example project's development server on a throwaway database."""
    tmp_path = tmp_path_factory.mktemp("example-site")
    manage(tmp_path, "migrate", "--verbosity", "0")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, MANAGE, "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=REPO_ROOT,
        env=example_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/signup/", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield url, tmp_path
    finally:
        server.terminate()
        server.wait(timeout=30)


def members(tmp_path: Path) -> list[str]:
    out = manage(
        tmp_path,
        "shell",
        "-c",
        "from example_project.members.models import Member;"
        "print('EMAILS', *Member.objects.order_by('pk').values_list('email', flat=True))",
    )
    line = next(line for line in out.splitlines() if line.startswith("EMAILS"))
    return line.split()[1:]


def test_signup_form(example_site, tab):
    from playwright.sync_api import expect

    url, tmp_path = example_site
    page, words = tab.page, WORDS[tab.language]
    page.goto(f"{url}/signup/")
    marks = page.locator("label .required-mark")
    expect(marks).to_have_count(5)
    assert set(marks.all_inner_texts()) == {words["required"]}
    for name in ("family_name", "given_name", "email"):
        expect(page.locator(f"label[for=id_{name}] .required-mark")).to_be_visible()
    for name in ("company", "department", "phone"):
        expect(page.locator(f"label[for=id_{name}] .required-mark")).to_have_count(0)
    page.screenshot(path=str(SHOTS / f"signup-{tab.suffix}.png"), full_page=True)

    local = f"hanako{os.getpid()}{tab.suffix.replace('-', '')}"
    full_width = "".join(chr(ord(c) + 0xFEE0) if c.isalnum() else c for c in local)
    page.fill("#id_family_name", "山田")
    page.fill("#id_given_name", "花子")
    page.fill("#id_email", f"{full_width}＠ｅｘａｍｐｌｅ．ｊｐ")
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/signup/thanks/$"))
    assert f"{local.lower()}@example.jp" in members(tmp_path)
