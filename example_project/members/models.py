"""The site's own data. ``Member`` is connected to SATORI through
``SATORI["MAPPINGS"]["members.Member"]`` in settings: saving a member updates
its SATORI customer in the same transaction; django-satori does the rest.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Company(models.Model):
    name = models.CharField(_("name"), max_length=200, unique=True)

    class Meta:
        verbose_name = _("company")
        verbose_name_plural = _("companies")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Plan(models.TextChoices):
    FREE = "free", _("Free")
    STANDARD = "standard", _("Standard")
    PREMIUM = "premium", _("Premium")


class Member(models.Model):
    email = models.EmailField(_("e-mail address"), unique=True)
    family_name = models.CharField(_("family name"), max_length=100)
    given_name = models.CharField(_("given name"), max_length=100)
    family_name_kana = models.CharField(_("family name (kana)"), max_length=100, blank=True)
    given_name_kana = models.CharField(_("given name (kana)"), max_length=100, blank=True)
    company = models.ForeignKey(
        Company,
        verbose_name=_("company"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="members",
    )
    department = models.CharField(_("department"), max_length=100, blank=True)
    phone = models.CharField(_("phone number"), max_length=30, blank=True)
    # No choices on purpose: old data holds retired plans, which SATORI's
    # select field refuses, so the admin shows why such a member failed.
    plan = models.CharField(_("plan"), max_length=20, default=Plan.FREE)
    newsletter = models.BooleanField(_("receives the newsletter"), default=False)
    #: Space-separated tag names, sent to SATORI as tags.
    tags = models.CharField(
        _("tags"), max_length=300, blank=True, help_text=_("Separate tags with spaces.")
    )
    #: Where the member came from: SATORI's collection route (情報獲得経路).
    source = models.CharField(_("source"), max_length=200, blank=True)
    joined_on = models.DateField(_("joined on"), default=timezone.localdate)
    is_active = models.BooleanField(
        _("active"),
        default=True,
        help_text=_("Withdrawn members are no longer synced, but stay in SATORI."),
    )

    class Meta:
        verbose_name = _("member")
        verbose_name_plural = _("members")
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.family_name} {self.given_name} <{self.email}>"

    @property
    def tag_list(self) -> list[str]:
        return self.tags.split()

    def satori_delivery_permission(self) -> str:
        return "approval" if self.newsletter else "reject"
