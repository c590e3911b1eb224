"""Scenario 4: bad input, mixed with good input.

Each bad value must be refused with an error that names its field, and must
not hold up, change or lose anything else in the same batch. Single pushes
run in-process (``tests.syncing.drain`` runs what the task runs); bulk jobs
through ``bulk.drive_job`` (what the tasks and ``--wait`` commands run).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_satori import bulk, mark_for_sync
from django_satori.client import SatoriClient
from django_satori.conf import get_settings
from django_satori.exceptions import SatoriError, SatoriNotFoundError, SatoriValidationError
from django_satori.models import BulkRowError, BulkState, Customer, SyncLog, SyncState, SyncStatus
from tests.reliability.helpers import (
    compare_with_sandbox,
    customer_values,
    describe_differences,
    record_figures,
    satori_settings,
)
from tests.syncing import drain
from tests.test_client import CaptureServer, Reply, capture  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db(transaction=True)

MEMO_10K = '長い,メモ "引用"\r\n' + "x" * 10_000


# --------------------------------------------------------------------------- e-mails


@pytest.mark.parametrize(
    ("email", "words"),
    [
        ("no-at-sign.example.jp", "not a valid"),
        ("two@@example.jp", "not a valid"),
        ("dots..in@example.jp", "not a valid"),
        ("spaces in@example.jp", "not a valid"),
        ("trailing@example", "not a valid"),
        ("山田@example.jp", "half-width"),
        ("taro@例え.jp", "half-width"),
        ("a" * 250 + "@example.jp", "longer than 255"),
        ("", "required"),
        ("   ", "required"),
    ],
)
def test_bad_emails_are_refused_at_save_naming_the_field(satori_sandbox, email, words):
    Customer.objects.create(**customer_values(1))
    with pytest.raises(SatoriValidationError) as info:
        Customer.objects.create(**{**customer_values(2), "email": email})
    assert info.value.field == "email"
    assert words in str(info.value)
    assert "email" in str(info.value)
    # The good customer is unaffected and nothing of the bad one was recorded.
    assert list(SyncState.objects.values_list("email", flat=True)) == ["rel00001@example.jp"]
    drain()
    assert compare_with_sandbox(satori_sandbox, ["rel00001@example.jp"])["synced"]


@pytest.mark.parametrize(
    "email", ["ＴＡＲＯ＠ＥＸＡＭＰＬＥ．ＪＰ", " Taro@Example.JP\t", "ｔａｒｏ@example.jp"]
)
def test_full_width_and_padded_emails_are_normalised_not_refused(satori_sandbox, email):
    customer = Customer.objects.create(**{**customer_values(1), "email": email})
    assert customer.email == "taro@example.jp"
    drain()
    (request,) = satori_sandbox.state.requests_for("upsert")
    assert request.form_dict()["customer[email]"] == "taro@example.jp"
    assert SyncState.objects.get().status == SyncStatus.SYNCED


# --------------------------------------------------------------------------- single pushes

#: Values the model accepts but SATORI must not get, and the field each error must name.
#: (A tag holding the separator is refused by ``save()`` itself now; it can still arrive
#: through ``update()``, which is how this test writes it.)
BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown custom field": ({"custom_fields": {"custom:colour": "red"}}, "custom:colour"),
    "integer field given text": ({"custom_fields": {"custom:age": "forty"}}, "custom:age"),
    "integer field given a float": ({"custom_fields": {"custom:age": "4.5"}}, "custom:age"),
    "integer field given a bool": ({"custom_fields": {"custom:age": True}}, "custom:age"),
    "date as DD/MM/YYYY": ({"custom_fields": {"custom:birthday": "31/01/1990"}}, "custom:birthday"),
    "impossible date": ({"custom_fields": {"custom:birthday": "1990-02-30"}}, "custom:birthday"),
    "date with a time": (
        {"custom_fields": {"custom:birthday": "1990-01-31T10:00"}},
        "custom:birthday",
    ),
    "unknown delivery permission": ({"delivery_permission": "maybe"}, "delivery_permission"),
    "tag with the separator": ({"tags": ["a,b"]}, "append_tags"),
}


def test_each_bad_value_fails_its_customer_naming_the_field_and_the_rest_sync(satori_sandbox):
    good = [Customer.objects.create(**customer_values(i)).email for i in range(20)]
    # CSV-hostile but valid: must arrive byte for byte.
    hostile = Customer.objects.create(
        **{
            **customer_values(99),
            "memo": MEMO_10K,
            "last_name": '山田, "太郎"',
            "first_name": "emoji 🎉👨‍👩‍👧",
            "address": "東京都\r\n千代田区\n1-1\r2",
        }
    ).email
    bad = {}
    for n, (label, (changes, field)) in enumerate(BAD_VALUES.items()):
        if "tags" in changes:
            customer = Customer.objects.create(**customer_values(100 + n))
            Customer.objects.filter(pk=customer.pk).update(**changes)
            mark_for_sync(Customer.objects.filter(pk=customer.pk))
            email = customer.email
        else:
            email = Customer.objects.create(**{**customer_values(100 + n), **changes}).email
        bad[email] = (label, field)
    drain()

    for email, (label, field) in bad.items():
        state = SyncState.objects.get(email=email)
        assert state.status == SyncStatus.FAILED, label
        assert f"field '{field}'" in state.last_error, (label, state.last_error)
        assert state.attempts == 1
        assert satori_sandbox.state.customer(email) is None, label
    sent = {r.form_dict()["customer[email]"] for r in satori_sandbox.state.requests_for("upsert")}
    assert sent == {*good, hostile}  # no call was spent on a bad value
    result = compare_with_sandbox(satori_sandbox, [*good, hostile])
    assert sorted(result["synced"]) == sorted([*good, hostile]), describe_differences(
        satori_sandbox, result["stale"] + result["missing"]
    )
    logged = SyncLog.objects.filter(outcome=SyncLog.Outcome.FAILED)
    assert {entry.email for entry in logged} == set(bad)
    record_figures(
        "bad_input_single_pushes",
        {
            "good": len(good) + 1,
            "bad": len(bad),
            "sent": len(result["synced"]),
            "failed_with_field_named": len(bad),
            "calls_spent_on_bad_values": 0,
            "lost": len(result["missing"]),
        },
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"memo": "a\x00b"}, "memo"),
        ({"last_name": "山\x00田"}, "last_name"),
        ({"custom_fields": {"custom:plan": "a\x00"}}, "custom:plan"),
        ({"tags": ["ok", "b\x00d"]}, "append_tags"),
    ],
)
def test_a_nul_character_is_refused_at_save_naming_the_field(satori_sandbox, changes, field):
    """Alike on every database: PostgreSQL cannot even store it (text and jsonb)."""
    fine = Customer.objects.create(**customer_values(1)).email
    with pytest.raises(SatoriValidationError) as info, transaction.atomic():
        Customer.objects.create(**{**customer_values(2), **changes})
    assert info.value.field == field and "NUL" in str(info.value)
    assert list(SyncState.objects.values_list("email", flat=True)) == [fine]
    drain()
    assert compare_with_sandbox(satori_sandbox, [fine])["synced"] == [fine]


def test_satori_refusing_a_value_fails_only_that_customer_naming_the_field(satori_sandbox):
    # SATORI's custom field is a select the project declared as text: SATORI refuses.
    satori_sandbox.configure(
        custom_fields={
            "plan": {"type": "select", "choices": ["gold"]},
            "age": "integer",
            "birthday": "date",
        }
    )
    fine = Customer.objects.create(
        **{**customer_values(1), "custom_fields": {"custom:plan": "gold"}}
    ).email
    refused = Customer.objects.create(
        **{**customer_values(2), "custom_fields": {"custom:plan": "silver"}}
    ).email
    drain()
    state = SyncState.objects.get(email=refused)
    assert state.status == SyncStatus.FAILED and state.attempts == 1
    assert "custom:plan" in state.last_error and "SATORI status 400" in state.last_error
    assert SyncState.objects.get(email=fine).status == SyncStatus.SYNCED


def test_an_unknown_hashcode_is_a_readable_not_found_error(satori_sandbox):
    client = SatoriClient(get_settings())
    with pytest.raises(SatoriNotFoundError) as info:
        client.delete_customer(hashcode="no-such-hashcode")
    assert info.value.field is None or info.value.field == "hashcode"
    assert "hashcode" in str(info.value)
    with pytest.raises(SatoriNotFoundError):
        client.upsert_customer(
            {"hashcode": "no-such-hashcode", "last_name": "x"}, identity_type="hashcode"
        )


def test_an_email_change_for_a_customer_satori_lost_ends_failed_with_the_reason(satori_sandbox):
    customer = Customer.objects.create(**customer_values(1))
    drain()
    satori_sandbox.state.customers.clear()  # deleted in SATORI's screen meanwhile
    customer.email = "renamed@example.jp"
    customer.save()
    drain()
    state = SyncState.objects.get(email="renamed@example.jp")
    assert state.status == SyncStatus.FAILED, state.status
    assert "hashcode" in state.last_error and "404" in state.last_error


# --------------------------------------------------------------------------- bulk


def test_bulk_job_with_bad_rows_reports_each_by_field_and_sends_the_rest(satori_sandbox):
    good = [Customer(**customer_values(i)) for i in range(50)]
    good.append(
        Customer(
            **{
                **customer_values(98),
                "memo": MEMO_10K,
                "first_name": 'emoji 🎉, "quoted"',
                "address": "a\r\nb\rc\nd",
            }
        )
    )
    bad_rows = {
        "permission@example.jp": ({"delivery_permission": "maybe"}, "delivery_permission"),
        "colour@example.jp": ({"custom_fields": {"custom:colour": "red"}}, "custom:colour"),
        "age@example.jp": ({"custom_fields": {"custom:age": "forty"}}, "custom:age"),
        "birthday@example.jp": (
            {"custom_fields": {"custom:birthday": "1990/13/01"}},
            "custom:birthday",
        ),
        # bulk_create skips save(): the same address twice, once not normalised.
        "Rel00003@Example.JP": ({}, "email"),
    }
    bad = [
        Customer(**{**customer_values(200 + n), "email": email, **changes})
        for n, (email, (changes, _field)) in enumerate(bad_rows.items())
    ]
    Customer.objects.bulk_create(good + bad)
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    with satori_settings(BULK_POLL_INTERVAL_SECONDS=0.05, BULK_POLL_MAX_INTERVAL_SECONDS=0.2):
        job = bulk.drive_job(job.pk, timeout=60)
    assert job.state == BulkState.FINISHED, job.error
    assert (job.row_count, job.invalid_count) == (len(good), len(bad))
    errors = {e.email: e for e in BulkRowError.objects.filter(job=job)}
    for email, (_changes, field) in bad_rows.items():
        assert errors[email].field == field, (email, errors[email].message)
        assert errors[email].before_upload
    emails = [c.email for c in good]
    result = compare_with_sandbox(satori_sandbox, emails)
    assert sorted(result["synced"]) == sorted(emails), describe_differences(
        satori_sandbox, result["stale"] + result["missing"]
    )
    record_figures(
        "bad_input_bulk",
        {
            "rows": len(good) + len(bad),
            "uploaded": job.row_count,
            "left_out_with_field_named": len(errors),
            "sent": len(result["synced"]),
            "lost": len(result["missing"]),
        },
    )


def test_the_same_email_twice_in_one_upload_fails_the_second_row_naming_email(satori_sandbox):
    client = SatoriClient(get_settings())
    csv = (
        b"email,last_name,collection_route\n"
        b"dup@example.jp,first,web\n"
        b"other@example.jp,other,web\n"
        b"DUP@example.jp,second,web\n"
    )
    upload = client.bulk_upsert(csv)
    status = client.bulk_status(upload.process_code)
    assert status.finished
    (failed,) = status.failed_rows
    assert failed.row_number == 4 and "email" in failed.message
    assert satori_sandbox.state.customer("dup@example.jp").fields["last_name"] == "first"
    assert satori_sandbox.state.customer("other@example.jp") is not None


def test_an_empty_selection_is_a_clear_no_op(satori_sandbox):
    Customer.objects.create(**customer_values(1))
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.none(), mode="upsert")
    job = bulk.drive_job(job.pk, timeout=10)
    assert job.state in (BulkState.FINISHED, BulkState.FAILED)
    assert (job.row_count, job.part_count) == (0, 0)
    assert job.state == BulkState.FINISHED or job.error.strip()
    assert not satori_sandbox.state.requests_for("bulk_upsert")
    assert SyncState.objects.get().bulk_part is None


# --------------------------------------------------------------------------- SATORI replies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
#: Replies shaped like SATORI's with anything in the places the client reads after parsing.
satori_like = st.fixed_dictionaries(
    {"status": st.sampled_from([200, 202, "200", 200.0])},
    optional={
        "message": json_values | st.fixed_dictionaries({"customer[hashcode]": json_values}),
        "body": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "process_code": json_values,
                "process_status": json_values,
                "failed_rows": json_values
                | st.lists(
                    st.fixed_dictionaries(
                        {}, optional={"row_number": json_values, "message": json_values}
                    ),
                    max_size=3,
                ),
                "succeeded_rows": json_values,
            },
        ),
        "process_code": json_values,
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    data=satori_like,
    cut=st.none() | st.integers(0, 120),
    call=st.sampled_from(["upsert", "delete", "bulk", "status", "action"]),
)
def test_fuzz_every_client_call_against_odd_replies_raises_only_typed_errors(
    capture: CaptureServer,  # noqa: F811
    data: dict[str, Any],
    cut: int | None,
    call: str,
) -> None:
    """After parsing, the client digs hashcodes, process codes and failed rows out of
    the reply; whatever sits there, only a SatoriError or a result comes back."""
    body = json.dumps(data, allow_nan=True).encode()
    capture.reply(Reply(200, body if cut is None else body[:cut]))
    conf = dataclasses.replace(get_settings(), BASE_URL=capture.url, TIMEOUT=5.0)
    with SatoriClient(conf) as client:
        calls = {
            "upsert": lambda: client.upsert_customer({"email": "a@example.jp"}),
            "delete": lambda: client.delete_customer(email="a@example.jp"),
            "bulk": lambda: client.bulk_upsert(b"email,collection_route\na@example.jp,web\n"),
            "status": lambda: client.bulk_status("pc-1"),
            "action": lambda: client.add_action(email="a@example.jp", name="x"),
        }
        try:
            result = calls[call]()
        except SatoriError as error:
            assert str(error).strip()  # a person can read what went wrong
            assert conf.USER_SECRET not in str(error) + repr(error)
            return
    if call == "bulk":
        assert isinstance(result.process_code, str) and result.process_code
    if call == "status":
        assert all(isinstance(row.row_number, int) for row in result.failed_rows)
        assert isinstance(result.finished, bool)
    if call in ("upsert", "delete", "action"):
        assert result.hashcode is None or isinstance(result.hashcode, str)


def test_odd_replies_through_the_sync_engine_end_retrying_or_failed_never_crashing(
    satori_sandbox,
    capture: CaptureServer,  # noqa: F811
) -> None:
    replies = [
        Reply(200, b"<html>maintenance</html>", {"Content-Type": "text/html"}),
        Reply(200, b'{"status": 200, "message": {"customer[hash'),  # truncated
        Reply(200, b"[1, 2, 3]"),  # unexpected shape
        Reply(502, b""),
        Reply(200, b'{"status": "OK"}'),
    ]
    capture.reply(*replies)
    with satori_settings(
        BASE_URL=capture.url,
        MAX_ATTEMPTS=10,
        RETRY_BACKOFF_SECONDS=0.01,
        RETRY_BACKOFF_MAX_SECONDS=0.02,
    ):
        Customer.objects.create(**customer_values(1))
        outcomes = []
        for _ in range(len(replies)):
            state = SyncState.objects.get()
            SyncState.objects.filter(pk=state.pk).update(not_before=None)
            from django_satori import sync

            outcomes.append(sync.push(state.pk)[0].value)
            state.refresh_from_db()
            assert state.last_error.strip()
            if state.status == SyncStatus.FAILED:
                break
    assert outcomes[:2] == ["retry", "retry"]  # not JSON, truncated: transient
    state = SyncState.objects.get()
    assert state.status in (SyncStatus.PENDING, SyncStatus.FAILED)
    assert SyncLog.objects.filter(outcome__in=["retry", "failed"]).count() == len(outcomes)
