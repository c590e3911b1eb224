"""The customer form of the admin: tags and custom fields without typing JSON.

Tags are one text input of comma-separated names, turned into chips by
``static/django_satori/tags.js`` (no build step; without JavaScript the plain
text field works the same). Custom fields get one input each, of the type
declared in ``SATORI['CUSTOM_FIELDS']``. Both are checked with SATORI's rules
when the form is saved, so a bad value is refused here, not later by the worker.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from django import forms
from django.utils.text import capfirst
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .conf import get_settings
from .exceptions import SatoriValidationError
from .models import Customer
from .schema import CUSTOM_PREFIX, DATA_FIELDS, clean_customer, custom_field_type, extra_items

#: Form field name of a custom field: a prefix no model field has, then SATORI's identifier.
CUSTOM_FIELD_PREFIX = "satori_custom__"
#: A stored value whose field is not (or no longer) declared: shown so it can be cleared.
UNDECLARED_PREFIX = CUSTOM_FIELD_PREFIX + "undeclared__"
#: What separates tags while typing: ASCII and full-width commas (a Japanese IME gives the
#: latter). SATORI['TAG_SEPARATOR'] is what joins them on the wire, a different matter.
_TYPED_SEPARATORS = re.compile(r"[,\uff0c]")


def custom_form_name(identifier: str) -> str:
    return CUSTOM_FIELD_PREFIX + identifier


def is_declared(key: str) -> bool:
    """Whether a ``custom_fields`` key belongs to a field of ``SATORI['CUSTOM_FIELDS']``."""
    return key.startswith(CUSTOM_PREFIX) and key[len(CUSTOM_PREFIX) :] in (
        get_settings().CUSTOM_FIELDS
    )


class TagInput(forms.TextInput):
    """A text input of comma-separated tags, shown as chips when JavaScript runs."""

    class Media:
        js = ("django_satori/tags.js",)
        css = {"all": ("django_satori/admin.css",)}

    def __init__(self, attrs: dict[str, Any] | None = None) -> None:
        super().__init__({"class": "vTextField satori-tags", **(attrs or {})})

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, list | tuple):
            return ", ".join(str(tag) for tag in value)
        return super().format_value(value)

    def get_context(self, name: str, value: Any, attrs: dict[str, Any] | None) -> dict[str, Any]:
        context = super().get_context(name, value, attrs)
        context["widget"]["attrs"].update(
            {
                "data-remove-label": _("Remove tag %(tag)s"),
                "data-placeholder": _("Add a tag, then press Enter or comma"),
            }
        )
        return context


class TagsField(forms.Field):
    """A list of tag names from ``"VIP, 重要"``; refuses what SATORI could not take."""

    widget = TagInput

    def to_python(self, value: Any) -> list[str]:
        if isinstance(value, list | tuple):
            parts = [str(item) for item in value]
        else:
            parts = _TYPED_SEPARATORS.split(str(value or ""))
        tags: list[str] = []
        for part in parts:
            tag = part.strip(" \t\u3000")
            if tag and tag not in tags:
                tags.append(tag)
        return tags

    def validate(self, value: list[str]) -> None:
        super().validate(value)
        separator = get_settings().TAG_SEPARATOR
        errors = []
        for tag in value:
            if "\n" in tag or "\r" in tag:
                errors.append(
                    forms.ValidationError(
                        _("The tag “%(tag)s” contains a line break; tags are one line each."),
                        code="line_break",
                        params={"tag": tag.replace("\r", " ").replace("\n", " ")},
                    )
                )
            elif separator and separator in tag:
                errors.append(
                    forms.ValidationError(
                        _(
                            "The tag “%(tag)s” contains “%(sep)s”, which SATORI uses to "
                            "separate tags (SATORI['TAG_SEPARATOR']). Remove it or split the tag."
                        ),
                        code="separator",
                        params={"tag": tag, "sep": separator},
                    )
                )
            elif "\x00" in tag:
                errors.append(
                    forms.ValidationError(_("The value contains a NUL character."), code="nul")
                )
        if errors:
            raise forms.ValidationError(errors)

    def has_changed(self, initial: Any, data: Any) -> bool:
        return self.to_python(initial) != self.to_python(data)


def custom_form_field(identifier: str, definition: Any) -> forms.Field:
    """The form field for one declared SATORI custom field."""
    kind, choices = custom_field_type(definition)
    options: dict[str, Any] = {"required": False, "label": identifier}
    if kind == "integer":
        return forms.IntegerField(**options, widget=forms.NumberInput(attrs={"step": 1}))
    if kind == "date":
        return forms.DateField(
            **options,
            input_formats=["%Y-%m-%d", "%Y/%m/%d"],
            widget=forms.DateInput(attrs={"type": "date"}, format="%Y-%m-%d"),
            help_text=gettext_lazy("YYYY-MM-DD"),  # the picker sends this form
        )
    if kind == "select":
        return forms.ChoiceField(**options, choices=[("", "---------"), *((c, c) for c in choices)])
    return forms.CharField(**options, widget=forms.TextInput(attrs={"class": "vTextField"}))


class CustomerAdminForm(forms.ModelForm):
    """Customer form whose ``tags`` and ``custom_fields`` are edited as plain inputs."""

    tags = TagsField(
        label=capfirst(gettext_lazy("tags")),
        required=False,
        help_text=gettext_lazy("Separate tags with commas (or press Enter after each)."),
    )

    class Meta:
        model = Customer
        # custom_fields (JSON) is edited through one input per declared field instead.
        fields = ("email", *DATA_FIELDS, "tags")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stored = (
            self.instance.custom_fields if isinstance(self.instance.custom_fields, dict) else {}
        )
        for identifier, definition in get_settings().CUSTOM_FIELDS.items():
            name = custom_form_name(identifier)
            self.fields[name] = custom_form_field(identifier, definition)
            if self.instance.pk is not None:
                current = stored.get(CUSTOM_PREFIX + identifier)
                self.initial.setdefault(name, current)
                kind, choices = custom_field_type(definition)
                field = self.fields[name]
                if (
                    kind == "select"
                    and isinstance(field, forms.ChoiceField)
                    and current not in (None, "")
                    and str(current) not in choices
                ):
                    # Shown as it is, not as a blank that would drop it unnoticed;
                    # saving it is refused with SATORI's list of choices.
                    label = _("%(value)s (not one of the choices)") % {"value": current}
                    field.choices = [
                        ("", "---------"),
                        *((choice, choice) for choice in choices),
                        (current, label),
                    ]
        for key in extra_items():
            # EXTRA_STANDARD_ITEMS live in custom_fields too (Customer has no column for
            # them); an input each, through the same path as the stored leftovers below.
            name = UNDECLARED_PREFIX + key
            self.fields[name] = forms.CharField(
                required=False,
                label=key,
                help_text=_("A further standard item (SATORI['EXTRA_STANDARD_ITEMS'])."),
                widget=forms.TextInput(attrs={"class": "vTextField"}),
            )
            self.initial.setdefault(name, stored.get(key))
        for key, value in stored.items():
            if is_declared(key) or key in extra_items():
                continue
            # SATORI would refuse it on every push: offer it for clearing, with the reason.
            name = UNDECLARED_PREFIX + key
            self.fields[name] = forms.CharField(
                required=False,
                label=key,
                help_text=_(
                    "Not declared in SATORI['CUSTOM_FIELDS']: SATORI is never sent this value. "
                    "Clear it, or declare the field in the settings."
                ),
                widget=forms.TextInput(attrs={"class": "vTextField"}),
            )
            self.initial.setdefault(name, value)

    def undeclared_names(self) -> list[str]:
        """Form names of the inputs for stored values of undeclared fields."""
        return [name for name in self.fields if name.startswith(UNDECLARED_PREFIX)]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        definitions = get_settings().CUSTOM_FIELDS
        for identifier in definitions:
            name = custom_form_name(identifier)
            value = cleaned.get(name)
            if value in (None, ""):
                continue
            try:
                clean_customer(
                    {CUSTOM_PREFIX + identifier: _wire(value)},
                    custom_fields=definitions,
                    require_email=False,
                )
            except SatoriValidationError as exc:
                self.add_error(name, exc.message)
        # The inputs go back into the JSON field before the model's own clean() runs
        # (after this method), unless one of them was refused.
        if not any(name.startswith(CUSTOM_FIELD_PREFIX) for name in self.errors):
            self.instance.custom_fields = self.custom_values()
        return cleaned

    def custom_values(self) -> dict[str, Any]:
        """The stored ``custom_fields``: declared inputs replace theirs, the rest is kept."""
        stored = (
            self.instance.custom_fields if isinstance(self.instance.custom_fields, dict) else {}
        )
        definitions = get_settings().CUSTOM_FIELDS
        values = {
            key: value
            for key, value in stored.items()
            if not (key.startswith(CUSTOM_PREFIX) and key[len(CUSTOM_PREFIX) :] in definitions)
        }
        for identifier in definitions:
            value = self.cleaned_data.get(custom_form_name(identifier))
            if value not in (None, ""):
                values[CUSTOM_PREFIX + identifier] = _wire(value)
        for name in self.undeclared_names():
            key = name[len(UNDECLARED_PREFIX) :]
            value = self.cleaned_data.get(name)
            if value in (None, ""):
                values.pop(key, None)
            elif value != str(stored.get(key)):
                values[key] = value
        return values

    # Django's private hook for the model's errors, absent from django-stubs; overridden
    # because the model's check of the JSON names the JSON field, which has no input
    # here: its message goes on the input of the value it is about, else above the form.
    def _update_errors(self, errors: Any) -> None:
        if hasattr(errors, "error_dict") and "custom_fields" in errors.error_dict:
            messages = errors.error_dict.pop("custom_fields")
            for message in messages:
                text = " ".join(message.messages)
                names = [
                    name
                    for name in self.undeclared_names()
                    if text.startswith(name[len(UNDECLARED_PREFIX) :] + ":")
                ]
                self.add_error(names[0] if names else None, text)
        super()._update_errors(errors)  # type: ignore[misc]


def _wire(value: Any) -> Any:
    # JSON holds what SATORI is sent: dates as YYYY-MM-DD, numbers as numbers.
    if isinstance(value, dt.date):
        return value.isoformat()
    return value
