"""The sandbox's HTML page, over real HTTP: Japan time, newest first, every
action, the options as a table, reloading, in the browser's language.
(test_browser_pages.py looks at the same page in chromium.)
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator

import pytest
import requests

from django_satori.sandbox import SandboxServer
from django_satori.sandbox.page import _config_rows, japan_time, render

AUTH = {
    "user_key": "sandbox-user-key",
    "user_secret": "sandbox-user-secret",
    "company_key": "sandbox-company-key",
    "company_secret": "sandbox-company-secret",
}
TIMEOUT = 5


@pytest.fixture(scope="module")
def server() -> Iterator[SandboxServer]:
    with SandboxServer(bulk_processing_seconds=0) as running:
        yield running


@pytest.fixture
def sandbox(server: SandboxServer) -> Iterator[SandboxServer]:
    server.reset()
    yield server
    server.reset()


def epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def upsert(server: SandboxServer, email: str, **fields: str) -> None:
    data = {**AUTH, "customer[identity_type]": "email", "customer[email]": email}
    data.update({f"customer[{k}]": v for k, v in fields.items()})
    response = requests.post(
        f"{server.url}/api/v4/public/customer/upsert.json", data=data, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


def add_action(server: SandboxServer, email: str, name: str, content: str = "") -> None:
    data = {
        **AUTH,
        "customer[identity_type]": "email",
        "customer[email]": email,
        "action[name]": name,
        "action[content]": content,
    }
    response = requests.post(
        f"{server.url}/api/v4/public/customer/add_action.json", data=data, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text


def page(server: SandboxServer, language: str = "en") -> str:
    response = requests.get(
        f"{server.url}/", headers={"Accept-Language": language}, timeout=TIMEOUT
    )
    assert response.headers["Content-Type"].startswith("text/html")
    return response.text


def rows(html: str, table_id: str) -> list[list[str]]:
    table = re.search(rf"<table id={table_id}>.*?</table>", html, re.S)
    assert table, f"no table {table_id}"
    body = table[0].split("<tbody>", 1)[1]
    return [
        re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)
    ]


def test_customers_and_actions_newest_first_in_japan_time(sandbox):
    upsert(sandbox, "old@example.jp", last_name="古田")
    upsert(sandbox, "new@example.jp", last_name="新井")
    add_action(sandbox, "old@example.jp", "資料請求", "料金表")
    add_action(sandbox, "old@example.jp", "セミナー申込")
    add_action(sandbox, "new@example.jp", "来場")
    state = sandbox.state
    # Known instants: 23:30 UTC is 08:30 the next day in Japan.
    state.customer("old@example.jp").updated_at = epoch("2026-03-01T23:30:00+00:00")
    state.customer("new@example.jp").updated_at = epoch("2026-03-02T01:00:05+00:00")
    first, second = state.customer("old@example.jp").actions
    first.received_at = epoch("2026-03-01T23:31:00+00:00")
    second.received_at = epoch("2026-03-02T02:00:00+00:00")
    state.customer("new@example.jp").actions[0].received_at = epoch("2026-03-02T00:15:00+00:00")

    html = page(sandbox)
    customers = rows(html, "customers")
    assert [(row[0], row[-1]) for row in customers] == [
        ("new@example.jp", "2026-03-02 10:00:05"),
        ("old@example.jp", "2026-03-02 08:30:00"),
    ]
    # The customer's actions by name (newest first), not only how many.
    assert customers[1][6] == "セミナー申込, 資料請求"
    actions = rows(html, "actions")
    assert [row[:4] for row in actions] == [
        ["2026-03-02 11:00:00", "old@example.jp", "セミナー申込", ""],
        ["2026-03-02 09:15:00", "new@example.jp", "来場", ""],
        ["2026-03-02 08:31:00", "old@example.jp", "資料請求", "料金表"],
    ]
    assert "Time (JST)" in html and "2026-03-01" not in html


def test_recent_requests_are_newest_first_in_japan_time(sandbox):
    upsert(sandbox, "a@example.jp")
    upsert(sandbox, "b@example.jp")
    requests_ = rows(page(sandbox), "requests")
    assert [r[2] for r in requests_] == ["/api/v4/public/customer/upsert.json"] * 2
    assert "b@example.jp" in requests_[0][5] and "a@example.jp" in requests_[1][5]
    recorded = sandbox.state.requests[-1].received_at
    expected = dt.datetime.fromtimestamp(recorded, dt.timezone(dt.timedelta(hours=9)))
    assert requests_[0][0] == expected.strftime("%Y-%m-%d %H:%M:%S")


def test_the_configuration_is_a_table_and_the_keys_stay_hidden(sandbox):
    sandbox.configure(own_only=True, deny_operations={"delete"})
    html = page(sandbox)
    config = {row[1]: (row[0], row[2]) for row in rows(html, "configuration")}
    assert config["own_only"] == ("Only customers created with these keys can be changed", "yes")
    assert config["deny_operations"] == ("Refused operations", "delete")
    assert config["keys"][1] == "********"
    assert config["custom_fields"][1] == "(not set)"
    assert "name: action[name]" in config["action_params"][1]
    assert "sandbox-user-secret" not in html


def test_the_page_reloads_itself_and_says_so(sandbox):
    html = page(sandbox)
    assert '<meta http-equiv="refresh" content="5">' in html
    status = re.search(r"<p class=status id=refresh-status>(.*?)</p>", html, re.S)
    assert status and "Japan time (JST)" in status[1] and "every 5 seconds" in status[1]
    assert '<a href="/">Reload now</a>' in status[1]


@pytest.mark.parametrize(
    ("language", "expected"),
    [
        ("ja,en;q=0.5", ["設定", "アクション", "日時（日本時間）", "今すぐ再読み込み"]),
        ("en-US,en;q=0.9", ["Configuration", "Actions", "Time (JST)", "Reload now"]),
        ("fr", ["Configuration", "Actions"]),  # not offered: the site's default
    ],
)
def test_the_page_speaks_the_browsers_language(sandbox, language, expected):
    upsert(sandbox, "a@example.jp")
    html = page(sandbox, language)
    for text in expected:
        assert text in html


def test_render_without_times_or_rows():
    snapshot = {
        "customers": [],
        "jobs": [],
        "requests": [],
        "faults_injected": 0,
        "faults_by_kind": {},
    }
    html = render(snapshot, {"custom_fields": {"plan": {"type": "select", "choices": ["a"]}}})
    assert "No customers yet." in html and "No actions yet." in html
    assert "plan: (type: select; choices: a)" in html
    assert japan_time(None) == "" and japan_time("not a time") == "not a time"
    assert japan_time("2026-12-31T15:00:00") == "2027-01-01 00:00:00"  # naive means UTC


def test_every_option_on_the_page_is_described(sandbox: SandboxServer) -> None:
    rows = _config_rows(sandbox.describe())
    undescribed = [key for label, key, _value in rows if label == key]
    assert undescribed == []
