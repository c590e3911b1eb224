"""The strict SATORI sandbox, over real HTTP with ``requests``.

One server per module (bulk jobs finish at once unless a test says
otherwise); each test starts from an empty state with no faults and the
default options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest
import requests
from django.conf import settings

from django_satori.conf import get_settings
from django_satori.sandbox import SandboxKeys, SandboxServer
from django_satori.sandbox.testing import use_sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
SINGLE = "/api/v4/public/customer/"
BULK = "/api/v4/public/bulk_customers/"
AUTH = {
    "user_key": "sandbox-user-key",
    "user_secret": "sandbox-user-secret",
    "company_key": "sandbox-company-key",
    "company_secret": "sandbox-company-secret",
}
TIMEOUT = 5


@pytest.fixture(scope="module")
def module_server() -> Iterator[SandboxServer]:
    with SandboxServer(bulk_processing_seconds=0) as server:
        yield server


@pytest.fixture
def sandbox(module_server: SandboxServer) -> Iterator[SandboxServer]:
    saved = module_server.config
    module_server.reset()
    yield module_server
    module_server.config = saved
    module_server.reset()


def call(
    server: SandboxServer, endpoint: str, auth: dict[str, str] | None = None, **customer: str
) -> requests.Response:
    """POST one single-customer call; ``customer`` keys go inside ``customer[...]``."""
    data = {**(AUTH if auth is None else auth)}
    data.update({f"customer[{k}]": v for k, v in customer.items()})
    return requests.post(f"{server.url}{SINGLE}{endpoint}.json", data=data, timeout=TIMEOUT)


def upsert(server: SandboxServer, **customer: str) -> requests.Response:
    customer.setdefault("identity_type", "email")
    return call(server, "upsert", **customer)


def register(server: SandboxServer, **customer: str) -> requests.Response:
    customer.setdefault("identity_type", "email")
    return call(server, "registration", **customer)


def upload(
    server: SandboxServer,
    csv: bytes | str,
    *,
    endpoint: str = "upsert",
    identity_type: str = "email",
    auth: dict[str, str] | None = None,
) -> requests.Response:
    content = csv.encode("utf-8") if isinstance(csv, str) else csv
    return requests.post(
        f"{server.url}{BULK}{endpoint}.json",
        data={**(AUTH if auth is None else auth), "identity_type": identity_type},
        files={"customer_csv_file": ("customers.csv", content, "text/csv")},
        timeout=TIMEOUT,
    )


def status(server: SandboxServer, code: str, **extra: str) -> requests.Response:
    return requests.get(
        f"{server.url}{BULK}status.json",
        params={**AUTH, "process_code": code, **extra},
        timeout=TIMEOUT,
    )


def finished(server: SandboxServer, csv: str, **kwargs: Any) -> dict[str, Any]:
    """Upload, then return the finished job's payload."""
    response = upload(server, csv, **kwargs)
    assert response.status_code == 200, response.text
    body = status(server, response.json()["body"]["process_code"]).json()["body"]
    assert body["process_status"] == "finished"
    return body


def assert_error(response: requests.Response, code: int, *fragments: str) -> None:
    assert response.status_code == code, response.text
    payload = response.json()
    assert payload["status"] == code
    assert isinstance(payload["message"], str)
    for fragment in fragments:
        assert fragment in payload["message"]


# -- single customer ----------------------------------------------------------


def test_upsert_creates_a_customer_and_answers_its_hashcode(sandbox):
    response = upsert(
        sandbox,
        email="taro@example.jp",
        last_name="山田",
        first_name="太郎",
        append_tags="資料請求,展示会",
        collection_date="2025-01-31",
        delivery_permission="approval",
        memo="一行目\n二行目",
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    hashcode = response.json()["message"]["customer[hashcode]"]
    assert response.json() == {"status": 200, "message": {"customer[hashcode]": hashcode}}
    assert re.fullmatch(r"[0-9a-f]{32}", hashcode)
    customer = sandbox.state.customer("TARO@example.jp")
    assert customer.hashcode == hashcode
    assert customer.fields == {
        "last_name": "山田",
        "first_name": "太郎",
        "collection_date": "2025-01-31",
        "delivery_permission": "approval",
        "memo": "一行目\n二行目",
    }
    assert customer.tags == {"資料請求", "展示会"}
    assert customer.created_by == AUTH["user_key"]
    (request,) = sandbox.state.requests_for("upsert")
    assert request.method == "POST"
    assert ("customer[last_name]", "山田") in request.form
    assert b"customer%5Blast_name%5D=%E5%B1%B1%E7%94%B0" in request.body
    assert request.status == 200 and request.fault is None


def test_multipart_is_accepted_for_single_calls(sandbox):
    response = requests.post(
        f"{sandbox.url}{SINGLE}upsert.json",
        files={
            k: (None, v)
            for k, v in {
                **AUTH,
                "customer[identity_type]": "email",
                "customer[email]": "m@example.jp",
                "customer[memo]": "マルチパート",
            }.items()
        },
        timeout=TIMEOUT,
    )
    assert response.status_code == 200, response.text
    assert sandbox.state.customer("m@example.jp").fields["memo"] == "マルチパート"


def test_upsert_overwrites_non_empty_values_and_empty_values_clear_nothing(sandbox):
    first = upsert(
        sandbox, email="taro@example.jp", last_name="山田", memo="old", append_tags="a,b"
    ).json()
    second = upsert(
        sandbox,
        email="Taro@Example.jp",
        last_name="田中",
        memo="",
        first_name="",
        append_tags="c",
        delete_tags="a",
    ).json()
    assert first == second  # same customer, matched case-insensitively
    assert list(sandbox.state.customers) == ["taro@example.jp"]
    customer = sandbox.state.customer("taro@example.jp")
    assert customer.email == "taro@example.jp"
    assert customer.fields == {"last_name": "田中", "memo": "old"}
    assert customer.tags == {"b", "c"}


def test_registration_creates_then_only_fills_blanks_and_adds_tags(sandbox):
    created = register(
        sandbox,
        email="hanako@example.jp",
        last_name="佐藤",
        delivery_permission="approval",
        append_tags="x",
    ).json()
    again = register(
        sandbox,
        email="hanako@example.jp",
        last_name="鈴木",
        first_name="花子",
        delivery_permission="reject",
        append_tags="y",
        delete_tags="x",
    ).json()
    assert created == again
    customer = sandbox.state.customer("hanako@example.jp")
    assert customer.fields == {
        "last_name": "佐藤",
        "first_name": "花子",
        "delivery_permission": "reject",
    }
    assert customer.tags == {"x", "y"}


def test_registration_fills_blank_custom_values_only(sandbox):
    register(sandbox, email="c@example.jp", **{"custom:plan": "free"})
    register(sandbox, email="c@example.jp", **{"custom:plan": "pro", "custom:rank": "A"})
    assert sandbox.state.customer("c@example.jp").custom == {"plan": "free", "rank": "A"}


def test_hashcode_identity_finds_the_customer_and_can_change_the_email(sandbox):
    hashcode = upsert(sandbox, email="old@example.jp").json()["message"]["customer[hashcode]"]
    upsert(sandbox, email="other@example.jp")
    response = call(
        sandbox,
        "upsert",
        identity_type="hashcode",
        hashcode=hashcode,
        email="new@example.jp",
        memo="moved",
    )
    assert response.json()["message"]["customer[hashcode]"] == hashcode
    assert sandbox.state.customer("old@example.jp") is None
    assert sandbox.state.customer("new@example.jp").fields["memo"] == "moved"

    taken = call(
        sandbox, "upsert", identity_type="hashcode", hashcode=hashcode, email="other@example.jp"
    )
    assert_error(taken, 400, "customer[email]")
    assert sandbox.state.customer("new@example.jp").hashcode == hashcode

    unknown = call(sandbox, "upsert", identity_type="hashcode", hashcode="0" * 32)
    assert_error(unknown, 404, "customer[hashcode]", "not found")
    both = upsert(sandbox, email="new@example.jp", hashcode=hashcode)
    assert_error(both, 400, "customer[hashcode]")


def test_delete_removes_and_unknown_customers_are_404(sandbox):
    upsert(sandbox, email="taro@example.jp")
    hashcode = upsert(sandbox, email="jiro@example.jp").json()["message"]["customer[hashcode]"]
    assert (
        call(sandbox, "delete", identity_type="email", email="TARO@example.jp").status_code == 200
    )
    assert sandbox.state.customer("taro@example.jp") is None
    assert_error(
        call(sandbox, "delete", identity_type="email", email="taro@example.jp"),
        404,
        "customer[email]",
        "not found",
    )
    assert_error(
        call(sandbox, "delete", identity_type="email", email="jiro@example.jp", memo="x"),
        400,
        "customer[memo]",
    )
    assert call(sandbox, "delete", identity_type="hashcode", hashcode=hashcode).status_code == 200
    assert sandbox.state.customers == {}


# A real key could hold characters that URL encoding changes: it must be scrubbed in both forms.
LEAKY = "my-real+production/secret=ключ&123"


@pytest.mark.parametrize("field", ["user_key", "user_secret", "company_key", "company_secret"])
def test_bad_or_missing_keys_are_401_without_echoing_any_key(sandbox, field):
    wrong = {**AUTH, field: LEAKY}
    response = call(sandbox, "upsert", auth=wrong, identity_type="email", email="a@example.jp")
    assert_error(response, 401)
    missing = {k: v for k, v in AUTH.items() if k != field}
    assert_error(
        call(sandbox, "upsert", auth=missing, identity_type="email", email="a@example.jp"), 401
    )
    for value in [*AUTH.values(), LEAKY]:
        assert value not in response.text
    assert sandbox.state.customers == {}
    shown = requests.get(f"{sandbox.url}/_sandbox/state", timeout=TIMEOUT).text
    page = requests.get(f"{sandbox.url}/", timeout=TIMEOUT).text
    listed = requests.get(f"{sandbox.url}/_sandbox/requests", timeout=TIMEOUT).text
    for text in (shown, page, listed):
        assert "********" in text
        for value in [*AUTH.values(), LEAKY]:
            assert value not in text
            assert quote_plus(value) not in text
        assert "ключ" not in text and "%D0%BA" not in text
    assert LEAKY not in repr(sandbox.state.requests)


@pytest.mark.parametrize(
    "data, name",
    [
        ({"customer[nickname]": "x"}, "customer[nickname]"),
        ({"nickname": "x"}, "nickname"),
        ({"customer[customer][email]": "x"}, "customer[customer][email]"),
        ({"customer[star]": "1"}, "customer[star]"),
    ],
)
def test_unknown_parameters_are_refused_by_name(sandbox, data, name):
    response = requests.post(
        f"{sandbox.url}{SINGLE}upsert.json",
        timeout=TIMEOUT,
        data={
            **AUTH,
            "customer[identity_type]": "email",
            "customer[email]": "a@example.jp",
            **data,
        },
    )
    assert_error(response, 400, name)
    assert sandbox.state.customers == {}


def test_duplicate_parameters_and_missing_identity_are_refused(sandbox):
    response = requests.post(
        f"{sandbox.url}{SINGLE}upsert.json",
        timeout=TIMEOUT,
        data=[
            *AUTH.items(),
            ("customer[identity_type]", "email"),
            ("customer[email]", "a@example.jp"),
            ("customer[email]", "b@example.jp"),
        ],
    )
    assert_error(response, 400, "customer[email]", "duplicate")
    assert_error(call(sandbox, "upsert", email="a@example.jp"), 400, "customer[identity_type]")
    assert_error(call(sandbox, "upsert", identity_type="email"), 400, "customer[email]")
    assert_error(
        call(sandbox, "upsert", identity_type="phone", email="a@example.jp"),
        400,
        "customer[identity_type]",
    )


@pytest.mark.parametrize(
    "email",
    [
        "ｔａｒｏ@example.jp",  # full-width: the sandbox does not normalise
        "taro@例え.jp",
        "taro.example.jp",
        " taro@example.jp",
        "taro..yamada@example.jp",
        "taro@example",
        "a" * 250 + "@example.jp",
    ],
)
def test_bad_emails_are_refused(sandbox, email):
    assert_error(upsert(sandbox, email=email), 400, "customer[email]")
    assert sandbox.state.customers == {}


@pytest.mark.parametrize(
    "field, value",
    [
        ("collection_date", "2025/01/31"),
        ("collection_date", "2025-02-30"),
        ("collection_date", "2025-1-3"),
        ("delivery_permission", "allow"),
        ("memo", "nul\x00byte"),
    ],
)
def test_bad_formats_are_refused_by_name(sandbox, field, value):
    assert_error(upsert(sandbox, email="a@example.jp", **{field: value}), 400, f"customer[{field}]")


def test_declared_custom_fields_are_type_checked(sandbox):
    sandbox.configure(
        custom_fields={
            "plan": "text",
            "age": "integer",
            "birthday": "date",
            "status": {"type": "select", "choices": ["対応中", "完了"]},
        }
    )
    ok = upsert(
        sandbox,
        email="a@example.jp",
        **{
            "custom:plan": "pro",
            "custom:age": "-3",
            "custom:birthday": "1990-04-01",
            "custom:status": "対応中",
        },
    )
    assert ok.status_code == 200, ok.text
    assert sandbox.state.customer("a@example.jp").custom == {
        "plan": "pro",
        "age": "-3",
        "birthday": "1990-04-01",
        "status": "対応中",
    }
    for key, value in [
        ("age", "3.5"),
        ("age", "三"),
        ("birthday", "1990/04/01"),
        ("status", "未決"),
        ("undeclared", "x"),
    ]:
        assert_error(
            upsert(sandbox, email="a@example.jp", **{f"custom:{key}": value}),
            400,
            f"customer[custom:{key}]",
        )
    assert sandbox.state.customer("a@example.jp").custom["age"] == "-3"


def test_undeclared_custom_fields_accept_any_valid_identifier(sandbox):
    assert sandbox.config.custom_fields is None
    assert upsert(sandbox, email="a@example.jp", **{"custom:Any_thing9": "x"}).status_code == 200
    assert_error(
        upsert(sandbox, email="a@example.jp", **{"custom:bad-id": "x"}),
        400,
        "customer[custom:bad-id]",
    )


def test_tag_separator_is_configurable(sandbox):
    sandbox.configure(tag_separator="|")
    upsert(sandbox, email="a@example.jp", append_tags="a,b|c| |c")
    assert sandbox.state.customer("a@example.jp").tags == {"a,b", "c"}


# -- permissions --------------------------------------------------------------


def test_own_only_refuses_changes_to_customers_created_by_another_key(sandbox):
    sandbox.configure(own_only=True)
    theirs = sandbox.seed_customer("theirs@example.jp", last_name="他人", created_by="someone")
    assert_error(upsert(sandbox, email="THEIRS@example.jp", last_name="私"), 403, "customer[email]")
    assert_error(register(sandbox, email="theirs@example.jp", first_name="x"), 403)
    assert_error(
        call(sandbox, "delete", identity_type="hashcode", hashcode=theirs.hashcode),
        403,
        "customer[hashcode]",
    )
    action = requests.post(
        f"{sandbox.url}/api/v4/public/customer/add_action.json",
        data={
            **AUTH,
            "customer[identity_type]": "email",
            "customer[email]": "theirs@example.jp",
            "action[name]": "x",
        },
        timeout=TIMEOUT,
    )
    assert_error(action, 403)
    assert theirs.fields == {"last_name": "他人"} and theirs.actions == []
    # Customers this key created stay editable.
    upsert(sandbox, email="mine@example.jp")
    assert upsert(sandbox, email="mine@example.jp", memo="ok").status_code == 200
    sandbox.configure(own_only=False)
    assert upsert(sandbox, email="theirs@example.jp", memo="now allowed").status_code == 200


def test_denied_operations_are_403_and_change_nothing(sandbox):
    upsert(sandbox, email="a@example.jp")
    sandbox.configure(deny_operations={"delete"})
    assert_error(
        call(sandbox, "delete", identity_type="email", email="a@example.jp"), 403, "delete"
    )
    assert sandbox.state.customer("a@example.jp") is not None
    sandbox.configure(deny_operations={"create"})
    assert_error(upsert(sandbox, email="new@example.jp"), 403, "create")
    assert upsert(sandbox, email="a@example.jp", memo="edit is fine").status_code == 200
    sandbox.configure(deny_operations={"edit"})
    assert_error(upsert(sandbox, email="a@example.jp", memo="no"), 403, "edit")
    assert sandbox.state.customer("a@example.jp").fields["memo"] == "edit is fine"
    with pytest.raises(ValueError, match="Unknown operation"):
        sandbox.configure(deny_operations={"fly"})


# -- add_action ---------------------------------------------------------------


def action(
    server: SandboxServer, path: str = "/api/v4/public/customer/add_action.json", **params: str
) -> requests.Response:
    return requests.post(f"{server.url}{path}", data={**AUTH, **params}, timeout=TIMEOUT)


def test_add_action_is_stored_on_the_customer(sandbox):
    hashcode = upsert(sandbox, email="a@example.jp").json()["message"]["customer[hashcode]"]
    response = action(
        sandbox,
        **{
            "customer[identity_type]": "email",
            "customer[email]": "A@example.jp",
            "action[name]": "資料請求",
            "action[content]": "PDF",
            "action[url]": "https://example.jp/doc",
            "action[date]": "2025-01-31 09:30:00",
        },
    )
    assert response.json() == {"status": 200, "message": {"customer[hashcode]": hashcode}}
    (stored,) = sandbox.state.customer("a@example.jp").actions
    assert (stored.name, stored.content, stored.url, stored.date) == (
        "資料請求",
        "PDF",
        "https://example.jp/doc",
        "2025-01-31 09:30:00",
    )
    by_hashcode = action(
        sandbox,
        **{
            "customer[identity_type]": "hashcode",
            "customer[hashcode]": hashcode,
            "action[name]": "来場",
        },
    )
    assert by_hashcode.status_code == 200
    assert len(sandbox.state.customer("a@example.jp").actions) == 2


def test_add_action_rules(sandbox):
    upsert(sandbox, email="a@example.jp")
    who = {"customer[identity_type]": "email", "customer[email]": "a@example.jp"}
    assert_error(action(sandbox, **who), 400, "action[name]")
    assert_error(
        action(sandbox, **who, **{"action[name]": "x", "action[date]": "2025-01-31T09:30:00"}),
        400,
        "action[date]",
    )
    assert_error(
        action(sandbox, **who, **{"action[name]": "x", "action[url]": "/relative"}),
        400,
        "action[url]",
    )
    assert_error(
        action(sandbox, **who, **{"action[name]": "x", "action[kind]": "y"}), 400, "action[kind]"
    )
    assert_error(
        action(sandbox, **who, **{"action[name]": "x", "customer[memo]": "y"}),
        400,
        "customer[memo]",
    )
    assert_error(
        action(
            sandbox,
            **{
                "customer[identity_type]": "email",
                "customer[email]": "nobody@example.jp",
                "action[name]": "x",
            },
        ),
        404,
        "not found",
    )
    assert sandbox.state.customer("a@example.jp").actions == []


def test_add_action_path_and_parameter_names_are_configurable(sandbox):
    sandbox.configure(
        action_path="/api/v4/public/action/add.json",
        action_params={"name": "action_name", "date": "action_date"},
    )
    upsert(sandbox, email="a@example.jp")
    who = {"customer[identity_type]": "email", "customer[email]": "a@example.jp"}
    assert action(sandbox, **who, action_name="x").status_code == 404  # old path is gone
    moved = "/api/v4/public/action/add.json"
    assert_error(action(sandbox, moved, **who, **{"action[name]": "x"}), 400, "action[name]")
    ok = action(sandbox, moved, **who, action_name="来店", action_date="2025-02-01 10:00:00")
    assert ok.status_code == 200, ok.text
    assert sandbox.state.customer("a@example.jp").actions[0].date == "2025-02-01 10:00:00"


# -- bulk CSV -----------------------------------------------------------------


def test_bulk_upsert_applies_rows_and_numbers_records_not_lines(sandbox):
    csv = (
        "email,last_name,memo,collection_route,custom:plan\r\n"
        'a@example.jp,山田,"first line\r\nsecond line",web,pro\r\n'  # row 2 spans two lines
        'b@example.jp,"Sato, Jr.","quote "" inside",web,\r\n'  # row 3
        "c@example.jp,鈴木,,,\r\n"  # row 4: no collection_route
        "not-an-email,x,,web,\r\n"  # row 5
        'A@EXAMPLE.JP,again,"x\ny\nz",web,\r\n'  # row 6: same e-mail as row 2
        "d@example.jp,田中,,web\r\n"  # row 7: a column short
        "e@example.jp,伊藤,,web,basic\r\n"  # row 8
    )
    response = upload(sandbox, csv)
    assert response.status_code == 200
    payload = response.json()
    assert payload["status"] == 202 and payload["message"] == "Accepted"
    code = payload["body"]["process_code"]
    body = status(sandbox, code).json()["body"]
    assert body["process_code"] == code and body["process_status"] == "finished"
    assert body["succeeded_rows"] == [{"row_number": 2}, {"row_number": 3}, {"row_number": 8}]
    failed = {row["row_number"]: row["message"] for row in body["failed_rows"]}
    assert sorted(failed) == [4, 5, 6, 7]
    assert "collection_route" in failed[4]
    assert "email" in failed[5]
    assert "email" in failed[6]
    assert "columns" in failed[7]
    a = sandbox.state.customer("a@example.jp")
    assert a.fields["memo"] == "first line\r\nsecond line" and a.custom == {"plan": "pro"}
    assert sandbox.state.customer("b@example.jp").fields["last_name"] == "Sato, Jr."
    assert sandbox.state.customer("b@example.jp").fields["memo"] == 'quote " inside'
    assert sandbox.state.customer("c@example.jp") is None
    assert sorted(sandbox.state.customers) == ["a@example.jp", "b@example.jp", "e@example.jp"]
    (request,) = sandbox.state.requests_for("bulk_upsert")
    (upload_file,) = request.files
    assert upload_file.name == "customer_csv_file" and upload_file.content == csv.encode()
    assert dict(request.form)["identity_type"] == "email"


def test_bulk_blank_cells_keep_values_and_registration_only_fills_blanks(sandbox):
    upsert(sandbox, email="a@example.jp", last_name="山田", memo="keep")
    finished(sandbox, "email,last_name,memo,collection_route\na@example.jp,田中,,web\n")
    assert sandbox.state.customer("a@example.jp").fields == {
        "last_name": "田中",
        "memo": "keep",
        "collection_route": "web",
    }
    finished(
        sandbox,
        "email,last_name,first_name,collection_route,append_tags\n"
        "a@example.jp,佐藤,一郎,form,t1\nnew@example.jp,新,,form,\n",
        endpoint="registration",
    )
    customer = sandbox.state.customer("a@example.jp")
    assert customer.fields == {
        "last_name": "田中",
        "memo": "keep",
        "first_name": "一郎",
        "collection_route": "web",
    }
    assert customer.tags == {"t1"}
    assert sandbox.state.customer("new@example.jp").fields["last_name"] == "新"


def test_bulk_accepts_a_bom_and_hashcode_identity(sandbox):
    hashcode = upsert(sandbox, email="a@example.jp").json()["message"]["customer[hashcode]"]
    body = finished(
        sandbox,
        (
            f"\ufeffhashcode,memo,collection_route\n{hashcode},bom ok,web\n{'f' * 32},x,web\n"
        ).encode(),
        identity_type="hashcode",
    )
    assert body["succeeded_rows"] == [{"row_number": 2}]
    assert [r["row_number"] for r in body["failed_rows"]] == [3]
    assert "not found" in body["failed_rows"][0]["message"]
    assert sandbox.state.customer("a@example.jp").fields["memo"] == "bom ok"


def test_bulk_rows_respect_permissions(sandbox):
    sandbox.configure(own_only=True)
    sandbox.seed_customer("theirs@example.jp")
    body = finished(sandbox, "email,collection_route\ntheirs@example.jp,web\nmine@example.jp,web\n")
    assert body["succeeded_rows"] == [{"row_number": 3}]
    assert body["failed_rows"][0]["row_number"] == 2
    assert "another user" in body["failed_rows"][0]["message"]
    sandbox.configure(deny_operations={"bulk_upsert"})
    assert_error(upload(sandbox, "email,collection_route\nx@example.jp,web\n"), 403)


@pytest.mark.parametrize(
    "csv, fragment",
    [
        ("email,nickname,collection_route\na@example.jp,x,web\n", "nickname"),
        ("email,custom:bad-id,collection_route\na@example.jp,x,web\n", "custom:bad-id"),
        ("last_name,collection_route\n山田,web\n", "email"),
        ("email,email,collection_route\na@example.jp,a@example.jp,web\n", "email"),
        ("email,collection_route\n", "no data rows"),
        ("", "header"),
        ('email,collection_route\na@example.jp,"unterminated\n', "malformed CSV"),
        (b"email,last_name,collection_route\na@example.jp,\x8eR\x93c,web\n", "UTF-8"),
    ],
)
def test_bulk_files_refused_as_a_whole(sandbox, csv, fragment):
    response = upload(sandbox, csv)
    assert_error(response, 400, fragment)
    assert sandbox.state.jobs == {}


def test_bulk_undeclared_custom_column_is_refused(sandbox):
    sandbox.configure(custom_fields={"plan": "text"})
    assert_error(
        upload(sandbox, "email,custom:rank,collection_route\na@example.jp,A,web\n"),
        400,
        "custom:rank",
    )


def test_bulk_row_limit_is_10000(sandbox):
    rows = "".join(f"u{i}@example.jp,web\n" for i in range(10_000))
    assert_error(
        upload(sandbox, "email,collection_route\n" + rows + "last@example.jp,web\n"), 400, "10000"
    )
    body = finished(sandbox, "email,collection_route\n" + rows)
    assert len(body["succeeded_rows"]) == 10_000 and body["failed_rows"] == []
    assert body["succeeded_rows"][-1] == {"row_number": 10_001}


def test_bulk_request_shape_is_checked(sandbox):
    url = f"{sandbox.url}{BULK}upsert.json"
    urlencoded = requests.post(
        url,
        data={**AUTH, "identity_type": "email", "customer_csv_file": "email\n"},
        timeout=TIMEOUT,
    )
    assert_error(urlencoded, 400, "multipart/form-data")
    no_file = requests.post(
        url,
        files={k: (None, v) for k, v in {**AUTH, "identity_type": "email"}.items()},
        timeout=TIMEOUT,
    )
    assert_error(no_file, 400, "customer_csv_file")
    assert_error(
        upload(sandbox, "email,collection_route\na@example.jp,web\n", identity_type=""),
        400,
        "identity_type",
    )
    assert_error(
        upload(
            sandbox,
            "email,collection_route\na@example.jp,web\n",
            auth={**AUTH, "company_secret": "nope"},
        ),
        401,
    )
    assert sandbox.state.jobs == {}


def test_bulk_job_is_processing_until_its_time_is_over(sandbox):
    sandbox.configure(bulk_processing_seconds=0.4)
    code = upload(sandbox, "email,collection_route\na@example.jp,web\n").json()["body"][
        "process_code"
    ]
    body = status(sandbox, code).json()["body"]
    assert body == {
        "process_code": code,
        "process_status": "processing",
        "succeeded_rows": [],
        "failed_rows": [],
    }
    assert sandbox.state.customer("a@example.jp") is None
    time.sleep(0.5)
    assert sandbox.state.customer("a@example.jp") is not None  # applied without polling
    body = status(sandbox, code).json()["body"]
    assert body["process_status"] == "finished"
    assert body["succeeded_rows"] == [{"row_number": 2}]


def test_process_codes_expire_and_can_be_forgotten(sandbox):
    sandbox.configure(process_code_ttl=0.3)
    code = upload(sandbox, "email,collection_route\na@example.jp,web\n").json()["body"][
        "process_code"
    ]
    assert status(sandbox, code).status_code == 200
    time.sleep(0.4)
    assert_error(status(sandbox, code), 404, "process_code")
    assert_error(status(sandbox, "no-such-code"), 404, "process_code")

    sandbox.configure(process_code_ttl=3600, bulk_processing_seconds=30)
    code = upload(sandbox, "email,collection_route\nb@example.jp,web\n").json()["body"][
        "process_code"
    ]
    forgotten = requests.post(f"{sandbox.url}/_sandbox/forget-process-codes", timeout=TIMEOUT)
    assert forgotten.json() == {"forgotten": 1}
    assert_error(status(sandbox, code), 404)
    assert sandbox.state.customer("b@example.jp") is not None  # the work was still done


def test_status_checks_keys_and_parameters(sandbox):
    code = upload(sandbox, "email,collection_route\na@example.jp,web\n").json()["body"][
        "process_code"
    ]
    assert_error(status(sandbox, code, user_secret="wrong"), 401)
    assert_error(status(sandbox, code, verbose="1"), 400, "verbose")
    assert_error(status(sandbox, ""), 400, "process_code")
    post = requests.post(
        f"{sandbox.url}{BULK}status.json", data={**AUTH, "process_code": code}, timeout=TIMEOUT
    )
    assert_error(post, 405)
    assert post.headers["Allow"] == "GET"


@pytest.mark.parametrize("envelope", ["body", "message", "top"])
def test_bulk_envelopes(sandbox, envelope):
    sandbox.configure(envelope=envelope)
    uploaded = upload(sandbox, "email,collection_route\na@example.jp,web\n").json()
    checked = None
    if envelope == "body":
        assert uploaded["status"] == 202 and uploaded["message"] == "Accepted"
        code = uploaded["body"]["process_code"]
        checked = status(sandbox, code).json()
        assert checked["message"] == "OK" and checked["body"]["process_status"] == "finished"
    elif envelope == "message":
        assert uploaded["status"] == 202 and "body" not in uploaded
        code = uploaded["message"]["process_code"]
        checked = status(sandbox, code).json()
        assert checked["message"]["succeeded_rows"] == [{"row_number": 2}]
    else:
        assert uploaded["message"] == "Accepted" and "body" not in uploaded
        code = uploaded["process_code"]
        checked = status(sandbox, code).json()
        assert checked["process_status"] == "finished" and checked["failed_rows"] == []
    assert checked["status"] == 200


# -- faults -------------------------------------------------------------------


@pytest.mark.parametrize("kind, http_status", [("500", 500), ("503", 503), ("429", 429)])
def test_json_faults_change_nothing_and_are_counted(sandbox, kind, http_status):
    sandbox.faults.retry_after = 7
    sandbox.faults.fail_first(2, kind=kind)
    for _attempt in range(2):
        response = upsert(sandbox, email="a@example.jp")
        assert_error(response, http_status)
        assert sandbox.state.customers == {}
        if kind == "429":
            assert response.headers["Retry-After"] == "7"
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    assert sandbox.state.faults_injected == 2
    assert sandbox.state.faults_by_kind == {kind: 2}
    assert [r.fault for r in sandbox.state.requests] == [kind, kind, None]


def test_html_fault_is_a_502_page(sandbox):
    sandbox.faults.fail_first(1, kind="html")
    response = upload(sandbox, "email,collection_route\na@example.jp,web\n")
    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    with pytest.raises(ValueError):
        response.json()
    assert sandbox.state.jobs == {}


def test_drop_fault_closes_the_connection_without_a_reply(sandbox):
    sandbox.faults.fail_first(1, kind="drop")
    with pytest.raises(requests.ConnectionError):
        upsert(sandbox, email="a@example.jp")
    assert sandbox.state.customers == {}
    (request,) = sandbox.state.requests
    assert request.fault == "drop" and request.status is None
    assert upsert(sandbox, email="a@example.jp").status_code == 200


def test_timeout_fault_outlasts_the_client_then_answers_504(sandbox):
    sandbox.faults.timeout_seconds = 0.6
    sandbox.faults.fail_first(2, kind="timeout")
    with pytest.raises(requests.Timeout):
        requests.post(
            f"{sandbox.url}{SINGLE}upsert.json",
            timeout=0.2,
            data={**AUTH, "customer[identity_type]": "email", "customer[email]": "a@example.jp"},
        )
    started = time.monotonic()
    late = upsert(sandbox, email="a@example.jp")
    assert time.monotonic() - started >= 0.55
    assert_error(late, 504)
    assert sandbox.state.customers == {}
    assert sandbox.state.faults_by_kind == {"timeout": 2}


def test_random_faults_are_reproducible_with_a_seed(sandbox):
    def run() -> list[int]:
        sandbox.faults.set_random(rate=0.5, kinds=["500", "503"], seed=42)
        return [upsert(sandbox, email=f"u{i}@example.jp").status_code for i in range(12)]

    first = run()
    second = run()
    assert first == second
    assert {500, 503, 200} <= set(first)
    assert len(sandbox.state.customers) == first.count(200)


def test_faults_can_target_operations_and_spare_control_endpoints(sandbox):
    sandbox.faults.fail_first(1, kind="503", operations=["bulk_status"])
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    code = upload(sandbox, "email,collection_route\nb@example.jp,web\n").json()["body"][
        "process_code"
    ]
    assert status(sandbox, code).status_code == 503
    assert status(sandbox, code).status_code == 200
    sandbox.faults.set_random(rate=1.0, kinds=["drop"])
    assert requests.get(f"{sandbox.url}/_sandbox/state", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{sandbox.url}/", timeout=TIMEOUT).status_code == 200


def test_delay_holds_every_satori_request(sandbox):
    sandbox.faults.delay = 0.3
    started = time.monotonic()
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    assert time.monotonic() - started >= 0.29


def test_faults_are_set_through_the_control_endpoint(sandbox):
    url = f"{sandbox.url}/_sandbox/faults"
    shown = requests.post(
        url, json={"fail_first": 1, "kind": "429", "retry_after": 3}, timeout=TIMEOUT
    ).json()
    assert shown["queued"] == [{"kind": "429", "remaining": 1, "operations": None}]
    response = upsert(sandbox, email="a@example.jp")
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
    assert (
        requests.post(url, json={"kind": "explode", "fail_first": 1}, timeout=TIMEOUT).status_code
        == 400
    )
    assert requests.post(url, data="not json", timeout=TIMEOUT).status_code == 400
    assert requests.post(url, json={"bogus": 1}, timeout=TIMEOUT).status_code == 400
    requests.post(url, json={"rate": 1.0, "kinds": "500"}, timeout=TIMEOUT)
    assert upsert(sandbox, email="a@example.jp").status_code == 500
    requests.post(url, json={"clear": True}, timeout=TIMEOUT)
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    assert requests.get(url, timeout=TIMEOUT).json()["rate"] == 0.0


def test_faults_clear_from_python(sandbox):
    sandbox.faults.fail_first(5)
    sandbox.faults.set_random(rate=1.0)
    sandbox.faults.delay = 1.0
    sandbox.faults.clear()
    assert sandbox.faults.delay == 0.0
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    with pytest.raises(ValueError):
        sandbox.faults.fail_first(1, kind="teapot")


def test_dribble_fault_sends_its_reply_byte_by_byte_and_changes_nothing(sandbox):
    sandbox.faults.dribble_seconds = 0.02
    sandbox.faults.fail_first(1, kind="dribble")
    started = time.monotonic()
    # Each read waits 0.02 s, far inside the 0.5 s read timeout; the whole reply does not.
    response = requests.post(
        f"{sandbox.url}{SINGLE}upsert.json",
        timeout=0.5,
        data={**AUTH, "customer[identity_type]": "email", "customer[email]": "a@example.jp"},
    )
    elapsed = time.monotonic() - started
    assert_error(response, 503, "dribbled")
    assert elapsed >= 0.02 * len(response.content) * 0.9
    assert sandbox.state.customers == {}
    (request,) = sandbox.state.requests
    assert request.fault == "dribble" and request.status == 503
    assert upsert(sandbox, email="a@example.jp").status_code == 200


def test_dribble_fault_stops_when_the_client_hangs_up(sandbox):
    sandbox.faults.dribble_seconds = 0.2
    sandbox.faults.fail_first(1, kind="dribble")
    with requests.post(
        f"{sandbox.url}{SINGLE}upsert.json",
        timeout=TIMEOUT,
        stream=True,
        data={**AUTH, "customer[identity_type]": "email", "customer[email]": "a@example.jp"},
    ) as response:
        assert response.status_code == 503
        assert response.raw.read(1) == b"{"
    # The sandbox is free for the next request at once.
    started = time.monotonic()
    assert upsert(sandbox, email="a@example.jp").status_code == 200
    assert time.monotonic() - started < 1


def test_oversized_fault_sends_the_configured_number_of_bytes(sandbox):
    sandbox.faults.oversized_bytes = 300_000
    sandbox.faults.fail_first(1, kind="oversized", operations=["upsert"])
    response = upsert(sandbox, email="a@example.jp")
    assert len(response.content) == 300_000
    assert_error(response, 503)
    assert sandbox.state.customers == {}
    assert sandbox.state.faults_by_kind == {"oversized": 1}


def test_dribble_and_oversized_are_set_through_the_control_endpoint(sandbox):
    url = f"{sandbox.url}/_sandbox/faults"
    shown = requests.post(
        url,
        json={
            "fail_first": 2,
            "kind": "oversized",
            "dribble_seconds": 0.01,
            "oversized_bytes": 1000,
        },
        timeout=TIMEOUT,
    ).json()
    assert shown["dribble_seconds"] == 0.01 and shown["oversized_bytes"] == 1000
    assert shown["queued"] == [{"kind": "oversized", "remaining": 2, "operations": None}]
    assert len(upsert(sandbox, email="a@example.jp").content) == 1000
    requests.post(url, json={"clear": True, "fail_first": 1, "kind": "dribble"}, timeout=TIMEOUT)
    assert requests.get(url, timeout=TIMEOUT).json()["dribble_seconds"] == 1.0  # cleared
    for bad in ({"oversized_bytes": 0}, {"dribble_seconds": -1}, {"oversized_bytes": "x"}):
        assert requests.post(url, json=bad, timeout=TIMEOUT).status_code == 400


def test_cli_sets_dribble_and_oversized_options():
    from django_satori.sandbox.cli import add_arguments, build_server

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = vars(
        parser.parse_args(
            [
                "--fail-first",
                "1",
                "--fail-kind",
                "dribble",
                "--dribble-seconds",
                "4",
                "--oversized-bytes",
                "5000",
                "--port",
                "0",
            ]
        )
    )
    server = build_server(options)
    assert server.faults.dribble_seconds == 4.0 and server.faults.oversized_bytes == 5000
    assert server.faults.pick("upsert") == "dribble"
    defaults = build_server(vars(parser.parse_args(["--port", "0"]))).faults
    assert (defaults.dribble_seconds, defaults.oversized_bytes) == (1.0, 16 * 1024 * 1024)


def test_stop_releases_a_request_held_by_a_timeout_fault():
    server = SandboxServer().start()
    server.faults.timeout_seconds = 60
    server.faults.fail_first(1, kind="timeout")
    errors: list[BaseException] = []

    def client() -> None:
        try:
            upsert(server, email="a@example.jp")
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    server.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 3


# -- HTTP strictness, control endpoints, server object ------------------------


def test_http_level_strictness(sandbox):
    url = f"{sandbox.url}{SINGLE}upsert.json"
    assert_error(requests.get(url, timeout=TIMEOUT), 405)
    assert_error(
        requests.post(
            f"{sandbox.url}/api/v4/public/customer/update.json", data=AUTH, timeout=TIMEOUT
        ),
        404,
    )
    in_query = requests.post(
        url,
        params=AUTH,
        data={"customer[identity_type]": "email", "customer[email]": "a@example.jp"},
        timeout=TIMEOUT,
    )
    assert_error(in_query, 400, "query")
    as_json = requests.post(url, json={**AUTH}, timeout=TIMEOUT)
    assert_error(as_json, 400, "Content-Type")
    latin1 = requests.post(
        url,
        data=b"user_key=%E9&x=1",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_error(latin1, 400, "UTF-8")
    sjis = requests.post(
        url,
        data=b"a=b",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=Shift_JIS"},
    )
    assert_error(sjis, 400, "UTF-8")
    assert sandbox.state.customers == {}


def test_keep_alive_connections_are_reused(sandbox):
    with requests.Session() as session:
        responses = [
            session.post(
                f"{sandbox.url}{SINGLE}upsert.json",
                timeout=TIMEOUT,
                data={
                    **AUTH,
                    "customer[identity_type]": "email",
                    "customer[email]": f"k{i}@example.jp",
                },
            )
            for i in range(3)
        ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.raw.version == 11 for r in responses)
    assert all(r.headers.get("Connection", "").lower() != "close" for r in responses)


def test_concurrent_requests_are_safe(sandbox):
    def work(i: int) -> int:
        return upsert(sandbox, email=f"user{i % 5}@example.jp", append_tags=f"t{i}").status_code

    threads = []
    results: list[int] = []
    for i in range(20):
        thread = threading.Thread(target=lambda i=i: results.append(work(i)))
        threads.append(thread)
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 20
    assert len(sandbox.state.customers) == 5
    assert set().union(*(c.tags for c in sandbox.state.customers.values())) == {
        f"t{i}" for i in range(20)
    }


def test_control_endpoints_show_state_and_reset(sandbox):
    upsert(sandbox, email="a@example.jp", last_name="山田")
    upload(sandbox, "email,collection_route\nb@example.jp,web\n")
    state = requests.get(f"{sandbox.url}/_sandbox/state", timeout=TIMEOUT).json()
    assert {c["email"] for c in state["customers"]} == {"a@example.jp", "b@example.jp"}
    assert state["customers"][0]["created_by"] == "********"
    assert state["jobs"][0]["process_status"] == "finished"
    assert state["config"]["keys"] == "********"
    assert [r["operation"] for r in state["requests"]] == ["upsert", "bulk_upsert"]
    assert ["user_key", "********"] in state["requests"][0]["form"]
    assert state["requests"][1]["files"][0]["content"].startswith("email,collection_route")
    requests_view = requests.get(f"{sandbox.url}/_sandbox/requests", timeout=TIMEOUT).json()
    assert len(requests_view) == 2 and "********" in requests_view[0]["body"]
    page = requests.get(f"{sandbox.url}/", timeout=TIMEOUT)
    assert page.headers["Content-Type"].startswith("text/html")
    assert "a@example.jp" in page.text and "山田" in page.text
    assert requests.post(f"{sandbox.url}/_sandbox/reset", timeout=TIMEOUT).json() == {"ok": True}
    assert sandbox.state.customers == {} and sandbox.state.requests == []
    assert requests.get(f"{sandbox.url}/_sandbox/nope", timeout=TIMEOUT).status_code == 404
    assert requests.get(f"{sandbox.url}/_sandbox/reset", timeout=TIMEOUT).status_code == 405
    # Control calls are not recorded as SATORI requests.
    assert sandbox.state.requests == []


def test_html_page_escapes_values(sandbox):
    upsert(sandbox, email="a@example.jp", last_name="<script>alert(1)</script>")
    page = requests.get(f"{sandbox.url}/", timeout=TIMEOUT).text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;" in page


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.com"])
def test_non_loopback_hosts_are_refused_unless_allowed(host):
    with pytest.raises(ValueError, match="allow_remote"):
        SandboxServer(host)
    SandboxServer(host, allow_remote=True)  # constructing does not bind


def test_loopback_hosts_and_the_server_object():
    keys = SandboxKeys("uk", "us", "ck", "cs")
    assert "uk" not in repr(keys) and "cs" not in repr(keys)
    server = SandboxServer("::1", keys=keys, envelope="top")
    with pytest.raises(RuntimeError):
        _ = server.url
    with server:
        assert re.fullmatch(r"http://\[::1\]:\d+", server.url)
        response = requests.post(
            f"{server.url}{SINGLE}upsert.json",
            timeout=TIMEOUT,
            data={
                "user_key": "uk",
                "user_secret": "us",
                "company_key": "ck",
                "company_secret": "cs",
                "customer[identity_type]": "email",
                "customer[email]": "a@example.jp",
            },
        )
        assert response.status_code == 200
        assert server.url in repr(server)
    assert "not started" in repr(server)
    with SandboxServer("localhost") as local:
        assert local.url.startswith("http://localhost:")
    with pytest.raises(ValueError):
        SandboxServer(envelope="nested")
    with pytest.raises(ValueError):
        SandboxServer(custom_fields={"plan": "blob"})


# -- command line, manage.py, pytest fixture ---------------------------------


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if match is None:
        process.kill()
        raise AssertionError(f"no URL in {line!r}; stderr: {process.stderr.read()}")
    return process, match.group(1)


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    out, _err = process.communicate(timeout=10)
    assert process.returncode == 0
    return out


def test_cli_runs_as_a_process_with_options_and_stops_on_sigterm():
    process, url = _start(
        [
            sys.executable,
            "-m",
            "django_satori.sandbox",
            "--port",
            "0",
            "--quiet",
            "--user-key",
            "cli-uk",
            "--user-secret",
            "cli-us",
            "--company-key",
            "cli-ck",
            "--company-secret",
            "cli-cs",
            "--custom-field",
            "age:integer",
            "--fail-first",
            "1",
            "--fail-kind",
            "503",
            "--processing-seconds",
            "0",
        ]
    )
    try:
        data = {
            "user_key": "cli-uk",
            "user_secret": "cli-us",
            "company_key": "cli-ck",
            "company_secret": "cli-cs",
            "customer[identity_type]": "email",
            "customer[email]": "a@example.jp",
            "customer[custom:age]": "30",
        }
        assert (
            requests.post(f"{url}{SINGLE}upsert.json", data=data, timeout=TIMEOUT).status_code
            == 503
        )
        assert (
            requests.post(f"{url}{SINGLE}upsert.json", data=data, timeout=TIMEOUT).status_code
            == 200
        )
        bad = requests.post(
            f"{url}{SINGLE}upsert.json",
            timeout=TIMEOUT,
            data={**data, "customer[custom:age]": "thirty"},
        )
        assert bad.status_code == 400
        state = requests.get(f"{url}/_sandbox/state", timeout=TIMEOUT).json()
        assert state["faults_injected"] == 1
        assert "cli-us" not in json.dumps(state)
    finally:
        out = _stop(process)
    assert "stopped" in out


def test_cli_refuses_a_remote_host_without_the_flag():
    result = subprocess.run(
        [sys.executable, "-m", "django_satori.sandbox", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert "allow_remote" in result.stderr


def test_manage_py_command_accepts_the_projects_keys_and_custom_fields():
    process, url = _start(
        [sys.executable, "-m", "django", "satori_sandbox", "--port", "0", "--quiet"],
        env={"DJANGO_SETTINGS_MODULE": "tests.settings"},
    )
    try:
        keys = {
            name.lower(): settings.SATORI[name]
            for name in ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET")
        }
        data = {
            **keys,
            "customer[identity_type]": "email",
            "customer[email]": "a@example.jp",
            "customer[custom:age]": "41",
        }
        assert (
            requests.post(f"{url}{SINGLE}upsert.json", data=data, timeout=TIMEOUT).status_code
            == 200
        )
        undeclared = requests.post(
            f"{url}{SINGLE}upsert.json",
            timeout=TIMEOUT,
            data={**data, "customer[custom:rank]": "A"},
        )
        assert undeclared.status_code == 400
        assert (
            requests.post(
                f"{url}{SINGLE}upsert.json", data={**data, **AUTH}, timeout=TIMEOUT
            ).status_code
            == 401
        )
    finally:
        _stop(process)


def test_fixture_points_settings_at_the_sandbox(satori_sandbox, satori_sandbox_server):
    assert satori_sandbox is satori_sandbox_server
    assert settings.SATORI["BASE_URL"] == satori_sandbox.url
    assert satori_sandbox.url == get_settings().BASE_URL
    assert satori_sandbox.config.bulk_processing_seconds == 0
    keys = {
        name.lower(): settings.SATORI[name]
        for name in ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET")
    }
    data = {
        **keys,
        "customer[identity_type]": "email",
        "customer[email]": "a@example.jp",
        "customer[custom:age]": "x",
    }
    assert_error(
        requests.post(f"{satori_sandbox.url}{SINGLE}upsert.json", data=data, timeout=TIMEOUT),
        400,
        "customer[custom:age]",
    )
    data["customer[custom:age]"] = "7"
    assert (
        requests.post(
            f"{satori_sandbox.url}{SINGLE}upsert.json", data=data, timeout=TIMEOUT
        ).status_code
        == 200
    )
    assert satori_sandbox.state.customer("a@example.jp").custom == {"age": "7"}


def test_use_sandbox_restores_settings_and_options(module_server):
    original_url = settings.SATORI["BASE_URL"]
    original = module_server.config
    module_server.faults.fail_first(3)
    with use_sandbox(module_server) as server:
        assert server.faults.as_dict()["queued"] == []
        assert settings.SATORI["BASE_URL"] == server.url
        assert server.keys.user_key == settings.SATORI["USER_KEY"]
        server.configure(own_only=True)
        upsert(server, email="ignored@example.jp")
    assert settings.SATORI["BASE_URL"] == original_url
    assert original_url == get_settings().BASE_URL
    assert module_server.config is original
    assert module_server.state.requests == []


def test_use_sandbox_gives_a_keyless_project_the_sandbox_keys(module_server, settings):
    settings.SATORI = {"CUSTOM_FIELDS": {"plan": "text"}}
    with use_sandbox(module_server) as server:
        assert settings.SATORI["USER_KEY"] == "sandbox-user-key"
        assert server.config.custom_fields is not None
        assert set(server.config.custom_fields) == {"plan"}
        assert upsert(server, email="a@example.jp", **{"custom:plan": "x"}).status_code == 200


def test_the_pytest_plugin_imports_without_django():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'django' or name.startswith('django.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import django_satori.sandbox.pytest_plugin\n"
        "from django_satori.sandbox.testing import project_settings\n"
        "assert project_settings() is None\n"
        "assert 'django' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_jobs_can_be_waited_for_or_finished_from_python(sandbox):
    sandbox.configure(bulk_processing_seconds=0.2)
    upload(sandbox, "email,collection_route\na@example.jp,web\n")
    assert sandbox.state.customer("a@example.jp") is None
    sandbox.wait_for_jobs(timeout=2)
    assert sandbox.state.customer("a@example.jp") is not None
    sandbox.configure(bulk_processing_seconds=60)
    code = upload(sandbox, "email,collection_route\nb@example.jp,web\n").json()["body"][
        "process_code"
    ]
    with pytest.raises(TimeoutError):
        sandbox.wait_for_jobs(timeout=0.1)
    assert sandbox.finish_bulk_jobs() == 1
    assert status(sandbox, code).json()["body"]["process_status"] == "finished"
    assert sandbox.state.customer("b@example.jp") is not None


def test_the_standalone_sandbox_starts_without_django_settings():
    # `python -m django_satori.sandbox` outside any project: no settings module, so
    # nothing it imports may read Django settings at import time.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "-m", "django_satori.sandbox", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--own-only" in result.stdout
