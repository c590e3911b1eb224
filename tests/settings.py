"""Settings for django-satori's own test suite.

The database is SQLite unless ``DJANGO_SATORI_TEST_DATABASE_URL`` points at
PostgreSQL (``make test`` runs the suite on both when a server is available).

Environment overrides used by the test infrastructure (tests/conftest.py):

* ``DJANGO_SATORI_WORKER_DB_NAME``: a Celery worker subprocess uses the test
  database pytest created instead of creating its own.
* ``DJANGO_SATORI_TEST_SATORI``: JSON merged (shallowly) into ``SATORI``, e.g. the
  sandbox's ``BASE_URL`` for a worker subprocess.
* ``CELERY_BROKER_URL``: the throwaway Redis started by tests/services.py.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import django
import environ

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "Asia/Tokyo"
LANGUAGE_CODE = "en"
LANGUAGES = [("en", "English"), ("ja", "日本語")]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_satori",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
STATIC_URL = "/static/"
MEDIA_ROOT = str(Path(os.environ.get("DJANGO_SATORI_TEST_MEDIA", "/tmp/django-satori-test-media")))

_db_url = os.environ.get("DJANGO_SATORI_TEST_DATABASE_URL")
if _db_url:
    DATABASES = {"default": env.db_url_config(_db_url)}
else:
    # A file, not Django's in-memory test database, so that a worker subprocess can
    # open it; /dev/shm keeps it in RAM where there is one.
    _tmp = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    _sqlite_options: dict[str, object] = {"timeout": 30}  # seconds to wait for the other process
    if django.VERSION >= (5, 1):
        # Take the write lock at BEGIN: two processes upgrading read locks deadlock at once.
        _sqlite_options["transaction_mode"] = "IMMEDIATE"
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("DJANGO_SATORI_TEST_SQLITE", str(BASE_DIR / "test.sqlite3")),
            "OPTIONS": _sqlite_options,
            "TEST": {
                "NAME": os.environ.get(
                    "DJANGO_SATORI_TEST_SQLITE_TEST",
                    os.path.join(_tmp, f"django-satori-test-{os.getpid()}.sqlite3"),
                )
            },
        }
    }

_worker_db_name = os.environ.get("DJANGO_SATORI_WORKER_DB_NAME")
if _worker_db_name:
    DATABASES["default"]["NAME"] = _worker_db_name

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# The sandbox keys: fake values, recognisable in a leak search.
SATORI = {
    "USER_KEY": "test-user-key-6f1d",
    "USER_SECRET": "test-user-secret-93ab",
    "COMPANY_KEY": "test-company-key-2c7e",
    "COMPANY_SECRET": "test-company-secret-d41f",
    "BASE_URL": "http://127.0.0.1:1",  # replaced by the sandbox fixture
    "CUSTOM_FIELDS": {"plan": "text", "age": "integer", "birthday": "date"},
    "COALESCE_SECONDS": 0,
    "RATE_LIMIT_PER_MINUTE": None,
    # Shared with the worker subprocesses (they inherit the environment variable set
    # below), never with another test run: retention tests remove files no job names.
    "BULK_FILES_DIR": os.environ.setdefault(
        "DJANGO_SATORI_TEST_BULK_DIR",
        os.path.join(tempfile.gettempdir(), f"django-satori-test-bulk-{os.getpid()}"),
    ),
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
SATORI.update(json.loads(os.environ.get("DJANGO_SATORI_TEST_SATORI") or "{}"))

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_TASK_ALWAYS_EAGER = False
CELERY_RESULT_BACKEND = None
# The delivery guarantees the app relies on in production: a task is acked after it
# ran, and a killed worker's task goes back to the queue.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Unacked messages of a killed worker come back after this long, not after an hour,
# and the workers look for such messages every second rather than every 100.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(os.environ.get("DJANGO_SATORI_TEST_VISIBILITY_TIMEOUT", "10")),
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {"django_satori": {"handlers": ["null"], "level": "DEBUG"}},
}
if _worker_db_name:
    # A worker's log is saved under test-artifacts/: let the app's own lines in.
    LOGGING["handlers"]["stderr"] = {"class": "logging.StreamHandler"}
    LOGGING["loggers"]["django_satori"]["handlers"] = ["stderr"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
