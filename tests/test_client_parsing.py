"""The reply parser and the redaction helpers, without a network.

``parse_response`` sees whatever a server, proxy or maintenance page sends,
so it is fuzzed: whatever the bytes, only our typed errors come out, and the
API keys planted in a reply never reach an error's text.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from typing import Any

import pytest
from django.utils import translation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_satori.client import SatoriReply, error_for_status, parse_response
from django_satori.conf import get_settings
from django_satori.exceptions import (
    SatoriAuthenticationError,
    SatoriConfigurationError,
    SatoriError,
    SatoriNotFoundError,
    SatoriPermissionError,
    SatoriRateLimitError,
    SatoriTransientError,
    SatoriValidationError,
)
from django_satori.redaction import (
    MASK,
    QueryStringScrubber,
    SecretNeedles,
    install_log_filters,
    redact_form,
    redact_text,
    redaction_marker,
    scrub,
    scrub_data,
    scrub_query,
    secret_needles,
    summarize_response,
)

JSON = {"Content-Type": "application/json"}
SECRETS = ("k3y-User/Λ+1", "s3cret user&x", "comp@ny key", "compány%secret")


def _needles() -> SecretNeedles:
    conf = get_settings()
    import dataclasses

    return secret_needles(
        dataclasses.replace(
            conf,
            USER_KEY=SECRETS[0],
            USER_SECRET=SECRETS[1],
            COMPANY_KEY=SECRETS[2],
            COMPANY_SECRET=SECRETS[3],
        )
    )


NEEDLES = _needles()


def parse(data: Any, http_status: int = 200, headers: dict[str, str] | None = None) -> Any:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return parse_response(body, http_status, JSON if headers is None else headers, needles=NEEDLES)


# --------------------------------------------------------------------------- envelopes


def test_success_envelopes() -> None:
    reply = parse({"status": 200, "message": {"customer[hashcode]": "H"}})
    assert isinstance(reply, SatoriReply)
    assert (reply.status, reply.payload, reply.http_status) == (
        200,
        {"customer[hashcode]": "H"},
        200,
    )
    reply = parse({"status": 202, "message": "Accepted", "body": {"process_code": "P"}})
    assert reply.payload == {"process_code": "P"} and reply.message == "Accepted"
    reply = parse({"status": 200, "message": "OK", "process_code": "P"})
    assert reply.payload == {"status": 200, "message": "OK", "process_code": "P"}
    # body wins over message when both are objects
    reply = parse({"status": 200, "message": {"a": 1}, "body": {"b": 2}})
    assert reply.payload == {"b": 2}


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, 200), ("200", 200), (" 202 ", 202), (200.0, 200), (201, 201)],
)
def test_status_coercion(status: Any, expected: int) -> None:
    assert parse({"status": status}).status == expected


@pytest.mark.parametrize(
    "status",
    [True, None, "OK", 200.5, "2000", -200, 0, 600, [200], "²⁰⁰", {"code": 200}, float("nan")],
)
def test_unusable_status_with_http_200_is_a_shape_error(status: Any) -> None:
    body = json.dumps({"status": status}, allow_nan=True).encode()
    with pytest.raises(SatoriError) as info:
        parse(body)
    assert type(info.value) is SatoriError
    assert not info.value.retryable


def test_unusable_status_falls_back_to_the_http_code() -> None:
    with pytest.raises(SatoriTransientError) as info:
        parse({"error": "bad gateway"}, http_status=502)
    assert (info.value.status, info.value.http_status) == (502, 502)
    with pytest.raises(SatoriNotFoundError):
        parse([], http_status=404)


def test_json_status_wins() -> None:
    assert parse({"status": 200}, http_status=503).status == 200
    with pytest.raises(SatoriValidationError):
        parse({"status": 400, "message": "x"}, http_status=200)


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (401, SatoriAuthenticationError),
        (403, SatoriPermissionError),
        (404, SatoriNotFoundError),
        (400, SatoriValidationError),
        (405, SatoriValidationError),
        (413, SatoriValidationError),
        (422, SatoriValidationError),
        (408, SatoriTransientError),
        (425, SatoriTransientError),
        (429, SatoriRateLimitError),
        (500, SatoriTransientError),
        (502, SatoriTransientError),
        (599, SatoriTransientError),
        (100, SatoriError),
        (304, SatoriError),
    ],
)
def test_error_for_status(status: int, error_class: type[SatoriError]) -> None:
    error = error_for_status(status, "m", http_status=200, response={"x": 1}, retry_after=3.0)
    assert type(error) is error_class
    assert (error.status, error.http_status, error.response, error.message) == (
        status,
        200,
        {"x": 1},
        "m",
    )
    if isinstance(error, SatoriTransientError):
        assert error.retry_after == 3.0
    assert error_for_status(status, "m", field="customer_csv_file").field == "customer_csv_file"


def test_error_message_forms() -> None:
    with pytest.raises(SatoriValidationError) as info:
        parse({"status": 400, "message": {"customer[email]": ["不正な値です"]}})
    assert info.value.message == '{"customer[email]": ["不正な値です"]}'
    assert info.value.field == "email"
    with pytest.raises(SatoriValidationError) as info:
        parse({"status": 400})
    assert "400" in info.value.message
    with pytest.raises(SatoriValidationError) as info:
        parse({"status": 400, "message": "x" * 5000})
    assert len(info.value.message) == 500


def test_redirect_is_a_configuration_error() -> None:
    with pytest.raises(SatoriConfigurationError) as info:
        parse({"status": 200}, http_status=301, headers={"Location": "https://x/?user_key=1"})
    assert "user_key" not in str(info.value)


def test_non_json_mentions_code_and_type_only() -> None:
    page = b"<html><title>Maintenance</title>secret page text</html>"
    with pytest.raises(SatoriTransientError) as info:
        parse(
            page,
            http_status=503,
            headers={"Content-Type": "text/html; charset=utf-8", "Retry-After": "600"},
        )
    text = str(info.value)
    assert "503" in text and "text/html" in text
    assert "secret page text" not in text
    assert info.value.retry_after == 600.0


@pytest.mark.parametrize(
    ("body", "language", "expected"),
    [
        (b"<", "en", "(HTTP 502, content type text/html, 1 byte); probably a proxy"),
        (b"<html>", "en", "(HTTP 502, content type text/html, 6 bytes); probably a proxy"),
        (b"<html>", "ja", "（HTTP 502、Content-Type text/html、6 バイト）。プロキシ"),
    ],
)
def test_non_json_counts_the_bytes_of_the_reply(body: bytes, language: str, expected: str) -> None:
    with translation.override(language), pytest.raises(SatoriTransientError) as info:
        parse(body, http_status=502, headers={"Content-Type": "text/html"})
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("30", 30.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("nan", None),
        ("inf", None),
        ("99999999", 86400.0),
        ("", None),
        ("tomorrow", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_header(header: str, expected: float | None) -> None:
    with pytest.raises(SatoriRateLimitError) as info:
        parse({"status": 429}, http_status=429, headers={"retry-after": header})
    assert info.value.retry_after == expected


def test_retry_after_future_http_date_and_json_hints() -> None:
    when = (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    with pytest.raises(SatoriTransientError) as info:
        parse({"status": 503}, headers={"Retry-After": when})
    assert info.value.retry_after is not None and 290 <= info.value.retry_after <= 300
    with pytest.raises(SatoriTransientError) as info:
        parse({"status": 503, "message": {"retryAfter": 12}})
    assert info.value.retry_after == 12.0
    with pytest.raises(SatoriTransientError) as info:
        parse({"status": 503, "retry_after": True})
    assert info.value.retry_after is None


def test_keys_in_a_reply_are_scrubbed_everywhere() -> None:
    encoded = "k3y-User%2F%CE%9B%2B1"
    data = {
        "status": 401,
        "message": f"user_key={encoded}&user_secret=s3cret+user%26x is wrong: {SECRETS[2]}",
        "body": {SECRETS[3]: [SECRETS[0], {"deep": SECRETS[1]}]},
    }
    with pytest.raises(SatoriAuthenticationError) as info:
        parse(data)
    blob = str(info.value) + repr(info.value) + json.dumps(info.value.response, ensure_ascii=False)
    for secret in (*SECRETS, encoded):
        assert secret not in blob
    assert MASK in str(info.value)


# --------------------------------------------------------------------------- fuzz


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from(SECRETS),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=12)
            | st.sampled_from(
                ["status", "message", "body", "process_code", "retry_after", "customer[hashcode]"]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)
statuses = (
    st.sampled_from([200, 202, 400, 401, 403, 404, 408, 422, 429, 500, 503])
    | st.integers(-5, 1200)
    | st.text(max_size=5)
    | st.none()
    | st.booleans()
    | st.floats()
)
envelopes = st.fixed_dictionaries(
    {"status": statuses},
    optional={"message": json_values, "body": json_values, "retry_after": json_values},
)
headers = st.dictionaries(
    st.sampled_from(["Content-Type", "Retry-After", "retry-after", "X-Other"]),
    st.text(max_size=40)
    | st.sampled_from(
        ["120", "Wed, 21 Oct 2015 07:28:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT", "1e400"]
    ),
    max_size=3,
)
http_statuses = st.integers(0, 999)


def _check(body: bytes, http_status: int, hdrs: dict[str, str]) -> None:
    try:
        reply = parse_response(body, http_status, hdrs, needles=NEEDLES)
    except SatoriError as error:
        text = str(error) + repr(error) + repr(error.response)
        assert not any(secret in text for secret in SECRETS)
        assert error.http_status == http_status
        if isinstance(error, SatoriTransientError) and error.retry_after is not None:
            assert 0.0 <= error.retry_after <= 86400.0
        return
    assert isinstance(reply, SatoriReply)
    assert 200 <= reply.status < 300
    assert isinstance(reply.payload, dict)
    assert not any(secret in repr(reply.data) for secret in SECRETS)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=300), http_status=http_statuses, hdrs=headers)
def test_fuzz_arbitrary_bytes(body: bytes, http_status: int, hdrs: dict[str, str]) -> None:
    _check(body, http_status, hdrs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, http_status=http_statuses, hdrs=headers)
def test_fuzz_arbitrary_json(value: Any, http_status: int, hdrs: dict[str, str]) -> None:
    _check(json.dumps(value).encode(), http_status, hdrs)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    envelope=envelopes, http_status=http_statuses, hdrs=headers, cut=st.none() | st.integers(0, 200)
)
def test_fuzz_satori_like_envelopes(
    envelope: dict[str, Any], http_status: int, hdrs: dict[str, str], cut: int | None
) -> None:
    body = json.dumps(envelope, allow_nan=True).encode()
    _check(body if cut is None else body[:cut], http_status, hdrs)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b"1" * 10_000,
        b'{"status": 1' + b"0" * 5000 + b"}",
        b'{"status": 200, "message": ' + b"[" * 900 + b"]" * 900 + b"}",
    ],
)
def test_pathological_bodies(body: bytes) -> None:
    _check(body, 200, {})


# --------------------------------------------------------------------------- redaction


def test_redact_form() -> None:
    pairs = [
        ("user_key", "a"),
        ("user_secret", "b"),
        ("company_key", "c"),
        ("company_secret", "d"),
        ("customer[identity_type]", "email"),
        ("customer[email]", "taro@example.com"),
        ("customer[last_name]", "山田"),
        ("customer[custom:plan]", "gold"),
        ("customer[collection_route]", "web"),
        ("customer[new_field]", "x"),
        ("action[name]", "visit"),
        ("action[content]", "free text"),
    ]
    assert redact_form(pairs, True, visible=("action[name]",)) == {
        "user_key": MASK,
        "user_secret": MASK,
        "company_key": MASK,
        "company_secret": MASK,
        "customer[identity_type]": "email",
        "customer[email]": "<redacted 16 chars>",
        "customer[last_name]": "<redacted 2 chars>",
        "customer[custom:plan]": "<redacted 4 chars>",
        "customer[collection_route]": "web",
        "customer[new_field]": "<redacted 1 chars>",
        "action[name]": "visit",
        "action[content]": "<redacted 9 chars>",
    }
    shown = redact_form(dict(pairs), False)
    assert shown["customer[email]"] == "taro@example.com"
    assert shown["user_secret"] == MASK
    assert redaction_marker("") == "" and redaction_marker(None) == ""


def test_scrub_raw_and_encoded_forms() -> None:
    import dataclasses

    conf = dataclasses.replace(
        get_settings(), USER_KEY="a b/c", USER_SECRET="ü+1", COMPANY_KEY="", COMPANY_SECRET="plain"
    )
    text = "raw a b/c, plus a+b%2Fc, quoted a%20b%2Fc, %C3%BC%2B1, ü+1 and plain"
    assert scrub(text, conf) == (
        f"raw {MASK}, plus {MASK}, quoted {MASK}, {MASK}, {MASK} and {MASK}"
    )
    assert scrub("nothing", conf) == "nothing"
    # the default is the current settings
    assert scrub("key test-user-key-6f1d") == f"key {MASK}"


def test_scrub_query_masks_any_value() -> None:
    url = (
        "/status.json?user_key=AAA&user_secret=B%2BB&company_key=&company_secret=x"
        "&process_code=P&other_user_key=z"
    )
    assert scrub_query(url) == (
        f"/status.json?user_key={MASK}&user_secret={MASK}&company_key={MASK}"
        f"&company_secret={MASK}&process_code=P&other_user_key={MASK}"
    )


def test_scrub_data_and_summaries() -> None:
    import dataclasses

    data = {
        "status": 200,
        "message": {"customer[email]": "a@b.jp", "customer[hashcode]": "H"},
        "body": {
            "failed_rows": [{"row_number": 2, "message": "x@y.jp is bad"}],
            "secret-key": ["secret-key"],
            "memo": {"nested": "private"},
        },
    }
    needles = ("secret-key",)
    assert scrub_data(data, needles) == {
        "status": 200,
        "message": {"customer[email]": "a@b.jp", "customer[hashcode]": "H"},
        "body": {
            "failed_rows": [{"row_number": 2, "message": "x@y.jp is bad"}],
            MASK: [MASK],
            "memo": {"nested": "private"},
        },
    }
    assert scrub_data(data, needles, redact_personal=True)["body"] == {
        "failed_rows": [{"row_number": 2, "message": "<redacted 6 chars> is bad"}],
        MASK: [MASK],
        "memo": {"nested": "<redacted 7 chars>"},
    }
    conf = dataclasses.replace(get_settings(), REDACT_PERSONAL_DATA=False)
    assert summarize_response(data, conf)["message"]["customer[email]"] == "a@b.jp"
    deep: Any = "leaf"
    for _ in range(200):
        deep = [deep]
    assert "<too deeply nested>" in json.dumps(scrub_data(deep, ()))
    assert scrub_data(("t", {1: dt.date(2025, 1, 1)}), ()) == [
        "t",
        {"1": "datetime.date(2025, 1, 1)"},
    ]


def test_redact_text() -> None:
    assert redact_text("送信失敗: Taro.Y+tag@mail.example.co.jp, 再送") == (
        "送信失敗: <redacted 29 chars>, 再送"
    )
    assert redact_text("no address here") == "no address here"


#: The pattern redact_text used to run as one regex (quadratic on some inputs):
#: on short strings it is the reference for what counts as an address.
_REFERENCE_ADDRESS = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"
)


@given(st.text(alphabet="ab.-_@+ é\n", max_size=40))
@settings(max_examples=2000, deadline=None)
def test_redact_text_finds_the_same_addresses_as_the_reference_pattern(text: str) -> None:
    expected = _REFERENCE_ADDRESS.sub(lambda m: redaction_marker(m.group(0)), text)
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@b@c.jp", "a@<redacted 6 chars>"),
        ("x@y.jp_z@w.jp", "<redacted 6 chars><redacted 7 chars>"),
        ("@only.jp and tail@", "@only.jp and tail@"),
        ("a@b.c.", "<redacted 5 chars>."),
        ("a@b", "a@b"),
    ],
)
def test_redact_text_edge_cases(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def _adversarial(size: int) -> dict[str, tuple[str, str]]:
    """Inputs that made the one-regex redaction quadratic, with the expected output."""
    run = "a" * size
    pairs = "a@" * (size // 2)
    return {
        # A run of local-part characters with no "@": every start position rescanned it.
        "local run, no @": (run, run),
        "dotted run, no @": ("a.b-" * (size // 4), "a.b-" * (size // 4)),
        # a@a@a@...: no dot after any "@", so nothing is an address.
        "a@a@a@": (pairs, pairs),
        # A long local part that is an address after all.
        "long local part": (run + "@example.jp", redaction_marker(run + "@example.jp")),
        "long domain, no dot": ("x@" + run, "x@" + run),
        "many addresses": ("t@e.jp " * (size // 7), "<redacted 6 chars> " * (size // 7)),
    }


@pytest.mark.parametrize("name", list(_adversarial(10)))
@pytest.mark.parametrize("size", [300_000, 1_000_000])
def test_redact_text_is_linear_on_adversarial_input(name: str, size: int) -> None:
    text, expected = _adversarial(size)[name]
    started = time.perf_counter()
    result = redact_text(text)
    elapsed = time.perf_counter() - started
    assert result == expected
    # A guard against the quadratic case only (it took minutes); linear takes milliseconds.
    assert elapsed < 2.0, f"{name}: {elapsed:.1f} s for {len(text)} characters"


def test_scrub_data_with_personal_redaction_is_linear_on_a_huge_message() -> None:
    text = "a" * 1_000_000 + " taro@example.jp"
    started = time.perf_counter()
    result = scrub_data({"message": text}, _needles(), redact_personal=True)
    assert time.perf_counter() - started < 2.0
    assert result == {"message": "a" * 1_000_000 + " <redacted 15 chars>"}


def test_query_string_scrubber_rewrites_third_party_records(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_log_filters()
    install_log_filters()  # idempotent
    log = logging.getLogger("urllib3.connectionpool")
    assert sum(isinstance(f, QueryStringScrubber) for f in log.filters) == 1
    caplog.set_level(logging.DEBUG)
    log.debug(
        '%s://%s:%s "%s %s %s" %s %s',
        "https",
        "api.satr.jp",
        443,
        "GET",
        "/api/v4/public/bulk_customers/status.json?user_key=K1&user_secret=S1"
        "&company_key=K2&company_secret=S2&process_code=P",
        "HTTP/1.1",
        200,
        10,
    )
    (record,) = [r for r in caplog.records if r.name == "urllib3.connectionpool"]
    message = record.getMessage()
    assert "K1" not in message and "S2" not in message
    assert "process_code=P" in message
    assert f"user_key={MASK}" in message
