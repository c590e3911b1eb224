"""Nothing leaked, nothing forged (issue 7, item 6).

The four keys are given values with characters that change under URL and HTML
encoding, so a leak in any spelling is caught. One full sync (single pushes
with failures and retries, a refused value, an action, a delete, bulk jobs
with bad rows, an expired process code, refused keys) is run with every
``django_satori`` logger at DEBUG, and then every place text could end up is
searched: log lines and their tracebacks, exception text and tracebacks with
frame locals (what error trackers record), stored SyncLog summaries, bulk
errors, the CSV files, every admin page, reprs, and the broker's messages.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import logging
import traceback
from collections.abc import Iterable, Iterator
from urllib.parse import quote, quote_plus

import pytest
import requests
from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import transaction
from django.test import Client, override_settings
from django.urls import reverse

from django_satori import add_action, bulk, sync
from django_satori.client import SatoriClient, get_client
from django_satori.conf import get_settings
from django_satori.exceptions import SatoriError, SatoriValidationError
from django_satori.models import (
    BulkJob,
    BulkPart,
    BulkRowError,
    BulkState,
    Customer,
    CustomerAction,
    SyncLog,
    SyncState,
    SyncStatus,
)
from django_satori.sandbox.config import SandboxKeys
from django_satori.sandbox.server import SandboxServer
from tests.reliability.helpers import customer_values, satori_settings
from tests.syncing import drain

pytestmark = pytest.mark.django_db(transaction=True)

KEYS = {
    "USER_KEY": "uk-Λ/+1&user=key",
    "USER_SECRET": "us-秘密 %20 <b>secret</b>",
    "COMPANY_KEY": "ck@company;key#1",
    "COMPANY_SECRET": "cs-\"quoted\"'secret'\\x",
}
FAST = {
    "RETRY_BACKOFF_SECONDS": 0.01,
    "RETRY_BACKOFF_MAX_SECONDS": 0.02,
    "MAX_ATTEMPTS": 5,
    "BULK_POLL_INTERVAL_SECONDS": 0.05,
    "BULK_POLL_MAX_INTERVAL_SECONDS": 0.1,
    "TIMEOUT": 0.5,
    **KEYS,
}


def spellings(value: str) -> set[str]:
    """Every way a value could be written into text we produce."""
    forms = {
        value,
        quote(value, safe=""),
        quote_plus(value, safe=""),
        html.escape(value),
        html.escape(value, quote=False),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        repr(value)[1:-1],
    }
    return {form for form in forms if len(form) >= 6}


NEEDLES = {name: spellings(value) for name, value in KEYS.items()}


def leaks(texts: Iterable[str]) -> list[str]:
    found = []
    for text in texts:
        for name, forms in NEEDLES.items():
            if any(form in text for form in forms):
                found.append(f"{name} in: {text[:300]!r}")
    return found


@pytest.fixture
def keyed_sandbox(satori_sandbox: SandboxServer) -> Iterator[SandboxServer]:
    """The sandbox and the project both using KEYS."""
    with satori_settings(**FAST):
        satori_sandbox.configure(
            keys=SandboxKeys(
                *(KEYS[k] for k in ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET"))
            )
        )
        yield satori_sandbox


def rendered_traceback(error: BaseException) -> str:
    """The traceback as an error tracker records it: with every frame's locals."""
    return "".join(traceback.TracebackException.from_exception(error, capture_locals=True).format())


def full_sync(sandbox: SandboxServer) -> list[BaseException]:
    """Exercise every path that talks to SATORI, failures included; returns raised errors."""
    errors: list[BaseException] = []
    sandbox.faults.fail_first(2, "500", operations=["upsert"])
    sandbox.faults.fail_first(1, "html", operations=["upsert"])
    sandbox.faults.fail_first(1, "drop", operations=["upsert"])
    sandbox.faults.fail_first(1, "429", operations=["upsert"])
    emails = [Customer.objects.create(**customer_values(i)).email for i in range(6)]
    Customer.objects.create(**{**customer_values(50), "custom_fields": {"custom:age": "x"}})
    drain()
    with transaction.atomic():
        action = add_action(emails[0], "資料請求", content="カタログ", url="https://example.jp/")
    sync.send_action(action.pk)
    Customer.objects.get(email=emails[1]).delete()
    drain()
    # Bulk: one bad row, a transient status error, then a forgotten process code.
    Customer.objects.bulk_create(
        [Customer(**customer_values(i)) for i in range(100, 120)]
        + [Customer(**{**customer_values(130), "custom_fields": {"custom:age": "x"}})]
    )
    sandbox.faults.fail_first(1, "503", operations=["bulk_status"])
    with transaction.atomic():
        job = bulk.start_bulk_job(
            Customer.objects.filter(email__startswith="rel001"), mode="upsert"
        )
    bulk.drive_job(job.pk, timeout=30)
    sandbox.configure(bulk_processing_seconds=30)
    Customer.objects.bulk_create([Customer(**customer_values(i)) for i in range(200, 205)])
    with transaction.atomic():
        job = bulk.start_bulk_job(
            Customer.objects.filter(email__startswith="rel002"), mode="upsert"
        )
    bulk.run_job(job.pk, on_part_ready=lambda part_id: bulk.upload_part(part_id))
    sandbox.state.forget_process_codes()
    for part in BulkPart.objects.filter(job=job):
        bulk.poll_part(part.pk, force=True)
    sandbox.configure(bulk_processing_seconds=0)
    # Direct client calls that fail in every way, for their exception objects.
    client = get_client()
    sandbox.faults.fail_first(1, "timeout", operations=["upsert"])
    sandbox.faults.timeout_seconds = 1.0
    calls = [
        lambda: client.upsert_customer({"email": emails[2], "memo": "x"}),  # timeout
        lambda: client.bulk_status("unknown-process-code"),  # 404, keys in the query string
        lambda: client.upsert_customer({"email": "bad@", "memo": "x"}),  # local refusal
        lambda: client.delete_customer(hashcode="unknown"),
    ]
    for call in calls:
        try:
            call()
        except SatoriError as error:
            errors.append(error)
    # Keys SATORI refuses: 401 through the sync engine and the client.
    sandbox.configure(keys=SandboxKeys())
    Customer.objects.create(**customer_values(300))
    drain()
    try:
        client.bulk_status("x")
    except SatoriError as error:
        errors.append(error)
    return errors


def stored_texts() -> list[str]:
    texts: list[str] = []
    for entry in SyncLog.objects.all():
        texts += [
            json.dumps(entry.request_summary, ensure_ascii=False),
            json.dumps(entry.response_summary, ensure_ascii=False),
            entry.message,
            repr(entry),
            str(entry),
        ]
    for state in SyncState.objects.all():
        texts += [state.last_error, repr(state), json.dumps(state.remote_values)]
    texts += [e.message for e in BulkRowError.objects.all()]
    texts += [p.error for p in BulkPart.objects.all()] + [j.error for j in BulkJob.objects.all()]
    texts += [a.last_error for a in CustomerAction.objects.all()]
    return texts


def csv_files() -> list[str]:
    storage = bulk.bulk_storage()
    contents = []
    for part in BulkPart.objects.exclude(csv_file=""):
        with storage.open(part.csv_file.name, "rb") as fileobj:
            contents.append(fileobj.read().decode("utf-8"))
    return contents


def test_no_key_anywhere_after_a_full_sync_with_failures(keyed_sandbox, caplog):
    caplog.set_level(logging.DEBUG)  # root: django_satori.* and the HTTP libraries
    errors = full_sync(keyed_sandbox)
    assert len(errors) == 5 and SyncLog.objects.filter(outcome="retry").exists()
    assert SyncLog.objects.filter(outcome="failed", satori_status=401).exists()
    assert BulkPart.objects.filter(state=BulkState.FAILED).exists()

    texts = [record.getMessage() for record in caplog.records]
    formatter = logging.Formatter()
    texts += [formatter.formatException(r.exc_info) for r in caplog.records if r.exc_info]
    for error in errors:
        texts += [
            str(error),
            repr(error),
            rendered_traceback(error),
            json.dumps(getattr(error, "request_summary", None), ensure_ascii=False),
            json.dumps(getattr(error, "response_summary", None), ensure_ascii=False, default=repr),
        ]
    texts += stored_texts() + csv_files()
    # (Not the sandbox's own state page: it masks only the keys configured now, and
    # full_sync() changed them at the end.)
    texts += [
        repr(get_settings()),
        repr(get_client()),
        repr(keyed_sandbox.keys),
        repr(keyed_sandbox),
    ]
    assert any(
        r.name.startswith("django_satori") and r.levelno == logging.DEBUG for r in caplog.records
    )
    assert any(
        "status.json" in r.getMessage() for r in caplog.records if r.name.startswith("urllib3")
    ), "the request line with the keys was not logged"
    assert leaks(texts) == []

    # Personal data is redacted by default in our own log lines.
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("django_satori")]
    ours += [
        formatter.formatException(r.exc_info)
        for r in caplog.records
        if r.exc_info and r.name.startswith("django_satori")
    ]
    personal = set()
    for customer in Customer.objects.all():
        personal |= {customer.email, customer.last_name, customer.memo, customer.phone_number}
    shown = [text for text in ours if any(value and value in text for value in personal)]
    assert shown == []


def test_every_admin_page_is_free_of_keys(keyed_sandbox):
    full_sync(keyed_sandbox)
    # A summary stored by an older version (or by hand) with a key in it is still masked.
    SyncLog.objects.create(
        endpoint="customer/upsert.json",
        outcome="failed",
        request_summary={"user_key": KEYS["USER_KEY"]},
        response_summary={"echo": f"user_secret={KEYS['USER_SECRET']}"},
    )
    User.objects.create_superuser("root", password="pw")
    browser = Client()
    browser.login(username="root", password="pw")
    pages = 0
    texts = []
    for model in admin.site._registry:
        if model._meta.app_label != "django_satori":
            continue
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        urls = [changelist, changelist + "?q=rel", changelist + "?all=1"]
        urls += [
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[pk])
            for pk in model._default_manager.values_list("pk", flat=True)[:25]
        ]
        for url in urls:
            response = browser.get(url)
            assert response.status_code == 200, (url, response.status_code)
            texts.append(response.content.decode())
            pages += 1
    for part in BulkPart.objects.exclude(csv_file=""):
        response = browser.get(reverse("admin:django_satori_bulkpart_csv", args=[part.pk]))
        texts.append(b"".join(response.streaming_content).decode())
    assert pages > 20
    assert leaks(texts) == []


def test_admin_state_changes_need_permission_and_csrf(keyed_sandbox):
    Customer.objects.create(**customer_values(1))
    keyed_sandbox.configure(bulk_processing_seconds=30)
    with transaction.atomic():
        job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=lambda part_id: bulk.upload_part(part_id))
    part = BulkPart.objects.get()
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.set(
        Permission.objects.filter(codename__in=["view_customer", "change_customer", "view_bulkjob"])
    )
    posts = [
        reverse("admin:django_satori_bulkjob_cancel", args=[job.pk]),
        reverse("admin:django_satori_bulkjob_refresh", args=[job.pk]),
        reverse("admin:django_satori_bulkjob_held", args=[job.pk, "resend"]),
        reverse("admin:django_satori_bulkjob_held", args=[job.pk, "give-up"]),
    ]
    browser = Client(enforce_csrf_checks=True)
    browser.login(username="viewer", password="pw")
    browser.get(reverse("admin:django_satori_customer_changelist"))
    token = browser.cookies["csrftoken"].value
    for url in posts:
        assert browser.post(url).status_code == 403  # no token
        assert browser.post(url, {"csrfmiddlewaretoken": token}).status_code == 403  # no perm
        assert browser.get(url).status_code == 405  # never on GET
    csv_url = reverse("admin:django_satori_bulkpart_csv", args=[part.pk])
    assert browser.get(csv_url).status_code == 403  # the CSV holds personal data
    for name in ("sync_now", "mark_for_sync", "retry_failed", "bulk_upsert", "bulk_register"):
        response = browser.post(
            reverse("admin:django_satori_customer_changelist"),
            {
                "action": name,
                "_selected_action": [str(Customer.objects.get().pk)],
                "csrfmiddlewaretoken": token,
            },
        )
        assert response.status_code == 200  # the changelist again, nothing done
    job.refresh_from_db()
    assert job.state == BulkState.PROCESSING and BulkJob.objects.count() == 1
    assert part.poll_count == BulkPart.objects.get().poll_count
    assert SyncState.objects.get().status == SyncStatus.IN_BULK


# --------------------------------------------------------------------------- the broker


def queued_messages(redis_url: str, queue: str = "celery") -> list[dict]:
    import redis

    connection = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in connection.lrange(queue, 0, -1)]
    finally:
        connection.close()


def all_redis_values(redis_url: str) -> list[bytes]:
    import redis

    connection = redis.Redis.from_url(redis_url)
    values: list[bytes] = []
    try:
        for key in connection.scan_iter():
            kind = connection.type(key)
            values.append(key)
            if kind == b"string":
                values.append(connection.get(key) or b"")
            elif kind == b"list":
                values += connection.lrange(key, 0, -1)
            elif kind == b"hash":
                values += [k + b"=" + v for k, v in connection.hgetall(key).items()]
            elif kind == b"zset":
                values += connection.zrange(key, 0, -1)
            elif kind == b"set":
                values += list(connection.smembers(key))
    finally:
        connection.close()
    return values


def test_tasks_carry_ids_only_and_the_broker_never_sees_keys_or_personal_data(
    keyed_sandbox, redis_server, celery_worker
):
    # No worker yet: every task message waits in the queue where we can read it.
    emails = [Customer.objects.create(**customer_values(i)).email for i in range(3)]
    with transaction.atomic():
        add_action(emails[0], "資料請求", content="カタログ")
    Customer.objects.get(email=emails[2]).delete()
    Customer.objects.bulk_create([Customer(**customer_values(i)) for i in range(10, 13)])
    with transaction.atomic():
        bulk.start_bulk_job(Customer.objects.filter(email__startswith="rel0001"), mode="upsert")
    assert sync.wait_for_dispatch()  # saves hand their ids to a publisher thread
    messages = queued_messages(redis_server.url)
    tasks = {m["headers"]["task"] for m in messages}
    assert tasks == {
        "django_satori.tasks.push_many",
        "django_satori.tasks.send_action",
        "django_satori.tasks.run_bulk_job",
    }
    personal = {c.email for c in Customer.objects.all()} | {"山田", "資料請求", "カタログ"}
    for message in messages:
        args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {} and len(args) == 1, message["headers"]
        ids = args[0] if isinstance(args[0], list) else [args[0]]
        assert ids and all(type(i) is int for i in ids), message["headers"]
        assert message["headers"]["argsrepr"] == repr(tuple(args))
        raw = json.dumps(message, ensure_ascii=False) + base64.b64decode(message["body"]).decode()
        assert leaks([raw]) == []
        assert not [value for value in personal if value in raw]

    # Then a worker runs everything; nothing it leaves in Redis holds a key or an e-mail.
    worker = celery_worker({"RETRY_BACKOFF_SECONDS": 0.05, "BULK_POLL_INTERVAL_SECONDS": 0.1})
    worker.wait_until(
        lambda: (
            not SyncState.objects.filter(
                status__in=[SyncStatus.PENDING, SyncStatus.SENDING, SyncStatus.IN_BULK]
            ).exists()
            and CustomerAction.objects.filter(status="sent").exists()
        ),
        timeout=60,
    )
    stored = b"\n".join(all_redis_values(redis_server.url)).decode(errors="replace")
    assert leaks([stored]) == []
    assert not [value for value in personal if value in stored]
    assert "celery-task-meta" not in stored  # results are not kept


# --------------------------------------------------------------------------- bulk CSV injection


def test_a_crafted_memo_cannot_inject_a_row_into_a_bulk_upload(satori_sandbox):
    victim = Customer.objects.create(**customer_values(1))
    drain()
    before = dict(satori_sandbox.state.customer(victim.email).fields)
    columns = len(bulk.bulk_csv.header(get_settings()))
    injected = "\r" + ",".join([victim.email, "HACKED"] + ["web"] * (columns - 2))
    Customer.objects.bulk_create([Customer(**{**customer_values(2), "memo": "hi" + injected})])
    with transaction.atomic():
        job = bulk.start_bulk_job(
            Customer.objects.filter(email=customer_values(2)["email"]), mode="upsert"
        )
    job = bulk.drive_job(job.pk, timeout=30)
    assert job.state == BulkState.FINISHED and (job.row_count, job.failed_count) == (1, 0)
    assert satori_sandbox.state.customer(victim.email).fields == before
    assert (
        satori_sandbox.state.customer(customer_values(2)["email"]).fields["memo"] == "hi" + injected
    )


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("base_url", "debug", "refused"),
    [
        ("http://api.satr.jp", False, True),
        ("http://10.0.0.5:8000", False, True),
        ("http://api.satr.jp", True, False),
        ("http://127.0.0.1:8765", False, False),
        ("http://[::1]:8765", False, False),
        ("https://api.satr.jp", False, False),
    ],
)
def test_manage_py_check_refuses_plain_http_outside_debug(settings, base_url, debug, refused):
    settings.DEBUG = debug
    with override_settings(SATORI={**settings.SATORI, "BASE_URL": base_url}):
        if refused:
            with pytest.raises(SystemCheckError, match=r"django_satori\.E003"):
                call_command("check", "django_satori")
        else:
            call_command("check", "django_satori")


def test_the_sandbox_listens_on_loopback_only_unless_told(satori_sandbox):
    with pytest.raises(ValueError, match="allow_remote"):
        SandboxServer("0.0.0.0")
    server = SandboxServer("127.0.0.1").start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        # Its control endpoints answer only there, and never show the keys.
        state = requests.get(server.url + "/_sandbox/state", timeout=5).json()
        assert leaks([json.dumps(state)]) == []
        assert dataclasses.asdict(server.keys)["user_key"] not in json.dumps(state)
    finally:
        server.stop()


def test_a_client_built_from_settings_never_shows_keys_in_its_repr():
    conf = dataclasses.replace(get_settings(), BASE_URL="https://user:pw@api.satr.jp/?k=1", **KEYS)
    texts = [repr(SatoriClient(conf)), repr(conf), str(conf)]
    assert leaks(texts) == [] and "pw" not in texts[0]


def assert_logged_without(caplog, address: str, words: str) -> None:
    """SATORI's ``words`` reached our log lines with ``address`` redacted, as
    REDACT_PERSONAL_DATA asks by default."""
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("django_satori")]
    assert any(words in text for text in ours)
    assert not any(address in text for text in ours)


def test_a_failed_bulk_part_is_logged_without_the_address_satori_quoted(monkeypatch, caplog):
    Customer.objects.bulk_create([Customer(email="taro@example.jp", collection_route="web")])
    job = bulk.start_bulk_job(Customer.objects.all(), mode="upsert")
    bulk.run_job(job.pk, on_part_ready=lambda part_id: None)
    part = job.parts.get()

    class RefusingClient:
        def bulk_upsert(self, *args, **kwargs):
            raise SatoriValidationError("row 2: taro@example.jp is refused", status=400)

    monkeypatch.setattr("django_satori.bulk.get_client", RefusingClient)
    with caplog.at_level(logging.DEBUG, logger="django_satori"):
        assert bulk.upload_part(part.pk) == ("failed", None)
    # Kept as SATORI worded it where a person looks (like a customer's last error)...
    assert "taro@example.jp" in BulkPart.objects.get(pk=part.pk).error
    assert_logged_without(caplog, "taro@example.jp", "is refused")


def test_a_failed_push_is_logged_without_the_address_satori_quoted(monkeypatch, caplog):
    Customer.objects.create(email="hanako@example.jp", last_name="花子", collection_route="web")
    state = SyncState.objects.get()

    class RefusingClient:
        def upsert_customer(self, *args, **kwargs):
            raise SatoriValidationError("hanako@example.jp is refused", status=400)

    monkeypatch.setattr("django_satori.sync.pushing.get_client", RefusingClient)
    with caplog.at_level(logging.DEBUG, logger="django_satori"):
        assert sync.push(state.pk, ignore_window=True)[0] is sync.PushOutcome.FAILED
    # Kept as SATORI worded it where a person looks...
    assert "hanako@example.jp" in SyncState.objects.get().last_error
    assert_logged_without(caplog, "hanako@example.jp", "is refused")
