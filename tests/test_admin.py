"""The admin: customer list and page, actions with their permissions, bulk job pages."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import translation

from django_satori import bulk
from django_satori.models import (
    BulkJob,
    BulkRowError,
    BulkState,
    Customer,
    SyncLog,
    SyncState,
    SyncStatus,
)

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:django_satori_customer_changelist"


@pytest.fixture(autouse=True)
def _fast_polls():
    from django.conf import settings

    fast = {"BULK_POLL_INTERVAL_SECONDS": 0.05, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.2}
    with override_settings(SATORI={**settings.SATORI, **fast}):
        yield


def user_with(*codenames: str, username: str = "staff") -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(
            Permission.objects.get(codename=codename, content_type__app_label="django_satori")
        )
    return user


@pytest.fixture
def admin_client_ja() -> Client:
    User.objects.create_superuser("root", password="pw")
    client = Client(HTTP_ACCEPT_LANGUAGE="ja")
    client.login(username="root", password="pw")
    return client


@pytest.fixture
def root(client: Client) -> Client:
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    return client


def make(email: str, **fields) -> Customer:
    return Customer.objects.create(email=email, collection_route="web", **fields)


def action(client: Client, name: str, pks=(), *, across: bool = False, query: str = ""):
    data = {"action": name, "_selected_action": [str(pk) for pk in pks], "index": "0"}
    if across:
        data["select_across"] = "1"
    return client.post(reverse(CHANGELIST) + query, data, follow=True)


def failed_customer() -> Customer:
    customer = make("failed@example.jp", last_name="失敗")
    SyncState.objects.filter(email=customer.email).update(
        status=SyncStatus.FAILED,
        attempts=3,
        hashcode="hc-123",
        last_error="SATORI status 400, field 'email': メールアドレスの形式が正しくありません",
    )
    return customer


# --------------------------------------------------------------------------- pages


@pytest.mark.parametrize(
    "language, expected",
    [("en", "Select SATORI customer to change"), ("ja", "変更する SATORIカスタマー を選択")],
)
def test_customer_list_renders_with_badges_in_english_and_japanese(client, language, expected):
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    failed_customer()
    make("ok@example.jp", last_name="成功", first_name="太郎", lead_company_name="例株式会社")
    with override_settings(LANGUAGE_CODE=language):
        response = client.get(reverse(CHANGELIST), HTTP_ACCEPT_LANGUAGE=language)
    assert response.status_code == 200
    html = response.content.decode()
    assert expected in html
    assert 'class="satori-badge satori-bad"' in html
    assert "メールアドレスの形式が正しくありません" in html
    assert "成功 太郎" in html and "例株式会社" in html
    assert "django_satori/admin.css" in html


def test_the_status_filter_and_search_narrow_the_list(root):
    failed_customer()
    make("other@example.jp", lead_company_name="Other Co")
    response = root.get(reverse(CHANGELIST), {"sync_status": "failed"})
    assert "failed@example.jp" in response.content.decode()
    assert "other@example.jp" not in response.content.decode()
    response = root.get(reverse(CHANGELIST), {"q": "Other Co"})
    assert "other@example.jp" in response.content.decode()
    assert "failed@example.jp" not in response.content.decode()


def test_customer_page_shows_sync_state_history_and_bulk_errors(root):
    customer = failed_customer()
    SyncLog.objects.create(
        email=customer.email,
        endpoint="customer/upsert.json",
        outcome=SyncLog.Outcome.FAILED,
        satori_status=400,
        message="refused by SATORI",
        request_summary={"customer[email]": "<15 chars>", "user_key": "test-user-key-6f1d"},
    )
    job = BulkJob.objects.create(mode="upsert", state=BulkState.FINISHED)
    BulkRowError.objects.create(
        job=job,
        email=customer.email,
        customer=customer,
        field="collection_route",
        message="必須項目です",
        before_upload=True,
    )
    response = root.get(reverse("admin:django_satori_customer_change", args=[customer.pk]))
    html = response.content.decode()
    assert response.status_code == 200
    assert "hc-123" in html
    assert "メールアドレスの形式が正しくありません" in html  # SATORI's own words
    assert "refused by SATORI" in html and "必須項目です" in html
    assert "test-user-key-6f1d" not in html  # a key stored by mistake is still masked
    assert reverse("admin:django_satori_bulkjob_change", args=[job.pk]) in html


def test_history_admins_are_read_only_and_never_show_keys(root):
    entry = SyncLog.objects.create(
        endpoint="bulk_customers/status.json",
        outcome="ok",
        request_summary={"user_secret": "test-user-secret-93ab", "process_code": "abc"},
    )
    make("a@example.jp")
    url = reverse("admin:django_satori_synclog_change", args=[entry.pk])
    html = root.get(url).content.decode()
    assert "test-user-secret-93ab" not in html and "abc" in html
    assert root.get(reverse("admin:django_satori_synclog_add")).status_code == 403
    state = SyncState.objects.get()
    page = root.get(reverse("admin:django_satori_syncstate_change", args=[state.pk]))
    assert page.status_code == 200 and b'name="_save"' not in page.content
    assert root.get(reverse("admin:django_satori_syncstate_changelist")).status_code == 200
    assert root.get(reverse("admin:django_satori_customeraction_changelist")).status_code == 200


# --------------------------------------------------------------------------- the form


@pytest.mark.parametrize(
    ("language", "ascii_only", "surrogate"),
    [
        ("en", "half-width (ASCII) characters only", "lone surrogate"),
        ("ja", "半角英数字と記号（ASCII）のみ", "サロゲート"),
    ],
)
def test_the_customer_form_puts_unsendable_values_on_their_field(
    rf, language, ascii_only, surrogate
):
    from django.contrib import admin

    request = rf.get("/")
    request.user = User.objects.create_superuser("root", password="pw")
    form_class = admin.site._registry[Customer].get_form(request)
    base = {"delivery_permission": "", "tags": ""}
    with translation.override(language):
        for email in ("ユーザー@例え.jp", "user@bücher.de", "ｕｓｅｒ＠例え.jp"):
            form = form_class(data={**base, "email": email})
            assert not form.is_valid()
            assert ascii_only in form.errors["email"][0], form.errors
        idn = form_class(data={**base, "email": "user@bücher.de"})
        assert "user@xn--bcher-kva.de" in str(idn.errors["email"])
        # What a JSON body's "\ud800" becomes: no database driver can store it.
        for field, data in (
            ("last_name", {"last_name": "山\ud800"}),
            ("memo", {"memo": "\udfff"}),
            ("tags", {"tags": "ok, \ud800"}),  # the tag input: names, comma-separated
            ("satori_custom__plan", {"satori_custom__plan": "\ud800"}),  # one input a field
        ):
            form = form_class(data={**base, "email": "a@example.jp", **data})
            assert not form.is_valid()
            assert surrogate in str(form.errors[field]), (field, form.errors)
        assert form_class(data={**base, "email": "ＵＳＥＲ＠example.jp"}).is_valid()
    assert not Customer.objects.exists()


def test_the_customer_admin_answers_an_internationalised_address_with_a_form_error(root):
    response = root.post(
        reverse("admin:django_satori_customer_add"),
        {"email": "user@bücher.de", "tags": "[]", "custom_fields": "{}"},
    )
    assert response.status_code == 200
    assert "user@xn--bcher-kva.de" in response.content.decode()
    assert not Customer.objects.exists()


# --------------------------------------------------------------------------- actions


def test_bulk_upsert_of_all_matching_stores_the_filtered_query(root):
    for i in range(3):
        make(f"x{i}@example.jp")
    failed_customer()
    response = action(
        root, "bulk_upsert", [Customer.objects.first().pk], across=True, query="?sync_status=failed"
    )
    assert response.status_code == 200
    job = BulkJob.objects.get()
    assert job.mode == "upsert" and job.started_by.username == "root"
    assert "sync_status=failed" in job.description
    assert "IN (" not in str(bulk.job_queryset(job).query)  # a filter, not a list of primary keys
    assert list(bulk.job_queryset(job).values_list("email", flat=True)) == ["failed@example.jp"]
    assert f"Bulk job #{job.pk} started" in response.content.decode()


def test_bulk_register_of_selected_rows(root):
    a, b, _c = make("a@example.jp"), make("b@example.jp"), make("c@example.jp")
    action(root, "bulk_register", [a.pk, b.pk])
    job = BulkJob.objects.get()
    assert job.mode == "registration"
    assert sorted(bulk.job_queryset(job).values_list("email", flat=True)) == [
        "a@example.jp",
        "b@example.jp",
    ]


def test_actions_need_their_permissions(client):
    customer = make("a@example.jp")
    user_with("view_customer", "change_customer")
    client.login(username="staff", password="pw")
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert "bulk_upsert" not in page and "sync_now" not in page
    assert action(client, "bulk_upsert", [customer.pk]).status_code == 200
    before = SyncState.objects.get().version
    action(client, "sync_now", [customer.pk])
    assert not BulkJob.objects.exists()
    assert SyncState.objects.get().version == before

    bulk_user = user_with("view_customer", "bulk_customer", username="bulker")
    client.login(username=bulk_user.username, password="pw")
    page = client.get(reverse(CHANGELIST)).content.decode()
    assert "bulk_upsert" in page and "sync_now" not in page
    action(client, "bulk_upsert", [customer.pk])
    assert BulkJob.objects.count() == 1
    response = action(client, "sync_now", [customer.pk])  # has bulk, lacks sync
    assert "No action selected" in response.content.decode()
    assert SyncState.objects.get().version == before


def one_of_each() -> dict[type, Any]:
    """A row for every model django_satori's admin shows (states come with the customer)."""
    from django.utils import timezone

    from django_satori.models import CustomerAction, ImportRun, SourceChange

    customer = make("a@example.jp")
    job = BulkJob.objects.create(mode="upsert", state=BulkState.FINISHED)
    return {
        Customer: customer,
        SyncState: SyncState.objects.get(),
        SyncLog: SyncLog.objects.create(endpoint="customer/upsert.json", outcome="ok"),
        CustomerAction: CustomerAction.objects.create(
            email=customer.email, name="資料請求", occurred_at=timezone.now()
        ),
        BulkJob: job,
        BulkRowError: BulkRowError.objects.create(job=job, email=customer.email, message="x"),
        ImportRun: ImportRun.objects.create(started_at=timezone.now()),
        SourceChange: SourceChange.objects.create(
            source_model="testapp.member", source_pk="1", error="x"
        ),
    }


def snapshot() -> list[Any]:
    from django.apps import apps

    return [
        sorted(model.objects.values_list("pk", flat=True))
        for model in apps.get_app_config("django_satori").get_models()
    ] + [list(SyncState.objects.values_list("version", "status"))]


SATORI_ADMINS = (
    "customer",
    "syncstate",
    "synclog",
    "customeraction",
    "bulkjob",
    "bulkrowerror",
    "importrun",
    "sourcechange",
)


def test_every_admin_of_django_satori_is_checked_for_view_only_users():
    from django.contrib import admin

    registered = {
        m._meta.model_name for m in admin.site._registry if m._meta.app_label == "django_satori"
    }
    assert registered == set(SATORI_ADMINS)  # a new admin joins SATORI_ADMINS and one_of_each()


@pytest.mark.parametrize("model_name", SATORI_ADMINS)
def test_a_view_only_user_neither_sees_nor_can_post_any_action(client, rf, model_name):
    """Every action of the admin: its own and the site's (delete_selected)."""
    from django.contrib import admin

    rows = {model._meta.model_name: row for model, row in one_of_each().items()}
    model_admin = next(
        a
        for m, a in admin.site._registry.items()
        if m._meta.model_name == model_name and m._meta.app_label == "django_satori"
    )
    before = snapshot()
    user = user_with(f"view_{model_name}")
    client.force_login(user)
    request = rf.get("/")
    request.user = User.objects.get(pk=user.pk)  # no cached permissions
    assert model_admin.get_actions(request) == {}
    url = reverse(f"admin:django_satori_{model_name}_changelist")
    page = client.get(url)
    assert page.status_code == 200 and b'name="action"' not in page.content
    every_action = [name for _func, name, _desc in model_admin._get_base_actions()]
    assert every_action  # at least the site's delete_selected
    for name in every_action:
        # "post" is the delete confirmation's answer: were the action run, it would delete.
        response = client.post(
            url,
            {
                "action": name,
                "_selected_action": [str(rows[model_name].pk)],
                "index": "0",
                "post": "yes",
                "select_across": "1",
            },
        )
        assert response.status_code in (200, 302), (name, response.status_code)
    assert snapshot() == before


def test_sync_now_marks_pending_and_retry_failed_touches_failed_ones_only(root):
    ok = make("ok@example.jp")
    SyncState.objects.filter(email=ok.email).update(status=SyncStatus.SYNCED)
    bad = failed_customer()
    action(root, "retry_failed", [ok.pk, bad.pk])
    assert SyncState.objects.get(email=ok.email).status == SyncStatus.SYNCED
    assert SyncState.objects.get(email=bad.email).status == SyncStatus.PENDING
    assert SyncState.objects.get(email=bad.email).attempts == 0
    before = SyncState.objects.get(email=ok.email).version
    response = action(root, "sync_now", [ok.pk])
    state = SyncState.objects.get(email=ok.email)
    assert state.status == SyncStatus.PENDING and state.version == before + 1
    assert "being sent to SATORI" in response.content.decode()


def test_sync_now_refuses_a_selection_too_large_for_single_calls(root, settings):
    settings.SATORI = {**settings.SATORI, "BULK_THRESHOLD": 2}
    customers = [make(f"x{i}@example.jp") for i in range(3)]
    SyncState.objects.update(status=SyncStatus.SYNCED)
    response = action(root, "sync_now", [c.pk for c in customers])
    assert "too many to send one by one" in response.content.decode()
    assert not SyncState.objects.filter(status=SyncStatus.PENDING).exists()
    action(root, "mark_for_sync", [customers[0].pk], across=True)
    assert SyncState.objects.filter(status=SyncStatus.PENDING).count() == 3


TOO_MANY = (
    'too many to send one by one. Use "Bulk upsert via CSV", or "Mark for sync" '
    "to let the sweep send them."
)


@pytest.mark.parametrize(
    ("limit", "language", "expected"),
    [
        (1, "en", f"More than 1 customer selected: {TOO_MANY}"),
        (2, "en", f"More than 2 customers selected: {TOO_MANY}"),
        (
            2,
            "ja",
            "2 件を超えるカスタマーが選択されています。1件ずつ送信するには多すぎます。"
            "「CSVで一括登録・更新」を使うか、「送信待ちにする」で定期処理に送信させてください。",
        ),
    ],
)
def test_the_too_large_selection_warning_is_worded_for_the_limit(
    settings, limit, language, expected
):
    settings.SATORI = {**settings.SATORI, "BULK_THRESHOLD": limit}
    User.objects.create_superuser("root", password="pw")
    client = Client(HTTP_ACCEPT_LANGUAGE=language)
    client.login(username="root", password="pw")
    customers = [make(f"x{i}@example.jp") for i in range(3)]
    with translation.override(language):
        response = action(client, "sync_now", [c.pk for c in customers])
    assert [str(message) for message in response.context["messages"]] == [expected]


def test_a_post_without_the_csrf_token_is_refused():
    User.objects.create_superuser("root", password="pw")
    customer = make("a@example.jp")
    client = Client(enforce_csrf_checks=True)
    client.login(username="root", password="pw")
    data = {"action": "bulk_upsert", "_selected_action": [str(customer.pk)], "index": "0"}
    assert client.post(reverse(CHANGELIST), data).status_code == 403
    assert not BulkJob.objects.exists()
    client.get(reverse(CHANGELIST))
    data["csrfmiddlewaretoken"] = client.cookies["csrftoken"].value
    assert client.post(reverse(CHANGELIST), data).status_code == 302
    assert BulkJob.objects.count() == 1


# --------------------------------------------------------------------------- bulk jobs


def finished_job_with_a_failure(sandbox) -> BulkJob:
    sandbox.configure(own_only=True)
    sandbox.seed_customer("taken@example.jp")
    Customer.objects.bulk_create(
        [
            Customer(email="free@example.jp", collection_route="web"),
            Customer(email="taken@example.jp", collection_route="web"),
            Customer(email="noroute@example.jp"),
        ]
    )
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    return bulk.drive_job(job.pk, timeout=20)


@pytest.mark.parametrize("language", ["en", "ja"])
def test_bulk_job_page_shows_progress_parts_and_row_errors(client, satori_sandbox, language):
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    job = finished_job_with_a_failure(satori_sandbox)
    with override_settings(LANGUAGE_CODE=language):
        response = client.get(
            reverse("admin:django_satori_bulkjob_change", args=[job.pk]),
            HTTP_ACCEPT_LANGUAGE=language,
        )
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="satori-rows">2<' in html and 'id="satori-failed">1<' in html
    assert 'id="satori-invalid">1<' in html
    assert job.parts.get().process_code in html
    assert "他のユーザーが登録したカスタマーは操作できません" in html
    taken = Customer.objects.get(email="taken@example.jp")
    assert reverse("admin:django_satori_customer_change", args=[taken.pk]) in html
    assert 'http-equiv="refresh"' not in html  # finished: no more reloading
    assert reverse("admin:django_satori_bulkpart_csv", args=[job.parts.get().pk]) in html
    listing = client.get(reverse("admin:django_satori_bulkjob_changelist"))
    assert listing.status_code == 200 and b"satori-progress" in listing.content


def test_a_running_job_page_reloads_itself_and_offers_refresh_and_cancel(root, satori_sandbox):
    satori_sandbox.configure(bulk_processing_seconds=30)
    make("a@example.jp")
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=bulk.upload_part)
    url = reverse("admin:django_satori_bulkjob_change", args=[job.pk])
    html = root.get(url).content.decode()
    assert 'http-equiv="refresh"' in html
    assert 'id="satori-refresh"' in html and 'id="satori-cancel"' in html

    satori_sandbox.finish_bulk_jobs()
    root.post(reverse("admin:django_satori_bulkjob_refresh", args=[job.pk]))
    job.refresh_from_db()
    assert job.state == BulkState.FINISHED and job.succeeded_count == 1


def test_cancel_button_cancels_a_job_not_yet_uploaded(root):
    make("a@example.jp")
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    assert root.get(reverse("admin:django_satori_bulkjob_cancel", args=[job.pk])).status_code == 405
    response = root.post(reverse("admin:django_satori_bulkjob_cancel", args=[job.pk]), follow=True)
    assert "Cancelled 1 part not yet uploaded. 1 customer released." in response.content.decode()
    job.refresh_from_db()
    assert job.state == BulkState.CANCELLED
    assert SyncState.objects.get().status == SyncStatus.PENDING


@pytest.mark.parametrize(("decision", "ends"), [("resend", "finished"), ("give-up", "failed")])
def test_a_held_upload_is_decided_on_the_job_page(root, satori_sandbox, decision, ends):
    satori_sandbox.faults.fail_first(1, "lost_answer", operations=["bulk_upsert"])
    make("a@example.jp")
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    with override_settings(SATORI={**settings.SATORI, "BULK_RESEND_UNANSWERED": "never"}):
        bulk.drive_job(job.pk, timeout=10)
        url = reverse("admin:django_satori_bulkjob_change", args=[job.pk])
        html = root.get(url).content.decode()
        assert 'id="satori-resend"' in html and 'id="satori-give-up"' in html
        assert "waiting for your decision" in html
        held = reverse("admin:django_satori_bulkjob_held", args=[job.pk, decision])
        assert root.get(held).status_code == 405
        root.post(held)
        if decision == "resend":  # the upload task was queued; run it as a worker would
            part = job.parts.get()
            assert not part.held and bulk.upload_part(part.pk)[0] == "uploaded"
            bulk.poll_part(part.pk, force=True)
    job.refresh_from_db()
    assert job.state == ends
    assert 'id="satori-resend"' not in root.get(url).content.decode()


def test_csv_download_needs_the_bulk_permission(client, satori_sandbox):
    job = finished_job_with_a_failure(satori_sandbox)
    url = reverse("admin:django_satori_bulkpart_csv", args=[job.parts.get().pk])
    user_with("view_bulkjob")
    client.login(username="staff", password="pw")
    assert client.get(url).status_code == 403
    user_with("view_bulkjob", "bulk_customer", username="bulker")
    client.login(username="bulker", password="pw")
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment")
    body = b"".join(response.streaming_content)
    # A BOM, so that Excel reads the Japanese text as UTF-8 (the upload to SATORI has none).
    assert body.startswith(b"\xef\xbb\xbfemail,") and b"free@example.jp" in body
    assert "private" in response["Cache-Control"] and "no-store" in response["Cache-Control"]


def test_running_jobs_cannot_be_deleted_and_deleting_removes_files(root, satori_sandbox):
    make("a@example.jp")
    running = bulk.start_bulk_job(Customer.objects.all(), mode="upsert", dry_run=True)
    assert (
        root.get(reverse("admin:django_satori_bulkjob_delete", args=[running.pk])).status_code
        == 403
    )
    job = bulk.run_job(running.pk)
    name = job.parts.get().csv_file.name
    assert bulk.bulk_storage().exists(name)
    response = root.post(
        reverse("admin:django_satori_bulkjob_delete", args=[job.pk]), {"post": "yes"}
    )
    assert response.status_code == 302
    assert not BulkJob.objects.exists()
    assert not bulk.bulk_storage().exists(name)


def test_the_customer_list_links_the_import_pages(root):
    html = root.get(reverse(CHANGELIST)).content.decode()
    assert reverse("admin:django_satori_customer_import") in html
    assert root.get(reverse("admin:django_satori_customer_import")).status_code == 200
    assert root.get(reverse("admin:django_satori_customer_reconcile")).status_code == 200


def test_import_runs_are_listed_read_only_with_a_link_to_their_report(client):
    from django.utils import timezone

    from django_satori.models import ImportRun

    run = ImportRun.objects.create(
        filename="export.csv", encoding="cp932", started_at=timezone.now(), rows=3, created_count=2
    )
    User.objects.create_superuser("root", password="pw")
    client.login(username="root", password="pw")
    page = client.get("/admin/django_satori/importrun/")
    assert page.status_code == 200
    assert f"/import/{run.pk}/" in page.content.decode()
    assert client.get("/admin/django_satori/importrun/add/").status_code == 403
