"""No key in the frame locals of any error the client raises.

Error trackers (Sentry by default, Django's DEBUG page too) record the local
variables of every frame a traceback passes through: containers item by item,
other objects by ``repr()`` and, in some tools, their ``__dict__``. When
SATORI or a proxy echoes the request (an error page quoting the form, an
http->https redirect of status.json carrying the query string), the raw reply
used to sit in such locals, keys included.

Each scenario below makes the client fail one way, against the capture server
(scripted replies that echo the keys) or the sandbox, then walks the error as
such a tool would, and asserts that none of the four key values appears.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from django_satori.client import SatoriClient
from django_satori.conf import AUTH_KEYS, get_settings
from django_satori.exceptions import (
    SatoriAuthenticationError,
    SatoriConfigurationError,
    SatoriError,
    SatoriNotFoundError,
    SatoriPermissionError,
    SatoriResponseTooLargeError,
    SatoriTimeoutError,
    SatoriTransientError,
    SatoriValidationError,
)
from tests.test_client import AUTH_BODY, KEYS, CaptureServer, Reply, serving

SECRETS = tuple(KEYS.values())
#: What an echoing server sends back: the form as sent and the raw values.
ECHO = AUTH_BODY.decode() + " " + " ".join(SECRETS)
ECHO_JSON = {"user_key": SECRETS[0], "request": ECHO, "keys": list(SECRETS)}


@pytest.fixture(name="capture")
def capture_server() -> Iterator[CaptureServer]:
    with serving() as server:
        yield server


# --------------------------------------------------------------------------- the walk


def leaks(error: BaseException, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    """Where a secret shows up in what a tracker could record of ``error``.

    The error itself (args, ``__dict__``), every frame of its traceback (each
    local: strings, bytes, containers recursively, ``repr()`` and ``__dict__``
    of other objects), and the same for ``__cause__`` and ``__context__``.
    """
    found: list[str] = []
    seen: set[int] = set()

    def check(text: str, where: str) -> None:
        for secret in secrets:
            if secret in text:
                found.append(f"{where}: {secret}")

    def walk(value: Any, where: str, depth: int = 0) -> None:
        if depth > 25 or id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, str):
            check(value, where)
            return
        if isinstance(value, bytes | bytearray | memoryview):
            check(bytes(value).decode("utf-8", "replace"), where)
            return
        if value is None or isinstance(value, bool | int | float | complex):
            return
        if isinstance(value, types.ModuleType | type):
            return  # module globals and class bodies are code, not the call's data
        if isinstance(value, types.FrameType):
            for name, local in value.f_locals.items():
                walk(local, f"{where}.{name}", depth + 1)
            return
        with contextlib.suppress(Exception):  # a broken repr is no leak
            check(repr(value), f"repr({where})")
        if isinstance(value, Mapping):
            for key, item in list(value.items()):
                walk(key, f"{where}[key]", depth + 1)
                walk(item, f"{where}[{key!r}]", depth + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for n, item in enumerate(list(value)):
                walk(item, f"{where}[{n}]", depth + 1)
        if isinstance(value, BaseException):
            walk(value.args, f"{where}.args", depth + 1)
            tb = value.__traceback__
            while tb is not None:
                frame = tb.tb_frame
                walk(frame, f"{where}<{frame.f_code.co_name}>", depth + 1)
                tb = tb.tb_next
            walk(value.__cause__, f"{where}.__cause__", depth + 1)
            walk(value.__context__, f"{where}.__context__", depth + 1)
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            walk(attributes, f"{where}.__dict__", depth + 1)

    walk(error, "error")
    return found


def provoke(call: Callable[[], Any]) -> SatoriError:
    """The error ``call`` raises, caught here so the test's own frame is not walked."""
    try:
        call()
    except SatoriError as error:
        return error
    raise AssertionError("no error was raised")


class _Leaky:
    def __init__(self, body: bytes) -> None:
        self.nested = {"reply": [("x", body)]}


def test_the_walk_finds_a_key_wherever_a_tracker_would() -> None:
    # The check must be able to fail: a key in a local, in a nested container,
    # in an object's __dict__, in a chained error.
    def parse(body: bytes) -> None:
        holder = _Leaky(body)
        assert holder
        raise SatoriError("bad reply")

    error = provoke(lambda: parse(AUTH_BODY))
    assert any("error<parse>.body" in hit for hit in leaks(error))
    assert any(".holder.__dict__" in hit for hit in leaks(error))

    def chained() -> None:
        try:
            raise ValueError(f"echo {SECRETS[2]}")
        except ValueError:
            raise SatoriError("wrapped") from None

    # "from None" hides the cause from the traceback print, not from a tracker.
    assert any("__context__" in hit for hit in leaks(provoke(chained)))


# --------------------------------------------------------------------------- scenarios

JSON = {"Content-Type": "application/json"}


def echo_json(status: int, **extra: Any) -> Reply:
    body = {"status": status, "message": f"refused: {ECHO}", **ECHO_JSON, **extra}
    return Reply(status=status, body=json.dumps(body).encode(), headers=JSON)


def upsert(client: SatoriClient) -> Any:
    return client.upsert_customer({"email": "a@b.jp", "last_name": "山田"})


#: name -> (reply, client settings, call, expected error class)
SCENARIOS: dict[str, tuple[Reply | None, dict[str, Any], Callable[[SatoriClient], Any], type]] = {
    "HTML error page echoing the form": (
        Reply(
            status=502,
            body=f"<html><body><pre>{ECHO}</pre></body></html>".encode(),
            headers={"Content-Type": "text/html", "X-Echo": AUTH_BODY.decode()},
        ),
        {},
        upsert,
        SatoriTransientError,
    ),
    "refused keys echoed as JSON": (echo_json(401), {}, upsert, SatoriAuthenticationError),
    "permission error echoed": (echo_json(403), {}, upsert, SatoriPermissionError),
    "validation error echoed": (echo_json(400), {}, upsert, SatoriValidationError),
    "server error echoed": (echo_json(500), {}, upsert, SatoriTransientError),
    "redirect of the status query to https": (
        Reply(
            status=301,
            body=f"Moved: https://api.example/status.json?{AUTH_BODY.decode()}".encode(),
            headers={
                "Location": f"https://api.example/status.json?{AUTH_BODY.decode()}&process_code=P",
                "Content-Type": "text/plain",
            },
        ),
        {},
        lambda client: client.bulk_status("P"),
        SatoriConfigurationError,
    ),
    "redirect of a customer call": (
        Reply(status=307, body=AUTH_BODY, headers={"Location": f"https://x/?{ECHO}"}),
        {},
        upsert,
        SatoriConfigurationError,
    ),
    "bad JSON echoing the keys": (
        Reply(body=f'{{"status": 200, "message": "{ECHO}'.encode(), headers=JSON),
        {},
        upsert,
        SatoriTransientError,
    ),
    "JSON of an unexpected shape": (
        Reply(body=json.dumps(ECHO_JSON).encode(), headers=JSON),
        {},
        upsert,
        SatoriError,
    ),
    "reply cut short": (
        Reply(body=f'{{"echo": "{ECHO}"'.encode(), headers=JSON, action="short"),
        {},
        upsert,
        SatoriTransientError,
    ),
    "read timeout": (Reply(delay=2.0), {"TIMEOUT": 0.3}, upsert, SatoriTransientError),
    "dribbling reply (total timeout)": (
        Reply(body=ECHO.encode(), dribble=0.1),
        {"TOTAL_TIMEOUT": 0.6, "TIMEOUT": 5.0},
        upsert,
        SatoriTimeoutError,
    ),
    "oversized reply": (
        Reply(body=(ECHO * 100).encode(), headers=JSON),
        {"MAX_RESPONSE_BYTES": 2000},
        upsert,
        SatoriResponseTooLargeError,
    ),
    "connection dropped": (Reply(action="drop"), {}, upsert, SatoriTransientError),
    "bulk upload refused, echoing": (
        echo_json(400),
        {},
        lambda client: client.bulk_upsert(b"email\na@b.jp\n"),
        SatoriValidationError,
    ),
    "bulk upload accepted without a process_code": (
        Reply(body=json.dumps({"status": 200, **ECHO_JSON}).encode(), headers=JSON),
        {},
        lambda client: client.bulk_register(b"email\na@b.jp\n"),
        SatoriError,
    ),
    "bulk upload timed out": (
        Reply(body=ECHO.encode(), dribble=0.1),
        {"BULK_UPLOAD_TIMEOUT": 0.6, "TIMEOUT": 5.0},
        lambda client: client.bulk_upsert(b"email\na@b.jp\n"),
        SatoriTimeoutError,
    ),
    "status query refused, echoing": (
        echo_json(404),
        {},
        lambda client: client.bulk_status("P"),
        SatoriNotFoundError,
    ),
    "status with failed rows lacking numbers": (
        Reply(
            body=json.dumps(
                {
                    "status": 200,
                    "body": {"process_status": "finished", "failed_rows": [{"message": ECHO}]},
                    **ECHO_JSON,
                }
            ).encode(),
            headers=JSON,
        ),
        {},
        lambda client: client.bulk_status("P"),
        SatoriError,
    ),
    "action refused, echoing": (
        echo_json(400),
        {},
        lambda client: client.add_action(email="a@b.jp", name="visited"),
        SatoriValidationError,
    ),
    "delete refused, echoing": (
        echo_json(404),
        {},
        lambda client: client.delete_customer(email="a@b.jp"),
        SatoriNotFoundError,
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_key_in_the_frames_of_a_client_error(capture: CaptureServer, name: str) -> None:
    reply, overrides, call, expected = SCENARIOS[name]
    if reply is not None:
        capture.reply(reply)
    conf = dataclasses.replace(get_settings(), BASE_URL=capture.url, **overrides)
    client = SatoriClient(conf)
    assert all(getattr(conf, key) in SECRETS for key in AUTH_KEYS)
    try:
        error = provoke(lambda: call(client))
    finally:
        client.close()
    assert isinstance(error, expected), repr(error)
    assert error.__traceback__ is not None
    assert leaks(error) == []
    assert capture.requests, "the call reached the server"


def test_no_key_in_the_frames_when_the_connection_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    conf = dataclasses.replace(get_settings(), BASE_URL=f"http://127.0.0.1:{port}")
    with SatoriClient(conf) as client:
        error = provoke(lambda: client.bulk_status("P"))
    assert isinstance(error, SatoriTransientError)
    assert leaks(error) == []


def test_no_key_in_the_frames_when_the_sandbox_refuses_the_keys(satori_sandbox: Any) -> None:
    # The real strict sandbox, with keys it does not accept (still the four values walked for).
    wrong = {key: f"wrong-{n}-{SECRETS[n]}" for n, key in enumerate(AUTH_KEYS)}
    conf = dataclasses.replace(get_settings(), **wrong)
    with SatoriClient(conf) as client:
        error = provoke(lambda: client.upsert_customer({"email": "a@b.jp"}))
    assert isinstance(error, SatoriAuthenticationError)
    assert leaks(error, tuple(wrong.values())) == []
