"""HTTP client for SATORI's seven public endpoints, in SATORI's own wire format.

* Single customer (``customer/registration|upsert|delete.json``) and the
  action API: POST, ``application/x-www-form-urlencoded; charset=UTF-8``, the
  four keys as top-level fields and customer items as ``customer[...]``.
* Bulk CSV upload (``bulk_customers/registration|upsert.json``): multipart
  with the keys, ``identity_type`` and the file field ``customer_csv_file``.
  The file is streamed from disk, never copied into one big body.
* Bulk status (``bulk_customers/status.json``): GET with the keys **in the
  query string**. That URL is therefore never logged or put into an error,
  and requests' own exceptions (whose text contains the URL) are never chained.

Every reply goes through :func:`parse_response`: SATORI's JSON ``status`` wins
over the HTTP code, and anything unexpected becomes one of our typed errors.

Permission errors (``SatoriPermissionError``) deserve a note: since 2025 SATORI
applies the key owner's permission rules to API calls, and with the rule
"own records only" valid keys are refused for customers that another user or
key created. Such errors are per customer and are never worth retrying.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import heapq
import http.client
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO
from urllib.parse import urlencode, urlsplit

import requests
import requests.adapters
import urllib3.connection
import urllib3.exceptions
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from . import __version__
from .conf import (
    ANSWER_CLASSES,
    AUTH_KEYS,
    DEFAULT_ANSWER_STATUS_CLASSES,
    SatoriSettings,
    answer_status_classes,
    get_settings,
)
from .exceptions import (
    SatoriAuthenticationError,
    SatoriConfigurationError,
    SatoriError,
    SatoriNotFoundError,
    SatoriPermissionError,
    SatoriRateLimitError,
    SatoriResponseTooLargeError,
    SatoriTimeoutError,
    SatoriTransientError,
    SatoriValidationError,
)
from .redaction import (
    AUTH_FIELDS,
    SecretNeedles,
    for_log,
    install_log_filters,
    redact_form,
    scrub,
    scrub_data,
    secret_needles,
)
from .schema import (
    IDENTITY_TYPES,
    STANDARD_FIELDS,
    clean_customer,
    customer_form_fields,
    join_tags,
    normalize_email,
    refuse_unencodable,
)

logger = logging.getLogger("django_satori.client")
install_log_filters()

USER_AGENT = f"django-satori/{__version__} python-requests/{requests.__version__}"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=UTF-8"
CSV_FIELD = "customer_csv_file"

#: endpoint name -> (HTTP method, path under BASE_URL)
ENDPOINTS: dict[str, tuple[str, str]] = {
    "customer/registration": ("POST", "/api/v4/public/customer/registration.json"),
    "customer/upsert": ("POST", "/api/v4/public/customer/upsert.json"),
    "customer/delete": ("POST", "/api/v4/public/customer/delete.json"),
    "bulk/registration": ("POST", "/api/v4/public/bulk_customers/registration.json"),
    "bulk/upsert": ("POST", "/api/v4/public/bulk_customers/upsert.json"),
    "bulk/status": ("GET", "/api/v4/public/bulk_customers/status.json"),
}
ACTION_ENDPOINT = "customer/add_action"

#: Retry-After values above this are capped: the sync engine plans in minutes.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0
#: Error messages quoted from SATORI are cut to this length.
MAX_MESSAGE_CHARS = 500
#: Non-seekable CSV streams are spooled to a temporary file above this size.
SPOOL_MAX_BYTES = 8 * 1024 * 1024

_FIELD_IN_BRACKETS = re.compile(r"customer\[([A-Za-z0-9_:]+)\]")
_CUSTOM_IN_TEXT = re.compile(r"custom:[A-Za-z0-9_]+")
_EXTRA_FIELD_NAMES = ("identity_type", "process_code", CSV_FIELD)
# One pass over SATORI's text, however long (one search per name took 20 passes).
# The earliest mention wins; at the same spot the longer name does, hence the order.
_FIELD_NAME_IN_TEXT = re.compile(
    r"(?<![A-Za-z0-9_])("
    + "|".join(
        re.escape(name)
        for name in sorted({*STANDARD_FIELDS, *_EXTRA_FIELD_NAMES}, key=lambda n: (-len(n), n))
    )
    + r")(?![A-Za-z0-9_])"
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CustomerResult:
    """Outcome of a single-customer or action call. ``hashcode`` when SATORI sent one."""

    endpoint: str
    status: int
    hashcode: str | None
    message: Any = field(repr=False)
    response: Any = field(repr=False)
    http_status: int = 200
    elapsed_ms: float = field(default=0.0, repr=False)
    #: The request with keys masked and personal values redacted (safe to store).
    request_summary: dict[str, str] = field(default_factory=dict, repr=False)
    #: The reply with keys removed and personal values redacted (safe to store).
    response_summary: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class BulkUploadResult:
    """SATORI accepted a CSV; poll :meth:`SatoriClient.bulk_status` with ``process_code``."""

    process_code: str
    status: int
    message: Any = field(repr=False)
    response: Any = field(repr=False)
    http_status: int = 200
    elapsed_ms: float = field(default=0.0, repr=False)
    request_summary: dict[str, str] = field(default_factory=dict, repr=False)
    response_summary: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class FailedRow:
    """One refused CSV row. ``row_number`` counts the header as row 1."""

    row_number: int
    message: str


@dataclass(frozen=True)
class BulkStatus:
    """Progress of a bulk job; only ``process_status == "finished"`` means done."""

    process_code: str
    process_status: str
    finished: bool
    succeeded_rows: list[Any] = field(repr=False)
    failed_rows: list[FailedRow] = field(repr=False)
    response: Any = field(repr=False)
    status: int = 200
    http_status: int = 200
    elapsed_ms: float = field(default=0.0, repr=False)
    request_summary: dict[str, str] = field(default_factory=dict, repr=False)
    response_summary: Any = field(default=None, repr=False)


# Slots: error trackers walk a local's ``__dict__``; ``raw`` and ``payload`` may echo
# the keys, and only the repr (which leaves them out) is there to see.
@dataclass(frozen=True, slots=True)
class SatoriReply:
    """A successful reply: its status, where its payload sits, and the JSON.

    ``payload`` and ``raw`` are the reply as SATORI sent it, for reading values
    (a hashcode, a process code) that must not be altered; ``data`` and
    ``message`` have the keys scrubbed out, for storing and showing.
    """

    status: int
    message: Any
    payload: dict[str, Any] = field(repr=False)
    data: dict[str, Any]
    http_status: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- parsing


def parse_response(
    body: bytes,
    http_status: int,
    headers: Mapping[str, str] | None = None,
    *,
    needles: Iterable[str] = (),
    status_classes: Mapping[int, str] | None = None,
    message_classes: Sequence[tuple[re.Pattern[str], str]] = (),
) -> SatoriReply:
    """Turn one HTTP reply into a :class:`SatoriReply` or raise a typed error.

    Only :class:`SatoriError` subclasses ever leave this function, whatever the
    bytes. ``needles`` (from :func:`redaction.secret_needles`) are removed from
    what is kept for storing and showing (``data``, an error's text and
    response), never from what is read: with short key values, scrubbing the
    reply before reading it mangled every answer (``"status"`` holds an "a").
    ``status_classes`` and ``message_classes`` classify refusals (see
    :func:`error_for_status`).
    """
    outcome = _parse(
        body,
        http_status,
        headers or {},
        _as_needles(needles),
        status_classes,
        message_classes,
    )
    # The raw reply can echo the keys (an error page quoting the form, a
    # redirect's Location): error trackers record the locals of the frame that
    # raises, so the raw bytes and headers are gone from it first.
    del body, headers
    if isinstance(outcome, SatoriError):
        raise outcome
    return outcome


def _as_needles(needles: Iterable[str]) -> SecretNeedles:
    return needles if isinstance(needles, SecretNeedles) else SecretNeedles(needles)


def _parse(
    body: bytes,
    http_status: int,
    headers: Mapping[str, str],
    needles: SecretNeedles,
    status_classes: Mapping[int, str] | None,
    message_classes: Sequence[tuple[re.Pattern[str], str]],
) -> SatoriReply | SatoriError:
    """:func:`parse_response`'s work; returns the error instead of raising it (see there)."""
    content_type = _header(headers, "Content-Type")[:100]
    retry_after = _retry_after_header(_header(headers, "Retry-After"))

    if 300 <= http_status < 400:
        # A redirect is never SATORI's answer; following it would re-send the
        # keys (status.json's query string) to wherever Location points.
        return SatoriConfigurationError(
            _(
                "SATORI answered with a redirect (HTTP %(code)s); check SATORI['BASE_URL'] "
                "(it should be https://api.satr.jp)."
            )
            % {"code": http_status},
            http_status=http_status,
        )

    raw, ok = _load_json(body)
    if not ok and http_status in (401, 403):
        # SATORI answers JSON; a page refusing the keys or the request comes from
        # a proxy or firewall in between. Retrying cannot help: a person must look.
        return SatoriConfigurationError(
            _(
                "The request was refused with HTTP %(code)s by something that is not SATORI "
                "(the reply is not JSON, content type %(type)s): probably a proxy or firewall "
                "between this server and SATORI. Check the outgoing proxy and firewall rules "
                "and SATORI['BASE_URL']; this is not retried."
            )
            % {"code": http_status, "type": scrub(content_type or "none", needles)},
            http_status=http_status,
        )
    if not ok:
        return SatoriTransientError(
            ngettext(
                "SATORI's reply was not JSON (HTTP %(code)s, content type %(type)s, "
                "%(size)d byte); probably a proxy or maintenance page.",
                "SATORI's reply was not JSON (HTTP %(code)s, content type %(type)s, "
                "%(size)d bytes); probably a proxy or maintenance page.",
                len(body),
            )
            % {
                "code": http_status,
                "type": scrub(content_type or "none", needles),
                "size": len(body),
            },
            http_status=http_status,
            retry_after=retry_after,
        )
    data = scrub_data(raw, needles)

    status = _coerce_status(raw.get("status")) if isinstance(raw, dict) else None
    if status is None:
        if 200 <= http_status < 300 or not 100 <= http_status < 600:
            return SatoriError(
                _(
                    "SATORI's reply has an unexpected shape (HTTP %(code)s, JSON %(kind)s "
                    "without a usable status)."
                )
                % {"code": http_status, "kind": type(data).__name__},
                http_status=http_status,
                response=data,
            )
        status = http_status  # e.g. a gateway's JSON error: the HTTP code is all we have

    message = raw.get("message") if isinstance(raw, dict) else None
    if 200 <= status < 300 and isinstance(raw, dict) and isinstance(data, dict):
        return SatoriReply(
            status=status,
            message=data.get("message"),
            payload=_payload(raw),
            data=data,
            http_status=http_status,
            raw=raw,
        )

    payload = _payload(raw) if isinstance(raw, dict) else {}
    if retry_after is None:
        retry_after = _retry_after_hint(payload, raw)
    return error_for_status(
        status,
        _message_text(message, needles)
        or _("SATORI refused the request (status %(status)s).") % {"status": status},
        http_status=http_status,
        response=data,
        retry_after=retry_after,
        field=_field_from_message(message),
        status_classes=status_classes,
        message_classes=message_classes,
    )


def error_for_status(
    status: int,
    message: str,
    *,
    http_status: int | None = None,
    response: Any = None,
    retry_after: float | None = None,
    field: str | None = None,
    status_classes: Mapping[int, str] | None = None,
    message_classes: Sequence[tuple[re.Pattern[str], str]] = (),
) -> SatoriError:
    """The error class for a non-success SATORI status (JSON status, or HTTP code).

    The first of ``message_classes`` (pattern, class) whose pattern is found in
    ``message`` decides; otherwise ``status_classes`` (default: 401
    authentication, 403 permission, 404 not found, 429 slow down, 408/425
    transient), then 5xx transient and any other 4xx validation. SATORI's list
    of codes is not published, hence ANSWER_STATUS_CLASSES / ANSWER_MESSAGE_CLASSES.
    """
    # ``field`` goes on every class: a 404 or 403 naming customer[email] says which identity.
    common: dict[str, Any] = {
        "status": status,
        "http_status": http_status,
        "response": response,
        "field": field,
    }
    kind = next((name for pattern, name in message_classes if pattern.search(message)), None)
    if kind is None:
        kind = (DEFAULT_ANSWER_STATUS_CLASSES if status_classes is None else status_classes).get(
            status
        )
    if kind is None and 500 <= status < 600:
        kind = "transient"
    elif kind is None and 400 <= status < 500:
        kind = "validation"
    if kind == "authentication":
        return SatoriAuthenticationError(message, **common)
    if kind == "permission":
        return SatoriPermissionError(message, **common)
    if kind == "not_found":
        return SatoriNotFoundError(message, **common)
    if kind == "slow_down":
        return SatoriRateLimitError(message, retry_after=retry_after, **common)
    if kind == "transient":
        return SatoriTransientError(message, retry_after=retry_after, **common)
    if kind == "validation":
        return SatoriValidationError(message, **common)
    return SatoriError(message, **common)


def compile_message_classes(value: Any) -> list[tuple[re.Pattern[str], str]]:
    """ANSWER_MESSAGE_CLASSES as compiled ``(pattern, class)`` pairs; unusable entries
    are left out (system check E011 names them)."""
    compiled: list[tuple[re.Pattern[str], str]] = []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return compiled
    for entry in value:
        if (
            isinstance(entry, list | tuple)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and entry[1] in ANSWER_CLASSES
        ):
            try:
                compiled.append((re.compile(entry[0]), entry[1]))
            except re.error:
                continue
    return compiled


def _header(headers: Mapping[str, str], name: str) -> str:
    lowered = name.lower()
    for key, value in headers.items():
        if str(key).lower() == lowered:
            return str(value)
    return ""


def _load_json(body: bytes) -> tuple[Any, bool]:
    try:
        return json.loads(body), True
    except (ValueError, RecursionError, TypeError):
        # ValueError covers bad JSON, bad UTF-8 and over-long integers.
        return None, False


def _coerce_status(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{3}", value.strip()):
        value = int(value.strip())  # str.isdigit() would also accept "¹" or "３"
    if isinstance(value, int) and 100 <= value < 600:
        return value
    return None


def _payload(data: dict[str, Any]) -> dict[str, Any]:
    """Where the useful part of a reply sits: ``body``, else ``message`` (an object), else top."""
    for key in ("body", "message"):
        value = data.get(key)
        if isinstance(value, dict):
            return value
    return data


def _message_text(message: Any, needles: Iterable[str]) -> str:
    if message is None:
        return ""
    if isinstance(message, str):
        text = message
    else:
        try:
            text = json.dumps(message, ensure_ascii=False, default=str)
        except (ValueError, TypeError, RecursionError):
            text = type(message).__name__
    text = scrub(text, needles).strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def _field_from_message(message: Any) -> str | None:
    """Name the customer item an error is about, when SATORI's message says so."""
    if isinstance(message, dict):
        for key in message:
            found = _field_from_text(str(key))
            if found:
                return found
        return None
    if isinstance(message, list):
        for item in message:
            found = _field_from_message(item)
            if found:
                return found
        return None
    return _field_from_text(message) if isinstance(message, str) else None


def _field_from_text(text: str) -> str | None:
    match = _FIELD_IN_BRACKETS.search(text)
    if match:
        return match.group(1)
    match = _CUSTOM_IN_TEXT.search(text)
    if match:
        return match.group(0)
    match = _FIELD_NAME_IN_TEXT.search(text)
    return match.group(1) if match else None


def _retry_after_header(value: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    return _clamp_retry_after(seconds)


def _retry_after_hint(payload: dict[str, Any], data: Any) -> float | None:
    for source in (payload, data if isinstance(data, dict) else {}):
        for key in ("retry_after", "retryAfter", "Retry-After"):
            value = source.get(key)
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                return _clamp_retry_after(float(value))
            if isinstance(value, str):
                try:
                    return _clamp_retry_after(float(value.strip()))
                except ValueError:
                    continue
    return None


def _clamp_retry_after(seconds: float) -> float | None:
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


# --------------------------------------------------------------------------- requests


def _never_connected(exc: requests.RequestException) -> bool:
    """The connection was never made (refused, unreachable, no route): nothing was sent."""
    if isinstance(exc, requests.exceptions.ConnectTimeout | requests.exceptions.ProxyError):
        return True
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


class _SafeRepr:
    """Holds wire data that error reports must not show.

    Error trackers record the locals of each frame a traceback passes through,
    by ``repr()`` or by walking ``__dict__``; subclasses declare ``__slots__``
    so there is no ``__dict__`` to walk, and the repr names only the class.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


class _Wire(_SafeRepr):
    """One request ready to send. The body and the query string (status.json) hold the keys."""

    __slots__ = (
        "body",
        "content_type",
        "endpoint",
        "method",
        "path",
        "query",
        "summary",
        "timeout_setting",
    )

    def __init__(
        self,
        endpoint: str,
        method: str,
        path: str,
        *,
        body: bytes | _MultipartStream | None = None,
        content_type: str | None = None,
        query: str = "",
        summary: dict[str, str],
        timeout_setting: str = "TOTAL_TIMEOUT",
    ) -> None:
        self.endpoint = endpoint
        self.method = method
        self.path = path
        self.body = body
        self.content_type = content_type
        self.query = query
        self.summary = summary
        #: The setting that bounds the whole call (named in the error when it runs out).
        self.timeout_setting = timeout_setting


class _RawReply(_SafeRepr):
    """An HTTP reply as received; SATORI or a proxy may have echoed the keys into it."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class _Deadline(_SafeRepr):
    """Ends one call when its overall time is up, whatever the server does.

    requests' timeouts bound each socket operation, not the call: a reply
    trickling one byte every few seconds never trips them. The process's
    watchdog thread (:class:`_Watchdog`) shuts the call's socket down instead,
    which wakes the blocked read or send at once.
    The socket is known through :class:`_WatchedConnection` (our session's
    pools), or, for an injected session, from the response once its headers
    are in (connect and read timeouts, clipped to the time left, bound the
    part before that).
    """

    __slots__ = (
        "_connection",
        "_done",
        "_lock",
        "_sock",
        "expired",
        "expires",
        "seconds",
    )

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.expired = False
        self._done = False
        self._connection: Any = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> _Deadline:
        _watch.deadline = self
        _watchdog.watch(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _watch.deadline = None
        with self._lock:
            self._done = True

    @property
    def done(self) -> bool:
        return self._done

    def remaining(self) -> float:
        return max(self.expires - time.monotonic(), 0.0)

    def attach(self, connection: Any, sock: socket.socket | None = None) -> None:
        """The connection (or socket) this call uses; cut at once if the time is already up."""
        sock = sock or getattr(connection, "sock", None)
        with self._lock:
            if connection is not None:
                self._connection = connection
            if sock is not None:
                # Kept too: http.client drops conn.sock when the reply says
                # "Connection: close", while the reply goes on reading from it.
                self._sock = sock
            if self.expired and not self._done:
                self._cut()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            self._cut()

    def _cut(self) -> None:
        for sock in (getattr(self._connection, "sock", None), self._sock):
            if sock is not None:
                # shutdown(), not close(): it wakes a recv() blocked in another thread.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """One thread per process that ends the calls whose deadline passed.

    It replaced a ``threading.Timer`` per call: starting a thread waits for it to
    run, which cost a third of a millisecond a call, a fifth of a push here.
    Deadlines that ended in time stay in the heap until they reach its top.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: _Deadline) -> None:
        with self._changed:
            heapq.heappush(self._heap, (deadline.expires, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="django-satori-deadlines"
                )
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._changed.notify()  # earlier than what the thread waits for

    def forget(self) -> None:
        """In a forked child: the parent's thread and lock are the parent's."""
        self.__init__()  # type: ignore[misc]

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._changed.wait()
                    continue
                expires, _order, deadline = self._heap[0]
                wait = expires - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)
                    continue
                heapq.heappop(self._heap)
            deadline._fire()  # outside the lock: it takes the deadline's own


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog.forget)


def _socket_of(http_response: requests.Response) -> socket.socket | None:
    """The socket a streamed reply is read from (urllib3 and http.client internals)."""
    raw = http_response.raw
    connection = getattr(raw, "connection", None) or getattr(raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


class _Watch(threading.local):
    deadline: _Deadline | None = None


_watch = _Watch()


class _WatchedConnection:
    """Mixed into urllib3's connection classes: tells the running call's deadline
    which connection it is using (new or reused from the pool)."""

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        deadline = _watch.deadline
        if deadline is not None:
            deadline.attach(self)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        deadline = _watch.deadline
        if deadline is not None:
            deadline.attach(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchedConnection, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, urllib3.connection.HTTPSConnection):
    pass


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """The default adapter, with pools whose connections report to :class:`_Deadline`."""

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        pool = super().get_connection_with_tls_context(*args, **kwargs)
        cls = pool.ConnectionCls
        # Only the stock classes: a SOCKS proxy's connection class is left alone.
        if cls is urllib3.connection.HTTPSConnection:
            pool.ConnectionCls = _WatchedHTTPSConnection
        elif cls is urllib3.connection.HTTPConnection:
            pool.ConnectionCls = _WatchedHTTPConnection
        return pool


class _MultipartStream(_SafeRepr):
    """A ``multipart/form-data`` body read piece by piece, with a known length.

    requests sends a readable object with ``__len__`` as a streamed body with
    ``Content-Length`` (not chunked, which SATORI was never seen to accept).
    """

    __slots__ = ("_index", "_length", "_offset", "_parts", "boundary")

    def __init__(
        self,
        fields: list[tuple[str, str]],
        file_field: str,
        filename: str,
        file_type: str,
        file: IO[bytes],
        file_size: int,
    ) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            self._part_header(name) + value.encode("utf-8") + b"\r\n" for name, value in fields
        )
        head += self._part_header(file_field, filename, file_type)
        tail = f"\r\n--{self.boundary}--\r\n".encode("ascii")
        self._parts: list[bytes | tuple[IO[bytes], int]] = [head, (file, file_size), tail]
        self._length = len(head) + file_size + len(tail)
        self._index = 0
        self._offset = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _part_header(
        self, name: str, filename: str | None = None, content_type: str | None = None
    ) -> bytes:
        disposition = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        lines = [f"--{self.boundary}", disposition]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(64 * 1024):
            yield chunk

    def read(self, size: int = -1) -> bytes:
        out = bytearray()
        while self._index < len(self._parts) and (size < 0 or len(out) < size):
            part = self._parts[self._index]
            want = -1 if size < 0 else size - len(out)
            if isinstance(part, bytes):
                piece = (
                    part[self._offset :] if want < 0 else part[self._offset : self._offset + want]
                )
                self._offset += len(piece)
                done = self._offset >= len(part)
            else:
                file, remaining = part
                left = remaining - self._offset
                piece = file.read(left if want < 0 else min(want, left))
                self._offset += len(piece)
                if not piece and self._offset < remaining:
                    # The file shrank under us: Content-Length would now be a lie.
                    raise OSError("the CSV file ended before its announced size")
                done = self._offset >= remaining
            out += piece
            if done:
                self._index += 1
                self._offset = 0
        return bytes(out)


def _csv_source(csv_file: Any) -> tuple[IO[bytes], int, bool]:
    """``(binary file, bytes left to send, whether we own the file)``.

    Seekable files are sent from their current position without copying;
    other streams are spooled once to a temporary file so the length is known.
    """
    if isinstance(csv_file, str):
        csv_file = csv_file.encode("utf-8")
    if isinstance(csv_file, bytes | bytearray | memoryview):
        data = bytes(csv_file)
        return io.BytesIO(data), len(data), True
    if not hasattr(csv_file, "read") or isinstance(csv_file, io.TextIOBase):
        raise TypeError("csv_file must be bytes or a file object opened in binary mode")
    try:
        start = csv_file.tell()
        end = csv_file.seek(0, io.SEEK_END)
        csv_file.seek(start)
        return csv_file, max(0, end - start), False
    except (AttributeError, OSError, ValueError):
        spool: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)  # noqa: SIM115
        shutil.copyfileobj(csv_file, spool)
        size = spool.tell()
        spool.seek(0)
        return spool, size, True


def _safe_filename(filename: str) -> str:
    # The name goes inside a quoted header; keep it to characters that need no escaping.
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(filename)).strip("._") or "customers"
    return cleaned if cleaned.lower().endswith(".csv") else cleaned + ".csv"


# --------------------------------------------------------------------------- client


class SatoriClient:
    """One client per settings object; one keep-alive HTTP session per client.

    Use :func:`get_client` for the shared per-thread instance. Methods raise
    :class:`~django_satori.exceptions.SatoriError` subclasses only.

    Every call is bounded in time (``TOTAL_TIMEOUT``, ``BULK_UPLOAD_TIMEOUT``)
    and in reply size (``MAX_RESPONSE_BYTES``). An injected ``session`` keeps
    its own adapters, so there the time limit takes hold once the reply's
    headers are in (before that, the connect and read timeouts clipped to the
    time left apply).
    """

    # No __dict__: the client is a local in every frame an error passes
    # through, and it holds the settings, the needles and the session.
    __slots__ = (
        "_base_url",
        "_max_bytes",
        "_message_classes",
        "_needles",
        "_owns_session",
        "_session",
        "_status_classes",
        "_timeout",
        "_total",
        "conf",
    )

    def __init__(
        self,
        conf: SatoriSettings | None = None,
        *,
        session: requests.Session | None = None,
    ) -> None:
        self.conf = conf if conf is not None else get_settings()
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = _DeadlineAdapter()
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"
        self._needles = secret_needles(self.conf)
        self._base_url = str(self.conf.BASE_URL or "").rstrip("/")
        self._timeout = _timeout(self.conf.TIMEOUT)
        self._total = {
            name: _seconds(getattr(self.conf, name))
            for name in ("TOTAL_TIMEOUT", "BULK_UPLOAD_TIMEOUT")
        }
        self._max_bytes = _positive_int(self.conf.MAX_RESPONSE_BYTES)
        self._status_classes = answer_status_classes(self.conf)
        self._message_classes = compile_message_classes(self.conf.ANSWER_MESSAGE_CLASSES)

    def __repr__(self) -> str:
        parts = urlsplit(self._base_url)
        # Host only: a BASE_URL could carry user:password@ or a query.
        shown = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if _port(parts) else ''}"
        return f"<SatoriClient {shown}>"

    def __enter__(self) -> SatoriClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session (only if this client created it)."""
        if self._owns_session:
            self._session.close()

    # ---------------------------------------------------------------- single customer

    def register_customer(
        self, customer: Mapping[str, Any], *, identity_type: str = "email", cleaned: bool = False
    ) -> CustomerResult:
        """Create the customer, or only fill blanks / add tags if it exists.

        ``cleaned``: ``customer`` is what :func:`~django_satori.schema.clean_customer`
        returned for this client's settings; it is sent without checking it again.
        """
        return self._customer_call("customer/registration", customer, identity_type, cleaned)

    def upsert_customer(
        self, customer: Mapping[str, Any], *, identity_type: str = "email", cleaned: bool = False
    ) -> CustomerResult:
        """Create or overwrite the customer. Unknown e-mail addresses are created.

        ``cleaned``: as for :meth:`register_customer`.
        """
        return self._customer_call("customer/upsert", customer, identity_type, cleaned)

    def delete_customer(
        self, *, email: str | None = None, hashcode: str | None = None
    ) -> CustomerResult:
        """Delete one customer, named by exactly one of ``email`` / ``hashcode``."""
        identity_type, value = self._identity(email, hashcode)
        return self._customer_call("customer/delete", {identity_type: value}, identity_type)

    def _customer_call(
        self, endpoint: str, customer: Mapping[str, Any], identity_type: str, cleaned: bool = False
    ) -> CustomerResult:
        self._check_configuration()
        values = dict(customer)
        if not cleaned:
            for key in ("append_tags", "delete_tags"):
                if isinstance(values.get(key), list | tuple | set | frozenset):
                    values[key] = self._join_tags(values[key], key)
            values = clean_customer(values, custom_fields=self.conf.CUSTOM_FIELDS)
        pairs = customer_form_fields(identity_type, values)
        method, path = ENDPOINTS[endpoint]
        wire = self._form_wire(endpoint, method, path, pairs)
        return self._customer_result(wire, *self._call(wire))

    def _customer_result(self, wire: _Wire, reply: SatoriReply, elapsed: float) -> CustomerResult:
        return CustomerResult(
            endpoint=wire.endpoint,
            status=reply.status,
            hashcode=_hashcode(reply),
            message=reply.message,
            response=reply.data,
            http_status=reply.http_status,
            elapsed_ms=elapsed,
            request_summary=wire.summary,
            response_summary=self._response_summary(reply.data),
        )

    def _join_tags(self, tags: Any, key: str) -> str:
        try:
            return join_tags(tags, self.conf.TAG_SEPARATOR)
        except SatoriValidationError as exc:
            exc.field = key  # schema.join_tags always names append_tags
            raise

    # ---------------------------------------------------------------- action

    def add_action(
        self,
        *,
        email: str | None = None,
        hashcode: str | None = None,
        name: str,
        content: str = "",
        url: str = "",
        occurred_at: dt.datetime | None = None,
    ) -> CustomerResult:
        """Record a user-defined action on a customer's timeline.

        The path and parameter names come from ``ACTION_PATH``, ``ACTION_PARAMS``
        and ``ACTION_IDENTITY_PARAMS``, fixed extra fields from
        ``ACTION_EXTRA_PARAMS``, because SATORI's documentation for this API could
        not be verified. ``occurred_at`` is sent in ``ACTION_TIMEZONE`` as
        ``ACTION_DATE_FORMAT`` (unless ``ACTION_SEND_DATE`` is off); naive values
        are taken to be in that zone already; the default is now.
        """
        self._check_configuration()
        identity_type, value = self._identity(email, hashcode)
        params = self.conf.ACTION_PARAMS
        ids = self.conf.ACTION_IDENTITY_PARAMS
        title = "" if name is None else str(name).strip()
        if not title:
            raise SatoriValidationError(_("An action needs a name."), field="name")
        pairs: list[tuple[str, str]] = [
            (ids["identity_type"], identity_type),
            (ids[identity_type], value),
            (params["name"], _no_nul(title, "name")),
        ]
        if content:
            pairs.append((params["content"], _no_nul(str(content), "content")))
        if url:
            pairs.append((params["url"], _absolute_url(str(url))))
        if self.conf.ACTION_SEND_DATE:
            pairs.append((params["date"], self._action_time(occurred_at)))
        pairs.extend((str(k), str(v)) for k, v in self.conf.ACTION_EXTRA_PARAMS.items())
        names = [wire for wire, _value in pairs]
        if set(names) & set(AUTH_FIELDS) or len(set(names)) != len(names):
            # The keys are ours to send; a setting naming one would replace or repeat it.
            raise SatoriConfigurationError(
                _(
                    "The action call's parameter names (SATORI['ACTION_PARAMS'], "
                    "['ACTION_IDENTITY_PARAMS'], ['ACTION_EXTRA_PARAMS']) must be distinct and "
                    "must not name one of the four keys."
                )
            )
        path = "/" + str(self.conf.ACTION_PATH).lstrip("/")
        wire = self._form_wire(
            ACTION_ENDPOINT, "POST", path, pairs, visible=(params["name"], params["date"])
        )
        return self._customer_result(wire, *self._call(wire))

    def _action_time(self, occurred_at: dt.datetime | None) -> str:
        try:
            zone: zoneinfo.ZoneInfo | None = zoneinfo.ZoneInfo(str(self.conf.ACTION_TIMEZONE))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            zone = None
        if zone is None:
            raise SatoriConfigurationError(
                _("SATORI['ACTION_TIMEZONE'] %(zone)r is not a known time zone.")
                % {"zone": str(self.conf.ACTION_TIMEZONE)[:64]}
            )
        if occurred_at is None:
            occurred_at = dt.datetime.now(zone)
        elif not isinstance(occurred_at, dt.datetime):
            raise SatoriValidationError(_("occurred_at must be a datetime."), field="date")
        elif occurred_at.tzinfo is not None and occurred_at.utcoffset() is not None:
            occurred_at = occurred_at.astimezone(zone)
        return occurred_at.strftime(str(self.conf.ACTION_DATE_FORMAT))

    # ---------------------------------------------------------------- bulk

    def bulk_register(
        self,
        csv_file: bytes | BinaryIO,
        *,
        identity_type: str = "email",
        filename: str = "customers.csv",
    ) -> BulkUploadResult:
        """Upload a UTF-8 CSV of new customers; returns the job's ``process_code``."""
        return self._bulk_upload("bulk/registration", csv_file, identity_type, filename)

    def bulk_upsert(
        self,
        csv_file: bytes | BinaryIO,
        *,
        identity_type: str = "email",
        filename: str = "customers.csv",
    ) -> BulkUploadResult:
        """Upload a UTF-8 CSV to create or update customers; returns the ``process_code``.

        File objects are read from their current position. Re-uploading after
        an ambiguous failure can create a duplicate job (SATORI has no
        idempotency key), so this is never retried here.
        """
        return self._bulk_upload("bulk/upsert", csv_file, identity_type, filename)

    def _bulk_upload(
        self, endpoint: str, csv_file: Any, identity_type: str, filename: str
    ) -> BulkUploadResult:
        self._check_configuration()
        if identity_type not in IDENTITY_TYPES:
            raise SatoriValidationError(
                _("identity_type must be 'email' or 'hashcode'."), field="identity_type"
            )
        file, size, owned = _csv_source(csv_file)
        try:
            if size == 0:
                raise SatoriValidationError(_("The CSV file is empty."), field=CSV_FIELD)
            wire = self._bulk_wire(endpoint, identity_type, file, size, filename)
            reply, elapsed = self._call(wire)
        finally:
            if owned:
                file.close()
        process_code = _text_or_none(reply.payload.get("process_code"))
        if process_code is None:
            process_code = _text_or_none(reply.raw.get("process_code"))
        if process_code is None:
            # Accepted or not? Unknown. Not retryable: a second upload may duplicate the job.
            error = SatoriError(
                _("SATORI accepted the CSV upload but sent no process_code (status %(status)s).")
                % {"status": reply.status},
                status=reply.status,
                http_status=reply.http_status,
                response=reply.data,
            )
            self._annotate(error, wire, reply.data)
            raise error
        return BulkUploadResult(
            process_code=process_code,
            status=reply.status,
            message=reply.message,
            response=reply.data,
            http_status=reply.http_status,
            elapsed_ms=elapsed,
            request_summary=wire.summary,
            response_summary=self._response_summary(reply.data),
        )

    def bulk_status(self, process_code: str) -> BulkStatus:
        """Ask how a bulk job is doing. Anything but ``finished`` means keep waiting."""
        self._check_configuration()
        code = "" if process_code is None else str(process_code).strip()
        if not code:
            raise SatoriValidationError(_("A process_code is required."), field="process_code")
        wire = self._status_wire(code)
        reply, elapsed = self._call(wire)
        # reply.payload is read in place, never bound to a local: it is the reply as
        # SATORI sent it, and an error raised here has this frame's locals recorded.
        process_status = _text_or_none(reply.payload.get("process_status")) or ""
        failed_rows = _failed_rows(reply.payload.get("failed_rows"), self._needles)
        if isinstance(failed_rows, SatoriError):
            failed_rows.status, failed_rows.http_status, failed_rows.response = (
                reply.status,
                reply.http_status,
                reply.data,
            )
            self._annotate(failed_rows, wire, reply.data)
            raise failed_rows
        succeeded = _payload(reply.data).get("succeeded_rows")
        return BulkStatus(
            process_code=code,
            process_status=process_status,
            finished=process_status == "finished",
            succeeded_rows=list(succeeded) if isinstance(succeeded, list) else [],
            failed_rows=failed_rows,
            response=reply.data,
            status=reply.status,
            http_status=reply.http_status,
            elapsed_ms=elapsed,
            request_summary=wire.summary,
            response_summary=self._response_summary(reply.data),
        )

    # ---------------------------------------------------------------- plumbing

    def _check_configuration(self) -> None:
        missing = [
            key
            for key in AUTH_KEYS
            if not isinstance(getattr(self.conf, key), str) or not getattr(self.conf, key).strip()
        ]
        if missing:
            raise SatoriConfigurationError(
                _(
                    "SATORI keys missing or empty: %(keys)s. Copy them from SATORI's admin "
                    "screen into settings.SATORI."
                )
                % {"keys": ", ".join(missing)}
            )
        parts = urlsplit(self._base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SatoriConfigurationError(
                _("SATORI['BASE_URL'] must be an http(s) URL such as https://api.satr.jp.")
            )
        if self._timeout is None:
            raise SatoriConfigurationError(
                _("SATORI['TIMEOUT'] must be a number of seconds or a (connect, read) pair.")
            )
        for name, seconds in self._total.items():
            if seconds is None:
                raise SatoriConfigurationError(
                    _("SATORI['%(name)s'] must be a positive number of seconds.") % {"name": name}
                )
        if self._max_bytes is None:
            raise SatoriConfigurationError(
                _("SATORI['MAX_RESPONSE_BYTES'] must be a positive number of bytes.")
            )

    def _auth_pairs(self) -> list[tuple[str, str]]:
        return [
            (name, getattr(self.conf, key))
            for name, key in zip(AUTH_FIELDS, AUTH_KEYS, strict=True)
        ]

    @staticmethod
    def _identity(email: str | None, hashcode: str | None) -> tuple[str, str]:
        hashcode = "" if hashcode is None else str(hashcode).strip()
        if bool(email) == bool(hashcode):
            raise SatoriValidationError(
                _("Give exactly one of email or hashcode."),
                field="email" if not email else "hashcode",
            )
        if email:
            return "email", normalize_email(email)
        return "hashcode", _no_nul(hashcode, "hashcode")

    # The wire builders keep the raw keys out of the locals of every frame an
    # error passes through (error trackers record frame locals).

    def _bulk_wire(
        self, endpoint: str, identity_type: str, file: IO[bytes], size: int, filename: str
    ) -> _Wire:
        safe_name = _safe_filename(filename)
        fields = [*self._auth_pairs(), ("identity_type", identity_type)]
        body = _MultipartStream(fields, CSV_FIELD, safe_name, "text/csv", file, size)
        summary = redact_form(fields, self.conf.REDACT_PERSONAL_DATA)
        summary[CSV_FIELD] = f"{safe_name} ({size} bytes)"
        method, path = ENDPOINTS[endpoint]
        return _Wire(
            endpoint,
            method,
            path,
            body=body,
            content_type=body.content_type,
            summary=summary,
            timeout_setting="BULK_UPLOAD_TIMEOUT",
        )

    def _status_wire(self, code: str) -> _Wire:
        pairs = [*self._auth_pairs(), ("process_code", code)]
        method, path = ENDPOINTS["bulk/status"]
        return _Wire(
            "bulk/status",
            method,
            path,
            query=urlencode(pairs, encoding="utf-8"),
            summary=redact_form(pairs, self.conf.REDACT_PERSONAL_DATA),
        )

    def _form_wire(
        self,
        endpoint: str,
        method: str,
        path: str,
        pairs: list[tuple[str, str]],
        visible: tuple[str, ...] = (),
    ) -> _Wire:
        form = [*self._auth_pairs(), *pairs]
        return _Wire(
            endpoint,
            method,
            path,
            # urlencode quotes like PHP's http_build_query: brackets and ':' become
            # %5B %5D %3A, spaces '+', non-ASCII as UTF-8 bytes.
            body=urlencode(form, encoding="utf-8").encode("ascii"),
            content_type=FORM_CONTENT_TYPE,
            summary=redact_form(form, self.conf.REDACT_PERSONAL_DATA, visible=visible),
        )

    def _call(self, wire: _Wire) -> tuple[SatoriReply, float]:
        """Send, parse, log. Raises our errors only, never with a requests error chained."""
        started = time.monotonic()
        outcome = self._exchange(wire)
        elapsed = (time.monotonic() - started) * 1000
        if isinstance(outcome, SatoriError):
            self._annotate(outcome, wire, None)
            self._log(wire, elapsed, outcome)
            raise outcome
        try:
            reply = parse_response(
                outcome.body,
                outcome.status,
                outcome.headers,
                needles=self._needles,
                status_classes=self._status_classes,
                message_classes=self._message_classes,
            )
        except SatoriError as error:
            self._annotate(error, wire, error.response)
            self._log(wire, elapsed, error)
            raise
        self._log(wire, elapsed, None, reply)
        return reply, elapsed

    def _exchange(self, wire: _Wire) -> _RawReply | SatoriError:
        """One HTTP round trip within the call's time and size limits.

        Failures are returned, not raised: the requests objects in this frame
        hold the keys (the prepared body, status.json's URL), and returning
        keeps this frame out of the traceback of the error the caller raises.
        Raising outside the except blocks also keeps requests' exception (whose
        text holds the URL) from being chained as ``__context__``.
        """
        total = self._total[wire.timeout_setting]
        assert self._timeout is not None and total is not None and self._max_bytes is not None
        connect, read = self._timeout if isinstance(self._timeout, tuple) else (self._timeout,) * 2
        headers = {"Content-Type": wire.content_type} if wire.content_type else {}
        http_response: requests.Response | None = None
        failure: SatoriError | None = None
        transport: str | None = None
        # Whether the request may have reached SATORI though no usable answer came back.
        sent = True
        with _Deadline(total) as deadline:
            try:
                http_response = self._session.request(
                    wire.method,
                    self._base_url + wire.path + ("?" + wire.query if wire.query else ""),
                    data=wire.body,
                    headers=headers,
                    timeout=(min(connect, total), min(read, total)),
                    allow_redirects=False,
                    stream=True,
                )
                # An injected session's pools do not report their connections:
                # from here on at least, this one can be cut.
                deadline.attach(None, _socket_of(http_response))
                body = self._read_body(http_response, self._max_bytes)
            # Order matters: every requests error is also an OSError.
            except _TooLarge:
                transport = "too_large"
                failure = SatoriResponseTooLargeError(
                    ngettext(
                        "SATORI's reply is larger than %(limit)d byte "
                        "(SATORI['MAX_RESPONSE_BYTES']); it was abandoned unread.",
                        "SATORI's reply is larger than %(limit)d bytes "
                        "(SATORI['MAX_RESPONSE_BYTES']); it was abandoned unread.",
                        self._max_bytes,
                    )
                    % {"limit": self._max_bytes}
                )
            except (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
                requests.exceptions.InvalidHeader,
            ) as exc:
                transport = type(exc).__name__
                failure = SatoriConfigurationError(
                    _(
                        "The request to SATORI could not be built (%(kind)s); check "
                        "SATORI['BASE_URL'] and the keys."
                    )
                    % {"kind": type(exc).__name__}
                )
            except requests.Timeout as exc:
                sent = not isinstance(exc, requests.exceptions.ConnectTimeout)
                transport = type(exc).__name__
                failure = SatoriTransientError(
                    _("SATORI did not answer in time (%(kind)s).") % {"kind": type(exc).__name__}
                )
            except (
                requests.ConnectionError,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError,
            ) as exc:
                sent = not _never_connected(exc)
                transport = type(exc).__name__
                failure = SatoriTransientError(
                    _("Could not talk to SATORI (%(kind)s).") % {"kind": type(exc).__name__}
                )
            except requests.RequestException as exc:
                transport = type(exc).__name__
                failure = SatoriError(
                    _("The request to SATORI failed (%(kind)s).") % {"kind": type(exc).__name__}
                )
            except (http.client.HTTPException, urllib3.exceptions.HTTPError, OSError) as exc:
                transport = type(exc).__name__
                failure = SatoriTransientError(
                    _("Could not talk to SATORI (%(kind)s).") % {"kind": type(exc).__name__}
                )
            finally:
                if http_response is not None:
                    # After a failure this closes the connection instead of
                    # pooling it; after a full read it only hands it back.
                    http_response.close()
        if failure is not None and (deadline.expired or deadline.remaining() <= 0):
            # Whatever broke (the cut socket, a clipped read timeout), time ran out.
            transport = "deadline"
            failure = SatoriTimeoutError(
                ngettext(
                    "SATORI's reply did not arrive in full within %(seconds)s second "
                    "(SATORI['%(setting)s']); the call was abandoned.",
                    "SATORI's reply did not arrive in full within %(seconds)s seconds "
                    "(SATORI['%(setting)s']); the call was abandoned.",
                    # "1 second", "1.5 seconds": a fraction takes the plural.
                    int(total) if total.is_integer() else 2,
                )
                % {"seconds": f"{total:g}", "setting": wire.timeout_setting}
            )
        if failure is not None:
            failure.answer_lost = failure.retryable and sent
            failure.transport = transport
            return failure
        assert http_response is not None
        # Not scrubbed here: the keys are taken out of what is stored and shown
        # (parse_response), never out of what is read.
        return _RawReply(http_response.status_code, http_response.headers, body)

    @staticmethod
    def _read_body(http_response: requests.Response, limit: int) -> bytes:
        """The (decoded) body, read in pieces so a reply past ``limit`` is never held whole."""
        announced = http_response.headers.get("Content-Length", "").strip()
        if announced.isdigit() and int(announced) > limit:
            raise _TooLarge
        body = bytearray()
        for chunk in http_response.iter_content(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise _TooLarge
        return bytes(body)

    def _annotate(self, error: SatoriError, wire: _Wire, data: Any) -> None:
        # Extra attributes for the sync engine's SyncLog; safe to store.
        error.endpoint = wire.endpoint
        error.request_summary = wire.summary
        error.response_summary = self._response_summary(data)

    def _response_summary(self, data: Any) -> Any:
        return scrub_data(data, self._needles, redact_personal=self.conf.REDACT_PERSONAL_DATA)

    def _log(
        self,
        wire: _Wire,
        elapsed: float,
        error: SatoriError | None,
        reply: SatoriReply | None = None,
    ) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        shown = {k: v for k, v in wire.summary.items() if k not in AUTH_FIELDS}
        if error is None and reply is not None:
            logger.debug(
                "SATORI %s %s: status %s (HTTP %s) in %.0f ms; request %s",
                wire.method,
                wire.path,
                reply.status,
                reply.http_status,
                elapsed,
                shown,
            )
            return
        assert error is not None
        text = for_log(scrub(str(error), self._needles), self.conf)
        logger.debug(
            "SATORI %s %s: %s %s (HTTP %s) in %.0f ms; request %s",
            wire.method,
            wire.path,
            type(error).__name__,
            text,
            error.http_status,
            elapsed,
            shown,
        )


def _port(parts: Any) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class _TooLarge(Exception):
    """The reply passed MAX_RESPONSE_BYTES (internal: becomes SatoriResponseTooLargeError)."""


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


def _timeout(value: Any) -> float | tuple[float, float] | None:
    """requests' timeout from the setting, or None when the setting is unusable."""
    try:
        if isinstance(value, list | tuple) and len(value) == 2:
            pair = (float(value[0]), float(value[1]))
            return pair if all(math.isfinite(v) and v > 0 for v in pair) else None
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _no_nul(text: str, field: str) -> str:
    # NUL and lone surrogates: requests would fail encoding the latter, naming no field.
    return refuse_unencodable(text, field)


def _absolute_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SatoriValidationError(
            _("The action URL must be an absolute http(s) URL."), field="url"
        )
    return _no_nul(url.strip(), "url")


def _text_or_none(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int):
        text = str(value).strip()
        return text or None
    return None


def _hashcode(reply: SatoriReply) -> str | None:
    for source in (reply.payload, reply.raw):
        for key in ("customer[hashcode]", "hashcode"):
            found = _text_or_none(source.get(key))
            if found:
                return found
        customer = source.get("customer")
        if isinstance(customer, dict):
            found = _text_or_none(customer.get("hashcode"))
            if found:
                return found
    return None


def _failed_rows(value: Any, needles: SecretNeedles) -> list[FailedRow] | SatoriError:
    """The refused rows, or the error (returned: this frame holds the unscrubbed reply)."""
    if value is None:
        return []
    if not isinstance(value, list):
        return SatoriError(_("SATORI's failed_rows is not a list."))
    rows = []
    for item in value:
        number = item.get("row_number") if isinstance(item, dict) else None
        if isinstance(number, str) and re.fullmatch(r"[0-9]{1,9}", number.strip()):
            number = int(number.strip())
        if isinstance(number, bool) or not isinstance(number, int):
            # Guessing would count a refused row as sent; better to stop and say so.
            return SatoriError(_("SATORI's failed_rows has an entry without a row_number."))
        message = item.get("message") if isinstance(item, dict) else None
        rows.append(
            FailedRow(
                row_number=number,
                # Stored with the row's error: scrubbed like every text kept from SATORI.
                message=scrub(message, needles)
                if isinstance(message, str)
                else _message_text(message, needles),
            )
        )
    return rows


# --------------------------------------------------------------------------- shared client


class _Shared(threading.local):
    pid: int = 0
    generation: int = -1
    client: SatoriClient | None = None


_shared = _Shared()
_generation_lock = threading.Lock()
_generation = 0


def get_client() -> SatoriClient:
    """This thread's client for the current settings.

    ``requests.Session`` is not documented as thread-safe, so each thread gets
    its own. The client is rebuilt when ``settings.SATORI`` changes and after a
    fork (a Celery prefork child must not share its parent's sockets).
    """
    pid = os.getpid()
    conf = get_settings()
    client = _shared.client
    if (
        client is not None
        and _shared.pid == pid
        and _shared.generation == _generation
        and client.conf is conf
    ):
        return client
    if client is not None and _shared.pid == pid:
        client.close()
    client = SatoriClient(conf)
    _shared.client, _shared.pid, _shared.generation = client, pid, _generation
    return client


@receiver(setting_changed)
def _settings_changed(*, setting: str, **kwargs: Any) -> None:
    global _generation
    if setting == "SATORI":
        with _generation_lock:
            _generation += 1


__all__ = [
    "BulkStatus",
    "BulkUploadResult",
    "CustomerResult",
    "FailedRow",
    "SatoriClient",
    "SatoriReply",
    "error_for_status",
    "get_client",
    "parse_response",
]
