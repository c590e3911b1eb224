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

from django_satori.conf import DEFAULT_ACTION_PARAMS, SatoriSettings
from django_satori.schema import CUSTOM_FIELD_TYPES, custom_field_type

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

_CUSTOM_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")


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


def _action_params(value: Mapping[str, str] | None) -> dict[str, str]:
    params = dict(DEFAULT_ACTION_PARAMS)
    for name, wire in (value or {}).items():
        if name not in DEFAULT_ACTION_PARAMS:
            raise ValueError(_("Unknown action parameter %(name)r.") % {"name": name})
        if not wire or not isinstance(wire, str):
            raise ValueError(
                _("Action parameter %(name)r needs a non-empty wire name.") % {"name": name}
            )
        params[name] = wire
    reserved = {*AUTH_FIELDS, "customer[identity_type]", "customer[email]", "customer[hashcode]"}
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
        action_params=_action_params(values.get("action_params")),
        envelope=envelope,
        own_only=bool(values.get("own_only", False)),
        deny_operations=_operations(values.get("deny_operations") or ()),
    )
