"""Admin pages for importing SATORI's export and for the reconciliation report.

Hooked into the Customer admin by :func:`import_urls`::

    def get_urls(self):
        return import_urls(self.admin_site) + super().get_urls()

The upload runs the import inside the request (a 100,000-row file takes
seconds); very large files are better imported with ``manage.py satori_import``.
The pages themselves never mention command-line options: the people using
them are marketing operators, not the developers who run ``manage.py``.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.text import capfirst
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext

from . import reconcile
from .conf import get_settings
from .importing import ImportFileError, import_export
from .models import Customer, ImportRun, SyncStatus
from .schema import CUSTOM_PREFIX

PAGE_SIZE = 100
TEMPLATE_DIR = "admin/django_satori/import"
IMPORT_PERMS = ("django_satori.add_customer", "django_satori.change_customer")
SYNC_PERM = "django_satori.sync_customer"

#: The encodings offered on the upload page, in words. "utf-8" also reads a file
#: that starts with a BOM (choose_encoding switches to utf-8-sig by itself), so
#: the form needs no separate "UTF-8 with BOM" choice.
ENCODING_CHOICES = [
    ("auto", gettext_lazy("Detect automatically")),
    ("utf-8", "UTF-8"),
    ("cp932", "Shift_JIS"),
]


def encoding_label(code: str) -> str:
    """An encoding as an operator knows it: "UTF-8", "Shift_JIS", not "cp932"."""
    return {
        "utf-8": "UTF-8",
        "utf-8-sig": _("UTF-8 (with BOM)"),
        "cp932": "Shift_JIS",
        "auto": _("Detect automatically"),
    }.get(code, code)


def field_label(key: str) -> str:
    """The name an operator sees in SATORI for one of our keys ("会社名", not
    "lead_company_name"); a custom field's ``label`` from ``SATORI["CUSTOM_FIELDS"]``."""
    if key.startswith(CUSTOM_PREFIX):
        identifier = key[len(CUSTOM_PREFIX) :]
        definition = get_settings().CUSTOM_FIELDS.get(identifier)
        label = definition.get("label") if isinstance(definition, dict) else None
        if label:
            return str(label)
        return _("%(identifier)s (custom field)") % {"identifier": identifier}
    try:
        field = Customer._meta.get_field(key)
    except FieldDoesNotExist:
        return key
    return str(capfirst(getattr(field, "verbose_name", key)))


class ImportForm(forms.Form):
    file = forms.FileField(label=gettext_lazy("SATORI customer export (CSV)"))
    encoding = forms.ChoiceField(
        label=gettext_lazy("Encoding"),
        choices=ENCODING_CHOICES,
        initial="auto",
        help_text=gettext_lazy(
            "SATORI's export is UTF-8 or Shift_JIS; automatic detection tells them apart."
        ),
    )
    dry_run = forms.BooleanField(
        label=gettext_lazy("Dry run (show what would change, write nothing)"),
        required=False,
        initial=True,
    )
    columns = forms.CharField(
        label=gettext_lazy("Extra column names"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text=gettext_lazy("One HEADER=KEY per line, for example プラン=custom:plan."),
    )

    def clean_columns(self) -> dict[str, str]:
        mapping: dict[str, str] = {}
        for line in self.cleaned_data["columns"].splitlines():
            if not line.strip():
                continue
            header, sep, key = line.partition("=")
            if not sep or not header.strip() or not key.strip():
                raise forms.ValidationError(
                    _("Write each line as HEADER=KEY (got %(line)r).") % {"line": line[:80]}
                )
            mapping[header.strip()] = key.strip()
        return mapping


def import_urls(admin_site: admin.AdminSite) -> list[URLPattern]:
    """URL patterns of the import pages, wrapped by ``admin_site.admin_view``."""
    views = _Views(admin_site)
    return [
        path("import/", admin_site.admin_view(views.upload), name="django_satori_customer_import"),
        path(
            "import/report/",
            admin_site.admin_view(views.report),
            name="django_satori_customer_reconcile",
        ),
        path(
            "import/<int:run_id>/", admin_site.admin_view(views.run), name="django_satori_importrun"
        ),
    ]


class _Views:
    def __init__(self, admin_site: admin.AdminSite) -> None:
        self.site = admin_site

    def _url(self, name: str, *args: Any) -> str:
        return reverse(f"{self.site.name}:{name}", args=args)

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        # So that {% url 'admin:...' %} in the templates resolves to this admin site.
        request.current_app = self.site.name
        return {
            **self.site.each_context(request),
            "title": title,
            "opts": Customer._meta,
            "import_url": self._url("django_satori_customer_import"),
            "report_url": self._url("django_satori_customer_reconcile"),
            "changelist_url": self._optional_url("django_satori_customer_changelist"),
            **extra,
        }

    # -- upload ---------------------------------------------------------------

    def upload(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perms(IMPORT_PERMS):
            raise PermissionDenied
        result = None
        if request.method == "POST":
            form = ImportForm(request.POST, request.FILES)
            if form.is_valid():
                uploaded = form.cleaned_data["file"]
                try:
                    result = import_export(
                        uploaded,
                        encoding=form.cleaned_data["encoding"],
                        dry_run=form.cleaned_data["dry_run"],
                        columns=form.cleaned_data["columns"],
                        filename=uploaded.name or "",
                        started_by=request.user,
                    )
                except ImportFileError as exc:
                    form.add_error("file", _file_error(exc))
                else:
                    if result.run is not None:
                        messages.success(
                            request,
                            _(
                                "Imported: %(created)d created, %(linked)d linked, %(refreshed)d "
                                "refreshed, %(skipped)d skipped. Nothing was sent to SATORI."
                            )
                            % {
                                "created": result.created,
                                "linked": result.linked,
                                "refreshed": result.refreshed,
                                "skipped": result.skipped_count,
                            },
                        )
                        return HttpResponseRedirect(
                            self._url("django_satori_importrun", result.run.pk)
                        )
        else:
            form = ImportForm()
        runs = ImportRun.objects.order_by("-pk")[:10]
        return TemplateResponse(
            request,
            f"{TEMPLATE_DIR}/upload.html",
            self._context(
                request,
                _("Import SATORI's customer export"),
                form=form,
                result=result,
                result_encoding=encoding_label(result.encoding) if result else "",
                runs=[(run, self._url("django_satori_importrun", run.pk)) for run in runs],
            ),
        )

    def run(self, request: HttpRequest, run_id: int) -> HttpResponse:
        if not request.user.has_perm("django_satori.view_customer"):
            raise PermissionDenied
        run = get_object_or_404(ImportRun, pk=run_id)
        return TemplateResponse(
            request,
            f"{TEMPLATE_DIR}/run.html",
            self._context(
                request,
                _("SATORI export import #%(id)s") % {"id": run.pk},
                run=run,
                run_encoding=encoding_label(run.encoding),
            ),
        )

    # -- reconciliation ---------------------------------------------------------

    def report(self, request: HttpRequest) -> HttpResponse:
        if not request.user.has_perm("django_satori.view_customer"):
            raise PermissionDenied
        category = request.GET.get("category") or request.POST.get("category") or "different"
        if category not in reconcile.CATEGORIES:
            category = "different"
        if request.method == "POST":
            return self._mark(request, category)
        page_number = _int(request.GET.get("page"), 1)
        by_field: dict[str, int] = {}
        page: Any
        counts_different: int | None = None  # counting it means comparing every customer
        if category == "different":
            items, counts_different, by_field = self._different_page(page_number)
            page = Paginator(range(counts_different), PAGE_SIZE).get_page(page_number)
        else:
            queryset = (
                reconcile.only_in_django()
                if category == "only_in_django"
                else reconcile.only_in_satori()
            ).select_related("sync_state")
            page = Paginator(queryset, PAGE_SIZE).get_page(page_number)
            items = [
                {
                    "id": c.pk,
                    "email": c.email,
                    "status": _status(getattr(c, "sync_state", None)),
                    "differences": (),
                }
                for c in page.object_list
            ]
        counts: dict[str, int | None] = {
            "only_in_django": reconcile.only_in_django().count(),
            "only_in_satori": reconcile.only_in_satori().count(),
            "different": counts_different,
        }
        for item in items:
            item["url"] = self._change_url(item["id"])
            item["status"] = _status_label(item["status"])
        tabs = [
            (key, label, counts[key])
            for key, label in (
                ("different", _("In both, with different values")),
                ("only_in_django", _("Only in Django")),
                ("only_in_satori", _("Only in SATORI")),
            )
        ]
        return TemplateResponse(
            request,
            f"{TEMPLATE_DIR}/report.html",
            self._context(
                request,
                _("Reconciliation with SATORI"),
                category=category,
                tabs=tabs,
                items=items,
                page=page,
                by_field=[
                    (field_label(name), n)
                    for name, n in sorted(by_field.items(), key=lambda kv: -kv[1])
                ],
                last_import=reconcile.last_import(),
                can_sync=request.user.has_perm(SYNC_PERM),
            ),
        )

    def _different_page(self, page_number: int) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
        """One pass over the customers: the page's items, the total, the count per field."""
        start = (max(page_number, 1) - 1) * PAGE_SIZE
        items: list[dict[str, Any]] = []
        total = 0
        by_field: dict[str, int] = {}
        for found in reconcile.different():
            if start <= total < start + PAGE_SIZE:
                items.append(
                    {
                        "id": found.customer_id,
                        "email": found.email,
                        "status": found.sync_status,
                        "differences": [
                            {
                                "label": field_label(diff.field),
                                "local": diff.local,
                                "remote": diff.remote,
                                "push_fixes": diff.push_fixes,
                            }
                            for diff in found.differences
                        ],
                    }
                )
            total += 1
            for diff in found.differences:
                by_field[diff.field] = by_field.get(diff.field, 0) + 1
        return items, total, by_field

    def _mark(self, request: HttpRequest, category: str) -> HttpResponse:
        if not request.user.has_perm(SYNC_PERM):
            raise PermissionDenied
        if "mark_all" in request.POST:
            ids = list(reconcile.category_ids(category))
        else:
            ids = sorted({_int(v, 0) for v in request.POST.getlist("ids")} - {0})
        if not ids:
            messages.warning(request, _("No customer was chosen."))
        else:
            marked = reconcile.mark_ids_for_sync(ids)
            messages.success(
                request,
                ngettext(
                    "%(n)d customer marked for sync with SATORI.",
                    "%(n)d customers marked for sync with SATORI.",
                    marked,
                )
                % {"n": marked},
            )
        return HttpResponseRedirect(
            f"{self._url('django_satori_customer_reconcile')}?category={category}"
        )

    def _change_url(self, pk: int) -> str:
        return self._optional_url("django_satori_customer_change", pk)

    def _optional_url(self, name: str, *args: Any) -> str:
        try:
            return self._url(name, *args)
        except NoReverseMatch:  # Customer not registered with this admin site
            return ""


def _file_error(exc: ImportFileError) -> str:
    message = str(exc)
    if exc.suggested_encoding:
        # The library's text names no option; say where on this page to choose.
        message += " " + _("Choose %(encoding)s under Encoding and upload the file again.") % {
            "encoding": encoding_label(exc.suggested_encoding)
        }
    return message


def _status(state: Any) -> str:
    return state.status if state is not None else ""


def _status_label(status: str) -> str:
    if not status:
        return _("no sync state")
    try:
        return str(SyncStatus(status).label)
    except ValueError:
        return status


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default
