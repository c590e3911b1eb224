"""Pointing a Django project's settings at a sandbox, for any test runner.

The pytest fixture ``satori_sandbox`` uses :func:`use_sandbox`; a
``unittest``/Django ``TestCase`` suite can call it directly::

    with SandboxServer(bulk_processing_seconds=0) as server, use_sandbox(server):
        ...  # settings.SATORI["BASE_URL"] == server.url
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .server import SandboxServer


def project_settings() -> dict[str, Any] | None:
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


@contextmanager
def use_sandbox(server: SandboxServer) -> Iterator[SandboxServer]:
    """Reset ``server`` and, if Django is configured, aim ``settings.SATORI`` at it.

    The server is made to accept the project's keys (or the project gets the
    sandbox's keys when it has none), its custom fields, tag separator and
    action path/parameters. Everything is restored on exit, including options
    the test changed with ``server.configure()``.
    """
    saved_config = server.config
    server.reset()
    raw = project_settings()
    override = None
    try:
        if raw is not None:
            from django.test import override_settings

            from django_satori.conf import AUTH_KEYS, get_settings

            from .config import SandboxKeys

            values = {**raw, "BASE_URL": server.url}
            if all(raw.get(name) for name in AUTH_KEYS):
                keys = SandboxKeys(*(str(raw[name]) for name in AUTH_KEYS))
            else:
                keys = server.keys
                values.update(zip(AUTH_KEYS, keys.values(), strict=True))
            override = override_settings(SATORI=values)
            override.enable()
            current = get_settings()
            server.configure(
                keys=keys,
                custom_fields=dict(current.CUSTOM_FIELDS),
                tag_separator=current.TAG_SEPARATOR,
                action_path=current.ACTION_PATH,
                action_params=dict(current.ACTION_PARAMS),
            )
        yield server
    finally:
        if override is not None:
            override.disable()
        server.config = saved_config
        server.reset()
