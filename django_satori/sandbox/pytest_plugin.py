"""pytest fixtures for projects using django-satori (registered as a pytest11 plugin).

``satori_sandbox_server`` is one sandbox for the whole session;
``satori_sandbox`` hands it to a test with empty state and no faults and, when
Django is configured, points ``SATORI["BASE_URL"]`` at it and makes it accept
the project's keys and custom fields. Bulk jobs finish immediately by default
(``satori_sandbox.configure(bulk_processing_seconds=...)`` to see
"processing"); options changed in a test are restored after it.

Django and the server are imported inside the fixtures, so merely having this
plugin installed never imports Django or requires it to be configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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


def _project_settings() -> dict[str, Any] | None:
    """``settings.SATORI`` if Django is installed and configured, else None."""
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return None
    try:
        raw = getattr(settings, "SATORI", None)
    except ImproperlyConfigured:
        return None
    return dict(raw) if isinstance(raw, dict) else {}


@pytest.fixture
def satori_sandbox(satori_sandbox_server: SandboxServer) -> Iterator[SandboxServer]:
    """The session's sandbox, reset, with the project's settings pointed at it."""
    server = satori_sandbox_server
    saved_config = server.config
    server.reset()
    raw = _project_settings()
    override = None
    if raw is not None:
        from django.test import override_settings

        from django_satori.conf import AUTH_KEYS, get_settings

        from .config import SandboxKeys

        values = {**raw, "BASE_URL": server.url}
        if all(raw.get(name) for name in AUTH_KEYS):
            keys = SandboxKeys(*(str(raw[name]) for name in AUTH_KEYS))
        else:
            # The project has no keys (yet): give it the sandbox's.
            keys = server.keys
            values.update(zip(AUTH_KEYS, keys.values(), strict=True))
        override = override_settings(SATORI=values)
        override.enable()
        try:
            current = get_settings()
            server.configure(
                keys=keys,
                custom_fields=dict(current.CUSTOM_FIELDS),
                tag_separator=current.TAG_SEPARATOR,
                action_path=current.ACTION_PATH,
                action_params=dict(current.ACTION_PARAMS),
            )
        except BaseException:
            override.disable()
            raise
    try:
        yield server
    finally:
        if override is not None:
            override.disable()
        server.config = saved_config
        server.reset()
