"""Child tasks that prepare a database: schema, data set, version report."""

from __future__ import annotations

import platform
import time
from typing import Any

from django.core.management import call_command
from django.db import connection

from . import data


def migrate() -> dict[str, Any]:
    call_command("migrate", verbosity=0, interactive=False)
    return {"ok": True}


def seed(customers: int = 0, members: int = 0, sql: bool = False) -> dict[str, Any]:
    """Replace the data set: ``customers`` plain customers (synced), ``members`` Members.

    ``sql``: let the database generate the customers (the same rows, much faster).
    """
    started = time.perf_counter()
    data.wipe()
    if sql and customers:
        data.seed_customers_sql(customers, synced=True)
    else:
        data.seed_customers(customers, synced=True)
    data.seed_members(members)
    if connection.vendor == "postgresql":
        data.analyze()
    return {"seconds": time.perf_counter() - started, "customers": customers, "members": members}


def versions() -> dict[str, Any]:
    import celery
    import django
    import requests

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SHOW server_version")
            db_version = f"PostgreSQL {cursor.fetchone()[0]}"
        else:
            cursor.execute("SELECT sqlite_version()")
            db_version = f"SQLite {cursor.fetchone()[0]}"
    info = {
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "requests": requests.__version__,
        "database": db_version,
    }
    if connection.vendor == "postgresql":
        import psycopg

        info["driver"] = f"psycopg {psycopg.__version__}"
    try:
        import import_export

        info["django-import-export"] = import_export.__version__
    except ImportError:
        pass
    return info
