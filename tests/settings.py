"""Settings for django-satori's own test suite.

The database is SQLite unless ``DJANGO_SATORI_TEST_DATABASE_URL`` points at
PostgreSQL (``make test`` runs the suite on both when a server is available).
"""

from __future__ import annotations

import os
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()

SECRET_KEY = "tests-only-not-secret"  # noqa: S105
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
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("DJANGO_SATORI_TEST_SQLITE", str(BASE_DIR / "test.sqlite3")),
            "TEST": {"NAME": os.environ.get("DJANGO_SATORI_TEST_SQLITE_TEST")},
        }
    }

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

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "memory://")
CELERY_TASK_ALWAYS_EAGER = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"null": {"class": "logging.NullHandler"}},
    "loggers": {"django_satori": {"handlers": ["null"], "level": "DEBUG"}},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
