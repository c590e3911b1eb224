"""System checks for ``settings.SATORI`` (ids are stable: see docs/configuration.md)."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.core.files.storage import InvalidStorageError

from . import bulk_csv
from .bulk_files import bulk_storage
from .conf import (
    ANSWER_CLASSES,
    AUTH_KEYS,
    DEFAULT_ACTION_IDENTITY_PARAMS,
    EXTRA_ITEM_TYPES,
    SETTING_NAMES,
    SatoriSettings,
    raw_settings,
)
from .mapping import mapping_errors
from .redaction import AUTH_FIELDS
from .schema import CUSTOM_FIELD_TYPES, STANDARD_FIELDS, custom_field_type

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
    "BULK_UPLOAD_ATTEMPTS": (int,),
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
    "EMAIL_LOWERCASE": (bool,),
    "DELETE_IDENTITY": (str,),
    "EXTRA_STANDARD_ITEMS": (Mapping,),
    "ANSWER_STATUS_CLASSES": (Mapping,),
    "ANSWER_MESSAGE_CLASSES": (list, tuple),
    "BULK_CHUNK_SIZE": (int,),
    "BULK_DEFAULT_COLLECTION_ROUTE": (str,),
    "BULK_CSV_COLUMNS": (str, list, tuple),
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
    "ACTION_IDENTITY_PARAMS": (Mapping,),
    "ACTION_DATE_FORMAT": (str,),
    "ACTION_SEND_DATE": (bool,),
    "ACTION_EXTRA_PARAMS": (Mapping,),
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
    elif url.scheme != "https" and not django_settings.DEBUG and not is_loopback(url.hostname):
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
    messages.extend(_check_facts(conf))
    # migrate (and the test runner) name the databases they run the checks for.
    messages.extend(_check_mappings(conf, migrating=kwargs.get("databases") is not None))
    return messages


def is_loopback(host: str | None) -> bool:
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


def _fact_error(key: str, text: str, check_id: str) -> Error:
    return Error(f"SATORI[{key!r}] {text}", id=check_id, obj=f"SATORI[{key!r}]")


def _check_facts(conf: SatoriSettings) -> list[CheckMessage]:
    """The settings that override a guessed SATORI fact (docs/satori-facts.md)."""
    return [
        *_check_bulk_columns(conf),
        *_check_answer_classes(conf),
        *_check_email_case(conf),
        *_check_delete_identity(conf),
        *_check_action_call(conf),
        *_check_extra_items(conf),
        *_check_upload_attempts(conf),
    ]


def _check_bulk_columns(conf: SatoriSettings) -> list[CheckMessage]:
    value = conf.BULK_CSV_COLUMNS
    if isinstance(value, str):
        if value == "filled":
            return []
        return [
            _fact_error(
                "BULK_CSV_COLUMNS",
                "must be 'filled' or a list of column names.",
                "django_satori.E010",
            )
        ]
    known = bulk_csv.header(conf)
    names = list(value)
    problems = []
    if not all(isinstance(name, str) for name in names):
        problems.append("holds a value that is not a column name (a string)")
    else:
        unknown = [name for name in names if name not in known]
        if unknown:
            problems.append(
                f"names columns the app does not write: {', '.join(unknown)} (known: "
                f"{', '.join(known)}; declare custom fields in CUSTOM_FIELDS and further "
                "items in EXTRA_STANDARD_ITEMS)"
            )
        if len(set(names)) != len(names):
            problems.append("names a column twice")
        if "email" not in names:
            problems.append("must include 'email', which identifies each row")
    return [
        _fact_error("BULK_CSV_COLUMNS", problem + ".", "django_satori.E010") for problem in problems
    ]


def _check_answer_classes(conf: SatoriSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    classes = ", ".join(ANSWER_CLASSES)
    for code, kind in conf.ANSWER_STATUS_CLASSES.items():
        text = str(code).strip()
        if isinstance(code, bool) or not text.isdigit() or not 400 <= int(text) < 600:
            messages.append(
                _fact_error(
                    "ANSWER_STATUS_CLASSES",
                    f"has the key {code!r}: keys must be refusal status codes (400-599).",
                    "django_satori.E011",
                )
            )
        elif kind not in ANSWER_CLASSES:
            messages.append(
                _fact_error(
                    "ANSWER_STATUS_CLASSES",
                    f"maps {code!r} to {kind!r}; the classes are {classes}.",
                    "django_satori.E011",
                )
            )
    for entry in conf.ANSWER_MESSAGE_CLASSES:
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            problem = "must be [regular expression, class] pairs"
        elif entry[1] not in ANSWER_CLASSES:
            problem = f"maps {entry[0]!r} to {entry[1]!r}; the classes are {classes}"
        else:
            try:
                re.compile(entry[0])
            except re.error as exc:
                problem = f"has the pattern {entry[0]!r}, which is not a regular expression ({exc})"
            else:
                continue
        messages.append(_fact_error("ANSWER_MESSAGE_CLASSES", problem + ".", "django_satori.E011"))
    return messages


def _check_email_case(conf: SatoriSettings) -> list[CheckMessage]:
    if conf.EMAIL_LOWERCASE:
        return []
    return [
        Warning(
            "SATORI['EMAIL_LOWERCASE'] is off: addresses go to SATORI as they were typed.",
            hint="Connected objects (MAPPINGS) whose addresses differ only in case are still "
            "refused at save, but Customer rows created directly are unique only as stored: "
            "'Taro@example.jp' and 'taro@example.jp' can be two local customers, and if "
            "SATORI treats them as one customer, both push into it. Turn it off only when "
            "SATORI already holds mixed-case addresses you must not duplicate; see "
            "docs/configuration.md.",
            id="django_satori.W010",
            obj="SATORI['EMAIL_LOWERCASE']",
        )
    ]


def _check_delete_identity(conf: SatoriSettings) -> list[CheckMessage]:
    if conf.DELETE_IDENTITY in ("hashcode", "email"):
        return []
    return [_fact_error("DELETE_IDENTITY", "must be 'hashcode' or 'email'.", "django_satori.E012")]


def _check_action_call(conf: SatoriSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    ids = conf.ACTION_IDENTITY_PARAMS
    unknown = set(ids) - set(DEFAULT_ACTION_IDENTITY_PARAMS)
    if unknown:
        messages.append(
            _fact_error(
                "ACTION_IDENTITY_PARAMS",
                f"has unknown name(s) {', '.join(sorted(map(str, unknown)))}; the names are "
                "identity_type, email and hashcode.",
                "django_satori.E013",
            )
        )
    wires = [*ids.values(), *conf.ACTION_PARAMS.values(), *conf.ACTION_EXTRA_PARAMS]
    if not all(isinstance(w, str) and w for w in wires) or not all(
        isinstance(v, str) for v in conf.ACTION_EXTRA_PARAMS.values()
    ):
        messages.append(
            _fact_error(
                "ACTION_IDENTITY_PARAMS",
                "and ACTION_EXTRA_PARAMS must hold non-empty parameter names and string values.",
                "django_satori.E013",
            )
        )
    elif set(wires) & set(AUTH_FIELDS):
        messages.append(
            _fact_error(
                "ACTION_EXTRA_PARAMS",
                "or ACTION_IDENTITY_PARAMS names one of the four keys "
                f"({', '.join(AUTH_FIELDS)}); the keys are sent by the app and cannot be "
                "overridden.",
                "django_satori.E013",
            )
        )
    elif len(set(wires)) != len(wires):
        messages.append(
            _fact_error(
                "ACTION_IDENTITY_PARAMS",
                "ACTION_PARAMS and ACTION_EXTRA_PARAMS name one parameter twice.",
                "django_satori.E013",
            )
        )
    if "%" not in conf.ACTION_DATE_FORMAT:
        messages.append(
            _fact_error(
                "ACTION_DATE_FORMAT",
                "must be a strftime format such as '%Y-%m-%d %H:%M:%S'.",
                "django_satori.E013",
            )
        )
    return messages


def _check_extra_items(conf: SatoriSettings) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    for key, definition in conf.EXTRA_STANDARD_ITEMS.items():
        where = f"EXTRA_STANDARD_ITEMS'][{key!r}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_]+", key):
            problem = "must be SATORI's item key (letters, digits, _)."
        elif key in STANDARD_FIELDS:
            problem = "is a standard item the app already sends."
        elif key in ("tags", "custom_fields"):
            problem = "is a name the app uses itself."
        elif not isinstance(definition, Mapping):
            problem = 'must be a dict such as {"type": "text", "max_length": 100}.'
        elif definition.get("type", "text") not in EXTRA_ITEM_TYPES:
            problem = f"has the type {definition.get('type')!r}; use one of " + ", ".join(
                EXTRA_ITEM_TYPES
            )
        elif set(definition) - {"type", "max_length"}:
            problem = "may hold only 'type' and 'max_length'."
        elif "max_length" in definition and (
            not isinstance(definition["max_length"], int)
            or isinstance(definition["max_length"], bool)
            or definition["max_length"] < 1
        ):
            problem = "has a 'max_length' that is not a positive whole number."
        else:
            continue
        messages.append(_fact_error(where, problem, "django_satori.E014"))
    return messages


def _check_upload_attempts(conf: SatoriSettings) -> list[CheckMessage]:
    if conf.BULK_UPLOAD_ATTEMPTS >= 1:
        return []
    return [
        _fact_error(
            "BULK_UPLOAD_ATTEMPTS",
            "must be at least 1 (the first upload counts).",
            "django_satori.E015",
        )
    ]


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
