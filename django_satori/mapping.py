"""Connecting a project's own model (a Member, an Order's buyer, the User) to Customer.

Declared in settings, one entry per model::

    SATORI = {
        "MAPPINGS": {
            "members.Member": {
                "email": "email",                      # required
                "fields": {                            # SATORI key -> attribute path
                    "last_name": "family_name",
                    "lead_company_name": "company.name",
                    "custom:plan": "plan",
                },
                "tags": "tag_names",                   # optional, an iterable of names
                "condition": "is_active",              # optional, sync only when truthy
                "on_delete": "delete",                 # or "stop" (keep it in SATORI)
            }
        }
    }

A value is a dotted attribute path (callables at the end are called) or a
Python callable taking the instance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.apps import apps
from django.core.signals import setting_changed
from django.db import models
from django.dispatch import receiver

from .conf import SatoriSettings, get_settings
from .schema import CUSTOM_PREFIX, STANDARD_FIELDS

Getter = Callable[[Any], Any]
ON_DELETE_CHOICES = ("delete", "stop")
_NOT_MAPPABLE = {"email", "hashcode", "append_tags", "delete_tags"}
_ALLOWED_KEYS = {"email", "fields", "tags", "condition", "on_delete"}


class MappingError(Exception):
    """A MAPPINGS entry is wrong; the message names the model and the key."""


def _getter(spec: Any, where: str) -> Getter:
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise MappingError(f"{where} must be an attribute path or a callable, not {spec!r}.")
    parts = spec.split(".")

    def get(instance: Any) -> Any:
        value = instance
        for part in parts:
            if value is None:
                return None
            value = getattr(value, part)
        return value() if callable(value) and not isinstance(value, models.Manager) else value

    return get


@dataclass(frozen=True)
class ModelMapping:
    model: type[models.Model]
    label: str
    email: Getter
    fields: Mapping[str, Getter]
    tags: Getter | None
    condition: Getter | None
    on_delete: str

    def wants_sync(self, instance: Any) -> bool:
        return bool(self.condition(instance)) if self.condition else True

    def customer_values(self, instance: Any) -> dict[str, Any]:
        """Customer model field values for ``instance`` (email included)."""
        values: dict[str, Any] = {"email": self.email(instance)}
        custom: dict[str, Any] = {}
        for key, get in self.fields.items():
            value = get(instance)
            if key.startswith(CUSTOM_PREFIX) or key not in STANDARD_FIELDS:
                # Custom fields and EXTRA_STANDARD_ITEMS: Customer has no column for
                # them, so they travel in its custom_fields, under their wire key.
                if value not in (None, ""):
                    custom[key] = value
            else:
                values[key] = "" if value is None and key != "collection_date" else value
        values["custom_fields"] = custom
        if self.tags is not None:
            values["tags"] = sorted({str(t) for t in (self.tags(instance) or ()) if str(t)})
        return values


def load_mappings(
    conf: SatoriSettings | None = None, errors: list[str] | None = None
) -> dict[type[models.Model], ModelMapping]:
    """The valid entries of ``SATORI['MAPPINGS']``, by model.

    Every mistake is found, not only the first: with ``errors`` given, each one is
    appended there and its entry left out; without, they are raised together as
    one :class:`MappingError`.
    """
    conf = conf or get_settings()
    found: list[str] = []
    result: dict[type[models.Model], ModelMapping] = {}
    for label, entry in conf.MAPPINGS.items():
        try:
            mapping = _load_entry(label, entry, conf, found)
        except MappingError as exc:
            found.append(str(exc))
            continue
        if mapping is not None:
            result[mapping.model] = mapping
    if errors is not None:
        errors.extend(found)
    elif found:
        raise MappingError("\n".join(found))
    return result


def _load_entry(
    label: str, entry: Any, conf: SatoriSettings, found: list[str]
) -> ModelMapping | None:
    """One entry; problems with its keys go to ``found`` (None then), a wrong model or
    shape is raised."""
    where = f"SATORI['MAPPINGS'][{label!r}]"
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        raise MappingError(f"{where}: no installed model {label!r}.") from None
    if not isinstance(entry, Mapping):
        raise MappingError(f"{where} must be a dict.")
    before = len(found)
    unknown = set(entry) - _ALLOWED_KEYS
    if unknown:
        found.append(f"{where}: unknown key(s) {', '.join(sorted(unknown))}.")
    if "email" not in entry:
        found.append(f"{where}: 'email' is required.")

    def getter(spec: Any, at: str) -> Getter | None:
        try:
            return _getter(spec, at)
        except MappingError as exc:
            found.append(str(exc))
            return None

    fields: dict[str, Getter] = {}
    for key, spec in (entry.get("fields") or {}).items():
        extra = conf.EXTRA_STANDARD_ITEMS if isinstance(conf.EXTRA_STANDARD_ITEMS, Mapping) else {}
        if key in _NOT_MAPPABLE or not (
            key in STANDARD_FIELDS or key.startswith(CUSTOM_PREFIX) or key in extra
        ):
            found.append(f"{where}['fields']: {key!r} is not a SATORI customer item.")
            continue
        if key.startswith(CUSTOM_PREFIX) and key[len(CUSTOM_PREFIX) :] not in conf.CUSTOM_FIELDS:
            found.append(f"{where}['fields']: {key!r} is not declared in SATORI['CUSTOM_FIELDS'].")
            continue
        get = getter(spec, f"{where}['fields'][{key!r}]")
        if get is not None:
            fields[key] = get
    on_delete = entry.get("on_delete", "delete")
    if on_delete not in ON_DELETE_CHOICES:
        found.append(f"{where}['on_delete'] must be 'delete' or 'stop'.")
    email = getter(entry["email"], f"{where}['email']") if "email" in entry else None
    tags = getter(entry["tags"], f"{where}['tags']") if entry.get("tags") else None
    condition = (
        getter(entry["condition"], f"{where}['condition']") if entry.get("condition") else None
    )
    if len(found) > before or email is None:
        return None
    return ModelMapping(
        model=model,
        label=model._meta.label_lower,
        email=email,
        fields=fields,
        tags=tags,
        condition=condition,
        on_delete=on_delete,
    )


def mapping_errors(conf: SatoriSettings | None = None) -> list[str]:
    """Every mistake in ``SATORI['MAPPINGS']`` (system check E005)."""
    errors: list[str] = []
    load_mappings(conf, errors)
    return errors


@lru_cache(maxsize=1)
def get_mappings() -> dict[type[models.Model], ModelMapping]:
    """The valid connected models (a mistaken entry is left out: check E005 names it)."""
    return load_mappings(errors=[])


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "SATORI":
        get_mappings.cache_clear()
