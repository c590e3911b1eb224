"""Settings of the example project. Everything that differs per machine comes
from the environment (or an optional ``example_project/.env`` file) through
django-environ; django-satori itself never reads the environment.

With nothing set, the project talks to the bundled SATORI sandbox on
127.0.0.1:8765 with the sandbox's published fake keys, stores data in SQLite
and uses a Celery broker made of plain files: no server to install.
"""

from __future__ import annotations

from pathlib import Path

import django
import environ
from django.utils.translation import gettext_lazy as _

from django_satori.beat import BEAT_SCHEDULE

BASE_DIR = Path(__file__).resolve().parent
env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

#: Runtime files (broker messages, beat schedule, cache, logs, uploaded CSVs).
VAR_DIR = Path(env("EXAMPLE_VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DEBUG", default=True)
# Outside DEBUG a real secret is required: no default.
SECRET_KEY = (
    env("SECRET_KEY")
    if not DEBUG
    else env("SECRET_KEY", default="django-insecure-example-project-only")
)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_satori",
    "example_project.members",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
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

DATABASES = {"default": env.db_url("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
# A connected model's row and its SATORI outbox row must commit together:
# every request runs in one transaction (docs/connecting-models.md).
DATABASES["default"]["ATOMIC_REQUESTS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the Celery worker write to the same file.
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options.setdefault("timeout", 30)
    if django.VERSION >= (5, 1):
        # Take the write lock at BEGIN; two processes upgrading read locks deadlock.
        _options.setdefault("transaction_mode", "IMMEDIATE")

# The SATORI rate limit is counted in this cache, so every worker process must
# see the same one: files here, Redis in production (CACHE_URL=redis://...).
CACHES = {"default": env.cache_url("CACHE_URL", default=f"filecache://{VAR_DIR / 'cache'}")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = env("LANGUAGE_CODE", default="ja")
LANGUAGES = [("ja", _("Japanese")), ("en", _("English"))]
TIME_ZONE = "Asia/Tokyo"
USE_I18N = True
LOCALE_PATHS = [BASE_DIR / "locale"]  # the site's own Japanese texts
USE_TZ = True

STATIC_URL = "/static/"
# No MEDIA_ROOT: the site takes no uploads, and the bulk CSV files (personal data)
# go to SATORI['BULK_FILES_DIR'] below, which no URL serves.
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- SATORI -----------------------------------------------------------------
# The sandbox's published fake keys are the defaults, so the project runs
# against ``manage.py satori_sandbox`` out of the box. For the real SATORI,
# set the four SATORI_* keys and SATORI_BASE_URL=https://api.satr.jp.
SATORI = {
    "USER_KEY": env("SATORI_USER_KEY", default="sandbox-user-key"),
    "USER_SECRET": env("SATORI_USER_SECRET", default="sandbox-user-secret"),
    "COMPANY_KEY": env("SATORI_COMPANY_KEY", default="sandbox-company-key"),
    "COMPANY_SECRET": env("SATORI_COMPANY_SECRET", default="sandbox-company-secret"),
    "BASE_URL": env("SATORI_BASE_URL", default="http://127.0.0.1:8765"),
    "DRY_RUN": env.bool("SATORI_DRY_RUN", default=False),
    "RATE_LIMIT_PER_MINUTE": env.int("SATORI_RATE_LIMIT_PER_MINUTE", default=30),
    # Private: downloaded only through the admin, by staff with the bulk permission.
    "BULK_FILES_DIR": str(VAR_DIR / "private" / "satori-bulk"),
    # The identifier set in SATORI's admin screen (カスタマーカスタム項目).
    "CUSTOM_FIELDS": {
        "plan": {"type": "select", "choices": ["free", "standard", "premium"], "label": "プラン"},
    },
    "MAPPINGS": {
        "members.Member": {
            "email": "email",
            "fields": {
                "last_name": "family_name",
                "first_name": "given_name",
                "last_name_reading": "family_name_kana",
                "first_name_reading": "given_name_kana",
                "lead_company_name": "company.name",
                "department": "department",
                "phone_number": "phone",
                "collection_route": "source",
                "collection_date": "joined_on",
                "delivery_permission": "satori_delivery_permission",
                "custom:plan": "plan",
            },
            "tags": "tag_list",
            # Withdrawn members stop syncing but stay in SATORI.
            "condition": "is_active",
            "on_delete": "delete",
        }
    },
}

# --- Celery -----------------------------------------------------------------
# Default: kombu's filesystem transport, a broker made of files under VAR_DIR.
# Production: CELERY_BROKER_URL=redis://... or amqp://... (docs/operations.md).
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem:"):
    _broker = VAR_DIR / "broker"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker / "queue"),
        "data_folder_out": str(_broker / "queue"),
        "control_folder": str(_broker / "control"),
    }
    for _folder in ("queue", "control"):
        (_broker / _folder).mkdir(parents=True, exist_ok=True)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {**BEAT_SCHEDULE}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_satori": {"handlers": ["console"], "level": "INFO"}},
}
