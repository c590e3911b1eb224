"""The admin page SATORI接続診断: the last diagnosis, and a button to run it again.

Only for users with ``django_satori.run_diagnosis``. Running it is a POST (with
Django's CSRF check): the offline checks and the live probe, which changes
nothing in SATORI. The write test is left to ``manage.py satori_doctor
--write-test``, where the person running it chooses the address.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.translation import gettext as _

from . import doctor
from .models import Customer, Diagnosis

RUN_PERMISSION = "django_satori.run_diagnosis"
LEVEL_LABELS = {
    doctor.OK: "ok",
    doctor.WARN: "wait",
    doctor.FAIL: "bad",
    doctor.SKIP: "off",
}


def diagnosis_urls(admin_site: admin.AdminSite) -> list[URLPattern]:
    """The page's URL pattern, wrapped by ``admin_site.admin_view`` (staff, CSRF)."""

    def view(request: HttpRequest) -> HttpResponse:
        return diagnosis_view(admin_site, request)

    return [path("diagnosis/", admin_site.admin_view(view), name="django_satori_diagnosis")]


def diagnosis_view(admin_site: admin.AdminSite, request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(RUN_PERMISSION):
        raise PermissionDenied
    if request.method == "POST":
        report = doctor.diagnose(live=True, ping_timeout=1.0)
        report.save(user=request.user, source="admin")
        if report.ok:
            messages.success(request, _("Everything sync needs works."))
        else:
            messages.error(request, _("Some checks failed: see below for the fixes."))
        return HttpResponseRedirect(reverse("admin:django_satori_diagnosis"))
    last = Diagnosis.objects.select_related("started_by").first()
    context: dict[str, Any] = {
        **admin_site.each_context(request),
        "title": _("SATORI connection diagnosis"),
        "opts": Customer._meta,
        "app_label": Customer._meta.app_label,
        "diagnosis": last,
        "checks": _rows(last) if last is not None else [],
        "snippet": doctor.snippet(last.suggested or {}) if last is not None else "",
        "source": _("the admin")
        if last is not None and last.source == "admin"
        else _("the command"),
    }
    return TemplateResponse(request, "admin/django_satori/diagnosis.html", context)


def _rows(diagnosis: Diagnosis) -> list[dict[str, Any]]:
    labels = {
        doctor.OK: _("OK"),
        doctor.WARN: _("Warning"),
        doctor.FAIL: _("Failed"),
        doctor.SKIP: _("Skipped"),
    }
    report = doctor.Report.from_diagnosis(diagnosis)
    return [
        {
            "id": check.id,
            "level": check.level,
            "badge": LEVEL_LABELS.get(check.level, "off"),
            "label": labels.get(check.level, check.level),
            "message": doctor.render(check.message),
            "fix": doctor.render(check.fix) if check.level != doctor.OK else "",
            "details": check.details,
        }
        for check in report.checks
    ]
