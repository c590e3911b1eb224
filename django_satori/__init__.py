"""django-satori: keep a Django project's customers in sync with SATORI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .models import CustomerAction


def add_action(email: str, name: str, **kwargs: Any) -> CustomerAction:
    """Record a user-defined action for ``email``; it is sent after commit.

    See :func:`django_satori.sync.add_action` for the keyword arguments.
    """
    from .sync import add_action as _add_action

    return _add_action(email, name, **kwargs)


def mark_for_sync(queryset: Any) -> int:
    """Mark customers (or rows of a connected model) for sync.

    Use it after ``QuerySet.update()``, ``bulk_create()`` or ``bulk_update()``,
    which send no signals. Returns the number of customers marked.
    """
    from .sync import mark_for_sync as _mark_for_sync

    return _mark_for_sync(queryset)
