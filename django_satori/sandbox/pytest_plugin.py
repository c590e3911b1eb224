"""pytest fixtures for projects using django-satori (registered as a pytest11 plugin).

``satori_sandbox_server`` is one sandbox for the whole session;
``satori_sandbox`` hands it to a test with empty state and no faults and, when
Django is configured, points ``SATORI["BASE_URL"]`` at it and makes it accept
the project's keys and custom fields (see :func:`.testing.use_sandbox`). Bulk
jobs finish immediately by default; ``satori_sandbox.configure(
bulk_processing_seconds=...)`` shows "processing". Options changed in a test
are restored after it.

Django and the server are imported inside the fixtures, so having this plugin
installed never imports Django or requires it to be configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # pragma: no cover
    from .server import SandboxServer


@pytest.fixture(scope="session")
def satori_sandbox_server() -> Iterator[SandboxServer]:
    """One running sandbox for the test session (loopback, free port)."""
    from .server import SandboxServer

    server = SandboxServer(bulk_processing_seconds=0).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def satori_sandbox(satori_sandbox_server: SandboxServer) -> Iterator[SandboxServer]:
    """The session's sandbox, reset, with the project's settings pointed at it."""
    from .testing import use_sandbox

    with use_sandbox(satori_sandbox_server) as server:
        yield server
