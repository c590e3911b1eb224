from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.backends.signals import connection_created
from django.utils.translation import gettext_lazy as _


def _sqlite_wal(sender: Any, connection: Any, **kwargs: Any) -> None:
    # The web server and the Celery worker share the SQLite file. In WAL mode a
    # reader never blocks a writer (nor the other way round), so a long read (a bulk
    # export, the admin's lists) does not make the other process's commits wait.
    # The mode is stored in the file; setting it on each new connection is cheap.
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL, fewer disk syncs


class MembersConfig(AppConfig):
    name = "example_project.members"
    label = "members"
    verbose_name = _("Members")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        connection_created.connect(_sqlite_wal, dispatch_uid="example_project.sqlite_wal")
