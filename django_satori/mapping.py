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
            if key.startswith(CUSTOM_PREFIX):
                if value not in (None, ""):
                    custom[key] = value
            else:
                values[key] = "" if value is None and key != "collection_date" else value
        values["custom_fields"] = custom
        if self.tags is not None:
            values["tags"] = sorted({str(t) for t in (self.tags(instance) or ()) if str(t)})
        return values


def load_mappings(conf: SatoriSettings | None = None) -> dict[type[models.Model], ModelMapping]:
    conf = conf or get_settings()
    result: dict[type[models.Model], ModelMapping] = {}
    for label, entry in conf.MAPPINGS.items():
        where = f"SATORI['MAPPINGS'][{label!r}]"
        try:
            model = apps.get_model(label)
        except (LookupError, ValueError):
            raise MappingError(f"{where}: no installed model {label!r}.") from None
        if not isinstance(entry, Mapping):
            raise MappingError(f"{where} must be a dict.")
        unknown = set(entry) - _ALLOWED_KEYS
        if unknown:
            raise MappingError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}.")
        if "email" not in entry:
            raise MappingError(f"{where}: 'email' is required.")
        fields: dict[str, Getter] = {}
        for key, spec in (entry.get("fields") or {}).items():
            if key in _NOT_MAPPABLE or not (
                key in STANDARD_FIELDS or key.startswith(CUSTOM_PREFIX)
            ):
                raise MappingError(f"{where}['fields']: {key!r} is not a SATORI customer item.")
            if (
                key.startswith(CUSTOM_PREFIX)
                and key[len(CUSTOM_PREFIX) :] not in conf.CUSTOM_FIELDS
            ):
                raise MappingError(
                    f"{where}['fields']: {key!r} is not declared in SATORI['CUSTOM_FIELDS']."
                )
            fields[key] = _getter(spec, f"{where}['fields'][{key!r}]")
        on_delete = entry.get("on_delete", "delete")
        if on_delete not in ON_DELETE_CHOICES:
            raise MappingError(f"{where}['on_delete'] must be 'delete' or 'stop'.")
        result[model] = ModelMapping(
            model=model,
            label=model._meta.label_lower,
            email=_getter(entry["email"], f"{where}['email']"),
            fields=fields,
            tags=_getter(entry["tags"], f"{where}['tags']") if entry.get("tags") else None,
            condition=(
                _getter(entry["condition"], f"{where}['condition']")
                if entry.get("condition")
                else None
            ),
            on_delete=on_delete,
        )
    return result


@lru_cache(maxsize=1)
def get_mappings() -> dict[type[models.Model], ModelMapping]:
    return load_mappings()


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs: Any) -> None:
    if setting == "SATORI":
        get_mappings.cache_clear()
