"""SATORI's customer items and the rules we check before anything is sent.

One place for the wire names (used by the client, the bulk CSV writer, the
admin-export importer and the sandbox) and for local validation, so a bad
value is refused with the field's name before it costs an API call.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from django.utils.translation import gettext as _

from .conf import get_settings
from .exceptions import SatoriValidationError

#: Standard customer items, in the order we write them (key inside ``customer[...]``
#: and the bulk CSV header). Keys marked weak in our SATORI notes are included
#: because public clients sent them; see docs/satori-facts.md.
STANDARD_FIELDS: tuple[str, ...] = (
    "email",
    "hashcode",
    "last_name",
    "first_name",
    "last_name_reading",
    "first_name_reading",
    "lead_company_name",
    "department",
    "phone_number",
    "mobile_phone_number",
    "address",
    "memo",
    "collection_route",
    "collection_date",
    "delivery_permission",
    "append_tags",
    "delete_tags",
)
#: Customer model fields sent as SATORI items of the same name (identity and tags aside).
DATA_FIELDS: tuple[str, ...] = tuple(
    f for f in STANDARD_FIELDS if f not in ("email", "hashcode", "append_tags", "delete_tags")
)
IDENTITY_TYPES: tuple[str, ...] = ("email", "hashcode")
DELIVERY_PERMISSIONS: tuple[str, ...] = ("approval", "reject")
CUSTOM_PREFIX = "custom:"
EMAIL_MAX_LENGTH = 255
CUSTOM_FIELD_TYPES: tuple[str, ...] = ("text", "integer", "date", "select")

# Deliberately simple: SATORI's own rule is "a valid, half-width address"; we
# refuse what is obviously broken and leave the fine print to SATORI.
_EMAIL_RE = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Half of a UTF-16 pair with no other half (``json.loads('"\\ud800"')`` makes one):
#: no UTF-8 encoder takes it, so the database driver or the HTTP client would
#: fail on it with a bare UnicodeEncodeError naming no field.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_CUSTOM_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")


def normalize_email(value: Any, field: str = "email", *, lowercase: bool | None = None) -> str:
    """Trim, NFKC (full-width to ASCII) and lower-case; refuse what SATORI would refuse.

    ``lowercase`` defaults to ``SATORI['EMAIL_LOWERCASE']``: SATORI's case rules
    are unknown, and with it off an address is sent as the person typed it.
    """
    if value is None or not str(value).strip():
        raise SatoriValidationError(_("An e-mail address is required."), field=field)
    if lowercase is None:
        lowercase = get_settings().EMAIL_LOWERCASE is not False
    email = unicodedata.normalize("NFKC", str(value)).strip()
    if lowercase:
        email = email.lower()
    if len(email) > EMAIL_MAX_LENGTH:
        raise SatoriValidationError(
            _("The e-mail address is longer than %(max)d characters.") % {"max": EMAIL_MAX_LENGTH},
            field=field,
        )
    if not email.isascii():
        ascii_form = _ascii_domain(email)
        if ascii_form:
            # SATORI takes half-width addresses only, and converting the domain
            # ourselves would send an address the project does not store.
            raise SatoriValidationError(
                _(
                    "The e-mail address must use half-width (ASCII) characters only. For an "
                    "internationalised domain, enter its ASCII form: %(address)s."
                )
                % {"address": ascii_form},
                field=field,
            )
        raise SatoriValidationError(
            _("The e-mail address must use half-width (ASCII) characters only."), field=field
        )
    if not _EMAIL_RE.match(email) or ".." in email.split("@", 1)[0]:
        raise SatoriValidationError(_("This is not a valid e-mail address."), field=field)
    return email


def _ascii_domain(email: str) -> str:
    """``user@xn--...`` for an ASCII local part at an internationalised domain, else ''."""
    local, at, domain = email.rpartition("@")
    if not at or not local.isascii() or not domain or domain.isascii():
        return ""
    try:
        encoded = domain.encode("idna").decode("ascii")
    except UnicodeError:  # not a valid IDN (or a lone surrogate): no hint to give
        return ""
    candidate = f"{local}@{encoded}"
    if len(candidate) > EMAIL_MAX_LENGTH or not _EMAIL_RE.match(candidate):
        return ""
    return candidate


def refuse_unencodable(text: str, field: str) -> str:
    """``text`` unchanged, or SatoriValidationError naming ``field`` for a NUL or a lone surrogate.

    Neither can be stored (PostgreSQL refuses NUL; no driver encodes a
    surrogate) or sent as UTF-8, so they are refused before anything tries.
    """
    if "\x00" in text:
        raise SatoriValidationError(_("The value contains a NUL character."), field=field)
    if not text.isascii() and _SURROGATE_RE.search(text):
        raise SatoriValidationError(
            _(
                "The value contains a lone surrogate (half of a UTF-16 pair), which cannot "
                "be stored or sent as UTF-8."
            ),
            field=field,
        )
    return text


def format_date(value: Any, field: str) -> str:
    """Dates go as ``YYYY-MM-DD``; ``/`` separators are accepted and converted."""
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return value.isoformat()
    text = str(value).strip().replace("/", "-")
    if _DATE_RE.match(text):
        try:
            dt.date.fromisoformat(text)
        except ValueError:
            pass
        else:
            return text
    raise SatoriValidationError(
        _("Dates must be written as YYYY-MM-DD (got %(value)r).") % {"value": str(value)[:40]},
        field=field,
    )


def custom_field_type(definition: Any) -> tuple[str, tuple[str, ...]]:
    """Return ``(type, choices)`` for one entry of ``SATORI["CUSTOM_FIELDS"]``."""
    if isinstance(definition, str):
        return definition, ()
    if isinstance(definition, Mapping):
        return str(definition.get("type", "text")), tuple(definition.get("choices") or ())
    raise TypeError(f"custom field definition must be a str or a dict, not {type(definition)}")


def _clean_custom(identifier: str, value: Any, definitions: Mapping[str, Any]) -> str:
    key = CUSTOM_PREFIX + identifier
    if not _CUSTOM_ID_RE.match(identifier) or identifier not in definitions:
        raise SatoriValidationError(
            _(
                "Unknown custom field %(key)s: declare it in SATORI['CUSTOM_FIELDS'] "
                "with the identifier set in SATORI's admin screen."
            )
            % {"key": key},
            field=key,
        )
    kind, choices = custom_field_type(definitions[identifier])
    text = _clean_typed(kind, key, value)
    if kind == "select" and choices and text not in choices:
        raise SatoriValidationError(
            _("%(key)s must be one of: %(choices)s.") % {"key": key, "choices": ", ".join(choices)},
            field=key,
        )
    return text


def _clean_text(value: Any, field: str) -> str:
    return refuse_unencodable(str(value), field)


def _clean_typed(kind: str, key: str, value: Any) -> str:
    """A custom field's or extra item's value as its wire string: whole numbers as
    digits, dates as ``YYYY-MM-DD``, anything else as text."""
    if kind == "integer":
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text):
            raise SatoriValidationError(
                _("%(key)s expects a whole number (got %(value)r).")
                % {"key": key, "value": text[:40]},
                field=key,
            )
        return text
    if kind == "date":
        return format_date(value, key)
    return _clean_text(value, key)


def extra_items() -> Mapping[str, Any]:
    """``SATORI['EXTRA_STANDARD_ITEMS']``: standard items we do not know, by wire key."""
    items = get_settings().EXTRA_STANDARD_ITEMS
    return items if isinstance(items, Mapping) else {}


def clean_extra_item(key: str, value: Any, definition: Any) -> str:
    """One EXTRA_STANDARD_ITEMS value as its wire string, by the declared type and length."""
    kind = str(definition.get("type", "text")) if isinstance(definition, Mapping) else "text"
    text = _clean_typed(kind, key, value)
    if kind != "text":
        return text
    limit = definition.get("max_length") if isinstance(definition, Mapping) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and len(text) > limit:
        raise SatoriValidationError(
            _("%(key)s is longer than %(max)d characters.") % {"key": key, "max": limit},
            field=key,
        )
    return text


def check_tags(value: Any, separator: str, field: str = "tags") -> list[str]:
    """``value`` as a customer's tags: a list of strings, none holding the separator or
    a line break (SATORI would read it as two tags, or refuse it). Raises otherwise."""
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(tag, str) for tag in value):
        # A string here would be sent one character a tag ("sales" -> s,a,l,e).
        raise SatoriValidationError(
            _("Tags must be a list of strings, not %(type)s.") % {"type": type(value).__name__},
            field=field,
        )
    for tag in value:
        if separator in tag:
            raise SatoriValidationError(
                _("The tag %(tag)r contains the tag separator %(sep)r.")
                % {"tag": tag, "sep": separator},
                field=field,
            )
        if "\n" in tag or "\r" in tag:
            raise SatoriValidationError(
                _("The tag %(tag)r contains a line break.") % {"tag": tag}, field=field
            )
    return list(value)


def join_tags(tags: Iterable[str], separator: str) -> str:
    cleaned = []
    for tag in tags:
        tag = str(tag).strip()
        if separator in tag:
            raise SatoriValidationError(
                _("The tag %(tag)r contains the tag separator %(sep)r.")
                % {"tag": tag, "sep": separator},
                field="append_tags",
            )
        if tag and tag not in cleaned:
            cleaned.append(tag)
    return separator.join(cleaned)


def clean_customer(
    values: Mapping[str, Any],
    *,
    custom_fields: Mapping[str, Any],
    require_email: bool = True,
) -> dict[str, str]:
    """Validate and normalise one customer's items into wire strings.

    ``values`` uses wire keys (``last_name``, ``custom:plan``). Empty values are
    dropped: SATORI does not clear a field for an empty value, so sending one
    would only suggest otherwise. Raises :class:`SatoriValidationError` naming
    the first bad field.
    """
    cleaned: dict[str, str] = {}
    extra = extra_items()
    for key, value in values.items():
        if value is None or (isinstance(value, str) and value == ""):
            continue
        if key.startswith(CUSTOM_PREFIX):
            cleaned[key] = _clean_custom(key[len(CUSTOM_PREFIX) :], value, custom_fields)
        elif key in extra and key not in STANDARD_FIELDS:
            cleaned[key] = clean_extra_item(key, value, extra[key])
        elif key not in STANDARD_FIELDS:
            raise SatoriValidationError(
                _("Unknown SATORI customer field %(key)r.") % {"key": key}, field=key
            )
        elif key == "email":
            cleaned[key] = normalize_email(value)
        elif key == "collection_date":
            cleaned[key] = format_date(value, key)
        elif key == "delivery_permission":
            text = str(value).strip()
            if text not in DELIVERY_PERMISSIONS:
                raise SatoriValidationError(
                    _("delivery_permission must be 'approval' or 'reject' (got %(value)r).")
                    % {"value": text[:40]},
                    field=key,
                )
            cleaned[key] = text
        else:
            cleaned[key] = _clean_text(value, key)
    if require_email and "email" not in cleaned and "hashcode" not in cleaned:
        raise SatoriValidationError(_("An e-mail address is required."), field="email")
    return cleaned


def customer_form_fields(identity_type: str, customer: Mapping[str, str]) -> list[tuple[str, str]]:
    """``customer[...]`` bracket pairs for the single-customer API (auth not included)."""
    if identity_type not in IDENTITY_TYPES:
        raise SatoriValidationError(
            _("identity_type must be 'email' or 'hashcode'."), field="identity_type"
        )
    if not customer.get(identity_type):
        raise SatoriValidationError(
            _("identity_type is %(type)r but no %(type)s was given.") % {"type": identity_type},
            field=identity_type,
        )
    pairs = [("customer[identity_type]", identity_type)]
    pairs.extend((f"customer[{key}]", value) for key, value in customer.items())
    return pairs
