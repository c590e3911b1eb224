"""The sandbox against web pages: cross-site requests and DNS rebinding.

The sandbox has no authentication and listens on loopback, which keeps other
machines out but not the developer's own browser: any page it visits can POST
a form to ``http://127.0.0.1:8765/_sandbox/reset`` (cross-site), and a page
whose DNS name is rebound to 127.0.0.1 reads the sandbox as same-origin. The
sandbox refuses both; clients that are not browsers (requests, curl, the app)
send none of the headers involved and keep working.

The first tests send the headers a browser sends, with requests; the last ones
drive Debian's chromium (as tests/test_browser.py does) so the real browser
behaviour is what is checked.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from django_satori.sandbox import SandboxServer
from django_satori.sandbox.cli import add_arguments, build_server

AUTH = {
    "user_key": "sandbox-user-key",
    "user_secret": "sandbox-user-secret",
    "company_key": "sandbox-company-key",
    "company_secret": "sandbox-company-secret",
}
UPSERT = "/api/v4/public/customer/upsert.json"
TIMEOUT = 5
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def module_server() -> Iterator[SandboxServer]:
    with SandboxServer(bulk_processing_seconds=0) as server:
        yield server


@pytest.fixture
def sandbox(module_server: SandboxServer) -> Iterator[SandboxServer]:
    module_server.reset()
    module_server.seed_customer("kept@example.jp", created_by="another-user")
    yield module_server
    module_server.reset()


def untouched(sandbox: SandboxServer) -> bool:
    """The seeded customer is there, nothing else, and no fault is set."""
    return (
        list(sandbox.state.customers) == ["kept@example.jp"]
        and sandbox.faults.as_dict()["queued"] == []
    )


def post(sandbox: SandboxServer, path: str, headers: dict[str, str], **kwargs: Any) -> Any:
    return requests.post(f"{sandbox.url}{path}", headers=headers, timeout=TIMEOUT, **kwargs)


# --------------------------------------------------------------------------- cross-site


CROSS_SITE = {
    "Origin of another site": {"Origin": "http://attacker.example"},
    "Origin on another port": {"Origin": "http://127.0.0.1:1"},
    "Origin null (sandboxed frame, file://)": {"Origin": "null"},
    "Sec-Fetch-Site cross-site": {"Sec-Fetch-Site": "cross-site"},
    "Sec-Fetch-Site same-site": {"Sec-Fetch-Site": "same-site"},
    "Referer of another site": {"Referer": "http://attacker.example/page"},
}


@pytest.mark.parametrize("label", list(CROSS_SITE))
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_sandbox/reset", {}),
        ("/_sandbox/faults", {"data": json.dumps({"fail_first": 5, "kind": "500"})}),
        ("/_sandbox/forget-process-codes", {}),
        (
            UPSERT,
            {"data": {**AUTH, "customer[identity_type]": "email", "customer[email]": "x@y.jp"}},
        ),
    ],
    ids=["reset", "faults", "forget-process-codes", "api upsert"],
)
def test_a_cross_site_post_changes_nothing(
    sandbox: SandboxServer, label: str, path: str, body: dict[str, Any]
) -> None:
    response = post(sandbox, path, CROSS_SITE[label], **body)
    assert response.status_code == 403
    assert "cross-site" in response.json()["message"]
    assert untouched(sandbox)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # requests, curl, the app's client: no browser headers at all
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
        {"Origin": "{url}", "Sec-Fetch-Site": "same-origin"},  # the sandbox's own page
        {"Referer": "{url}/"},
    ],
    ids=["no browser headers", "same-origin", "user-initiated", "own page", "own referer"],
)
def test_same_origin_and_non_browser_posts_still_work(
    sandbox: SandboxServer, headers: dict[str, str]
) -> None:
    headers = {name: value.format(url=sandbox.url) for name, value in headers.items()}
    assert post(sandbox, "/_sandbox/faults", headers, json={"fail_first": 1}).status_code == 200
    assert sandbox.faults.as_dict()["queued"]
    assert post(sandbox, "/_sandbox/reset", headers).status_code == 200
    assert sandbox.state.customers == {}


def test_reads_are_not_blocked_by_origin_headers(sandbox: SandboxServer) -> None:
    # A cross-site page cannot read the answer (no CORS headers): GETs stay open.
    response = requests.get(
        f"{sandbox.url}/_sandbox/state", headers=CROSS_SITE["Origin of another site"], timeout=5
    )
    assert response.status_code == 200
    assert "access-control-allow-origin" not in {h.lower() for h in response.headers}


# --------------------------------------------------------------------------- Host header


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:{port}", True),
        ("localhost:{port}", True),
        ("LOCALHOST", True),
        ("app.localhost:{port}", True),  # *.localhost never leaves the machine
        ("[::1]:{port}", True),
        ("127.0.0.2", True),
        ("rebind.attacker.example:{port}", False),
        ("127.0.0.1.attacker.example:{port}", False),
        ("localhost.attacker.example", False),
        ("10.0.0.5:{port}", False),  # another address: not where this server listens
        ("", False),
    ],
)
def test_only_loopback_host_names_are_answered(
    sandbox: SandboxServer, host: str, allowed: bool
) -> None:
    headers = {"Host": host.format(port=sandbox.port)}
    response = requests.get(f"{sandbox.url}/_sandbox/state", headers=headers, timeout=TIMEOUT)
    if allowed:
        assert response.status_code == 200
        assert "kept@example.jp" in response.text
    else:
        assert response.status_code == 403
        assert "Host not allowed" in response.json()["message"]
        assert "kept@example.jp" not in response.text
    # The SATORI endpoints and POSTs are guarded alike.
    reset = requests.post(f"{sandbox.url}/_sandbox/reset", headers=headers, timeout=TIMEOUT)
    assert (reset.status_code == 200) is allowed
    assert (sandbox.state.customers == {}) is allowed


def test_a_request_without_a_host_header_is_refused(sandbox: SandboxServer) -> None:
    with socket.create_connection((sandbox.host, sandbox.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /_sandbox/state HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403") and b"kept@example.jp" not in answer


def test_allowed_hosts_and_wildcard_addresses() -> None:
    named = SandboxServer(allowed_hosts=["satori-sandbox"])
    assert named.host_allowed("satori-sandbox:8765") and named.host_allowed("SATORI-SANDBOX")
    assert not named.host_allowed("other:8765")
    wildcard = SandboxServer("0.0.0.0", allow_remote=True)
    # Any IP literal reaches a wildcard listener; an IP cannot be rebound, a name can.
    assert wildcard.host_allowed("192.168.1.20:8765") and wildcard.host_allowed("[::1]:8765")
    assert not wildcard.host_allowed("sandbox.attacker.example:8765")
    one = SandboxServer("192.168.1.20", allow_remote=True)
    assert one.host_allowed("192.168.1.20:8765") and not one.host_allowed("192.168.1.21")


def test_the_cli_takes_allowed_hosts() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = vars(parser.parse_args(["--allowed-host", "sandbox", "--allowed-host", "Box2"]))
    server = build_server(options)
    assert server.allowed_hosts == frozenset({"sandbox", "box2"})
    assert build_server(vars(parser.parse_args([]))).allowed_hosts == frozenset()


# --------------------------------------------------------------------------- a real browser


class _AttackerPage(BaseHTTPRequestHandler):
    """A page on another origin that tries what a hostile site would."""

    target = ""

    def do_GET(self) -> None:
        page = f"""<!doctype html><html><body>
<form id=reset method=post action="{self.target}/_sandbox/reset"></form>
<script>
fetch("{self.target}/_sandbox/faults", {{method: "POST", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body: '{{"fail_first": 5, "kind": "500"}}'}})
  .finally(() => document.getElementById("reset").submit());
</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def chromium(sandbox: SandboxServer) -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium here")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                # rebind.test resolves to 127.0.0.1, as a rebound DNS name would.
                "--host-resolver-rules=MAP rebind.test 127.0.0.1",
            ],
        )
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(20_000)
            yield page
        finally:
            browser.close()


@pytest.mark.browser
def test_a_hostile_page_in_chromium_cannot_reset_or_set_faults(
    sandbox: SandboxServer, chromium: Any
) -> None:
    handler = type("Handler", (_AttackerPage,), {"target": sandbox.url})
    attacker = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=attacker.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with chromium.expect_navigation(url=f"{sandbox.url}/_sandbox/reset"):
            chromium.goto(f"http://127.0.0.1:{attacker.server_address[1]}/")
        assert "cross-site" in chromium.content()
    finally:
        attacker.shutdown()
        attacker.server_close()
    assert untouched(sandbox)


@pytest.mark.browser
def test_chromium_reaches_the_sandbox_page_but_not_through_a_rebound_name(
    sandbox: SandboxServer, chromium: Any
) -> None:
    own = chromium.goto(f"{sandbox.url}/")
    assert own.status == 200 and "kept@example.jp" in chromium.content()
    rebound = chromium.goto(f"http://rebind.test:{sandbox.port}/")
    assert rebound.status == 403
    assert "kept@example.jp" not in chromium.content()
    # What the page's script could do once same-origin through the rebound name.
    reset = chromium.evaluate("fetch('/_sandbox/reset', {method: 'POST'}).then(r => r.status)")
    assert reset == 403 and untouched(sandbox)
