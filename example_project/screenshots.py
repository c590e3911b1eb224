"""Screenshots for docs/admin.md, taken from a running demo.

    python -m example_project.demo                     # in one terminal
    python -m example_project.screenshots --password <the printed one>

Needs Playwright for Python (the ``test`` extra) and a Chromium binary; it
uses Debian's ``/usr/bin/chromium`` unless ``--chromium`` says otherwise and
never downloads a browser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


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
    args = parser.parse_args()
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
        page.goto(f"{site}/signup/")
        shoot(page, f"signup{suffix}", args.out, full=True)

        page.goto(f"{site}/admin/login/")
        page.fill("#id_username", "admin")
        page.fill("#id_password", args.password)
        page.click("input[type=submit]")

        page.goto(f"{site}/admin/django_satori/customer/")
        shoot(page, f"customers{suffix}", args.out)
        page.goto(f"{site}/admin/django_satori/customer/?sync_status=failed")
        shoot(page, f"customers-failed{suffix}", args.out)
        first_failed = page.locator("#result_list tbody tr th a").first
        if first_failed.count():
            first_failed.click()
            shoot(page, f"customer-failed{suffix}", args.out, full=True)

        # A bulk upsert of every customer, then its job page once SATORI finished it.
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
        shoot(page, f"bulk-job{suffix}", args.out, full=True)

        page.goto(f"{site}/admin/django_satori/synclog/?endpoint=customer%2Fupsert.json")
        shoot(page, f"sync-log{suffix}", args.out)
        page.goto(args.sandbox + "/")
        shoot(page, f"sandbox{suffix}", args.out)
        browser.close()


if __name__ == "__main__":
    main()
