from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from django_satori.exceptions import SatoriValidationError
from django_satori.schema import normalize_email, refuse_unencodable

from .models import Member, Plan

DOCUMENTS = [
    ("overview", _("Service overview")),
    ("pricing", _("Price list")),
    ("cases", _("Customer case studies")),
]
#: The values are SATORI tag names (data, not UI text, so not translated).
INTERESTS = [
    ("セミナー", _("Seminars")),
    ("無料トライアル", _("Free trial")),
    ("個別相談", _("Consulting")),
]


class HalfWidthEmailField(forms.EmailField):
    """An e-mail field that takes what Japanese keyboards type.

    Django's EmailValidator refuses a full-width address (ｔａｒｏ＠ｅｘａｍｐｌｅ．ｊｐ)
    before ``clean_email`` could convert it, so the one check is
    ``normalize_email`` there: SATORI's rules, worded as SATORI's.
    """

    default_validators: list[Any] = []


def satori_email(value: str) -> str:
    """The address as SATORI gets it, or a form error saying why SATORI would refuse it.

    Django's EmailField accepts internationalised addresses (``user@bücher.de``);
    SATORI takes half-width (ASCII) ones only, and the member's save would then
    fail in the sync with a 500 instead of a message next to the field.
    """
    try:
        return normalize_email(value)
    except SatoriValidationError as exc:
        raise forms.ValidationError(exc.message) from None


def refuse_unencodable_values(form: forms.BaseForm) -> None:
    """Add a field error for any text holding NUL or a lone surrogate.

    Neither can be stored or sent to SATORI; a lone surrogate (what a JSON body's
    ``"\\ud800"`` decodes to) would otherwise fail later in the database driver
    with a UnicodeEncodeError that names no field.
    """
    for name, value in list(form.cleaned_data.items()):
        for text in value if isinstance(value, list | tuple) else (value,):
            if not isinstance(text, str):
                continue
            try:
                refuse_unencodable(text, name)
            except SatoriValidationError as exc:
                form.add_error(name, exc.message)
                break


class MemberAdminForm(forms.ModelForm):
    """The member admin's form: SATORI's refusals shown on the field, not as a 500."""

    class Meta:
        model = Member
        fields = [
            "email",
            "family_name",
            "given_name",
            "family_name_kana",
            "given_name_kana",
            "company",
            "department",
            "phone",
            "plan",
            "newsletter",
            "tags",
            "source",
            "joined_on",
            "is_active",
        ]

    def clean_email(self) -> str:
        return satori_email(self.cleaned_data["email"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        refuse_unencodable_values(self)
        return cleaned


class SignupForm(forms.Form):
    """The document request form (資料請求) of the example site."""

    document = forms.ChoiceField(
        label=_("Document"), choices=DOCUMENTS, widget=forms.RadioSelect, initial="overview"
    )
    family_name = forms.CharField(label=_("Family name"), max_length=100)
    given_name = forms.CharField(label=_("Given name"), max_length=100)
    family_name_kana = forms.CharField(
        label=_("Family name (kana)"), max_length=100, required=False
    )
    given_name_kana = forms.CharField(label=_("Given name (kana)"), max_length=100, required=False)
    email = HalfWidthEmailField(label=_("E-mail address"))
    company = forms.CharField(label=_("Company"), max_length=200, required=False)
    department = forms.CharField(label=_("Department"), max_length=100, required=False)
    phone = forms.CharField(label=_("Phone number"), max_length=30, required=False)
    plan = forms.ChoiceField(
        label=_("Plan you are interested in"), choices=Plan.choices, initial=Plan.FREE
    )
    interests = forms.MultipleChoiceField(
        label=_("Interested in"),
        choices=INTERESTS,
        required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    newsletter = forms.BooleanField(label=_("Send me the newsletter"), required=False, initial=True)

    def clean_email(self) -> str:
        # SATORI's own rules (half-width only, at most 255 characters), checked
        # here so the visitor sees the problem instead of a failed sync later.
        return satori_email(self.cleaned_data["email"])

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        refuse_unencodable_values(self)
        return cleaned

    def document_label(self) -> str:
        return str(dict(DOCUMENTS)[self.cleaned_data["document"]])

    def member_values(self) -> dict[str, Any]:
        data = self.cleaned_data
        return {
            "family_name": data["family_name"],
            "given_name": data["given_name"],
            "family_name_kana": data["family_name_kana"],
            "given_name_kana": data["given_name_kana"],
            "department": data["department"],
            "phone": data["phone"],
            "plan": data["plan"],
            "newsletter": data["newsletter"],
        }
