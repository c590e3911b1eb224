"""The sandbox HTTP server: ``SandboxServer(...).start()`` in a background thread.

HTTP/1.1 with keep-alive, like the real service behind its load balancer, so
client connection pooling is exercised. Loopback only unless told otherwise:
the control endpoints have no authentication.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .api import ApiRequest, handle, route
from .config import (
    DEFAULT_ACTION_PATH,
    REDACTED,
    SandboxConfig,
    SandboxKeys,
    build_config,
)
from .faults import Faults
from .forms import parse_body, parse_query
from .i18n import _
from .page import render
from .rules import SandboxError
from .state import Customer, RecordedRequest, SandboxState, redact_request

__all__ = ["SandboxConfig", "SandboxKeys", "SandboxServer"]

logger = logging.getLogger("django_satori.sandbox")

MAX_BODY_BYTES = 64 * 1024 * 1024
#: Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 120.0
_FAULT_REPLIES: dict[str, tuple[int, str]] = {
    "500": (500, "Internal Server Error"),
    "503": (503, "Service Unavailable"),
    "429": (429, "Too Many Requests"),
    "timeout": (504, "Gateway Timeout"),
}
_HTML_502 = (
    "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>502 Bad Gateway</h1><p>The upstream server did not answer.</p></body></html>\n"
)


_HTML_403 = (
    "<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>"
    "<body><h1>Forbidden</h1><p>Access denied by the proxy.</p></body></html>\n"
)


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless ``allow_remote`` (ValueError)."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            _(
                "Refusing to listen on %(host)s: the SATORI sandbox records everything sent to "
                "it and its control endpoints have no authentication. Use 127.0.0.1, or pass "
                "allow_remote=True (--allow-remote) on a network you trust."
            )
            % {"host": host}
        )


#: Methods a browser page on another site can send without a CORS preflight
#: only as "simple" requests; every other method is state-changing here.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Sec-Fetch-Site values of requests the sandbox's own page or a non-browser sends.
_SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})


def split_host(value: str) -> tuple[str, str]:
    """``("127.0.0.1", "8765")`` from a Host header (or an origin's netloc); IPv6 unbracketed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _sep, rest = value[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _sep, port = value.partition(":") if value.count(":") == 1 else (value, "", "")
    return host, port


def _is_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections when a test or a benchmark opens
    # many at once; SATORI itself never refuses a connection for that.
    request_queue_size = 128
    sandbox: SandboxServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections cut by clients or by stop() are normal here; no tracebacks on stderr.
        logger.debug("connection error from %s", client_address, exc_info=True)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "SATORI-sandbox/1.0"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    # Headers and body go out in separate writes; without TCP_NODELAY every
    # reused keep-alive connection waits ~40 ms for delayed ACKs.
    disable_nagle_algorithm = True
    server: _HTTPServer

    # -- plumbing --------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.sandbox._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.sandbox._track(self.connection, add=False)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Never the request line: status.json carries the keys in its query string.
        logger.info("%s %s -> %s", self.command, self.path.partition("?")[0], code)

    def log_error(self, format: str, *args: Any) -> None:
        logger.debug("HTTP error while reading a request")

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", headers)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise SandboxError(411, "Transfer-Encoding is not supported; send Content-Length")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            if self.command in ("POST", "PUT", "PATCH"):
                raise SandboxError(411, "Content-Length が必要です (Content-Length required)")
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise SandboxError(400, "Content-Length is not a number") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise SandboxError(
                413, f"リクエストが大きすぎます (body larger than {MAX_BODY_BYTES} bytes)"
            )
        return self.rfile.read(length)

    # -- routing ---------------------------------------------------------------

    def _dispatch(self) -> None:
        sandbox = self.server.sandbox
        path, _sep, query = self.path.partition("?")
        try:
            body = self._read_body()
        except SandboxError as exc:
            # The body was not read, so this connection cannot carry another request.
            self.close_connection = True
            self._send_json(exc.status, {"status": exc.status, "message": exc.message})
            return
        refusal = self._refusal(sandbox)
        if refusal:
            # Not recorded: such a request comes from a browser page, not a client under test.
            self._send_json(403, {"status": 403, "message": refusal})
            return
        try:
            if path == "/" or path.startswith("/_sandbox/"):
                self._control(sandbox, path, body)
            else:
                self._api(sandbox, path, query, body)
        except ConnectionError:  # the client (or stop()) closed the connection
            self.close_connection = True
        except Exception:  # a sandbox bug: say so instead of hanging the client
            logger.exception("SATORI sandbox failed on %s %s", self.command, path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send_json(500, {"status": 500, "message": "sandbox internal error"})

    def _refusal(self, sandbox: SandboxServer) -> str:
        """Why a browser-borne request is refused ("" when it is not).

        * DNS rebinding: a page on attacker.example whose name later resolves
          to 127.0.0.1 reaches the sandbox as same-origin, but its requests
          carry ``Host: attacker.example``. Only loopback names, IP literals we
          listen on and ``allowed_hosts`` are answered.
        * Cross-site requests: a page on another site can POST a form (or a
          no-cors fetch) to ``/_sandbox/reset`` or the API without reading the
          answer. Browsers say where such a request comes from
          (``Sec-Fetch-Site``, ``Origin``, ``Referer``); anything not from the
          sandbox's own origin may not change its state. Clients such as
          requests or curl send none of these headers and are unaffected.
        """
        host_header = self.headers.get("Host")
        if host_header is None or not sandbox.host_allowed(host_header):
            return (
                "Host not allowed: the sandbox answers only to loopback names and the "
                "addresses it listens on (DNS rebinding protection); see allowed_hosts"
            )
        if self.command in _SAFE_METHODS:
            return ""
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site.strip().lower() not in _SAME_ORIGIN_FETCH:
            return f"cross-site request refused (Sec-Fetch-Site: {fetch_site[:20]})"
        origin = self.headers.get("Origin")
        if origin is not None and not self._same_origin(origin, host_header):
            return "cross-site request refused (Origin does not match Host)"
        referer = self.headers.get("Referer")
        if origin is None and referer is not None and not self._same_origin(referer, host_header):
            return "cross-site request refused (Referer does not match Host)"
        return ""

    @staticmethod
    def _same_origin(url: str, host_header: str) -> bool:
        parts = urlsplit(url.strip())
        if parts.scheme != "http" or not parts.netloc:
            return False  # "null" (sandboxed frames, file://) or another scheme
        return split_host(parts.netloc) == split_host(host_header)

    def _api(self, sandbox: SandboxServer, path: str, query: str, body: bytes) -> None:
        config = sandbox.config
        record = RecordedRequest(
            method=self.command,
            path=path,
            query=parse_qsl(query, keep_blank_values=True, errors="replace"),
            headers=list(self.headers.items()),
            body=body,
        )
        error: SandboxError | None = None
        request: ApiRequest | None = None
        try:
            operation = route(self.command, path, config)
            record.operation = operation
            if self.command == "GET":
                request = ApiRequest(operation, parse_query(query))
            else:
                if query:
                    raise SandboxError(
                        400,
                        "URLにパラメータを付けないでください (parameters "
                        "belong in the body, not the query string)",
                    )
                media, pairs, files = parse_body(self.headers.get("Content-Type"), body)
                record.form, record.files = pairs, files
                request = ApiRequest(operation, pairs, media, files)
        except SandboxError as exc:
            error = exc
        sandbox.state.record(record)

        if record.operation is not None:
            fault = self._inject(sandbox, record)
            if fault:
                return
        try:
            if error is not None:
                raise error
            assert request is not None
            try:
                status, payload = 200, handle(request, config, sandbox.state)
            except SandboxError as exc:
                # A refusal of the API (not of the route) in the code this SATORI uses.
                raise exc.answered_as(config.answer_status) from None
            headers: Mapping[str, str] = {}
        except SandboxError as exc:
            status, payload = exc.status, {"status": exc.status, "message": exc.message}
            headers = exc.headers
        record.status = status
        if record.fault == "lost_answer":
            self.close_connection = True  # applied, but the answer never leaves
            return
        self._send_json(status, payload, headers)

    def _inject(self, sandbox: SandboxServer, record: RecordedRequest) -> bool:
        """Apply delay and fault injection; True if a fault took the request."""
        faults = sandbox.faults
        if faults.delay > 0:
            sandbox._stopping.wait(faults.delay)
        assert record.operation is not None
        kind = faults.pick(record.operation)
        if kind is None:
            return False
        record.fault = kind
        sandbox.state.count_fault(kind)
        if kind == "lost_answer":
            return False  # processed as usual; _api drops the reply
        if kind == "drop":
            self.close_connection = True
            return True
        if kind == "html":
            record.status = 502
            self._send(502, _HTML_502.encode(), "text/html; charset=utf-8")
            return True
        if kind == "html_403":
            record.status = 403
            self._send(403, _HTML_403.encode(), "text/html; charset=utf-8")
            return True
        if kind == "dribble":
            record.status = 503
            self._dribble(sandbox, faults.dribble_seconds)
            return True
        if kind == "oversized":
            record.status = 503
            self._oversized(faults.oversized_bytes)
            return True
        if kind == "timeout":
            sandbox._stopping.wait(faults.timeout_seconds)
        status, text = _FAULT_REPLIES[kind]
        headers = {"Retry-After": str(faults.retry_after)} if kind == "429" else {}
        record.status = status
        self._send_json(status, {"status": status, "message": text}, headers)
        return True

    def _dribble(self, sandbox: SandboxServer, seconds: float) -> None:
        """A JSON 503 whose headers come at once and whose body comes byte by byte."""
        body = json.dumps({"status": 503, "message": "Service Unavailable (dribbled)"}).encode()
        self.close_connection = True  # the client may give up halfway
        self.send_response(503)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        for byte in body:
            if sandbox._stopping.wait(seconds):
                return
            self.wfile.write(bytes([byte]))
            self.wfile.flush()

    def _oversized(self, size: int) -> None:
        """A JSON 503 of exactly ``size`` bytes, streamed, never held in memory whole."""
        head = b'{"status": 503, "message": "'
        tail = b'"}'
        padding = max(size - len(head) - len(tail), 0)
        self.close_connection = True
        self.send_response(503)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(head) + padding + len(tail)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(head)
        piece = b"x" * 65536
        while padding > 0:
            self.wfile.write(piece[:padding])
            padding -= min(padding, len(piece))
        self.wfile.write(tail)

    def _control(self, sandbox: SandboxServer, path: str, body: bytes) -> None:
        method = self.command
        sandbox.state.finish_due_jobs()
        if path == "/" and method == "GET":
            page = render(
                sandbox.snapshot(), sandbox.describe(), self.headers.get("Accept-Language")
            )
            self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/_sandbox/state" and method == "GET":
            self._send_json(
                200,
                {
                    **sandbox.snapshot(),
                    "config": sandbox.describe(),
                    "faults": sandbox.faults.as_dict(),
                },
            )
        elif path == "/_sandbox/requests" and method == "GET":
            self._send_json(200, sandbox.snapshot()["requests"])
        elif path == "/_sandbox/reset" and method == "POST":
            sandbox.reset()
            self._send_json(200, {"ok": True})
        elif path == "/_sandbox/faults" and method in ("GET", "POST"):
            if method == "POST":
                try:
                    data = json.loads(body.decode("utf-8") or "{}")
                    if not isinstance(data, dict):
                        raise ValueError("expected a JSON object")
                    sandbox.faults.configure(data)
                except (ValueError, UnicodeDecodeError) as exc:
                    self._send_json(400, {"ok": False, "error": str(exc)})
                    return
            self._send_json(200, sandbox.faults.as_dict())
        elif path == "/_sandbox/forget-process-codes" and method == "POST":
            self._send_json(200, {"forgotten": sandbox.state.forget_process_codes()})
        elif path in (
            "/",
            "/_sandbox/state",
            "/_sandbox/requests",
            "/_sandbox/reset",
            "/_sandbox/faults",
            "/_sandbox/forget-process-codes",
        ):
            self._send_json(405, {"ok": False, "error": f"method {method} not allowed"})
        else:
            self._send_json(404, {"ok": False, "error": f"no such sandbox endpoint {path}"})


class SandboxServer:
    """A strict fake SATORI. ``start()`` it, point ``SATORI["BASE_URL"]`` at ``url``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        keys: SandboxKeys | None = None,
        custom_fields: Mapping[str, Any] | None = None,
        bulk_processing_seconds: float = 1.0,
        process_code_ttl: float = 3600.0,
        tag_separator: str = ",",
        action_path: str = DEFAULT_ACTION_PATH,
        action_params: Mapping[str, str] | None = None,
        envelope: str = "body",
        own_only: bool = False,
        deny_operations: Iterable[str] = (),
        allow_remote: bool = False,
        allowed_hosts: Iterable[str] = (),
        **facts: Any,
    ) -> None:
        """``facts``: the options that play a SATORI unlike our assumptions
        (``refused_columns``, ``answer_status``, ``email_case_sensitive``,
        ``hashcode_identity``, ``action_identity_params``, ``action_date_format``,
        ``action_refuse_date``, ``action_required_params``, ``extra_items``)."""
        check_host(host, allow_remote)
        self.host = host
        self.port = port
        #: Host names answered besides loopback ones and the listening address
        #: (for example a docker-compose service name with ``allow_remote``).
        self.allowed_hosts = frozenset(name.strip().lower() for name in allowed_hosts)
        self._config = build_config(
            keys=keys or SandboxKeys(),
            custom_fields=custom_fields,
            bulk_processing_seconds=bulk_processing_seconds,
            process_code_ttl=process_code_ttl,
            tag_separator=tag_separator,
            action_path=action_path,
            action_params=action_params,
            envelope=envelope,
            own_only=own_only,
            deny_operations=frozenset(deny_operations),
            **facts,
        )
        self.state = SandboxState()
        self.state.email_case_sensitive = self._config.email_case_sensitive
        self.faults = Faults()
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SandboxServer {self.url if self._httpd else 'not started'}>"

    # -- configuration ---------------------------------------------------------

    def host_allowed(self, host_header: str) -> bool:
        """Whether a request's ``Host`` names this sandbox, not a rebound DNS name."""
        host, _port = split_host(host_header)
        if not host:
            return False
        if host == "localhost" or host.endswith(".localhost") or host in self.allowed_hosts:
            return True
        address = _is_ip(host)
        if address is None:
            # A DNS name can be rebound to 127.0.0.1 by whoever controls it.
            return host == self.host.lower()
        if address.is_loopback:
            return True
        listening = _is_ip(self.host.strip("[]"))
        # On a wildcard address every local IP reaches the sandbox; an IP
        # literal, unlike a name, cannot be rebound.
        return listening is not None and (listening.is_unspecified or listening == address)

    @property
    def config(self) -> SandboxConfig:
        return self._config

    @config.setter
    def config(self, value: SandboxConfig) -> None:
        if not isinstance(value, SandboxConfig):
            raise TypeError("config must be a SandboxConfig")
        self._config = value
        self.state.email_case_sensitive = value.email_case_sensitive

    @property
    def keys(self) -> SandboxKeys:
        return self._config.keys

    def configure(self, **changes: Any) -> SandboxConfig:
        """Change options of a running server; returns the previous config to restore."""
        with self._lock:
            previous = self._config
            self._config = build_config(previous, **changes)
            self.state.email_case_sensitive = self._config.email_case_sensitive
            return previous

    def describe(self) -> dict[str, Any]:
        """The options, JSON-able, keys hidden."""
        config = self._config
        return {
            "keys": REDACTED,
            "custom_fields": None
            if config.custom_fields is None
            else {
                k: {"type": v.kind, "choices": list(v.choices)}
                for k, v in config.custom_fields.items()
            },
            "bulk_processing_seconds": config.bulk_processing_seconds,
            "process_code_ttl": config.process_code_ttl,
            "tag_separator": config.tag_separator,
            "action_path": config.action_path,
            "action_params": dict(config.action_params),
            "envelope": config.envelope,
            "own_only": config.own_only,
            "deny_operations": sorted(config.deny_operations),
            "refused_columns": sorted(config.refused_columns),
            "answer_status": dict(config.answer_status),
            "email_case_sensitive": config.email_case_sensitive,
            "hashcode_identity": config.hashcode_identity,
            "action_identity_params": dict(config.action_identity_params),
            "action_date_format": config.action_date_format,
            "action_refuse_date": config.action_refuse_date,
            "action_required_params": dict(config.action_required_params),
            "extra_items": {
                k: {"type": v.kind, "max_length": v.max_length}
                for k, v in config.extra_items.items()
            },
        }

    # -- lifecycle -------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the sandbox server is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> SandboxServer:
        if self._httpd is not None:
            raise RuntimeError("the sandbox server is already started")
        self._stopping.clear()
        cls = _HTTPServer6 if ":" in self.host else _HTTPServer
        httpd = cls((self.host, self.port), _Handler)
        httpd.sandbox = self
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._threads = [
            threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.1},
                name=f"satori-sandbox-{self.port}",
                daemon=True,
            ),
            threading.Thread(
                target=self._tick, name=f"satori-sandbox-jobs-{self.port}", daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        httpd = self._httpd
        if httpd is None:
            return
        self._stopping.set()  # wakes requests held by "timeout" faults or delays
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._httpd = None

    def __enter__(self) -> SandboxServer:
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _tick(self) -> None:
        # Finishes bulk jobs on time even when nobody polls status.json.
        while not self._stopping.wait(0.05):
            self.state.finish_due_jobs()

    def _track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    # -- state -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget customers, jobs, recorded requests and fault settings."""
        self.state.reset()
        self.faults.clear()

    def seed_customer(self, email: str, **kwargs: Any) -> Customer:
        """Add a customer as if another SATORI user created it (see ``SandboxState``)."""
        return self.state.seed_customer(email, **kwargs)

    def finish_bulk_jobs(self) -> int:
        """Finish every processing job now, whatever its processing time."""
        return self.state.finish_due_jobs(force=True)

    def wait_for_jobs(self, timeout: float = 5.0) -> None:
        """Block until no bulk job is processing (TimeoutError after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.state.lock:
                if all(j.finished_at is not None for j in self.state.jobs.values()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("bulk jobs still processing")
            time.sleep(0.02)

    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-able data, with key values replaced by ``********``."""
        return self.state.snapshot(self._config.keys.values())

    def redacted_requests(self) -> list[dict[str, Any]]:
        secrets_ = self._config.keys.values()
        with self.state.lock:
            return [redact_request(r, secrets_) for r in self.state.requests]
