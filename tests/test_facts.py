"""Every guessed SATORI fact can be overridden in settings (issue 15, part 2), and the
fixes found against an independent stand-in for SATORI (part 3).

Each override is tested end to end over real HTTP against a sandbox started with
the CLI flag that makes it behave unlike our default assumption: the test shows
the default failing there and the setting making it work.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.checks import run_checks
from django.db import transaction
from django.test import override_settings
from django.utils import translation

from django_satori import bulk, permissions, sync
from django_satori.admin_forms import CustomerAdminForm
from django_satori.bulk_csv import header
from django_satori.client import SatoriClient
from django_satori.conf import get_settings
from django_satori.exceptions import (
    SatoriConfigurationError,
    SatoriPermissionError,
    SatoriValidationError,
)
from django_satori.mapping import mapping_errors
from django_satori.models import BulkPart, BulkState, Customer, SyncState, SyncStatus
from django_satori.sandbox import cli
from django_satori.sandbox.config import SandboxKeys
from django_satori.sandbox.server import SandboxServer
from django_satori.sandbox.testing import use_sandbox
from tests.syncing import drain
from tests.testapp.models import Member

pytestmark = pytest.mark.django_db(transaction=True)

FAST = {"BULK_POLL_INTERVAL_SECONDS": 0.05, "BULK_POLL_MAX_INTERVAL_SECONDS": 0.2}


def satori(**changes: Any) -> Any:
    return override_settings(SATORI={**settings.SATORI, **FAST, **changes})


@pytest.fixture
def sandbox_with() -> Iterator[Callable[..., SandboxServer]]:
    """Start a sandbox from command-line flags, as ``python -m django_satori.sandbox``
    would, and point the settings at it (keys and custom fields as the fixture does)."""
    with contextlib.ExitStack() as stack:

        def start(*argv: str) -> SandboxServer:
            parser = argparse.ArgumentParser()
            cli.add_arguments(parser)
            options = vars(parser.parse_args(["--port", "0", "--processing-seconds", "0", *argv]))
            server = cli.build_server(options).start()
            stack.callback(server.stop)
            stack.enter_context(use_sandbox(server))
            # use_sandbox clears faults for a fresh test: those the flags asked for, again.
            server.faults = cli.build_server(options).faults
            return server

        yield start


def make_customer(**fields: Any) -> Customer:
    defaults = {"email": "taro@example.jp", "last_name": "山田", "collection_route": "web"}
    return Customer.objects.create(**{**defaults, **fields})


def state() -> SyncState:
    return SyncState.objects.get()


def run_bulk() -> Any:
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    return bulk.drive_job(job.pk, timeout=30)


def part_header(part: BulkPart) -> list[str]:
    with bulk.bulk_storage().open(part.csv_file.name, "rb") as fileobj:
        return next(csv.reader(io.TextIOWrapper(fileobj, encoding="utf-8", newline="")))


def check_ids(**changes: Any) -> set[str]:
    with satori(**changes):
        return {m.id for m in run_checks() if m.id and m.id.startswith("django_satori.")}


# --------------------------------------------------------------------------- bulk columns


def test_filled_columns_leave_out_a_column_satori_refuses(sandbox_with):
    sandbox_with("--refuse-column", "department")
    make_customer(email="a@example.jp")
    make_customer(email="b@example.jp", phone_number="03-0000-0000")

    # Every column (today's file before this setting): SATORI refuses it, naming the column.
    with satori(BULK_CSV_COLUMNS=header(get_settings())):
        job = run_bulk()
    assert job.state == BulkState.FAILED
    error = job.parts.get().error
    assert "department" in error and "BULK_CSV_COLUMNS" in error

    Customer.objects.update(memo="again")  # a new version for the second job
    for customer in Customer.objects.all():
        customer.save()
    job = run_bulk()  # the default, "filled"
    assert job.state == BulkState.FINISHED, job.error
    part = job.parts.exclude(state=BulkState.FAILED).get()
    assert part_header(part) == ["email", "last_name", "phone_number", "memo", "collection_route"]
    assert sync.pending_counts() == {SyncStatus.SYNCED: 2}


def test_an_explicit_column_list_is_the_header_and_refuses_rows_it_cannot_carry(sandbox_with):
    server = sandbox_with("--refuse-column", "memo")
    make_customer(email="a@example.jp", first_name="太郎")
    make_customer(email="b@example.jp", memo="a note SATORI's bulk API would refuse")
    columns = ["email", "collection_route", "last_name", "first_name", "department"]

    with satori(BULK_CSV_COLUMNS=columns):
        job = run_bulk()

    assert job.state == BulkState.FINISHED, job.error
    assert part_header(job.parts.get()) == columns  # the list's order, empty columns too
    assert server.state.customer("a@example.jp").fields["first_name"] == "太郎"
    row_error = job.row_errors.get()
    assert row_error.email == "b@example.jp" and row_error.field == "memo"
    assert "BULK_CSV_COLUMNS" in row_error.message
    assert server.state.customer("b@example.jp") is None


def test_bulk_columns_are_checked():
    assert "django_satori.E010" in check_ids(BULK_CSV_COLUMNS="all")
    assert "django_satori.E010" in check_ids(BULK_CSV_COLUMNS=["last_name"])  # no email
    assert "django_satori.E010" in check_ids(BULK_CSV_COLUMNS=["email", "fax"])
    assert "django_satori.E010" not in check_ids(BULK_CSV_COLUMNS=["email", "last_name"])


# --------------------------------------------------------------------------- answer classes


@pytest.mark.parametrize("configured", [False, True])
def test_a_permission_refusal_with_another_status_is_classified_by_setting(
    sandbox_with, configured
):
    server = sandbox_with("--own-only", "--answer-status", "permission=418")
    server.seed_customer("taro@example.jp", created_by="another-user")
    changes = {"ANSWER_STATUS_CLASSES": {418: "permission"}} if configured else {}
    with satori(**changes):
        make_customer()
        drain()
    row = state()
    assert row.status == SyncStatus.FAILED and row.attempts == 1
    # Only as a permission refusal does the error name the rule item to enable.
    assert ("カスタマー情報の編集" in row.last_error) is configured


@pytest.mark.parametrize("configured", [False, True])
def test_a_delete_of_an_unknown_customer_answered_400_is_done_once_its_message_is_known(
    sandbox_with, configured
):
    server = sandbox_with("--answer-status", "not_found=400")
    make_customer()
    drain()
    server.state.customers.clear()  # deleted in SATORI's admin screen meanwhile
    changes = {"ANSWER_MESSAGE_CLASSES": [["見つかりません", "not_found"]]} if configured else {}
    with satori(**changes):
        Customer.objects.get().delete()
        drain()
    row = state()
    assert row.status == (SyncStatus.DELETED if configured else SyncStatus.FAILED)


def test_answer_classes_are_checked():
    assert "django_satori.E011" in check_ids(ANSWER_STATUS_CLASSES={418: "teapot"})
    assert "django_satori.E011" in check_ids(ANSWER_STATUS_CLASSES={200: "permission"})
    assert "django_satori.E011" in check_ids(ANSWER_MESSAGE_CLASSES=[["(", "not_found"]])
    assert "django_satori.E011" in check_ids(ANSWER_MESSAGE_CLASSES=[["x", "gone"]])
    assert "django_satori.E011" not in check_ids(
        ANSWER_STATUS_CLASSES={418: "permission"}, ANSWER_MESSAGE_CLASSES=[["x", "not_found"]]
    )


# --------------------------------------------------------------------------- e-mail case


@pytest.mark.parametrize("lowercase", [True, False])
def test_a_mixed_case_address_in_satori_is_not_duplicated_with_lowercasing_off(
    sandbox_with, lowercase
):
    server = sandbox_with("--email-case-sensitive")
    server.seed_customer("Taro@Example.jp", created_by=server.keys.user_key)
    with satori(EMAIL_LOWERCASE=lowercase):
        customer = make_customer(email="  Taro@Example.jp ")
        drain()
    assert customer.email == ("taro@example.jp" if lowercase else "Taro@Example.jp")
    assert len(server.state.customers) == (2 if lowercase else 1)
    assert server.state.customer("Taro@Example.jp").fields.get("last_name") == (
        None if lowercase else "山田"
    )


def test_with_lowercasing_off_connected_objects_stay_unique_regardless_of_case(satori_sandbox):
    with satori(EMAIL_LOWERCASE=False):
        Member.objects.create(email="OK.User@Example.jp", family_name="一郎")
        sync.apply_source_changes()  # its mirror is built (the worker's part)
        with pytest.raises(SatoriValidationError) as refused, transaction.atomic():
            Member.objects.create(email="ok.user@example.jp", family_name="二郎")
    assert refused.value.field == "email"
    assert list(Customer.objects.values_list("email", flat=True)) == ["OK.User@Example.jp"]


def test_lowercasing_off_is_warned_about_with_what_uniqueness_then_means():
    assert "django_satori.W010" in check_ids(EMAIL_LOWERCASE=False)
    assert "django_satori.W010" not in check_ids()


# --------------------------------------------------------------------------- identity


@pytest.mark.parametrize("identity", ["hashcode", "email"])
def test_deletes_and_email_changes_name_the_customer_by_the_chosen_identity(sandbox_with, identity):
    server = sandbox_with("--no-hashcode-identity")
    with satori(DELETE_IDENTITY=identity):
        customer = make_customer()
        drain()
        assert state().hashcode  # known: today a delete would use it
        customer.email = "jiro@example.jp"
        customer.save()
        drain()
        moved = SyncState.objects.get(email="jiro@example.jp")
        customer.delete()
        drain()
    moved.refresh_from_db()
    if identity == "hashcode":
        # This SATORI refuses hashcode identity: the e-mail change cannot be followed.
        assert moved.status == SyncStatus.FAILED and "hashcode" in moved.last_error
    else:
        assert moved.status == SyncStatus.DELETED
        assert server.state.customer("jiro@example.jp") is None
        deletes = server.state.requests_for("delete")
        assert deletes[-1].form_dict()["customer[identity_type]"] == "email"


def test_delete_identity_is_checked():
    assert "django_satori.E012" in check_ids(DELETE_IDENTITY="id")
    assert "django_satori.E012" not in check_ids(DELETE_IDENTITY="email")


# --------------------------------------------------------------------------- action call


ACTION_FLAGS = (
    "--action-identity-param",
    "identity_type=identity_type",
    "--action-identity-param",
    "email=email",
    "--action-date-format",
    "%Y/%m/%d %H:%M",
    "--action-require-param",
    "action[source]=django",
)
ACTION_SETTINGS = {
    "ACTION_IDENTITY_PARAMS": {"identity_type": "identity_type", "email": "email"},
    "ACTION_DATE_FORMAT": "%Y/%m/%d %H:%M",
    "ACTION_EXTRA_PARAMS": {"action[source]": "django"},
}


@pytest.mark.parametrize("configured", [False, True])
def test_the_action_call_follows_the_configured_parameters(sandbox_with, configured):
    server = sandbox_with(*ACTION_FLAGS)
    server.seed_customer("taro@example.jp", created_by=server.keys.user_key)
    with satori(**(ACTION_SETTINGS if configured else {})), SatoriClient() as client:
        if not configured:
            with pytest.raises(SatoriValidationError):
                client.add_action(email="taro@example.jp", name="資料DL")
            return
        client.add_action(email="taro@example.jp", name="資料DL")
    (action,) = server.state.customer("taro@example.jp").actions
    assert action.name == "資料DL" and action.date.count("/") == 2 and action.date.count(":") == 1
    form = server.state.requests_for("action")[-1].form_dict()
    assert form["email"] == "taro@example.jp" and form["action[source]"] == "django"


@pytest.mark.parametrize("send_date", [True, False])
def test_the_action_date_can_be_left_out(sandbox_with, send_date):
    server = sandbox_with("--action-refuse-date")
    server.seed_customer("taro@example.jp", created_by=server.keys.user_key)
    with satori(ACTION_SEND_DATE=send_date), SatoriClient() as client:
        if send_date:
            with pytest.raises(SatoriValidationError, match=r"action\[date\]"):
                client.add_action(email="taro@example.jp", name="来店")
        else:
            client.add_action(email="taro@example.jp", name="来店")
            assert server.state.customer("taro@example.jp").actions[0].date == ""


def test_the_keys_can_never_be_replaced_through_the_action_settings(satori_sandbox):
    with (
        satori(ACTION_EXTRA_PARAMS={"user_key": "x"}),
        SatoriClient() as client,
        pytest.raises(SatoriConfigurationError),
    ):
        client.add_action(email="taro@example.jp", name="来店")
    assert satori_sandbox.state.requests_for("action") == []
    assert "django_satori.E013" in check_ids(ACTION_EXTRA_PARAMS={"company_secret": "x"})
    assert "django_satori.E013" in check_ids(ACTION_IDENTITY_PARAMS={"email": "user_secret"})
    assert "django_satori.E013" in check_ids(ACTION_DATE_FORMAT="YYYY-MM-DD")
    assert "django_satori.E013" not in check_ids(**ACTION_SETTINGS)


# --------------------------------------------------------------------------- extra items


EXTRA = {"position": {"type": "text", "max_length": 10}}


@pytest.mark.parametrize("configured", [False, True])
def test_a_further_standard_item_travels_like_a_custom_field(sandbox_with, configured):
    server = sandbox_with("--extra-item", "position:text:10")
    with satori(**({"EXTRA_STANDARD_ITEMS": EXTRA} if configured else {})):
        make_customer(custom_fields={"position": "部長"})
        drain()
    row = state()
    if not configured:
        assert row.status == SyncStatus.FAILED and "position" in row.last_error
        assert server.state.requests_for("upsert") == []
        return
    assert row.status == SyncStatus.SYNCED
    assert server.state.customer("taro@example.jp").fields["position"] == "部長"


def test_a_further_standard_item_goes_into_bulk_files_and_mappings(sandbox_with):
    server = sandbox_with("--extra-item", "position:text:10")
    with satori(EXTRA_STANDARD_ITEMS=EXTRA):
        make_customer(email="a@example.jp", custom_fields={"position": "課長"})
        make_customer(email="b@example.jp", custom_fields={"position": "とても長い役職名の例です"})
        job = run_bulk()
        assert "position" in part_header(job.parts.get())
        row_error = job.row_errors.get()
        assert row_error.field == "position" and row_error.email == "b@example.jp"
        mapping = {"testapp.Member": {"email": "email", "fields": {"position": "name"}}}
        assert mapping_errors(dataclass_with(MAPPINGS=mapping)) == []
    assert server.state.customer("a@example.jp").fields["position"] == "課長"
    assert mapping_errors(dataclass_with(MAPPINGS=mapping)) != []  # unknown without it


def dataclass_with(**changes: Any) -> Any:
    return dataclasses.replace(get_settings(), **changes)


def test_extra_items_are_checked():
    assert "django_satori.E014" in check_ids(EXTRA_STANDARD_ITEMS={"memo": {"type": "text"}})
    assert "django_satori.E014" in check_ids(EXTRA_STANDARD_ITEMS={"fax": {"type": "blob"}})
    assert "django_satori.E014" in check_ids(EXTRA_STANDARD_ITEMS={"fax": {"max_length": 0}})
    assert "django_satori.E014" not in check_ids(EXTRA_STANDARD_ITEMS=EXTRA)


# --------------------------------------------------------------------------- upload attempts


@pytest.mark.parametrize("attempts", [4, 5])
def test_the_number_of_upload_attempts_is_a_setting(sandbox_with, attempts):
    sandbox_with("--fail-first", "4", "--fail-kind", "500", "--fail-operations", "bulk_upsert")
    make_customer()
    with satori(BULK_UPLOAD_ATTEMPTS=attempts):
        with transaction.atomic():
            job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
        ready: list[int] = []
        bulk.run_job(job.pk, on_part_ready=ready.append)
        (part_id,) = ready
        outcomes = []
        while not outcomes or outcomes[-1] == "retry":
            outcomes.append(bulk.upload_part(part_id)[0])
    assert outcomes[-1] == ("failed" if attempts == 4 else "uploaded")
    assert len(outcomes) == min(attempts, 5)
    assert "django_satori.E015" in check_ids(BULK_UPLOAD_ATTEMPTS=0)


# --------------------------------------------------------------------------- fixes


def test_short_key_values_do_not_spoil_the_reading_of_successful_answers(satori_sandbox):
    keys = {"USER_KEY": "a", "USER_SECRET": "s", "COMPANY_KEY": "t", "COMPANY_SECRET": "e"}
    satori_sandbox.configure(keys=SandboxKeys("a", "s", "t", "e"))
    with satori(**keys):
        make_customer()
        drain()
    row = state()
    assert row.status == SyncStatus.SYNCED, row.last_error
    assert row.hashcode == satori_sandbox.state.customer("taro@example.jp").hashcode


def test_registration_sends_no_delete_tags_and_a_removal_is_not_marked_synced(satori_sandbox):
    with satori(PUSH_ENDPOINT="registration"):
        customer = make_customer(tags=["seminar", "whitepaper"])
        drain()
        assert state().status == SyncStatus.SYNCED
        customer.tags = ["seminar"]
        customer.save()
        drain()
    last = satori_sandbox.state.requests_for("registration")[-1].form_dict()
    assert "customer[delete_tags]" not in last
    row = state()
    assert row.status == SyncStatus.FAILED
    assert "whitepaper" in row.last_error and "PUSH_ENDPOINT" in row.last_error
    assert "whitepaper" in satori_sandbox.state.customer("taro@example.jp").tags


def test_the_bulk_default_route_does_not_overwrite_a_route_with_single_upserts(satori_sandbox):
    satori_sandbox.seed_customer(
        "taro@example.jp", created_by=satori_sandbox.keys.user_key, collection_route="展示会"
    )
    with satori(BULK_DEFAULT_COLLECTION_ROUTE="API連携"):
        make_customer(collection_route="")
        drain()
    assert state().status == SyncStatus.SYNCED
    assert "customer[collection_route]" not in (
        satori_sandbox.state.requests_for("upsert")[-1].form_dict()
    )
    assert satori_sandbox.state.customer("taro@example.jp").fields["collection_route"] == "展示会"


@pytest.mark.parametrize("language", ["en", "ja"])
def test_a_permission_refusal_names_the_rule_item_not_a_field(sandbox_with, language):
    server = sandbox_with("--own-only")
    server.seed_customer("taro@example.jp", created_by="another-user")
    with translation.override(language):
        make_customer()
        drain()
        text = state().last_error
    assert "「カスタマー情報の編集」" in text and "自分のみ" in text
    assert "'email'" not in text and "項目" not in text


def test_every_operation_has_its_permission_rule_item():
    assert {op: permissions.RULE_LABELS[op] for op in permissions.OPERATIONS} == {
        "upsert": "カスタマー情報の編集",
        "registration": "新規登録の実行",
        "delete": "カスタマーの削除",
        "action": "カスタマーのユーザー定義アクション",
        "bulk_upload": "カスタマーの一括登録",
        "bulk_status": "カスタマーステータスの一括取得",
    }
    error = SatoriPermissionError("denied", status=403)
    error.endpoint = "customer/delete"
    assert "「カスタマーの削除」" in str(error)


def test_an_html_403_from_a_proxy_is_a_configuration_problem_not_retried(sandbox_with):
    sandbox_with("--fail-first", "1", "--fail-kind", "html_403")
    make_customer()
    drain()
    row = state()
    assert row.status == SyncStatus.FAILED and row.attempts == 1
    assert "proxy" in row.last_error and "not retried" in row.last_error


def test_the_admin_form_has_an_input_for_each_further_standard_item():
    customer = Customer.objects.create(email="c@example.jp", custom_fields={"position": "部長"})
    name = "satori_custom__undeclared__position"
    data = {"email": "c@example.jp", "collection_route": "web", "tags": ""}
    with satori(EXTRA_STANDARD_ITEMS=EXTRA):
        form = CustomerAdminForm(instance=customer, data={**data, name: "とても長い役職名の例です"})
        assert "EXTRA_STANDARD_ITEMS" in str(form.fields[name].help_text)
        assert form.initial[name] == "部長"
        assert not form.is_valid() and "10" in form.errors[name][0]  # its max_length
        form = CustomerAdminForm(instance=customer, data={**data, name: "課長"})
        assert form.is_valid(), form.errors
        form.save()
    customer.refresh_from_db()
    assert customer.custom_fields == {"position": "課長"}
