"""Screenshots for docs/admin.md, taken from a running demo.

    python -m example_project.demo                     # in one terminal
    python -m example_project.screenshots --password <the printed one>
    python -m example_project.screenshots --password ... --pages import,sandbox --language ja

The import pages are shot after importing an "export" made from what the
sandbox holds (SATORI's export, as far as the demo is concerned), with one
company name changed as if someone had edited it in SATORI.

Needs Playwright for Python (the ``test`` extra) and a Chromium binary; it
uses Debian's ``/usr/bin/chromium`` unless ``--chromium`` says otherwise and
never downloads a browser.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import requests
from playwright.sync_api import Page, sync_playwright

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
PAGES = ("signup", "admin", "bulk", "import", "sandbox")


def shoot(page: Page, name: str, out: Path, *, full: bool = False) -> None:
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=full)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="http://127.0.0.1:8000")
    parser.add_argument("--sandbox", default="http://127.0.0.1:8765")
    parser.add_argument("--password", required=True)
    parser.add_argument("--language", default="en", choices=("en", "ja"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", type=Path, default=DOCS_IMG)
    parser.add_argument(
        "--pages", default=",".join(PAGES), help=f"comma-separated, of: {', '.join(PAGES)}"
    )
    args = parser.parse_args()
    pages = set(args.pages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.language == "en" else "-ja"
    site = args.site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        context = browser.new_context(
            viewport={"width": 1280, "height": 800},
            locale=args.language,
            timezone_id="Asia/Tokyo",
            extra_http_headers={"Accept-Language": args.language},
        )
        page = context.new_page()
        if "signup" in pages:
            page.goto(f"{site}/signup/")
            shoot(page, f"signup{suffix}", args.out, full=True)

        page.goto(f"{site}/admin/login/")
        page.fill("#id_username", "admin")
        page.fill("#id_password", args.password)
        page.click("input[type=submit]")

        if "admin" in pages:
            admin_pages(page, site, args.out, suffix)
        if "bulk" in pages:
            bulk_job(page, site, args.out, suffix)
        if "import" in pages:
            import_pages(page, site, args.sandbox, args.out, suffix)
        if "sandbox" in pages:
            page.goto(args.sandbox + "/")
            shoot(page, f"sandbox{suffix}", args.out)
        browser.close()


def admin_pages(page: Page, site: str, out: Path, suffix: str) -> None:
    page.goto(f"{site}/admin/django_satori/customer/")
    shoot(page, f"customers{suffix}", out)
    page.goto(f"{site}/admin/django_satori/customer/?sync_status=failed")
    shoot(page, f"customers-failed{suffix}", out)
    first_failed = page.locator("#result_list tbody tr th a").first
    if first_failed.count():
        first_failed.click()
        shoot(page, f"customer-failed{suffix}", out, full=True)
    page.goto(f"{site}/admin/django_satori/synclog/?endpoint=customer%2Fupsert.json")
    shoot(page, f"sync-log{suffix}", out)


def bulk_job(page: Page, site: str, out: Path, suffix: str) -> None:
    """A bulk upsert of every customer, then its job page once SATORI finished it."""
    page.goto(f"{site}/admin/django_satori/customer/")
    page.check("#action-toggle")
    page.select_option("select[name=action]", "bulk_upsert")
    page.click("button[name=index]")
    page.locator(".messagelist a").first.click()
    for _attempt in range(120):
        # The state badge: "wait"/"busy" while the job runs, "ok"/"bad"/"off" once ended.
        badge = page.locator(".satori-badge").first.get_attribute("class") or ""
        if not any(kind in badge for kind in ("satori-wait", "satori-busy")):
            break
        page.wait_for_timeout(1000)
        page.reload()
    shoot(page, f"bulk-job{suffix}", out, full=True)


def import_pages(page: Page, site: str, sandbox: str, out: Path, suffix: str) -> None:
    """Upload page, dry run, the import's page and the reconciliation report."""
    held = requests.get(f"{sandbox}/_sandbox/state", timeout=10).json()["customers"]
    items = ("last_name", "first_name", "lead_company_name", "department")
    with tempfile.TemporaryDirectory() as folder:
        export = Path(folder) / "satori-customers.csv"
        with open(export, "w", encoding="cp932", errors="replace", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["メールアドレス", "ハッシュコード", "苗字", "名前", "会社名", "部署"])
            for n, customer in enumerate(held[:20]):
                values = [customer["fields"].get(item, "") for item in items]
                if n == 0:  # edited in SATORI's screen since the last sync
                    values[2] = "株式会社エグザンプル（旧社名）"
                writer.writerow([customer["email"], customer["hashcode"], *values])
        page.goto(f"{site}/admin/django_satori/customer/import/")
        shoot(page, f"import-upload{suffix}", out)
        page.set_input_files("#id_file", str(export))
        page.click("#satori-import-form input[type=submit]")
        shoot(page, f"import-dry-run{suffix}", out, full=True)
        page.set_input_files("#id_file", str(export))
        page.uncheck("#id_dry_run")
        page.click("#satori-import-form input[type=submit]")
        shoot(page, f"import-run{suffix}", out, full=True)
    page.goto(f"{site}/admin/django_satori/customer/import/report/")
    shoot(page, f"import-report{suffix}", out, full=True)


if __name__ == "__main__":
    main()
