"""System checks for ``settings.SATORI`` (ids are stable: see docs/configuration.md)."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import InvalidStorageError

from .bulk_files import bulk_storage
from .conf import AUTH_KEYS, SETTING_NAMES, SatoriSettings, raw_settings
from .mapping import mapping_errors
from .schema import CUSTOM_FIELD_TYPES, custom_field_type

# Expected types for each setting; checked so a typo like "30" fails at start-up.
_TYPES: dict[str, tuple[type, ...]] = {
    "USER_KEY": (str,),
    "USER_SECRET": (str,),
    "COMPANY_KEY": (str,),
    "COMPANY_SECRET": (str,),
    "BASE_URL": (str,),
    "TIMEOUT": (int, float, tuple, list),
    "TOTAL_TIMEOUT": (int, float),
    "BULK_UPLOAD_TIMEOUT": (int, float),
    "MAX_RESPONSE_BYTES": (int,),
    "SYNC_ENABLED": (bool,),
    "DRY_RUN": (bool,),
    "CREATE_UNKNOWN": (bool,),
    "PUSH_ENDPOINT": (str,),
    "RATE_LIMIT_PER_MINUTE": (int, type(None)),
    "RATE_LIMIT_CACHE": (str,),
    "COALESCE_SECONDS": (int, float),
    "BULK_THRESHOLD": (int,),
    "MAX_ATTEMPTS": (int,),
    "RETRY_BACKOFF_SECONDS": (int, float),
    "RETRY_BACKOFF_MAX_SECONDS": (int, float),
    "LEASE_SECONDS": (int, float),
    "SWEEP_AFTER_SECONDS": (int, float),
    "MAPPINGS": (Mapping,),
    "CUSTOM_FIELDS": (Mapping,),
    "TAG_SEPARATOR": (str,),
    "BULK_CHUNK_SIZE": (int,),
    "BULK_DEFAULT_COLLECTION_ROUTE": (str,),
    "BULK_POLL_INTERVAL_SECONDS": (int, float),
    "BULK_POLL_MAX_INTERVAL_SECONDS": (int, float),
    "BULK_DEADLINE_SECONDS": (int, float),
    "BULK_RESEND_UNANSWERED": (str,),
    "BULK_RESEND_WAIT_SECONDS": (int, float),
    "BULK_STORAGE": (str,),
    "BULK_FILES_DIR": (str, os.PathLike),
    "BULK_FILE_RETENTION_DAYS": (int, float, type(None)),
    "BULK_EXPORT_ITERATOR_CHUNK": (int,),
    "ACTION_PATH": (str,),
    "ACTION_PARAMS": (Mapping,),
    "ACTION_TIMEZONE": (str,),
    "REDACT_PERSONAL_DATA": (bool,),
    "LOG_RETENTION_DAYS": (int, float, type(None)),
    "LOG_DELETE_BATCH": (int,),
    "STATUS_CACHE": (str,),
    "DELIVERY_PERMISSION_LABELS": (Mapping,),
}
assert set(_TYPES) == set(SETTING_NAMES), "every setting needs a type check"


@register(Tags.compatibility, deploy=False)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    raw = getattr(django_settings, "SATORI", None)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return [Error("settings.SATORI must be a dict.", id="django_satori.E004", obj="SATORI")]
    messages: list[CheckMessage] = []
    raw = raw_settings()

    for key in AUTH_KEYS:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            messages.append(
                Error(
                    f"SATORI['{key}'] is missing or empty.",
                    hint="Copy the four keys from SATORI's admin screen into settings "
                    "(read them from the environment in your settings module).",
                    id="django_satori.E001",
                    obj=f"SATORI['{key}']",
                )
            )

    for key in sorted(set(raw) - SETTING_NAMES):
        close = difflib.get_close_matches(key, SETTING_NAMES, n=1)
        hint = f"Did you mean {close[0]!r}?" if close else "See docs/configuration.md."
        messages.append(
            Error(
                f"Unknown setting SATORI[{key!r}].",
                hint=hint,
                id="django_satori.E002",
                obj=f"SATORI[{key!r}]",
            )
        )

    for key, types in _TYPES.items():
        if key in raw and (
            not isinstance(raw[key], types) or (bool not in types and isinstance(raw[key], bool))
        ):
            messages.append(
                Error(
                    f"SATORI[{key!r}] has the wrong type {type(raw[key]).__name__}; expected "
                    + " or ".join(t.__name__ for t in types)
                    + ".",
                    id="django_satori.E004",
                    obj=f"SATORI[{key!r}]",
                )
            )
    if any(m.id == "django_satori.E004" for m in messages):
        return messages

    conf = SatoriSettings(**{k: v for k, v in raw.items() if k in SETTING_NAMES})
    url = urlparse(conf.BASE_URL)
    if url.scheme not in ("http", "https") or not url.netloc:
        messages.append(
            Error(
                f"SATORI['BASE_URL'] {conf.BASE_URL!r} is not an http(s) URL.",
                id="django_satori.E003",
                obj="SATORI['BASE_URL']",
            )
        )
    elif url.scheme != "https" and not django_settings.DEBUG and not _is_loopback(url.hostname):
        messages.append(
            Error(
                "SATORI['BASE_URL'] must use https outside DEBUG: the API keys travel in "
                "every request.",
                hint="Use https://api.satr.jp. Plain http is accepted only with DEBUG = True "
                "or for a loopback address (the sandbox).",
                id="django_satori.E003",
                obj="SATORI['BASE_URL']",
            )
        )

    messages.extend(_check_values(conf))
    messages.extend(_check_bulk_storage(conf))
    messages.extend(_check_custom_fields(conf))
    # migrate (and the test runner) name the databases they run the checks for.
    messages.extend(_check_mappings(conf, migrating=kwargs.get("databases") is not None))
    return messages


def _is_loopback(host: str | None) -> bool:
    # Plain http to this machine (the sandbox) never carries the keys over a network.
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def _value_error(key: str, text: str) -> Error:
    return Error(f"SATORI[{key!r}] {text}", id="django_satori.E004", obj=f"SATORI[{key!r}]")


def _check_values(conf: SatoriSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    if conf.PUSH_ENDPOINT not in ("upsert", "registration"):
        messages.append(_value_error("PUSH_ENDPOINT", "must be 'upsert' or 'registration'."))
    if conf.BULK_RESEND_UNANSWERED not in ("once", "never"):
        messages.append(_value_error("BULK_RESEND_UNANSWERED", "must be 'once' or 'never'."))
    if conf.BULK_RESEND_WAIT_SECONDS < 0:
        messages.append(_value_error("BULK_RESEND_WAIT_SECONDS", "must not be negative."))
    if not 1 <= conf.BULK_CHUNK_SIZE <= 10_000:
        messages.append(
            _value_error(
                "BULK_CHUNK_SIZE",
                "must be between 1 and 10000 (SATORI takes at most 10,000 rows per upload).",
            )
        )
    if conf.RATE_LIMIT_PER_MINUTE is not None and conf.RATE_LIMIT_PER_MINUTE < 1:
        messages.append(_value_error("RATE_LIMIT_PER_MINUTE", "must be positive, or None."))
    if conf.MAX_ATTEMPTS < 1:
        messages.append(_value_error("MAX_ATTEMPTS", "must be at least 1."))
    if conf.BULK_THRESHOLD < 1:
        messages.append(_value_error("BULK_THRESHOLD", "must be at least 1."))
    if not conf.TAG_SEPARATOR:
        messages.append(_value_error("TAG_SEPARATOR", "must not be empty."))
    if not conf.ACTION_PATH.startswith("/"):
        messages.append(_value_error("ACTION_PATH", "must start with '/'."))
    timeout = conf.TIMEOUT
    parts = timeout if isinstance(timeout, (tuple, list)) else (timeout,)
    if not parts or not all(isinstance(p, (int, float)) and p > 0 for p in parts):
        messages.append(
            _value_error("TIMEOUT", "must be a positive number or a (connect, read) pair.")
        )
    for name in ("TOTAL_TIMEOUT", "BULK_UPLOAD_TIMEOUT"):
        if not math.isfinite(getattr(conf, name)) or getattr(conf, name) <= 0:
            messages.append(_value_error(name, "must be a positive number of seconds."))
    if conf.MAX_RESPONSE_BYTES < 1:
        messages.append(_value_error("MAX_RESPONSE_BYTES", "must be a positive number of bytes."))
    elif conf.TOTAL_TIMEOUT > conf.LEASE_SECONDS / 2:
        # A push renews its claim every LEASE_SECONDS / 2 between calls, so a
        # longer call can outlive the claim and another worker sends the row too.
        messages.append(
            Warning(
                "SATORI['TOTAL_TIMEOUT'] is more than half of SATORI['LEASE_SECONDS'].",
                hint="A call that long can outlive a worker's claim on the customer, and "
                "another worker then sends it again. Lower TOTAL_TIMEOUT or raise LEASE_SECONDS.",
                id="django_satori.W004",
                obj="SATORI['TOTAL_TIMEOUT']",
            )
        )
    if conf.RATE_LIMIT_PER_MINUTE is not None:
        backend = django_settings.CACHES.get(conf.RATE_LIMIT_CACHE, {}).get("BACKEND", "")
        if not backend:
            messages.append(
                _value_error(
                    "RATE_LIMIT_CACHE", f"names no cache in CACHES ({conf.RATE_LIMIT_CACHE!r})."
                )
            )
        elif backend.endswith(("LocMemCache", "DummyCache")) and not django_settings.DEBUG:
            messages.append(
                Warning(
                    "The SATORI rate limit uses a per-process cache, so each worker counts alone.",
                    hint="Point SATORI['RATE_LIMIT_CACHE'] at Redis, Memcached or the database "
                    "cache so all workers share one limit.",
                    id="django_satori.W001",
                    obj="SATORI['RATE_LIMIT_CACHE']",
                )
            )
    for key in ("BULK_FILE_RETENTION_DAYS", "LOG_RETENTION_DAYS"):
        days = getattr(conf, key)
        if days is not None and days <= 0:
            messages.append(_value_error(key, "must be positive, or None (keep for ever)."))
    if conf.LOG_DELETE_BATCH < 1:
        messages.append(_value_error("LOG_DELETE_BATCH", "must be at least 1."))
    if conf.STATUS_CACHE not in django_settings.CACHES:
        messages.append(
            _value_error("STATUS_CACHE", f"names no cache in CACHES ({conf.STATUS_CACHE!r}).")
        )
    if conf.DRY_RUN:
        messages.append(
            Warning(
                "SATORI['DRY_RUN'] is on: nothing is sent to SATORI.",
                id="django_satori.W002",
                obj="SATORI['DRY_RUN']",
            )
        )
    return messages


def _check_bulk_storage(conf: SatoriSettings) -> list[CheckMessage]:
    """Bulk CSV files hold every uploaded customer's personal data: never at a public URL."""
    obj = "SATORI['BULK_STORAGE']"
    try:
        storage = bulk_storage(conf)
    except (ImproperlyConfigured, InvalidStorageError) as exc:
        return [Error(str(exc), id="django_satori.E007", obj=obj)]
    public = []
    media_url = str(getattr(django_settings, "MEDIA_URL", "") or "")
    base_url = getattr(storage, "base_url", None)
    # An unset MEDIA_URL reads as "/" (the script prefix): then only the directory tells.
    if isinstance(base_url, str) and media_url.strip("/") and base_url.startswith(media_url):
        public.append(f"its base URL {base_url!r} is under MEDIA_URL")
    location = getattr(storage, "location", None)
    for name in ("MEDIA_ROOT", "STATIC_ROOT"):
        root = str(getattr(django_settings, name, "") or "")
        if isinstance(location, str) and root and _inside(location, root):
            public.append(f"its directory is inside {name}")
    if not public:
        return []
    return [
        Warning(
            f"The storage for bulk CSV files ({conf.BULK_STORAGE!r}) may be public: "
            + " and ".join(public)
            + ". Those files hold every uploaded customer's personal data.",
            hint="Remove SATORI['BULK_STORAGE'] to use the private default directory "
            "(SATORI['BULK_FILES_DIR']), or point it at a private storage such as a private "
            "S3 bucket. See docs/security.md.",
            id="django_satori.W003",
            obj=obj,
        )
    ]


def _inside(path: str, root: str) -> bool:
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_custom_fields(conf: SatoriSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for identifier, definition in conf.CUSTOM_FIELDS.items():
        try:
            kind, choices = custom_field_type(definition)
        except TypeError as exc:
            kind, choices = "", ()
            problem = str(exc)
        else:
            problem = (
                ""
                if kind in CUSTOM_FIELD_TYPES
                else (f"has unknown type {kind!r}; use one of {', '.join(CUSTOM_FIELD_TYPES)}.")
            )
        if isinstance(identifier, str) and identifier.startswith("custom:"):
            problem = "must be the bare identifier, without the 'custom:' prefix."
        if kind == "select" and not choices:
            problem = "is a select field without 'choices'."
        if problem:
            messages.append(
                Error(
                    f"SATORI['CUSTOM_FIELDS'][{identifier!r}] {problem}",
                    id="django_satori.E006",
                    obj=f"SATORI['CUSTOM_FIELDS'][{identifier!r}]",
                )
            )
    return messages


def _check_mappings(conf: SatoriSettings, *, migrating: bool) -> list[CheckMessage]:
    # Each mistake is its own message. They do not stop ``migrate`` (which runs the checks
    # for its database): the tables do not depend on MAPPINGS, and a deployment must be
    # able to migrate before it fixes them. Everywhere else they are errors.
    level = Warning if migrating else Error
    return [
        level(
            message,
            hint=None if not migrating else "Reported as error E005 by `manage.py check`.",
            id="django_satori.E005",
            obj="SATORI['MAPPINGS']",
        )
        for message in mapping_errors(conf)
    ]
