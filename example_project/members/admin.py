from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

import django_satori

from .forms import MemberAdminForm
from .models import Company, Member


@admin.register(Company)
class CompanyAdmin(admin.ModelAdmin):
    search_fields = ["name"]


@admin.register(Member)
class MemberAdmin(admin.ModelAdmin):
    form = MemberAdminForm
    list_display = [
        "email",
        "family_name",
        "given_name",
        "company",
        "plan",
        "newsletter",
        "is_active",
        "joined_on",
    ]
    list_filter = ["plan", "newsletter", "is_active"]
    search_fields = [
        "email",
        "family_name",
        "given_name",
        "family_name_kana",
        "given_name_kana",
        "company__name",
    ]
    autocomplete_fields = ["company"]
    actions = ["mark_for_sync"]

    # Sending changes what SATORI holds: not for staff who may only look.
    @admin.action(
        description=_("Send the selected members to SATORI again"), permissions=["change"]
    )
    def mark_for_sync(self, request: HttpRequest, queryset: QuerySet[Member]) -> None:
        count = django_satori.mark_for_sync(queryset)
        self.message_user(
            request,
            ngettext(
                "%(count)d member was marked for sync.",
                "%(count)d members were marked for sync.",
                count,
            )
            % {"count": count},
        )
