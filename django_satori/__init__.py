"""django-satori: keep a Django project's customers in sync with SATORI.

The public API (documented in docs/api.md) is what ``__all__`` names. The names
are loaded on first use: this package is imported before Django's app registry
is ready (by ``INSTALLED_APPS`` itself), and the functions need the models.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_PUBLIC = {
    "add_action": "django_satori.sync",
    "apply_source_changes": "django_satori.sync",
    "mark_for_sync": "django_satori.sync",
    "push": "django_satori.sync",
    "PushOutcome": "django_satori.sync",
    "wait_for_dispatch": "django_satori.sync",
    "pending_counts": "django_satori.sync",
    "start_bulk_job": "django_satori.bulk",
    "cancel_job": "django_satori.bulk",
    "get_client": "django_satori.client",
    "SatoriClient": "django_satori.client",
    "SatoriError": "django_satori.exceptions",
    "SatoriValidationError": "django_satori.exceptions",
}

__all__ = [
    "PushOutcome",
    "SatoriClient",
    "SatoriError",
    "SatoriValidationError",
    "__version__",
    "add_action",
    "apply_source_changes",
    "cancel_job",
    "get_client",
    "mark_for_sync",
    "pending_counts",
    "push",
    "start_bulk_job",
    "wait_for_dispatch",
]

if TYPE_CHECKING:  # pragma: no cover
    from .bulk import cancel_job, start_bulk_job
    from .client import SatoriClient, get_client
    from .exceptions import SatoriError, SatoriValidationError
    from .sync import (
        PushOutcome,
        add_action,
        apply_source_changes,
        mark_for_sync,
        pending_counts,
        push,
        wait_for_dispatch,
    )


def __getattr__(name: str) -> Any:
    # The package's one deliberate late import (PEP 562): see the docstring.
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'django_satori' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
