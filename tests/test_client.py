"""SatoriClient against a real HTTP server that records every byte it receives.

The capture server here is deliberately dumb: it records requests and plays
back scripted replies (JSON, HTML, truncated bodies, delays, dropped sockets),
so the tests can assert the exact wire format of each endpoint and every
error path. Round trips through the strict sandbox live at the end of the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import re
import socket
import threading
import time
import traceback
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from django.test import override_settings

from django_satori import __version__
from django_satori.client import (
    BulkStatus,
    BulkUploadResult,
    CustomerResult,
    FailedRow,
    SatoriClient,
    get_client,
)
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

KEYS = {
    "user_key": "test-user-key-6f1d",
    "user_secret": "test-user-secret-93ab",
    "company_key": "test-company-key-2c7e",
    "company_secret": "test-company-secret-d41f",
}
AUTH_BODY = (
    b"user_key=test-user-key-6f1d&user_secret=test-user-secret-93ab"
    b"&company_key=test-company-key-2c7e&company_secret=test-company-secret-d41f"
)


# --------------------------------------------------------------------------- capture server


@dataclasses.dataclass
class Reply:
    status: int = 200
    body: bytes = b'{"status": 200, "message": {"customer[hashcode]": "hc-1"}}'
    headers: dict[str, str] = dataclasses.field(
        default_factory=lambda: {"Content-Type": "application/json; charset=utf-8"}
    )
    delay: float = 0.0
    #: "drop": close without answering; "short": announce more bytes than sent.
    action: str = ""
    #: Seconds between bytes of the body (and of the headers with ``dribble_headers``).
    dribble: float = 0.0
    dribble_headers: bool = False


@dataclasses.dataclass
class Captured:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    body_sha256: str
    body_length: int
    #: The client's port: requests sent over one kept-alive connection share it.
    client_port: int = 0

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


class CaptureServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[Captured] = []
        self.replies: list[Reply] = []
        self.default = Reply()
        #: Large uploads: keep only the hash, so memory measurements see the client alone.
        self.keep_bodies = True
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reply(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def next_reply(self) -> Reply:
        with self.lock:
            return self.replies.pop(0) if self.replies else self.default

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # timeouts make the client hang up on us; that is the point of those tests


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle plus delayed ACKs
    # add 40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: CaptureServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        digest = hashlib.sha256()
        kept = bytearray()
        remaining = length
        while remaining:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
            digest.update(chunk)
            if self.server.keep_bodies:
                kept += chunk
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.requests.append(
                Captured(
                    method=self.command,
                    path=parts.path,
                    query=parts.query,
                    headers=dict(self.headers.items()),
                    body=bytes(kept),
                    body_sha256=digest.hexdigest(),
                    body_length=length,
                    client_port=self.client_address[1],
                )
            )
        reply = self.server.next_reply()
        if reply.delay:
            time.sleep(reply.delay)
        if reply.action == "drop":
            self.close_connection = True
            return
        if reply.action == "endless":
            # No Content-Length; 64 KB pieces until the client hangs up (or 64 MB).
            self.close_connection = True
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            piece = b'{"status": 200, "message": "' + b"x" * 65536
            for _ in range(1024):
                self.wfile.write(piece)
            return
        self.send_response(reply.status)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        announced = len(reply.body) + (500 if reply.action == "short" else 0)
        self.send_header("Content-Length", str(announced))
        if reply.action == "short" or reply.dribble:
            self.send_header("Connection", "close")
            self.close_connection = True
        if not reply.dribble:
            self.end_headers()
            self.wfile.write(reply.body)
            return
        head = b"".join(self._headers_buffer) + b"\r\n"  # what end_headers() would send
        self._headers_buffer = []
        self.wfile.write(b"" if reply.dribble_headers else head)
        for byte in (head if reply.dribble_headers else b"") + reply.body:
            time.sleep(reply.dribble)
            self.wfile.write(bytes([byte]))
            self.wfile.flush()


@contextlib.contextmanager
def serving() -> Iterator[CaptureServer]:
    """A running CaptureServer (also for other test files, as their own fixture)."""
    server = CaptureServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with serving() as server:
        yield server


def make_client(server: CaptureServer, **overrides: Any) -> SatoriClient:
    conf = dataclasses.replace(get_settings(), BASE_URL=server.url, **overrides)
    return SatoriClient(conf)


@pytest.fixture
def client(capture: CaptureServer) -> Iterator[SatoriClient]:
    with make_client(capture) as satori:
        yield satori


def json_reply(data: Any, status: int = 200, **headers: str) -> Reply:
    return Reply(
        status=status,
        body=json.dumps(data).encode(),
        headers={"Content-Type": "application/json", **headers},
    )


# --------------------------------------------------------------------------- exact wire format


def test_upsert_sends_exact_urlencoded_body(capture: CaptureServer, client: SatoriClient) -> None:
    result = client.upsert_customer(
        {
            "email": "  Taro.Yamada@Example.COM ",
            "last_name": "山田",
            "first_name": "太郎",
            "lead_company_name": "Example株式会社 東京",
            "collection_date": "2025/01/31",
            "delivery_permission": "approval",
            "append_tags": "a,b",
            "custom:plan": "gold & more",
        }
    )

    (sent,) = capture.requests
    assert sent.method == "POST"
    assert sent.path == "/api/v4/public/customer/upsert.json"
    assert sent.query == ""
    assert sent.header("Content-Type") == "application/x-www-form-urlencoded; charset=UTF-8"
    assert sent.header("User-Agent") == (
        f"django-satori/{__version__} python-requests/{requests.__version__}"
    )
    assert sent.body == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=email"
        b"&customer%5Bemail%5D=taro.yamada%40example.com"
        b"&customer%5Blast_name%5D=%E5%B1%B1%E7%94%B0"
        b"&customer%5Bfirst_name%5D=%E5%A4%AA%E9%83%8E"
        b"&customer%5Blead_company_name%5D=Example%E6%A0%AA%E5%BC%8F%E4%BC%9A%E7%A4%BE"
        b"+%E6%9D%B1%E4%BA%AC"
        b"&customer%5Bcollection_date%5D=2025-01-31"
        b"&customer%5Bdelivery_permission%5D=approval"
        b"&customer%5Bappend_tags%5D=a%2Cb"
        b"&customer%5Bcustom%3Aplan%5D=gold+%26+more"
    )
    assert sent.header("Content-Length") == str(len(sent.body))
    # What a PHP/Rails server decodes from it:
    assert parse_qsl(sent.body.decode("ascii"))[4:7] == [
        ("customer[identity_type]", "email"),
        ("customer[email]", "taro.yamada@example.com"),
        ("customer[last_name]", "山田"),
    ]
    assert isinstance(result, CustomerResult)
    assert (result.endpoint, result.status, result.hashcode) == ("customer/upsert", 200, "hc-1")


def test_register_and_delete_paths_and_bodies(capture: CaptureServer, client: SatoriClient) -> None:
    client.register_customer({"email": "ａｂｃ@ｅｘａｍｐｌｅ.ｊｐ", "memo": "1行目\n2行目"})
    client.delete_customer(email="Someone@Example.jp")
    client.delete_customer(hashcode="HC 9/9")
    client.register_customer({"hashcode": "hc-7", "last_name": "x"}, identity_type="hashcode")

    assert [r.path for r in capture.requests] == [
        "/api/v4/public/customer/registration.json",
        "/api/v4/public/customer/delete.json",
        "/api/v4/public/customer/delete.json",
        "/api/v4/public/customer/registration.json",
    ]
    bodies = [r.body for r in capture.requests]
    # Full-width e-mail normalised to ASCII; newlines percent-encoded, not stripped.
    assert bodies[0] == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=email&customer%5Bemail%5D=abc%40example.jp"
        b"&customer%5Bmemo%5D=1%E8%A1%8C%E7%9B%AE%0A2%E8%A1%8C%E7%9B%AE"
    )
    assert bodies[1] == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=email&customer%5Bemail%5D=someone%40example.jp"
    )
    assert bodies[2] == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=hashcode&customer%5Bhashcode%5D=HC+9%2F9"
    )
    assert bodies[3] == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=hashcode&customer%5Bhashcode%5D=hc-7"
        b"&customer%5Blast_name%5D=x"
    )


def test_tag_lists_are_joined_with_the_configured_separator(capture: CaptureServer) -> None:
    with make_client(capture, TAG_SEPARATOR="|") as satori:
        satori.upsert_customer(
            {"email": "a@b.jp", "append_tags": ["x", "y", "x"], "delete_tags": ("z",)}
        )
        with pytest.raises(SatoriValidationError) as info:
            satori.upsert_customer({"email": "a@b.jp", "delete_tags": ["bad|tag"]})
    assert info.value.field == "delete_tags"
    assert capture.requests[0].body.endswith(
        b"&customer%5Bappend_tags%5D=x%7Cy&customer%5Bdelete_tags%5D=z"
    )
    assert len(capture.requests) == 1


def test_add_action_defaults_and_time_zone(capture: CaptureServer, client: SatoriClient) -> None:
    client.add_action(
        email="Taro@Example.com",
        name="資料ダウンロード",
        content="価格表 PDF",
        url="https://example.com/dl?id=1",
        occurred_at=dt.datetime(2025, 1, 31, 15, 4, 5, tzinfo=dt.UTC),
    )
    client.add_action(
        hashcode="hc-1", name="visit", occurred_at=dt.datetime(2025, 2, 1, 9, 0, 0)
    )  # naive = already JST
    before = dt.datetime.now(dt.timezone(dt.timedelta(hours=9))).replace(microsecond=0, tzinfo=None)
    client.add_action(email="a@b.jp", name="now")
    after = dt.datetime.now(dt.timezone(dt.timedelta(hours=9))).replace(tzinfo=None)

    first, second, third = capture.requests
    assert first.path == "/api/v4/public/customer/add_action.json"
    assert first.header("Content-Type") == "application/x-www-form-urlencoded; charset=UTF-8"
    assert first.body == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=email&customer%5Bemail%5D=taro%40example.com"
        b"&action%5Bname%5D=%E8%B3%87%E6%96%99%E3%83%80%E3%82%A6%E3%83%B3%E3%83%AD%E3%83%BC"
        b"%E3%83%89"
        b"&action%5Bcontent%5D=%E4%BE%A1%E6%A0%BC%E8%A1%A8+PDF"
        b"&action%5Burl%5D=https%3A%2F%2Fexample.com%2Fdl%3Fid%3D1"
        b"&action%5Bdate%5D=2025-02-01+00%3A04%3A05"
    )
    assert second.body == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=hashcode&customer%5Bhashcode%5D=hc-1"
        b"&action%5Bname%5D=visit&action%5Bdate%5D=2025-02-01+09%3A00%3A00"
    )
    sent_at = dt.datetime.strptime(
        dict(parse_qsl(third.body.decode()))["action[date]"], "%Y-%m-%d %H:%M:%S"
    )
    assert before <= sent_at <= after


def test_add_action_uses_configured_path_and_names(capture: CaptureServer) -> None:
    params = {"name": "action_name", "content": "detail", "url": "link", "date": "occurred"}
    with make_client(
        capture, ACTION_PATH="custom/actions.json", ACTION_PARAMS=params, ACTION_TIMEZONE="UTC"
    ) as satori:
        satori.add_action(
            email="a@b.jp",
            name="n",
            content="c",
            occurred_at=dt.datetime(2025, 1, 1, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=9))),
        )
    (sent,) = capture.requests
    assert sent.path == "/custom/actions.json"
    assert sent.body == AUTH_BODY + (
        b"&customer%5Bidentity_type%5D=email&customer%5Bemail%5D=a%40b.jp"
        b"&action_name=n&detail=c&occurred=2025-01-01+00%3A00%3A00"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"email": "a@b.jp", "name": "  "}, "name"),
        ({"name": "x"}, "email"),
        ({"email": "a@b.jp", "hashcode": "h", "name": "x"}, "hashcode"),
        ({"email": "a@b.jp", "name": "x", "url": "/relative"}, "url"),
        ({"email": "not-an-address", "name": "x"}, "email"),
        ({"email": "a@b.jp", "name": "x", "occurred_at": dt.date(2025, 1, 1)}, "date"),
        ({"email": "a@b.jp", "name": "資料\ud800請求"}, "name"),
        ({"email": "a@b.jp", "name": "x", "content": "\udc00"}, "content"),
        ({"email": "a@b.jp", "name": "x", "url": "https://example.jp/\ud800"}, "url"),
        ({"hashcode": "\ud800", "name": "x"}, "hashcode"),
    ],
)
def test_add_action_validation(
    capture: CaptureServer, client: SatoriClient, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(SatoriValidationError) as info:
        client.add_action(**kwargs)
    assert info.value.field == field
    assert capture.requests == []


def _multipart(boundary: str, identity_type: str, filename: str, data: bytes) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in [*KEYS.items(), ("identity_type", identity_type)]
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="customer_csv_file"; '
        f'filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts)


CSV = "email,last_name,collection_route\r\ntaro@example.com,山田,自社フォーム\r\n".encode()


def test_bulk_upload_sends_exact_multipart(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(
        json_reply({"status": 202, "message": "Accepted", "body": {"process_code": "pc-1"}})
    )
    result = client.bulk_upsert(CSV)

    (sent,) = capture.requests
    assert (sent.method, sent.path, sent.query) == (
        "POST",
        "/api/v4/public/bulk_customers/upsert.json",
        "",
    )
    match = re.fullmatch(
        r"multipart/form-data; boundary=([0-9a-f]{32})", sent.header("Content-Type") or ""
    )
    assert match, sent.header("Content-Type")
    assert sent.body == _multipart(match.group(1), "email", "customers.csv", CSV)
    assert sent.header("Content-Length") == str(len(sent.body))
    assert sent.header("Transfer-Encoding") is None
    assert isinstance(result, BulkUploadResult)
    assert (result.process_code, result.status) == ("pc-1", 202)
    assert result.request_summary == {
        "user_key": "********",
        "user_secret": "********",
        "company_key": "********",
        "company_secret": "********",
        "identity_type": "email",
        "customer_csv_file": f"customers.csv ({len(CSV)} bytes)",
    }


def test_bulk_register_streams_file_objects_from_their_position(
    capture: CaptureServer, client: SatoriClient, tmp_path: Any
) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(b"IGNORED" + CSV)
    capture.reply(json_reply({"status": 200, "message": {"process_code": "pc-2"}}))
    with path.open("rb") as handle:
        handle.seek(len(b"IGNORED"))
        result = client.bulk_register(
            handle, identity_type="hashcode", filename='../evil "name".csv'
        )
    (sent,) = capture.requests
    assert sent.path == "/api/v4/public/bulk_customers/registration.json"
    boundary = (sent.header("Content-Type") or "").rsplit("=", 1)[1]
    assert sent.body == _multipart(boundary, "hashcode", "evil__name_.csv", CSV)
    assert result.process_code == "pc-2"


class _PipeLike(io.RawIOBase):
    """A readable stream that cannot seek, like a socket or a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_bulk_upload_of_non_seekable_stream(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(json_reply({"status": 202, "process_code": 12345}))
    result = client.bulk_upsert(_PipeLike(CSV))
    boundary = (capture.requests[0].header("Content-Type") or "").rsplit("=", 1)[1]
    assert capture.requests[0].body == _multipart(boundary, "email", "customers.csv", CSV)
    assert result.process_code == "12345"


def test_bulk_upload_streams_a_10000_row_file(
    capture: CaptureServer, client: SatoriClient, tmp_path: Any
) -> None:
    path = tmp_path / "big.csv"
    with path.open("wb") as handle:
        handle.write(b"email,last_name,memo,collection_route\n")
        for n in range(10_000):
            handle.write(f"user{n:05d}@example.com,山田,{'x' * 150},web\n".encode())
    data = path.read_bytes()
    size = len(data)
    capture.keep_bodies = False
    capture.reply(json_reply({"status": 202, "body": {"process_code": "big"}}))

    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            client.bulk_upsert(handle)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    (sent,) = capture.requests
    boundary = (sent.header("Content-Type") or "").rsplit("=", 1)[1]
    expected = _multipart(boundary, "email", "customers.csv", data)
    assert sent.body_length == len(expected)
    assert sent.body_sha256 == hashlib.sha256(expected).hexdigest()
    # Streamed: nothing close to one copy of the 1.9 MB file was held at once.
    assert size > 1_500_000
    assert peak < size / 4, (peak, size)


def test_bulk_status_query_string(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(
        json_reply(
            {
                "status": 200,
                "body": {
                    "process_status": "finished",
                    "succeeded_rows": [{"row_number": 2}],
                    "failed_rows": [{"row_number": 3, "message": "メールアドレスが不正です"}],
                },
            }
        )
    )
    status = client.bulk_status("pc 1/2")

    (sent,) = capture.requests
    assert (sent.method, sent.path) == ("GET", "/api/v4/public/bulk_customers/status.json")
    assert sent.query == (
        "user_key=test-user-key-6f1d&user_secret=test-user-secret-93ab"
        "&company_key=test-company-key-2c7e&company_secret=test-company-secret-d41f"
        "&process_code=pc+1%2F2"
    )
    assert sent.body == b""
    assert sent.header("Content-Type") is None
    assert isinstance(status, BulkStatus)
    assert status.finished and status.process_status == "finished"
    assert status.process_code == "pc 1/2"
    assert status.succeeded_rows == [{"row_number": 2}]
    assert status.failed_rows == [FailedRow(3, "メールアドレスが不正です")]
    assert status.request_summary["process_code"] == "pc 1/2"
    assert status.request_summary["user_key"] == "********"


@pytest.mark.parametrize(
    ("payload", "finished", "state", "failed"),
    [
        ({"status": 200, "message": {"process_status": "processing"}}, False, "processing", []),
        ({"status": 200, "process_status": "queued", "failed_rows": []}, False, "queued", []),
        ({"status": 200, "body": {"process_status": "Finished"}}, False, "Finished", []),
        ({"status": 200, "body": {}}, False, "", []),
        (
            {
                "status": 200,
                "body": {
                    "process_status": "finished",
                    "failed_rows": [{"row_number": "7", "message": None}],
                },
            },
            True,
            "finished",
            [FailedRow(7, "")],
        ),
    ],
)
def test_bulk_status_envelopes(
    capture: CaptureServer,
    client: SatoriClient,
    payload: dict[str, Any],
    finished: bool,
    state: str,
    failed: list[FailedRow],
) -> None:
    capture.reply(json_reply(payload))
    status = client.bulk_status("pc")
    assert (status.finished, status.process_status, status.failed_rows) == (finished, state, failed)


@pytest.mark.parametrize(
    "failed_rows", ["oops", [{"message": "no number"}], [3], [{"row_number": "²"}]]
)
def test_bulk_status_malformed_failed_rows_is_an_error(
    capture: CaptureServer, client: SatoriClient, failed_rows: Any
) -> None:
    capture.reply(
        json_reply(
            {"status": 200, "body": {"process_status": "finished", "failed_rows": failed_rows}}
        )
    )
    with pytest.raises(SatoriError) as info:
        client.bulk_status("pc")
    assert not info.value.retryable
    assert info.value.status == 200
    assert info.value.endpoint == "bulk/status"


# --------------------------------------------------------------------------- envelopes


@pytest.mark.parametrize(
    "payload",
    [
        {"status": 200, "message": {"customer[hashcode]": "H"}},
        {"status": 200, "message": "OK", "body": {"customer[hashcode]": "H"}},
        {"status": 200, "body": {"hashcode": "H"}},
        {"status": 200, "customer[hashcode]": "H"},
        {"status": "200", "message": {"customer": {"hashcode": "H"}}},
    ],
)
def test_hashcode_envelopes(
    capture: CaptureServer, client: SatoriClient, payload: dict[str, Any]
) -> None:
    capture.reply(json_reply(payload))
    assert client.upsert_customer({"email": "a@b.jp"}).hashcode == "H"


def test_success_without_hashcode(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(json_reply({"status": 200, "message": "deleted"}))
    result = client.delete_customer(email="a@b.jp")
    assert (result.hashcode, result.message) == (None, "deleted")


@pytest.mark.parametrize(
    "payload",
    [
        {"status": 202, "message": "Accepted", "body": {"process_code": "P"}},
        {"status": 202, "message": {"process_code": "P"}},
        {"status": 200, "process_code": "P"},
        {"status": 202, "message": "Accepted", "body": {"other": 1}, "process_code": "P"},
    ],
)
def test_process_code_envelopes(
    capture: CaptureServer, client: SatoriClient, payload: dict[str, Any]
) -> None:
    capture.reply(json_reply(payload))
    assert client.bulk_register(CSV).process_code == "P"


def test_accepted_upload_without_process_code_is_not_retryable(
    capture: CaptureServer, client: SatoriClient
) -> None:
    capture.reply(json_reply({"status": 202, "message": "Accepted", "body": {}}))
    with pytest.raises(SatoriError) as info:
        client.bulk_upsert(CSV)
    assert type(info.value) is SatoriError
    assert not info.value.retryable
    assert info.value.endpoint == "bulk/upsert"


def test_json_status_wins_over_http_code(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(
        json_reply({"status": 200, "message": {"customer[hashcode]": "H"}}, status=500),
        json_reply({"status": 500, "message": "internal"}, status=200),
        json_reply({"status": 400, "message": "customer[email] is invalid"}, status=200),
    )
    ok = client.upsert_customer({"email": "a@b.jp"})
    assert (ok.status, ok.http_status, ok.hashcode) == (200, 500, "H")
    with pytest.raises(SatoriTransientError) as transient:
        client.upsert_customer({"email": "a@b.jp"})
    assert (transient.value.status, transient.value.http_status) == (500, 200)
    with pytest.raises(SatoriValidationError) as invalid:
        client.upsert_customer({"email": "a@b.jp"})
    assert (invalid.value.status, invalid.value.field) == (400, "email")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "error_class", "retryable"),
    [
        (401, SatoriAuthenticationError, False),
        (403, SatoriPermissionError, False),
        (404, SatoriNotFoundError, False),
        (400, SatoriValidationError, False),
        (422, SatoriValidationError, False),
        (409, SatoriValidationError, False),
        (408, SatoriTransientError, True),
        (425, SatoriTransientError, True),
        (429, SatoriRateLimitError, True),
        (500, SatoriTransientError, True),
        (503, SatoriTransientError, True),
    ],
)
def test_error_classes(
    capture: CaptureServer,
    client: SatoriClient,
    status: int,
    error_class: type[SatoriError],
    retryable: bool,
) -> None:
    capture.reply(json_reply({"status": status, "message": f"エラー {status}"}))
    with pytest.raises(error_class) as info:
        client.upsert_customer({"email": "a@b.jp"})
    error = info.value
    assert type(error) is error_class
    assert (error.status, error.http_status, error.retryable) == (status, 200, retryable)
    assert error.message == f"エラー {status}"
    assert error.response == {"status": status, "message": f"エラー {status}"}
    assert error.endpoint == "customer/upsert"
    assert error.request_summary is not None
    assert error.request_summary["customer[email]"] == "<redacted 6 chars>"


def test_permission_error_is_an_authentication_error(
    capture: CaptureServer, client: SatoriClient
) -> None:
    capture.reply(json_reply({"status": 403, "message": "権限がありません"}))
    with pytest.raises(SatoriAuthenticationError):
        client.delete_customer(email="a@b.jp")


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (
            Reply(502, b"<html><body>502 Bad Gateway</body></html>", {"Content-Type": "text/html"}),
            "text/html",
        ),
        (Reply(200, b'{"status": 200, "message": {"customer[hash', {}), "none"),
        (Reply(200, b"", {"Content-Type": "application/json"}), "application/json"),
        (
            Reply(200, b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}),
            "application/json",
        ),
    ],
)
def test_non_json_replies_are_transient(
    capture: CaptureServer, client: SatoriClient, reply: Reply, needle: str
) -> None:
    capture.reply(reply)
    with pytest.raises(SatoriTransientError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert info.value.http_status == reply.status
    assert str(reply.status) in str(info.value)
    assert needle in str(info.value)
    assert info.value.response is None


@pytest.mark.parametrize(
    ("body", "http_status", "error_class"),
    [
        (b"[1, 2, 3]", 200, SatoriError),
        (b'"just a string"', 200, SatoriError),
        (b"null", 200, SatoriError),
        (b'{"message": "no status"}', 200, SatoriError),
        (b'{"status": true}', 200, SatoriError),
        (b'{"status": 99999}', 200, SatoriError),
        (b'{"error": "Unauthorized"}', 401, SatoriAuthenticationError),
        (b'["gateway"]', 504, SatoriTransientError),
        (b'{"status": 302, "message": "moved"}', 200, SatoriError),
    ],
)
def test_unexpected_json_shapes(
    capture: CaptureServer,
    client: SatoriClient,
    body: bytes,
    http_status: int,
    error_class: type[SatoriError],
) -> None:
    capture.reply(Reply(http_status, body))
    with pytest.raises(SatoriError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert type(info.value) is error_class
    assert info.value.http_status == http_status


def test_redirects_are_not_followed(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(Reply(302, b"", {"Location": capture.url + "/elsewhere?user_key=x"}))
    with pytest.raises(SatoriConfigurationError) as info:
        client.bulk_status("pc")
    assert len(capture.requests) == 1
    assert "elsewhere" not in str(info.value)


@pytest.mark.parametrize(
    ("headers", "payload", "expected"),
    [
        ({"Retry-After": "120"}, {"status": 429, "message": "slow down"}, 120.0),
        ({}, {"status": 429, "message": "slow down", "retry_after": 30}, 30.0),
        ({}, {"status": 503, "body": {"retry_after": "7.5"}}, 7.5),
        ({"Retry-After": "soon"}, {"status": 429, "message": "slow down"}, None),
        ({"Retry-After": "-5"}, {"status": 503, "message": "x"}, 0.0),
    ],
)
def test_retry_after(
    capture: CaptureServer,
    client: SatoriClient,
    headers: dict[str, str],
    payload: dict[str, Any],
    expected: float | None,
) -> None:
    capture.reply(json_reply(payload, status=payload["status"], **headers))
    with pytest.raises(SatoriTransientError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert info.value.retry_after == expected


def test_retry_after_http_date(capture: CaptureServer, client: SatoriClient) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=90)
    capture.reply(
        json_reply(
            {"status": 429, "message": "x"},
            status=429,
            **{"Retry-After": when.strftime("%a, %d %b %Y %H:%M:%S GMT")},
        )
    )
    with pytest.raises(SatoriRateLimitError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert info.value.retry_after is not None
    assert 80 <= info.value.retry_after <= 91


def _assert_unchained(error: BaseException) -> None:
    assert error.__cause__ is None
    assert error.__context__ is None


def test_read_timeout(capture: CaptureServer) -> None:
    capture.reply(Reply(delay=1.0))
    with (
        make_client(capture, TIMEOUT=(2.0, 0.2)) as satori,
        pytest.raises(SatoriTransientError) as info,
    ):
        satori.bulk_status("pc")
    assert "ReadTimeout" in str(info.value)
    assert info.value.retryable
    _assert_unchained(info.value)


def test_dropped_connection(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(Reply(action="drop"))
    with pytest.raises(SatoriTransientError) as info:
        client.bulk_status("pc")
    assert "ConnectionError" in str(info.value)
    _assert_unchained(info.value)


def test_body_shorter_than_announced(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(Reply(action="short"))
    with pytest.raises(SatoriTransientError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    _assert_unchained(info.value)


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    conf = dataclasses.replace(get_settings(), BASE_URL=f"http://127.0.0.1:{port}")
    with SatoriClient(conf) as satori, pytest.raises(SatoriTransientError) as info:
        satori.bulk_status("pc")
    _assert_unchained(info.value)


def test_keep_alive_reuses_one_connection(capture: CaptureServer, client: SatoriClient) -> None:
    ports = set()
    original = _Handler.handle

    def handle(self: _Handler) -> None:
        ports.add(self.client_address[1])
        original(self)

    _Handler.handle = handle  # type: ignore[method-assign]
    try:
        for _ in range(3):
            client.upsert_customer({"email": "a@b.jp"})
    finally:
        _Handler.handle = original  # type: ignore[method-assign]
    assert len(capture.requests) == 3
    assert len(ports) == 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("customer", "field"),
    [
        ({"email": "not an address"}, "email"),
        ({"email": "a@@b.jp"}, "email"),
        ({"email": "x" * 251 + "@b.jp"}, "email"),
        ({"email": "山田@example.jp"}, "email"),
        ({"email": ""}, "email"),
        ({"email": "a@b.jp", "nickname": "x"}, "nickname"),
        ({"email": "a@b.jp", "custom:unknown": "x"}, "custom:unknown"),
        ({"email": "a@b.jp", "custom:age": "twelve"}, "custom:age"),
        ({"email": "a@b.jp", "custom:birthday": "1990-13-01"}, "custom:birthday"),
        ({"email": "a@b.jp", "collection_date": "31/01/2025"}, "collection_date"),
        ({"email": "a@b.jp", "collection_date": "2025-02-30"}, "collection_date"),
        ({"email": "a@b.jp", "delivery_permission": "yes"}, "delivery_permission"),
        ({"email": "a@b.jp", "delivery_permission": "許可"}, "delivery_permission"),
        ({"email": "a@b.jp", "memo": "nul\x00byte"}, "memo"),
        # Lone surrogates (what json.loads makes of "\ud800"): requests would fail to
        # encode them with a UnicodeEncodeError naming nothing.
        ({"email": "a@b.jp", "memo": "half \ud800 pair"}, "memo"),
        ({"email": "a@b.jp", "last_name": "\udfff"}, "last_name"),
        ({"email": "a@b.jp", "append_tags": ["ok", "t\ud83d"]}, "append_tags"),
        ({"email": "a@b.jp", "delete_tags": "t\ud83d"}, "delete_tags"),
        ({"email": "a@b.jp", "custom:plan": "\ud800"}, "custom:plan"),
        ({"email": "山\ud800@example.jp"}, "email"),
        ({"hashcode": "h\ud800"}, "hashcode"),
        ({"last_name": "no identity"}, "email"),
    ],
)
def test_local_validation_names_the_field_and_sends_nothing(
    capture: CaptureServer, client: SatoriClient, customer: dict[str, Any], field: str
) -> None:
    with pytest.raises(SatoriValidationError) as info:
        client.upsert_customer(customer)
    assert info.value.field == field
    assert field in str(info.value)
    assert capture.requests == []


def test_hashcode_identity_requires_a_hashcode(
    capture: CaptureServer, client: SatoriClient
) -> None:
    with pytest.raises(SatoriValidationError) as info:
        client.upsert_customer({"email": "a@b.jp"}, identity_type="hashcode")
    assert info.value.field == "hashcode"
    with pytest.raises(SatoriValidationError) as info:
        client.bulk_upsert(CSV, identity_type="phone")
    assert info.value.field == "identity_type"
    with pytest.raises(SatoriValidationError) as info:
        client.bulk_upsert(b"")
    assert info.value.field == "customer_csv_file"
    with pytest.raises(SatoriValidationError) as info:
        client.bulk_status("  ")
    assert info.value.field == "process_code"
    assert capture.requests == []


def test_a_blank_hashcode_counts_as_none(capture: CaptureServer, client: SatoriClient) -> None:
    with pytest.raises(SatoriValidationError) as info:
        client.delete_customer(hashcode="  ")
    assert info.value.field == "email"  # neither identity given
    with pytest.raises(SatoriValidationError):
        client.add_action(hashcode="\t", name="資料請求")
    assert capture.requests == []


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("customer[email] is invalid", "email"),
        ("customer[custom:plan] の値が不正です", "custom:plan"),
        ("custom:age must be an integer", "custom:age"),
        ("last_name_reading is too long", "last_name_reading"),
        ({"customer[phone_number]": ["invalid"]}, "phone_number"),
        ([{"customer[address]": "too long"}], "address"),
        ("process_code is unknown", "process_code"),
        ("不正なリクエストです", None),
    ],
)
def test_satori_validation_errors_name_the_field(
    capture: CaptureServer, client: SatoriClient, message: Any, field: str | None
) -> None:
    capture.reply(json_reply({"status": 400, "message": message}))
    with pytest.raises(SatoriValidationError) as info:
        client.upsert_customer({"email": "a@b.jp"})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("USER_KEY", ""),
        ("USER_SECRET", "   "),
        ("COMPANY_KEY", None),
        ("COMPANY_SECRET", ""),
        ("BASE_URL", "api.satr.jp"),
        ("TIMEOUT", "ten"),
        ("TIMEOUT", (1, 0)),
    ],
)
def test_configuration_errors_before_any_request(
    capture: CaptureServer, setting: str, value: Any
) -> None:
    overrides = {setting: value}
    if setting != "BASE_URL":
        overrides["BASE_URL"] = capture.url
    conf = dataclasses.replace(get_settings(), **overrides)
    with SatoriClient(conf) as satori:
        for call in (
            lambda: satori.upsert_customer({"email": "a@b.jp"}),
            lambda: satori.delete_customer(email="a@b.jp"),
            lambda: satori.bulk_upsert(CSV),
            lambda: satori.bulk_status("pc"),
            lambda: satori.add_action(email="a@b.jp", name="x"),
        ):
            with pytest.raises(SatoriConfigurationError) as info:
                call()
            if setting in ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET"):
                assert setting in str(info.value)
    assert capture.requests == []


def test_unknown_action_time_zone(capture: CaptureServer) -> None:
    with (
        make_client(capture, ACTION_TIMEZONE="Mars/Olympus") as satori,
        pytest.raises(SatoriConfigurationError) as info,
    ):
        satori.add_action(email="a@b.jp", name="x")
    _assert_unchained(info.value)
    assert capture.requests == []


# --------------------------------------------------------------------------- secrets & privacy


def _leaks(texts: list[str]) -> list[tuple[str, str]]:
    found = []
    for text in texts:
        for value in KEYS.values():
            if value in text:
                found.append((value, text[:300]))
    return found


def _error_texts(error: BaseException) -> list[str]:
    texts = [str(error), repr(error), "".join(traceback.format_exception(error))]
    for attribute in ("response", "request_summary", "response_summary"):
        texts.append(repr(getattr(error, attribute, None)))
    return texts


def _echoing_replies(capture: CaptureServer) -> list[Reply]:
    """Replies that quote the request back, keys included, in every way we can think of."""
    status_url = (
        capture.url
        + "/api/v4/public/bulk_customers/status.json?user_key="
        + KEYS["user_key"]
        + "&user_secret="
        + KEYS["user_secret"]
    )
    return [
        json_reply({"status": 401, "message": f"user_key {KEYS['user_key']} is not valid"}),
        json_reply(
            {
                "status": 400,
                "message": {f"customer[{KEYS['company_secret']}]": "bad", "echo": dict(KEYS)},
            }
        ),
        Reply(
            404,
            f"<html><a href='{status_url}'>{status_url}</a></html>".encode(),
            {"Content-Type": "text/html"},
        ),
        json_reply({"status": 500, "message": "boom", "query": status_url}, status=500),
        Reply(action="drop"),
        Reply(delay=0.6),
        Reply(action="short"),
        json_reply(
            {
                "status": 200,
                "body": {
                    "process_status": "finished",
                    "failed_rows": [{"message": KEYS["user_secret"]}],
                },
            }
        ),
    ]


def test_no_key_appears_in_logs_errors_tracebacks_or_reprs(
    capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # root: urllib3's request lines are captured too
    texts: list[str] = []
    satori = make_client(capture, TIMEOUT=(2.0, 0.3))
    texts.append(repr(satori))
    texts.append(repr(satori.conf))

    calls = {
        "upsert": lambda: satori.upsert_customer({"email": "a@b.jp", "last_name": "山田"}),
        "register": lambda: satori.register_customer({"email": "a@b.jp"}),
        "delete": lambda: satori.delete_customer(email="a@b.jp"),
        "bulk": lambda: satori.bulk_upsert(CSV),
        "status": lambda: satori.bulk_status("pc-1"),
        "action": lambda: satori.add_action(email="a@b.jp", name="x"),
    }
    successes = {
        "upsert": json_reply({"status": 200, "message": {"customer[hashcode]": "h"}}),
        "register": json_reply({"status": 200, "message": {"customer[hashcode]": "h"}}),
        "delete": json_reply({"status": 200, "message": "ok"}),
        "bulk": json_reply({"status": 202, "body": {"process_code": "p"}}),
        "status": json_reply({"status": 200, "body": {"process_status": "finished"}}),
        "action": json_reply({"status": 200, "message": "ok"}),
    }
    errors = 0
    for name, call in calls.items():
        capture.reply(successes[name])
        result = call()
        texts += [
            repr(result),
            str(result),
            repr(dataclasses.asdict(result)),
            repr(result.request_summary),
        ]
        for reply in _echoing_replies(capture):
            capture.reply(reply)
            try:
                call()
            except SatoriError as error:
                errors += 1
                texts += _error_texts(error)
            else:  # the finished status with a key in failed_rows: check the result too
                texts.append(repr(result))
    satori.close()

    assert errors >= len(calls) * 7
    texts += [record.getMessage() for record in caplog.records]
    texts.append(caplog.text)
    assert any(
        "status.json" in record.getMessage()
        for record in caplog.records
        if record.name.startswith("urllib3")
    ), "urllib3 request lines were not captured"
    assert any(record.name == "django_satori.client" for record in caplog.records)
    assert _leaks(texts) == []


def test_requests_error_text_would_have_leaked() -> None:
    """The reason for all the care: requests puts the full URL in its messages."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = (
        f"http://127.0.0.1:{port}/api/v4/public/bulk_customers/status.json?user_key="
        + KEYS["user_key"]
    )
    with pytest.raises(requests.ConnectionError) as info:
        requests.get(url, timeout=2)
    assert KEYS["user_key"] in "".join(traceback.format_exception(info.value))
    # ...and our client, given the same dead port, says nothing of the kind.
    conf = dataclasses.replace(get_settings(), BASE_URL=f"http://127.0.0.1:{port}")
    with SatoriClient(conf) as satori, pytest.raises(SatoriTransientError) as ours:
        satori.bulk_status("pc")
    assert _leaks(_error_texts(ours.value)) == []


def test_debug_log_line_per_call_with_personal_data_redacted(
    capture: CaptureServer, client: SatoriClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_satori.client")
    client.upsert_customer(
        {
            "email": "taro@example.com",
            "last_name": "山田",
            "phone_number": "03-1234-5678",
            "custom:plan": "gold",
            "collection_route": "web",
        }
    )
    capture.reply(json_reply({"status": 400, "message": "taro@example.com は不正です"}))
    with pytest.raises(SatoriValidationError) as info:
        client.upsert_customer({"email": "taro@example.com"})

    records = [r for r in caplog.records if r.name == "django_satori.client"]
    assert len(records) == 2
    assert all(r.levelno == logging.DEBUG for r in records)
    ok, failed = (r.getMessage() for r in records)
    assert "/api/v4/public/customer/upsert.json" in ok
    assert "status 200" in ok
    assert re.search(r"in \d+ ms", ok)
    assert "<redacted 16 chars>" in ok and "taro@example.com" not in ok
    assert "山田" not in ok and "03-1234-5678" not in ok and "gold" not in ok
    assert "'customer[collection_route]': 'web'" in ok
    assert "user_key" not in ok
    assert "SatoriValidationError" in failed and "taro@example.com" not in failed
    # The error itself keeps SATORI's words as they are, for the person fixing it.
    assert "taro@example.com" in str(info.value)
    assert info.value.response_summary == {
        "status": 400,
        "message": "<redacted 16 chars> は不正です",
    }


def test_personal_data_shown_when_redaction_is_off(
    capture: CaptureServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="django_satori.client")
    with make_client(capture, REDACT_PERSONAL_DATA=False) as satori:
        result = satori.upsert_customer({"email": "taro@example.com", "last_name": "山田"})
    assert result.request_summary["customer[email]"] == "taro@example.com"
    assert result.request_summary["user_secret"] == "********"
    message = caplog.records[-1].getMessage()
    assert "taro@example.com" in message and "山田" in message
    assert _leaks([message, repr(result.request_summary)]) == []


def test_result_summaries(capture: CaptureServer, client: SatoriClient) -> None:
    capture.reply(
        json_reply(
            {"status": 200, "message": {"customer[hashcode]": "H", "customer[email]": "a@b.jp"}}
        )
    )
    result = client.upsert_customer(
        {"email": "a@b.jp", "lead_company_name": "ACME", "custom:plan": "gold"}
    )
    assert result.request_summary == {
        "user_key": "********",
        "user_secret": "********",
        "company_key": "********",
        "company_secret": "********",
        "customer[identity_type]": "email",
        "customer[email]": "<redacted 6 chars>",
        "customer[lead_company_name]": "ACME",
        "customer[custom:plan]": "<redacted 4 chars>",
    }
    assert result.response_summary == {
        "status": 200,
        "message": {"customer[hashcode]": "H", "customer[email]": "<redacted 6 chars>"},
    }
    assert result.response["message"]["customer[email]"] == "a@b.jp"
    assert repr(result) == (
        "CustomerResult(endpoint='customer/upsert', status=200, hashcode='H', http_status=200)"
    )


# --------------------------------------------------------------------------- shared client


def test_get_client_is_per_thread_and_follows_settings() -> None:
    first = get_client()
    assert get_client() is first
    assert first.conf is get_settings()

    other: list[SatoriClient] = []
    thread = threading.Thread(target=lambda: other.append(get_client()))
    thread.start()
    thread.join()
    assert other[0] is not first

    changed = {**get_settings_dict(), "BASE_URL": "https://example.invalid"}
    with override_settings(SATORI=changed):
        inside = get_client()
        assert inside is not first
        assert inside.conf.BASE_URL == "https://example.invalid"
        assert get_client() is inside
    after = get_client()
    assert after is not inside
    assert after.conf.BASE_URL != "https://example.invalid"


def test_get_client_after_fork_builds_a_new_client() -> None:
    """A Celery prefork child must not reuse its parent's pooled sockets."""
    import os

    parent = get_client()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            child = get_client()
            ok = child is not parent and get_client() is child
            os.write(write_end, b"new" if ok else b"same")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert answer == b"new"
    assert get_client() is parent


def get_settings_dict() -> dict[str, Any]:
    from django.conf import settings

    return dict(settings.SATORI)


def test_client_repr_hides_credentials_in_base_url() -> None:
    conf = dataclasses.replace(get_settings(), BASE_URL="https://user:pw@api.satr.jp:8443/x?k=v")
    with SatoriClient(conf) as satori:
        assert repr(satori) == "<SatoriClient https://api.satr.jp:8443>"


def test_injected_session_is_used_and_left_open(capture: CaptureServer) -> None:
    session = requests.Session()
    conf = dataclasses.replace(get_settings(), BASE_URL=capture.url)
    with SatoriClient(conf, session=session) as satori:
        satori.upsert_customer({"email": "a@b.jp"})
    assert session.headers["User-Agent"].startswith("django-satori/")
    # Still usable: the client did not close a session it does not own.
    session.get(capture.url + "/ping", timeout=5)
    session.close()
    assert len(capture.requests) == 2


# --------------------------------------------------------------------------- sandbox round trips
#
# The strict sandbox (django_satori.sandbox) checks keys, permissions and every
# field like SATORI would; ``satori_sandbox`` points settings.SATORI at it, so
# these tests use the client exactly as the sync engine does: get_client().

SANDBOX_CSV = (
    "email,last_name,custom:plan,collection_route\n"
    "hanako@example.jp,佐藤,gold,web\n"
    "not-an-address,鈴木,silver,web\n"
    "jiro@example.jp,田中,,\n"
).encode()


def _sent_form(sandbox: Any, operation: str) -> dict[str, str]:
    (record,) = sandbox.state.requests_for(operation)
    return record.form_dict()


def test_sandbox_upsert_register_delete(satori_sandbox: Any) -> None:
    satori = get_client()
    assert satori_sandbox.url == satori.conf.BASE_URL

    created = satori.upsert_customer(
        {
            "email": "Ｔａｒｏ@Example.com",
            "last_name": "山田",
            "first_name": "太郎",
            "custom:plan": "gold",
            "append_tags": "資料請求,展示会",
            "collection_date": "2025/01/31",
            "delivery_permission": "approval",
        }
    )
    stored = satori_sandbox.state.customer("taro@example.com")
    assert stored is not None
    assert created.hashcode == stored.hashcode
    assert stored.email == "taro@example.com"
    assert stored.fields["last_name"] == "山田"
    assert stored.fields["collection_date"] == "2025-01-31"
    assert stored.custom == {"plan": "gold"}
    assert stored.tags == {"資料請求", "展示会"}
    assert _sent_form(satori_sandbox, "upsert")["customer[email]"] == "taro@example.com"

    # registration fills blanks only (the sandbox follows SATORI's documented v3 rule)
    again = satori.register_customer(
        {"email": "taro@example.com", "last_name": "上書き", "memo": "新しいメモ"}
    )
    assert again.hashcode == created.hashcode
    assert stored.fields["last_name"] == "山田" and stored.fields["memo"] == "新しいメモ"

    deleted = satori.delete_customer(hashcode=created.hashcode)
    assert deleted.hashcode == created.hashcode
    assert satori_sandbox.state.customer("taro@example.com") is None
    with pytest.raises(SatoriNotFoundError) as info:
        satori.delete_customer(email="taro@example.com")
    assert (info.value.status, info.value.field) == (404, "email")


def test_sandbox_add_action(satori_sandbox: Any) -> None:
    satori = get_client()
    satori.upsert_customer({"email": "a@example.jp"})
    result = satori.add_action(
        email="A@example.jp",
        name="セミナー参加",
        content="第3回",
        url="https://example.jp/s/3",
        occurred_at=dt.datetime(2025, 3, 1, 1, 2, 3, tzinfo=dt.UTC),
    )
    (action,) = satori_sandbox.state.customer("a@example.jp").actions
    assert (action.name, action.content, action.url, action.date) == (
        "セミナー参加",
        "第3回",
        "https://example.jp/s/3",
        "2025-03-01 10:02:03",
    )
    assert result.endpoint == "customer/add_action"
    with pytest.raises(SatoriNotFoundError):
        satori.add_action(email="nobody@example.jp", name="x")


@pytest.mark.parametrize("envelope", ["body", "message", "top"])
def test_sandbox_bulk_upload_and_status(satori_sandbox: Any, envelope: str) -> None:
    satori_sandbox.configure(envelope=envelope)
    satori = get_client()
    upload = satori.bulk_upsert(io.BytesIO(SANDBOX_CSV))
    assert upload.status == 202
    assert satori_sandbox.state.jobs.keys() == {upload.process_code}

    status = satori.bulk_status(upload.process_code)
    assert status.finished and status.process_status == "finished"
    assert [row["row_number"] for row in status.succeeded_rows] == [2]
    assert [row.row_number for row in status.failed_rows] == [3, 4]
    assert "email" in status.failed_rows[0].message
    assert "collection_route" in status.failed_rows[1].message
    assert satori_sandbox.state.customer("hanako@example.jp").custom == {"plan": "gold"}

    (record,) = satori_sandbox.state.requests_for("bulk_upsert")
    (upload_file,) = record.files
    assert (upload_file.name, upload_file.filename, upload_file.content_type) == (
        "customer_csv_file",
        "customers.csv",
        "text/csv",
    )
    assert upload_file.content == SANDBOX_CSV
    assert record.form_dict() == {**KEYS, "identity_type": "email"}


def test_sandbox_bulk_register_processing_then_finished(satori_sandbox: Any) -> None:
    satori_sandbox.configure(bulk_processing_seconds=0.4)
    satori = get_client()
    upload = satori.bulk_register(b"email,collection_route\nnew@example.jp,web\n")
    first = satori.bulk_status(upload.process_code)
    assert (first.finished, first.process_status) == (False, "processing")
    deadline = time.monotonic() + 5
    while not (status := satori.bulk_status(upload.process_code)).finished:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status.failed_rows == []
    assert satori_sandbox.state.customer("new@example.jp") is not None
    (record,) = satori_sandbox.state.requests_for("bulk_registration")
    assert (record.method, record.path) == (
        "POST",
        "/api/v4/public/bulk_customers/registration.json",
    )
    status_query = dict(satori_sandbox.state.requests_for("bulk_status")[0].query)
    assert status_query == {**KEYS, "process_code": upload.process_code}

    with pytest.raises(SatoriNotFoundError):
        satori.bulk_status("no-such-code")


def test_sandbox_whole_file_refusal_names_the_field(satori_sandbox: Any) -> None:
    with pytest.raises(SatoriValidationError) as info:
        get_client().bulk_upsert(b"email,collection_route\n\xff\xfe@example.jp,web\n")
    assert (info.value.status, info.value.field) == (400, "customer_csv_file")
    with pytest.raises(SatoriValidationError) as info:
        get_client().bulk_upsert(b"email,last_name\n", identity_type="hashcode")
    assert info.value.field == "hashcode"


def test_sandbox_wrong_keys_and_permissions(satori_sandbox: Any) -> None:
    satori = get_client()
    satori_sandbox.state.seed_customer("theirs@example.jp", last_name="他人")

    satori_sandbox.configure(own_only=True)
    with pytest.raises(SatoriPermissionError) as info:
        satori.upsert_customer({"email": "theirs@example.jp", "last_name": "x"})
    assert not info.value.retryable and info.value.status == 403
    satori.upsert_customer({"email": "mine@example.jp"})  # own records are fine

    satori_sandbox.configure(own_only=False, deny_operations=["bulk_status"])
    with pytest.raises(SatoriPermissionError):
        satori.bulk_status("anything")

    wrong = dataclasses.replace(satori.conf, COMPANY_SECRET="wrong-secret")
    with SatoriClient(wrong) as stranger, pytest.raises(SatoriAuthenticationError) as auth:
        stranger.upsert_customer({"email": "mine@example.jp"})
    assert auth.value.status == 401 and not auth.value.retryable


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("500", SatoriTransientError),
        ("503", SatoriTransientError),
        ("429", SatoriRateLimitError),
        ("html", SatoriTransientError),
        ("drop", SatoriTransientError),
        ("timeout", SatoriTransientError),
    ],
)
def test_sandbox_faults_on_every_endpoint_leak_nothing(
    satori_sandbox: Any,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    error_class: type[SatoriError],
) -> None:
    caplog.set_level(logging.DEBUG)
    satori_sandbox.faults.retry_after = 42
    satori_sandbox.faults.timeout_seconds = 2.0
    conf = dataclasses.replace(get_settings(), TIMEOUT=(2.0, 0.3))
    satori_sandbox.state.seed_customer("a@example.jp", created_by=KEYS["user_key"])
    calls = [
        lambda s: s.upsert_customer({"email": "a@example.jp"}),
        lambda s: s.register_customer({"email": "a@example.jp"}),
        lambda s: s.delete_customer(email="a@example.jp"),
        lambda s: s.bulk_upsert(b"email,collection_route\na@example.jp,web\n"),
        lambda s: s.bulk_register(b"email,collection_route\na@example.jp,web\n"),
        lambda s: s.bulk_status("pc-123"),
        lambda s: s.add_action(email="a@example.jp", name="x"),
    ]
    texts: list[str] = []
    with SatoriClient(conf) as satori:
        for call in calls:
            satori_sandbox.faults.fail_first(1, kind)
            with pytest.raises(error_class) as info:
                call(satori)
            assert type(info.value) is error_class
            assert info.value.retryable
            if kind == "429":
                assert info.value.retry_after == 42.0
            if kind in ("drop", "timeout"):
                _assert_unchained(info.value)
            texts += _error_texts(info.value)
        # The fault was consumed: the same client works again on the same endpoint.
        assert satori.upsert_customer({"email": "a@example.jp"}).status == 200
    assert satori_sandbox.state.faults_by_kind == {kind: len(calls)}
    texts += [record.getMessage() for record in caplog.records] + [caplog.text]
    assert _leaks(texts) == []
