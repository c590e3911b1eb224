"""The sandbox's settings: keys, custom fields, timings and permissions.

One frozen object so a running server can be reconfigured atomically (the
pytest fixture swaps keys and custom fields per test and restores them).
"""

from __future__ import annotations

import dataclasses
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django_satori.conf import (
    DEFAULT_ACTION_DATE_FORMAT,
    DEFAULT_ACTION_IDENTITY_PARAMS,
    DEFAULT_ACTION_PARAMS,
    EXTRA_ITEM_TYPES,
    SatoriSettings,
)
from django_satori.schema import CUSTOM_FIELD_TYPES, STANDARD_FIELDS, custom_field_type

from .i18n import _

AUTH_FIELDS: tuple[str, ...] = ("user_key", "user_secret", "company_key", "company_secret")
REDACTED = "********"

# The app's own defaults, so a project that changes nothing talks to the sandbox.
DEFAULT_ACTION_PATH: str = SatoriSettings().ACTION_PATH
ENVELOPES: tuple[str, ...] = ("body", "message", "top")

#: Operations that ``deny_operations`` can forbid. The endpoint names, plus
#: "create" and "edit", which follow SATORI's permission items (new customer,
#: editing a customer) whatever endpoint does the writing.
OPERATIONS: tuple[str, ...] = (
    "registration",
    "upsert",
    "delete",
    "action",
    "bulk_registration",
    "bulk_upsert",
    "bulk_status",
    "create",
    "edit",
)

#: Kinds of refusal whose status ``answer_status`` can change (the sandbox's own codes:
#: 401, 403, 404, 400), to play a SATORI that answers with other codes than we assume.
ANSWER_KINDS: dict[str, int] = {
    "authentication": 401,
    "permission": 403,
    "not_found": 404,
    "validation": 400,
}

_CUSTOM_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")


@dataclass(frozen=True)
class ExtraItem:
    """A standard customer item the sandbox accepts besides the known ones."""

    kind: str = "text"
    max_length: int | None = None


@dataclass(frozen=True)
class SandboxKeys:
    """The four keys the sandbox accepts. Their values never appear in a repr."""

    user_key: str = "sandbox-user-key"
    user_secret: str = "sandbox-user-secret"  # noqa: S105 - a published fake value
    company_key: str = "sandbox-company-key"
    company_secret: str = "sandbox-company-secret"  # noqa: S105

    def __post_init__(self) -> None:
        for name in AUTH_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(
                    _("Sandbox key %(name)s must be a non-empty string.") % {"name": name}
                )

    def __repr__(self) -> str:
        return f"SandboxKeys({REDACTED})"

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in AUTH_FIELDS)

    def matches(self, given: Mapping[str, str]) -> bool:
        """Constant-time comparison of all four fields (missing ones never match)."""
        ok = True
        for name in AUTH_FIELDS:
            expected = getattr(self, name).encode("utf-8")
            actual = str(given.get(name, "")).encode("utf-8", "surrogateescape")
            ok = hmac.compare_digest(expected, actual) and ok
        return ok


@dataclass(frozen=True)
class CustomField:
    kind: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxConfig:
    """Validated sandbox options; build a changed copy with :meth:`replace`."""

    keys: SandboxKeys = field(default_factory=SandboxKeys)
    #: None: any ``custom:<identifier>`` is accepted as text; otherwise only these.
    custom_fields: Mapping[str, CustomField] | None = None
    bulk_processing_seconds: float = 1.0
    process_code_ttl: float = 3600.0
    tag_separator: str = ","
    action_path: str = DEFAULT_ACTION_PATH
    action_params: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTION_PARAMS))
    envelope: str = "body"
    own_only: bool = False
    deny_operations: frozenset[str] = frozenset()
    #: Bulk CSV columns refused as "not accepted" (a SATORI that does not take them).
    refused_columns: frozenset[str] = frozenset()
    #: {kind: status}: refusals of that kind answered with this code (see ANSWER_KINDS).
    answer_status: Mapping[str, int] = field(default_factory=dict)
    #: Addresses that differ in case are different customers.
    email_case_sensitive: bool = False
    #: False: ``identity_type=hashcode`` is refused (a SATORI that takes e-mail only).
    hashcode_identity: bool = True
    action_identity_params: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_ACTION_IDENTITY_PARAMS)
    )
    action_date_format: str = DEFAULT_ACTION_DATE_FORMAT
    #: True: the action's date parameter is refused as unknown.
    action_refuse_date: bool = False
    #: Fixed fields an action call must carry, with their values.
    action_required_params: Mapping[str, str] = field(default_factory=dict)
    #: Standard items accepted besides the known ones (役職, FAX, ...).
    extra_items: Mapping[str, ExtraItem] = field(default_factory=dict)

    def replace(self, **changes: Any) -> SandboxConfig:
        return build_config(self, **changes)


def _custom_fields(value: Any) -> dict[str, CustomField] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(_("custom_fields must be a dict or None."))
    result: dict[str, CustomField] = {}
    for identifier, definition in value.items():
        if not _CUSTOM_ID_RE.match(str(identifier)):
            raise ValueError(_("Invalid custom field identifier %(id)r.") % {"id": identifier})
        if isinstance(definition, CustomField):
            result[str(identifier)] = definition
            continue
        try:
            kind, choices = custom_field_type(definition)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if kind not in CUSTOM_FIELD_TYPES:
            raise ValueError(
                _("Custom field %(id)s has unknown type %(kind)r (expected one of %(kinds)s).")
                % {"id": identifier, "kind": kind, "kinds": ", ".join(CUSTOM_FIELD_TYPES)}
            )
        result[str(identifier)] = CustomField(kind, tuple(str(c) for c in choices))
    return result


def _answer_status(value: Mapping[str, Any] | None) -> dict[str, int]:
    result: dict[str, int] = {}
    for kind, code in (value or {}).items():
        if kind not in ANSWER_KINDS:
            raise ValueError(
                _("Unknown answer kind %(kind)r; known: %(kinds)s.")
                % {"kind": kind, "kinds": ", ".join(ANSWER_KINDS)}
            )
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code < 600:
            raise ValueError(_("An answer status must be a code from 400 to 599."))
        result[str(kind)] = code
    return result


def _identity_params(value: Mapping[str, str] | None) -> dict[str, str]:
    params = dict(DEFAULT_ACTION_IDENTITY_PARAMS)
    for name, wire in (value or {}).items():
        if name not in DEFAULT_ACTION_IDENTITY_PARAMS or not isinstance(wire, str) or not wire:
            raise ValueError(
                _("Unknown action identity parameter %(name)r (identity_type, email, hashcode).")
                % {"name": name}
            )
        params[name] = wire
    return params


def _extra_items(value: Mapping[str, Any] | None) -> dict[str, ExtraItem]:
    result: dict[str, ExtraItem] = {}
    for key, definition in (value or {}).items():
        if not _CUSTOM_ID_RE.match(str(key)) or key in STANDARD_FIELDS:
            raise ValueError(_("Invalid extra item key %(key)r.") % {"key": key})
        if isinstance(definition, ExtraItem):
            item = definition
        elif isinstance(definition, Mapping):
            item = ExtraItem(
                str(definition.get("type", "text")), definition.get("max_length") or None
            )
        else:
            item = ExtraItem(str(definition))
        if item.kind not in EXTRA_ITEM_TYPES:
            raise ValueError(
                _("Extra item %(key)s has unknown type %(kind)r (expected one of %(kinds)s).")
                % {"key": key, "kind": item.kind, "kinds": ", ".join(EXTRA_ITEM_TYPES)}
            )
        result[str(key)] = item
    return result


def _action_params(
    value: Mapping[str, str] | None, identity: Mapping[str, str] | None = None
) -> dict[str, str]:
    params = dict(DEFAULT_ACTION_PARAMS)
    for name, wire in (value or {}).items():
        if name not in DEFAULT_ACTION_PARAMS:
            raise ValueError(_("Unknown action parameter %(name)r.") % {"name": name})
        if not wire or not isinstance(wire, str):
            raise ValueError(
                _("Action parameter %(name)r needs a non-empty wire name.") % {"name": name}
            )
        params[name] = wire
    reserved = {*AUTH_FIELDS, *(identity or DEFAULT_ACTION_IDENTITY_PARAMS).values()}
    wires = list(params.values())
    if len(set(wires)) != len(wires) or reserved & set(wires):
        raise ValueError(
            _(
                "Action parameter names must be distinct and must not reuse "
                "the key or customer identity parameter names."
            )
        )
    return params


def _operations(value: Iterable[str]) -> frozenset[str]:
    ops = frozenset(value)
    unknown = ops - set(OPERATIONS)
    if unknown:
        raise ValueError(
            _("Unknown operation(s) %(ops)s; known: %(known)s.")
            % {"ops": ", ".join(sorted(unknown)), "known": ", ".join(OPERATIONS)}
        )
    return ops


def build_config(base: SandboxConfig | None = None, **changes: Any) -> SandboxConfig:
    """Return ``base`` with ``changes`` applied, every value checked (ValueError)."""
    names = {f.name for f in dataclasses.fields(SandboxConfig)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"unknown sandbox option(s): {', '.join(sorted(unknown))}")
    values = (
        {f.name: getattr(base, f.name) for f in dataclasses.fields(SandboxConfig)}
        if base is not None
        else {}
    )
    values.update(changes)
    keys = values.get("keys") or SandboxKeys()
    if isinstance(keys, Mapping):
        keys = SandboxKeys(**keys)
    if not isinstance(keys, SandboxKeys):
        raise ValueError(_("keys must be a SandboxKeys instance."))
    envelope = values.get("envelope", "body")
    if envelope not in ENVELOPES:
        raise ValueError(
            _("envelope must be one of %(choices)s.") % {"choices": ", ".join(ENVELOPES)}
        )
    separator = values.get("tag_separator", ",")
    if not isinstance(separator, str) or not separator:
        raise ValueError(_("tag_separator must be a non-empty string."))
    action_path = values.get("action_path", DEFAULT_ACTION_PATH)
    if (
        not isinstance(action_path, str)
        or not action_path.startswith("/")
        or action_path.startswith("/_sandbox")
    ):
        raise ValueError(
            _("action_path must be an absolute path such as %(path)s.")
            % {"path": DEFAULT_ACTION_PATH}
        )
    identity = _identity_params(values.get("action_identity_params"))
    date_format = values.get("action_date_format") or DEFAULT_ACTION_DATE_FORMAT
    if not isinstance(date_format, str) or "%" not in date_format:
        raise ValueError(_("action_date_format must be a strftime format."))
    processing = float(values.get("bulk_processing_seconds", 1.0))
    ttl = float(values.get("process_code_ttl", 3600.0))
    if processing < 0 or ttl < 0:
        raise ValueError(_("bulk_processing_seconds and process_code_ttl must not be negative."))
    return SandboxConfig(
        keys=keys,
        custom_fields=_custom_fields(values.get("custom_fields")),
        bulk_processing_seconds=processing,
        process_code_ttl=ttl,
        tag_separator=separator,
        action_path=action_path,
        action_params=_action_params(values.get("action_params"), identity),
        envelope=envelope,
        own_only=bool(values.get("own_only", False)),
        deny_operations=_operations(values.get("deny_operations") or ()),
        refused_columns=frozenset(values.get("refused_columns") or ()),
        answer_status=_answer_status(values.get("answer_status")),
        email_case_sensitive=bool(values.get("email_case_sensitive", False)),
        hashcode_identity=bool(values.get("hashcode_identity", True)),
        action_identity_params=identity,
        action_date_format=date_format,
        action_refuse_date=bool(values.get("action_refuse_date", False)),
        action_required_params={
            str(k): str(v) for k, v in dict(values.get("action_required_params") or {}).items()
        },
        extra_items=_extra_items(values.get("extra_items")),
    )
