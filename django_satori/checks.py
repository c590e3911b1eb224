"""System checks for ``settings.SATORI`` (ids are stable: see docs/configuration.md)."""

from __future__ import annotations

import difflib
import ipaddress
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from django.conf import settings as django_settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .conf import AUTH_KEYS, SETTING_NAMES, SatoriSettings, raw_settings
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
    "BULK_STORAGE": (str,),
    "BULK_EXPORT_ITERATOR_CHUNK": (int,),
    "ACTION_PATH": (str,),
    "ACTION_PARAMS": (Mapping,),
    "ACTION_TIMEZONE": (str,),
    "REDACT_PERSONAL_DATA": (bool,),
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
    messages.extend(_check_custom_fields(conf))
    messages.extend(_check_mappings(conf))
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
                id="django_satori.W003",
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
    if conf.DRY_RUN:
        messages.append(
            Warning(
                "SATORI['DRY_RUN'] is on: nothing is sent to SATORI.",
                id="django_satori.W002",
                obj="SATORI['DRY_RUN']",
            )
        )
    return messages


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


def _check_mappings(conf: SatoriSettings) -> list[CheckMessage]:
    from .mapping import MappingError, load_mappings

    try:
        load_mappings(conf)
    except MappingError as exc:
        return [Error(str(exc), id="django_satori.E005", obj="SATORI['MAPPINGS']")]
    return []
