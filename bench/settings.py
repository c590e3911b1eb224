"""Django settings for the benchmark processes (children, the Celery worker).

Everything variable comes from the environment that :mod:`bench.run` sets:

* ``BENCH_DATABASE_URL``: the PostgreSQL database; unset means SQLite at
  ``BENCH_SQLITE_PATH``.
* ``CELERY_BROKER_URL``: the throwaway Redis started by bench.run.
* ``BENCH_SATORI``: JSON merged into ``SATORI`` (the sandbox URL, a case's
  own switches such as ``SYNC_ENABLED``).
* ``BENCH_MEDIA_ROOT``: where bulk CSV parts are written.
"""

from __future__ import annotations

import json
import os
import tempfile

import environ

env = environ.Env()

SECRET_KEY = "bench-only-not-secret"  # noqa: S105 - a benchmark, never deployed
DEBUG = False  # DEBUG=True would keep every query in memory and skew memory figures
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "Asia/Tokyo"
LANGUAGE_CODE = "en"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django_satori",
    # Member, the connected project model of the save benchmark.
    "tests.testapp",
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_db_url = os.environ.get("BENCH_DATABASE_URL")
if _db_url:
    DATABASES = {"default": env.db_url_config(_db_url)}
else:
    _sqlite_options: dict[str, object] = {"timeout": 60}
    import django

    if django.VERSION >= (5, 1):
        # A worker and the driving process write at once: take the write lock at BEGIN.
        _sqlite_options["transaction_mode"] = "IMMEDIATE"
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get(
                "BENCH_SQLITE_PATH", os.path.join(tempfile.gettempdir(), "django-satori-bench.db")
            ),
            "OPTIONS": _sqlite_options,
        }
    }

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
MEDIA_ROOT = os.environ.get(
    "BENCH_MEDIA_ROOT", os.path.join(tempfile.gettempdir(), "django-satori-bench-media")
)

# Fake keys: the sandbox started by bench.run is given the same ones.
SANDBOX_KEYS = {
    "user_key": "bench-user-key",
    "user_secret": "bench-user-secret",
    "company_key": "bench-company-key",
    "company_secret": "bench-company-secret",
}
#: The customers of every benchmark carry these two custom fields.
CUSTOM_FIELDS = {"plan": "text", "age": "integer"}

SATORI: dict[str, object] = {
    "USER_KEY": SANDBOX_KEYS["user_key"],
    "USER_SECRET": SANDBOX_KEYS["user_secret"],
    "COMPANY_KEY": SANDBOX_KEYS["company_key"],
    "COMPANY_SECRET": SANDBOX_KEYS["company_secret"],
    "BASE_URL": "http://127.0.0.1:1",  # replaced with the sandbox's URL
    "CUSTOM_FIELDS": CUSTOM_FIELDS,
    "MAPPINGS": {
        "testapp.Member": {
            "email": "email",
            "fields": {
                "last_name": "family_name",
                "first_name": "given_name",
                "lead_company_name": "company",
                "custom:plan": "plan",
            },
            "tags": "tag_list",
            "on_delete": "delete",
        }
    },
}
SATORI.update(json.loads(os.environ.get("BENCH_SATORI") or "{}"))

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_RESULT_BACKEND = None
# The delivery settings the app documents for production.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    # Warnings only: a benchmark must not pay for formatting debug lines.
    "loggers": {"django_satori": {"handlers": ["stderr"], "level": "WARNING"}},
}
