"""The admin: customers with their sync state, bulk jobs, and the read-only history.

Actions never loop over a selection in the request: "all N matching" with a
million customers is one UPDATE (Mark for sync) or a bulk job that stores the
selection as a query (the bulk actions), so the page comes back at once.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.http.response import HttpResponseBase
from django.shortcuts import get_object_or_404
from django.template.defaultfilters import truncatechars
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.timezone import localtime
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext, pgettext_lazy

from . import bulk, bulk_files, sync
from .admin_dashboard import dashboard_context
from .admin_doctor import RUN_PERMISSION, diagnosis_urls
from .admin_forms import (
    CUSTOM_FIELD_PREFIX,
    UNDECLARED_PREFIX,
    CustomerAdminForm,
    custom_form_name,
    is_declared,
)
from .admin_import import IMPORT_PERMS, import_urls
from .admin_status import RetryInfo, error_origin, job_progress, part_stage, retry_info
from .conf import get_settings
from .models import (
    BulkJob,
    BulkMode,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    CustomerAction,
    ImportRun,
    SourceChange,
    SyncLog,
    SyncState,
    SyncStatus,
)
from .redaction import scrub_data, secret_needles

SYNC_PERMISSION = "django_satori.sync_customer"
BULK_PERMISSION = "django_satori.bulk_customer"
CSS = {"all": ("django_satori/admin.css",)}
#: Lists: fold Django's navigation sidebar on narrow screens (static/django_satori/fit.js).
LIST_JS = ("django_satori/fit.js",)
#: Entries of each history shown on a customer's page.
RECENT = 20
#: Row errors listed on a bulk job's page (the rest: the row error list, filtered).
ROW_ERRORS_SHOWN = 200

_BADGE_CLASS: dict[str, str] = {
    SyncStatus.SYNCED: "ok",
    SyncStatus.PENDING: "wait",
    SyncStatus.SENDING: "busy",
    SyncStatus.IN_BULK: "busy",
    SyncStatus.FAILED: "bad",
    SyncStatus.DELETED: "off",
    SyncStatus.DRY_RUN: "off",
    SyncStatus.NOT_IN_SATORI: "off",
    SyncStatus.STOPPED: "off",
    BulkState.CREATED: "wait",
    BulkState.EXPORTING: "busy",
    BulkState.UPLOADING: "busy",
    BulkState.PROCESSING: "busy",
    BulkState.FINISHED: "ok",
    BulkState.CANCELLED: "off",
}


#: SyncLog outcomes drawn with the sync status colours.
_LOG_BADGE: dict[str, str] = {
    SyncLog.Outcome.OK: SyncStatus.SYNCED,
    SyncLog.Outcome.RETRY: SyncStatus.PENDING,
    SyncLog.Outcome.FAILED: SyncStatus.FAILED,
}


def badge(value: str, label: Any) -> str:
    kind = "bad" if value == BulkState.FAILED else _BADGE_CLASS.get(value, "off")
    return format_html('<span class="satori-badge satori-{}">{}</span>', kind, label)


def safe_summary(data: Any) -> str:
    """A stored request/response summary as indented JSON, key values removed once more."""
    cleaned = scrub_data(data or {}, secret_needles())
    return json.dumps(cleaned, ensure_ascii=False, indent=2, sort_keys=True)


# --------------------------------------------------------------------------
# Customers
# --------------------------------------------------------------------------


class SyncStatusFilter(admin.SimpleListFilter):
    title = gettext_lazy("sync status")
    parameter_name = "sync_status"
    NONE = "none"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [*SyncStatus.choices, (self.NONE, gettext_lazy("Never marked for sync"))]

    def queryset(self, request: HttpRequest, queryset: models.QuerySet[Any]) -> Any:
        value = self.value()
        if value == self.NONE:
            return queryset.filter(sync_state__isnull=True)
        if value in SyncStatus.values:
            return queryset.filter(sync_state__status=value)
        return queryset


class LastErrorFilter(admin.SimpleListFilter):
    """``?last_error=<text>``: the dashboard's link from a failure reason to its customers.

    Its one choice is the text asked for, so the sidebar shows it only while it is in
    use (Django leaves out, and does not apply, a filter with no choices).
    """

    title = gettext_lazy("last error")
    parameter_name = "last_error"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        value = self.value()
        return [(value, truncatechars(value, 60))] if value else []

    def queryset(self, request: HttpRequest, queryset: models.QuerySet[Any]) -> Any:
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(sync_state__last_error=value)


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    # What an operator scans first comes first; long values are cut to the column with
    # the whole text on hover (admin.css, cut()), so no column wraps a letter per line.
    list_display = (
        "sync_status",
        "email_cell",
        "name",
        "company",
        "last_error",
        "last_synced",
    )
    list_display_links = ("email_cell",)
    list_filter = (SyncStatusFilter, "delivery_permission", "created_at", LastErrorFilter)
    search_fields = (
        "email",
        "last_name",
        "first_name",
        "last_name_reading",
        "first_name_reading",
        "lead_company_name",
    )
    list_select_related = ("sync_state",)
    list_per_page = 100
    date_hierarchy = None
    # The sync state is shown under the form (change_form.html), with its history.
    readonly_fields = ("source_model", "source_pk", "created_at", "updated_at")
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "email",
                    ("last_name", "first_name"),
                    ("last_name_reading", "first_name_reading"),
                    ("lead_company_name", "department"),
                    ("phone_number", "mobile_phone_number"),
                    "address",
                    "memo",
                )
            },
        ),
        (
            gettext_lazy("SATORI items"),
            {
                "fields": (
                    ("collection_route", "collection_date"),
                    "delivery_permission",
                    "tags",
                    # One input per SATORI['CUSTOM_FIELDS'] entry: see get_fieldsets().
                    "custom_fields",
                )
            },
        ),
        (
            gettext_lazy("Connected object"),
            {"fields": (("source_model", "source_pk"), ("created_at", "updated_at"))},
        ),
    )
    actions = ("sync_now", "bulk_upsert", "bulk_register", "retry_failed", "mark_for_sync")
    change_form_template = "admin/django_satori/customer/change_form.html"
    change_list_template = "admin/django_satori/customer/change_list.html"
    form = CustomerAdminForm

    class Media:
        css = CSS
        js = LIST_JS

    # -- the form: tags and custom fields as inputs (admin_forms) ------------------

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        names = tuple(custom_form_name(i) for i in get_settings().CUSTOM_FIELDS)
        stored = getattr(obj, "custom_fields", None)
        if isinstance(stored, dict):
            names += tuple(UNDECLARED_PREFIX + key for key in stored if not is_declared(key))
        return [
            (title, {**options, "fields": _replace_custom(options["fields"], names)})
            for title, options in super().get_fieldsets(request, obj)
        ]

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        # The custom inputs are added by the form itself; the model form factory would
        # refuse their names as unknown model fields.
        fields = kwargs.get("fields")
        if fields is None:
            fields = flatten_fieldsets(self.get_fieldsets(request, obj))
        kwargs["fields"] = [name for name in fields if not name.startswith(CUSTOM_FIELD_PREFIX)]
        return super().get_form(request, obj, change, **kwargs)

    # -- columns ----------------------------------------------------------------

    @staticmethod
    def _state(obj: Customer) -> SyncState | None:
        try:
            return obj.sync_state
        except SyncState.DoesNotExist:
            return None

    @admin.display(description=gettext_lazy("e-mail address"), ordering="email")
    def email_cell(self, obj: Customer) -> str:
        return cut(obj.email, "satori-cut-email")

    @admin.display(description=pgettext_lazy("satori item", "name"), ordering="last_name")
    def name(self, obj: Customer) -> str:
        return cut(" ".join(part for part in (obj.last_name, obj.first_name) if part))

    @admin.display(
        description=pgettext_lazy("satori item", "company"), ordering="lead_company_name"
    )
    def company(self, obj: Customer) -> str:
        return cut(obj.lead_company_name)

    @admin.display(description=gettext_lazy("sync status"), ordering="sync_state__status")
    def sync_status(self, obj: Customer) -> str:
        state = self._state(obj)
        if state is None:
            return badge("none", _("Never marked for sync"))
        shown = badge(state.status, state.get_status_display())
        retry = retry_info(state, get_settings().MAX_ATTEMPTS)
        if retry is not None:
            shown = format_html(
                '{} <span class="satori-retry" title="{}">{}</span>',
                shown,
                retry_text(retry),
                f"{retry.attempts}/{retry.limit}",
            )
        return shown

    @admin.display(description=gettext_lazy("last error"))
    def last_error(self, obj: Customer) -> str:
        state = self._state(obj)
        return cut(state.last_error, "satori-cut-error") if state and state.last_error else ""

    @admin.display(description=gettext_lazy("last synced"), ordering="sync_state__last_synced_at")
    def last_synced(self, obj: Customer) -> Any:
        state = self._state(obj)
        if not state or not state.last_synced_at:
            return "-"
        # The short form (2026/12/08 9:30) keeps the column narrow; the long one on hover.
        when = localtime(state.last_synced_at)
        return format_html(
            '<span title="{}">{}</span>',
            date_format(when, "DATETIME_FORMAT"),
            date_format(when, "SHORT_DATETIME_FORMAT"),
        )

    # -- importing SATORI's admin export (django_satori.admin_import) ---------------

    def get_urls(self) -> list[Any]:
        dashboard = path(
            "dashboard/",
            self.admin_site.admin_view(self.dashboard_view),
            name="django_satori_dashboard",
        )
        return [
            dashboard,
            *diagnosis_urls(self.admin_site),
            *import_urls(self.admin_site),
            *super().get_urls(),
        ]

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            **dashboard_context(),
            "satori_can_diagnose": request.user.has_perm(RUN_PERMISSION),
            "title": _("SATORI sync dashboard"),
            "opts": self.model._meta,
            "app_label": self.model._meta.app_label,
        }
        return TemplateResponse(request, "admin/django_satori/dashboard.html", context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {"satori_can_import": request.user.has_perms(IMPORT_PERMS), **(extra_context or {})}
        return super().changelist_view(request, extra)

    # -- the detail page: history next to the form -------------------------------

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = dict(extra_context or {})
        customer = self.get_object(request, object_id)
        if customer is not None:
            emails = {customer.email}
            state = self._state(customer)
            if state is not None and state.previous_email:
                emails.add(state.previous_email)
            extra.update(
                satori_state=state,
                satori_origin=error_origin(state),
                satori_retry=retry_info(state, get_settings().MAX_ATTEMPTS),
                satori_max_attempts=get_settings().MAX_ATTEMPTS,
                satori_logs=[
                    (
                        entry,
                        safe_summary(entry.request_summary),
                        safe_summary(entry.response_summary),
                    )
                    for entry in SyncLog.objects.filter(email__in=emails)[:RECENT]
                ],
                satori_actions=CustomerAction.objects.filter(customer=customer)[:RECENT],
                satori_row_errors=BulkRowError.objects.filter(customer=customer)
                .select_related("job", "part")
                .order_by("-id")[:RECENT],
            )
        return super().change_view(request, object_id, form_url, extra)

    # -- permissions ----------------------------------------------------------------

    def has_sync_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(SYNC_PERMISSION)

    def has_bulk_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(BULK_PERMISSION)

    # -- actions --------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Sync now"), permissions=["sync"])
    def sync_now(self, request: HttpRequest, queryset: models.QuerySet[Customer]) -> None:
        limit = get_settings().BULK_THRESHOLD
        # Bounded by the threshold, so counting is cheap compared with what follows.
        if queryset[: limit + 1].count() > limit:
            self.message_user(
                request,
                ngettext(
                    "More than %(limit)d customer selected: too many to send one by one. Use "
                    '"Bulk upsert via CSV", or "Mark for sync" to let the sweep send them.',
                    "More than %(limit)d customers selected: too many to send one by one. Use "
                    '"Bulk upsert via CSV", or "Mark for sync" to let the sweep send them.',
                    limit,
                )
                % {"limit": limit},
                messages.WARNING,
            )
            return
        count = sync.mark_for_sync(queryset)
        self.message_user(
            request,
            ngettext(
                "%(count)d customer is being sent to SATORI.",
                "%(count)d customers are being sent to SATORI.",
                count,
            )
            % {"count": count},
            messages.SUCCESS,
        )

    @admin.action(description=gettext_lazy("Mark for sync"), permissions=["sync"])
    def mark_for_sync(self, request: HttpRequest, queryset: models.QuerySet[Customer]) -> None:
        count = sync.mark_for_sync(queryset)
        self.message_user(
            request,
            ngettext(
                "%(count)d customer marked for sync; it is sent shortly.",
                "%(count)d customers marked for sync; large selections go through a bulk job.",
                count,
            )
            % {"count": count},
            messages.SUCCESS,
        )

    @admin.action(description=gettext_lazy("Retry failed"), permissions=["sync"])
    def retry_failed(self, request: HttpRequest, queryset: models.QuerySet[Customer]) -> None:
        count = sync.mark_for_sync(queryset.filter(sync_state__status=SyncStatus.FAILED))
        if count:
            self.message_user(
                request,
                ngettext(
                    "%(count)d failed customer will be sent again.",
                    "%(count)d failed customers will be sent again.",
                    count,
                )
                % {"count": count},
                messages.SUCCESS,
            )
        else:
            self.message_user(
                request, _("None of the selected customers had failed."), messages.INFO
            )

    @admin.action(description=gettext_lazy("Bulk upsert via CSV"), permissions=["bulk"])
    def bulk_upsert(self, request: HttpRequest, queryset: models.QuerySet[Customer]) -> None:
        self._start_bulk(request, queryset, BulkMode.UPSERT)

    @admin.action(description=gettext_lazy("Bulk register via CSV"), permissions=["bulk"])
    def bulk_register(self, request: HttpRequest, queryset: models.QuerySet[Customer]) -> None:
        self._start_bulk(request, queryset, BulkMode.REGISTRATION)

    def _start_bulk(
        self, request: HttpRequest, queryset: models.QuerySet[Customer], mode: str
    ) -> None:
        filters = request.GET.urlencode()
        across = request.POST.get("select_across") == "1"
        if across:
            description = _("Admin: all matching %(filters)s") % {
                "filters": filters or _("(no filter)")
            }
        else:
            description = _("Admin: %(n)d selected") % {
                "n": len(request.POST.getlist(helpers.ACTION_CHECKBOX_NAME))
            }
        with transaction.atomic():
            job = bulk.start_bulk_job(
                queryset, mode=mode, user=request.user, description=description
            )
        url = reverse("admin:django_satori_bulkjob_change", args=[job.pk])
        self.message_user(
            request,
            format_html(
                '{} <a href="{}">{}</a>',
                _("Bulk job #%(id)s started: the CSV is written and uploaded in the background.")
                % {"id": job.pk},
                url,
                _("Follow its progress"),
            ),
            messages.SUCCESS,
        )


# --------------------------------------------------------------------------
# Bulk jobs
# --------------------------------------------------------------------------


class ReadOnlyMixin:
    """History and machinery: visible, never edited by hand."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return bool(request.user.is_superuser)


@admin.register(BulkJob)
class BulkJobAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "state_badge",
        "progress",
        "stage",
        "mode_cell",
        "short_description",
        "created_at",
        "started_by",
    )
    list_filter = ("state", "mode", "automatic", "dry_run")
    search_fields = ("description",)
    list_select_related = ("started_by",)
    list_per_page = 50
    change_form_template = "admin/django_satori/bulkjob/change_form.html"
    fields = (
        "mode",
        "state",
        "description",
        "automatic",
        "dry_run",
        "started_by",
        "created_at",
        "started_at",
        "finished_at",
        "last_polled_at",
        "error",
    )

    class Media:
        css = CSS
        js = LIST_JS

    @admin.display(description=gettext_lazy("state"), ordering="state")
    def state_badge(self, obj: BulkJob) -> str:
        return badge(obj.state, obj.get_state_display())

    def get_queryset(self, request: HttpRequest) -> models.QuerySet[BulkJob]:
        # The stage column reads each job's parts: one query for the page, not one per job.
        return super().get_queryset(request).prefetch_related("parts")

    @admin.display(description=gettext_lazy("progress"))
    def progress(self, obj: BulkJob) -> str:
        return render_to_string(
            "django_satori/job_progress_cell.html",
            {"progress": job_progress(obj, list(obj.parts.all()))},
        )

    @admin.display(description=gettext_lazy("stage"))
    def stage(self, obj: BulkJob) -> str:
        return cut(job_progress(obj, list(obj.parts.all())).stage, "satori-cut-stage")

    @admin.display(description=gettext_lazy("mode"), ordering="mode")
    def mode_cell(self, obj: BulkJob) -> str:
        return cut(obj.get_mode_display())

    @admin.display(description=gettext_lazy("selection"), ordering="description")
    def short_description(self, obj: BulkJob) -> str:
        return cut(obj.description)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A running job holds customers (SyncState.bulk_part): only ended ones go.
        if obj is not None and obj.state not in bulk.TERMINAL_STATES:
            return False
        return super().has_delete_permission(request, obj)

    def delete_model(self, request: HttpRequest, obj: BulkJob) -> None:
        delete_job_files(obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: models.QuerySet[BulkJob]) -> None:
        queryset = queryset.filter(state__in=bulk.TERMINAL_STATES)
        for job in queryset:
            delete_job_files(job)
        super().delete_queryset(request, queryset)

    def get_urls(self) -> list[Any]:
        wrap = self.admin_site.admin_view
        return [
            path(
                "<int:job_id>/refresh/",
                wrap(self.refresh_view),
                name="django_satori_bulkjob_refresh",
            ),
            path(
                "<int:job_id>/cancel/", wrap(self.cancel_view), name="django_satori_bulkjob_cancel"
            ),
            path(
                "<int:job_id>/held/<str:decision>/",
                wrap(self.held_view),
                name="django_satori_bulkjob_held",
            ),
            path("part/<int:part_id>/csv/", wrap(self.csv_view), name="django_satori_bulkpart_csv"),
            *super().get_urls(),
        ]

    def _job_or_404(self, request: HttpRequest, job_id: int) -> BulkJob:
        job = get_object_or_404(BulkJob, pk=job_id)
        if not self.has_view_permission(request, job):
            raise PermissionDenied
        return job

    def refresh_view(self, request: HttpRequest, job_id: int) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(status=405)
        job = self._job_or_404(request, job_id)
        if not request.user.has_perm(BULK_PERMISSION):
            raise PermissionDenied
        asked = bulk.refresh_job(job)
        self.message_user(
            request,
            ngettext("Asked SATORI about %(n)d part.", "Asked SATORI about %(n)d parts.", asked)
            % {"n": asked},
            messages.INFO,
        )
        return HttpResponseRedirect(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))

    def cancel_view(self, request: HttpRequest, job_id: int) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(status=405)
        job = self._job_or_404(request, job_id)
        if not request.user.has_perm(BULK_PERMISSION):
            raise PermissionDenied
        result = bulk.cancel_job(job)
        self.message_user(
            request,
            result.message(),
            messages.WARNING if result.uploaded_parts else messages.SUCCESS,
        )
        return HttpResponseRedirect(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))

    def held_view(self, request: HttpRequest, job_id: int, decision: str) -> HttpResponse:
        """A person's decision on parts whose upload's answer was lost (BULK_RESEND_UNANSWERED
        "never"): upload them again, or give them up (their customers go back)."""
        if request.method != "POST" or decision not in ("resend", "give-up"):
            return HttpResponse(status=405)
        job = self._job_or_404(request, job_id)
        if not request.user.has_perm(BULK_PERMISSION):
            raise PermissionDenied
        if decision == "resend":
            n = bulk.resend_held(job)
            text = ngettext(
                "%(n)d part is being uploaded again.", "%(n)d parts are being uploaded again.", n
            )
        else:
            n = bulk.give_up_held(job)
            text = ngettext(
                "%(n)d part was given up; its customers will be sent again.",
                "%(n)d parts were given up; their customers will be sent again.",
                n,
            )
        self.message_user(request, text % {"n": n}, messages.INFO)
        return HttpResponseRedirect(reverse("admin:django_satori_bulkjob_change", args=[job.pk]))

    def csv_view(self, request: HttpRequest, part_id: int) -> HttpResponseBase:
        """The part's CSV holds personal data: served only to staff allowed to run bulk jobs.

        This view is the only way to the file (its storage has no URL). Cells a
        spreadsheet would run as formulas are neutralised here, for people only:
        the stored file, which is what SATORI gets, keeps the values as they are.
        """
        part = get_object_or_404(BulkPart.objects.select_related("job"), pk=part_id)
        if not (
            self.has_view_permission(request, part.job) and request.user.has_perm(BULK_PERMISSION)
        ):
            raise PermissionDenied
        if not part.csv_file.name:
            raise Http404(_("This part has no CSV file (deleted after the retention period)."))
        try:
            stream = bulk_files.people_csv(part.csv_file.name)
        except OSError:
            raise Http404(_("The CSV file is no longer in storage.")) from None
        response = StreamingHttpResponse(stream, content_type="text/csv; charset=utf-8")
        filename = f"satori-bulk-{part.job_id}-{part.number}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        response["Cache-Control"] = "private, no-store"
        response["X-Content-Type-Options"] = "nosniff"
        return response

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = dict(extra_context or {})
        job = self.get_object(request, object_id)
        if job is not None:
            errors = job.row_errors.select_related("part").order_by(
                "part__number", "row_number", "id"
            )
            parts = list(job.parts.all())
            extra.update(
                job=job,
                parts=[(part, part_stage(part)) for part in parts],
                progress=job_progress(job, parts),
                row_errors=errors[:ROW_ERRORS_SHOWN],
                row_error_total=job.row_errors.count(),
                running=job.state in bulk.ACTIVE_STATES,
                can_operate=request.user.has_perm(BULK_PERMISSION),
                can_cancel=job.state in bulk.ACTIVE_STATES,
                held=any(part.held and part.state == BulkState.UPLOADING for part in parts),
                state_badge=badge(job.state, job.get_state_display()),
            )
        return super().change_view(request, object_id, form_url, extra)


def _replace_custom(fields: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for field in fields:
        if field == "custom_fields":
            out.extend(names)
        else:
            out.append(field)
    return tuple(out)


def cut(text: Any, extra_class: str = "") -> str:
    """A value cut to its column by CSS, the whole of it in ``title`` (shown on hover)."""
    text = "" if text is None else str(text)
    if not text:
        return ""
    return format_html('<span class="satori-cut {}" title="{}">{}</span>', extra_class, text, text)


def retry_text(retry: RetryInfo) -> str:
    """``Attempt 3 of 8; next try at 18:05`` in the admin's language and time zone."""
    text = _("Attempt %(n)d of %(max)d (SATORI['MAX_ATTEMPTS'])") % {
        "n": retry.attempts,
        "max": retry.limit,
    }
    if retry.next_at is not None:
        text += "; " + _("next try at %(time)s") % {
            "time": date_format(localtime(retry.next_at), "DATETIME_FORMAT")
        }
    return text


def delete_job_files(job: BulkJob) -> None:
    bulk_files.delete_files(job.parts.exclude(csv_file="").values_list("csv_file", flat=True))


@admin.register(BulkRowError)
class BulkRowErrorAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "job",
        "part",
        "row_number",
        "email",
        "customer_link",
        "field",
        "message",
        "before_upload",
    )
    list_filter = ("before_upload", "field")
    search_fields = ("email", "message")
    list_select_related = ("job", "part", "customer")
    raw_id_fields = ("customer",)

    @admin.display(description=gettext_lazy("customer"))
    def customer_link(self, obj: BulkRowError) -> str:
        if obj.customer_id is None:
            return ""
        url = reverse("admin:django_satori_customer_change", args=[obj.customer_id])
        return format_html('<a href="{}">{}</a>', url, obj.email or obj.customer_id)


# --------------------------------------------------------------------------
# Outbox and history (read-only)
# --------------------------------------------------------------------------


@admin.register(SyncState)
class SyncStateAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "email",
        "status_badge",
        "operation",
        "attempts",
        "short_error",
        "last_synced_at",
        "in_satori",
        "hashcode",
        "bulk_part",
    )
    list_filter = ("status", "operation", "in_satori")
    search_fields = ("email", "hashcode", "previous_email")
    list_select_related = ("bulk_part",)
    exclude = ("lease_token", "fingerprint")

    class Media:
        css = CSS
        js = LIST_JS

    @admin.display(description=gettext_lazy("sync status"), ordering="status")
    def status_badge(self, obj: SyncState) -> str:
        return badge(obj.status, obj.get_status_display())

    @admin.display(description=gettext_lazy("last error"))
    def short_error(self, obj: SyncState) -> str:
        return cut(obj.last_error, "satori-cut-error")


@admin.register(SyncLog)
class SyncLogAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = (
        "created_at",
        "outcome_badge",
        "email_cell",
        "endpoint",
        "satori_status",
        "short_message",
        "attempt",
        "duration_ms",
    )
    list_display_links = ("created_at",)
    list_filter = ("outcome", "endpoint")
    search_fields = ("email", "message")
    date_hierarchy = "created_at"
    fields = (
        "created_at",
        "email",
        "endpoint",
        "outcome",
        "satori_status",
        "attempt",
        "duration_ms",
        "message",
        "request",
        "response",
    )
    readonly_fields = ("request", "response")

    class Media:
        css = CSS
        js = LIST_JS

    @admin.display(description=gettext_lazy("outcome"), ordering="outcome")
    def outcome_badge(self, obj: SyncLog) -> str:
        return badge(_LOG_BADGE.get(obj.outcome, "off"), obj.get_outcome_display())

    @admin.display(description=gettext_lazy("e-mail address"), ordering="email")
    def email_cell(self, obj: SyncLog) -> str:
        return cut(obj.email, "satori-cut-email")

    @admin.display(description=gettext_lazy("message"))
    def short_message(self, obj: SyncLog) -> str:
        return cut(obj.message, "satori-cut-error")

    @admin.display(description=gettext_lazy("request (redacted)"))
    def request(self, obj: SyncLog) -> str:
        return format_html("<pre>{}</pre>", safe_summary(obj.request_summary))

    @admin.display(description=gettext_lazy("response (redacted)"))
    def response(self, obj: SyncLog) -> str:
        return format_html("<pre>{}</pre>", safe_summary(obj.response_summary))


@admin.register(SourceChange)
class SourceChangeAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """Saves of connected objects whose SATORI customer is not built yet, or could not be."""

    list_display = ("created_at", "source_model", "source_pk", "email", "attempts", "short_error")
    list_filter = ("source_model", ("error", admin.EmptyFieldListFilter))
    search_fields = ("source_pk", "email", "error")
    actions = ("retry",)

    class Media:
        css = CSS
        js = LIST_JS

    @admin.display(description=gettext_lazy("error"))
    def short_error(self, obj: SourceChange) -> str:
        return cut(obj.error, "satori-cut-error")

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("django_satori.sync_customer")

    @admin.action(description=gettext_lazy("Try again"), permissions=["retry"])
    def retry(self, request: HttpRequest, queryset: models.QuerySet[SourceChange]) -> None:
        queued = sync.retry_source_changes(queryset)
        self.message_user(
            request,
            ngettext("%(count)d change queued again.", "%(count)d changes queued again.", queued)
            % {"count": queued},
            messages.SUCCESS,
        )


@admin.register(CustomerAction)
class CustomerActionAdmin(ReadOnlyMixin, admin.ModelAdmin):
    list_display = ("occurred_at", "email", "name", "status", "attempts", "short_error", "sent_at")
    list_filter = ("status",)
    search_fields = ("email", "name")
    date_hierarchy = "occurred_at"

    @admin.display(description=gettext_lazy("last error"))
    def short_error(self, obj: CustomerAction) -> str:
        return truncatechars(obj.last_error, 80)


@admin.register(ImportRun)
class ImportRunAdmin(ReadOnlyMixin, admin.ModelAdmin):
    """Each import of SATORI's admin export; the full report is on its own page."""

    list_display = (
        "started_at",
        "filename",
        "encoding",
        "status",
        "rows",
        "created_count",
        "linked_count",
        "refreshed_count",
        "skipped_count",
        "report_link",
    )
    list_filter = ("status",)
    search_fields = ("filename",)
    date_hierarchy = "started_at"

    @admin.display(description=gettext_lazy("report"))
    def report_link(self, obj: ImportRun) -> str:
        url = reverse("admin:django_satori_importrun", args=[obj.pk])
        return format_html('<a href="{}">{}</a>', url, gettext_lazy("Open"))
