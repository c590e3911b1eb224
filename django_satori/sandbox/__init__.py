"""A strict, standard-library fake of SATORI's public API over real HTTP.

SATORI has no public sandbox, so this server stands in for it in test suites,
in ``make demo`` and on a developer's machine: ``python -m django_satori.sandbox``
or ``manage.py satori_sandbox``. It is deliberately stricter than what we know
of SATORI (unknown keys, bad formats and duplicates are refused, naming the
field) so a client bug shows up here rather than in production.

The names below are imported lazily: the pytest plugin lives in this package
and must import even where Django is not installed or configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Faults", "SandboxKeys", "SandboxServer", "SandboxState"]

if TYPE_CHECKING:  # pragma: no cover
    from .faults import Faults
    from .server import SandboxKeys, SandboxServer
    from .state import SandboxState

_LAZY = {
    "Faults": "faults",
    "SandboxKeys": "server",
    "SandboxServer": "server",
    "SandboxState": "state",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
