"""``manage.py satori_doctor`` and the admin page SATORI接続診断, against the sandbox over HTTP."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import re
import threading
import urllib.parse
from typing import Any, ClassVar

import pytest
from celery import current_app
from django.conf import settings
from django.contrib.auth.models import Permission, User
from django.core.cache import caches
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import translation

from django_satori import doctor
from django_satori import status as sync_status
from django_satori.beat import BEAT_SCHEDULE
from django_satori.conf import AUTH_KEYS
from django_satori.models import Customer, Diagnosis, SyncLog, SyncState
from django_satori.permissions import RULE_ITEMS, rule_item
from django_satori.sandbox import cli
from django_satori.sandbox.testing import use_sandbox

pytestmark = pytest.mark.django_db(transaction=True)

PAGE = "admin:django_satori_diagnosis"
#: Key values that appear nowhere else, so any leak is found by a plain search.
LEAKY_KEYS = {
    "USER_KEY": "uk-Zq81vX-doctor",
    "USER_SECRET": "us-Wm27pL-doctor",
    "COMPANY_KEY": "ck-Rt55nB-doctor",
    "COMPANY_SECRET": "cs-Hy93kD-doctor",
}


def satori(**changes):

    return override_settings(SATORI={**settings.SATORI, **changes})


def run(*args: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr and the error's text)`` of one satori_doctor run."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("satori_doctor", "--ping-timeout", "0.1", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, out.getvalue(), err.getvalue() + str(exc)
    return 0, out.getvalue(), err.getvalue()


def lines(out: str, check_id: str) -> list[str]:
    return [line for line in out.splitlines() if f" {check_id}:" in line]


def check(report: doctor.Report, check_id: str) -> doctor.Check:
    (found,) = [c for c in report.checks if c.id == check_id]
    return found


# --------------------------------------------------------------------------- all green


@pytest.fixture
def beat_schedule():
    saved = current_app.conf.beat_schedule
    current_app.conf.beat_schedule = dict(BEAT_SCHEDULE)
    yield
    current_app.conf.beat_schedule = saved


def shared_cache(tmp_path):
    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "satori": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path / "cache"),
        },
    }
    return override_settings(CACHES=caches)


def test_all_green_against_the_sandbox_with_a_worker(
    satori_sandbox, celery_worker, beat_schedule, tmp_path
):
    worker = celery_worker()
    with (
        shared_cache(tmp_path),
        satori(RATE_LIMIT_CACHE="satori", STATUS_CACHE="satori", RATE_LIMIT_PER_MINUTE=30),
    ):
        code, out, err = run("--ping-timeout", "2")
    assert code == 0, out + err
    assert "[FAIL]" not in out and "[WARN]" not in out, out
    for check_id in ("settings", "broker", "cache", "worker", "beat", "sandbox_keys", "probe"):
        assert lines(out, check_id) and all("[OK]" in line for line in lines(out, check_id)), out
    assert worker.hostname in out
    assert "Everything sync needs works." in out
    kept = Diagnosis.objects.get()
    assert kept.ok and kept.live and kept.source == "command"
    # The probe asked one thing, and nothing was written in SATORI.
    (request,) = satori_sandbox.state.requests
    assert request.path.endswith("/bulk_customers/status.json")
    assert satori_sandbox.state.customers == {}


def test_a_per_process_cache_fails_the_rate_limit_and_the_exit_status(satori_sandbox):
    with satori(RATE_LIMIT_PER_MINUTE=30):
        report = doctor.diagnose(live=False, ping_timeout=0.1)
    (cache,) = [c for c in report.checks if c.id == "cache"]
    assert cache.level == doctor.FAIL and cache.details["backend"] == "LocMemCache"
    assert "RATE_LIMIT_CACHE" in doctor.render(cache.message)
    assert not report.ok


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", "The broker (memory) lives inside this process"),
        ("redis://:pw-Bq4@127.0.0.1:1/0", "The broker cannot be reached (OperationalError)"),
    ],
)
def test_a_broker_workers_cannot_use_and_a_missing_worker_fail(url, expected, monkeypatch):
    # Celery prefers the environment to its configuration (the Redis fixture sets it).
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    saved = current_app.conf.broker_url
    current_app.conf.broker_url = url
    try:
        code, out, err = run("--no-live")
        report = doctor.diagnose(live=False, ping_timeout=0.1)
    finally:
        current_app.conf.broker_url = saved
    assert code == 1 and "pw-Bq4" not in out + err and "127.0.0.1:1" not in out + err
    assert check(report, "broker").level == doctor.FAIL
    assert doctor.render(check(report, "broker").message).startswith(expected)
    assert check(report, "worker").level == doctor.FAIL
    assert check(report, "beat").level == doctor.FAIL
    assert "BEAT_SCHEDULE" in doctor.render(check(report, "beat").fix)


@pytest.fixture(autouse=True)
def _no_sweep_noted():
    # A sweep run by an earlier test (any file) would vouch for a worker here.
    caches["default"].delete(sync_status.SWEEP_KEY)


@pytest.fixture
def sweep_noted():
    sync_status.record_sweep()
    yield
    caches["default"].delete(sync_status.SWEEP_KEY)


def test_a_recent_sweep_shows_a_worker_runs_when_the_broker_carries_no_pings(sweep_noted):
    report = doctor.diagnose(live=False, ping_timeout=0.1)
    worker = check(report, "worker")
    assert worker.level == doctor.WARN and "the sweep ran" in doctor.render(worker.message)
    assert check(report, "beat").level == doctor.OK


def test_the_sweep_in_the_schedule_is_enough_until_it_has_run(beat_schedule):
    report = doctor.diagnose(live=False, ping_timeout=0.1)
    assert check(report, "beat").level == doctor.OK


# --------------------------------------------------------------------------- the probe


def test_wrong_keys_fail_and_name_the_settings_without_a_value(satori_sandbox):
    with satori(**LEAKY_KEYS):
        outputs = []
        for args in ([], ["-v", "3"], ["--json"], ["-v", "3", "--write-test", "a@example.jp"]):
            code, out, err = run(*args)
            assert code == 1, out + err
            outputs.append(out + err)
        kept = json.dumps(
            [Diagnosis.objects.get().checks, Diagnosis.objects.get().suggested],
            ensure_ascii=False,
        )
    text = "\n".join(outputs)
    for value in LEAKY_KEYS.values():
        assert value not in text and value not in kept
    (probe,) = lines(outputs[0], "probe")
    assert "[FAIL]" in probe and "refused the keys (status 401)" in probe
    fix = outputs[0].split(probe, 1)[1].splitlines()[1]
    for name in AUTH_KEYS:
        assert f"SATORI['{name}']" in fix
    assert '"error": "SatoriAuthenticationError"' in outputs[1]
    assert json.loads(outputs[2].split("\n")[0])["ok"] is False
    assert "[SKIP] write:" in outputs[3]  # no write test on refused keys


def test_the_sandbox_keys_aimed_at_another_host_fail_without_their_values():
    sandbox_keys = {
        "USER_KEY": "sandbox-user-key",
        "USER_SECRET": "sandbox-user-secret",
        "COMPANY_KEY": "sandbox-company-key",
        "COMPANY_SECRET": "sandbox-company-secret",
    }
    with satori(BASE_URL="https://api.satr.jp", **sandbox_keys):
        code, out, err = run("--no-live")
    assert code == 1
    (line,) = lines(out, "sandbox_keys")
    assert "[FAIL]" in line and "api.satr.jp" in line and "USER_KEY, USER_SECRET" in line
    for value in sandbox_keys.values():
        assert value not in out + err
    assert not lines(out, "probe")  # --no-live asks nothing


def test_a_proxy_page_is_not_satori(satori_sandbox):
    satori_sandbox.faults.fail_first(1, "html")
    report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL and probe.details["http_status"] == 502
    assert "Something other than SATORI answered (HTTP 502" in doctor.render(probe.message)
    assert "BASE_URL" in doctor.render(probe.fix)


def test_a_timeout_is_named(satori_sandbox):
    satori_sandbox.faults.timeout_seconds = 3.0
    satori_sandbox.faults.fail_first(1, "timeout")
    with satori(TIMEOUT=0.5, TOTAL_TIMEOUT=0.5):
        report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL and probe.details["transport"]
    assert "did not answer in time" in doctor.render(probe.message)


def test_a_closed_port_is_a_network_failure():
    with satori(BASE_URL="http://127.0.0.1:1"):
        report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL
    assert doctor.render(probe.message).startswith("Could not reach SATORI (ConnectionError)")


def test_a_setting_the_client_refuses_is_named_and_nothing_is_sent(satori_sandbox):
    with satori(TIMEOUT=-1):
        report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL
    assert doctor.render(probe.message).startswith("Nothing was sent: SATORI['TIMEOUT']")
    assert any(
        c.level == doctor.FAIL and "TIMEOUT" in doctor.render(c.message)
        for c in report.checks
        if c.id == "settings"
    )
    assert satori_sandbox.state.requests == []


def test_tls_to_a_plain_http_server_is_a_tls_failure(satori_sandbox):
    with satori(BASE_URL=satori_sandbox.url.replace("http://", "https://")):
        report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL and probe.details["transport"] == "SSLError"
    assert "TLS connection to SATORI failed" in doctor.render(probe.message)


def test_a_refused_status_query_names_its_rule_item(satori_sandbox):
    satori_sandbox.configure(deny_operations=["bulk_status"])
    report = doctor.diagnose(ping_timeout=0.1)
    probe = check(report, "probe")
    assert probe.level == doctor.FAIL
    assert "カスタマーステータスの一括取得" in doctor.render(probe.message)


# --------------------------------------------------------------------------- write test


def cli_sandbox(*flags: str):
    """A sandbox built from command-line flags, as `python -m django_satori.sandbox` does."""
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    options = vars(parser.parse_args(["--port", "0", "--processing-seconds", "0", *flags]))
    return cli.build_server(options)


def test_the_write_test_goes_through_every_step_and_leaves_nothing_behind(satori_sandbox):
    _code, out, _err = run("--write-test", "Doctor@Example.jp")
    steps = ("upsert", "action", "bulk_upload", "bulk_status", "delete", "delete_unknown")
    for step in steps:
        (line,) = lines(out, f"write.{step}")
        assert "[OK]" in line, out
    assert "status 200" in lines(out, "write.upsert")[0]
    assert "status 404" in lines(out, "write.delete_unknown")[0]
    assert satori_sandbox.state.customer("doctor@example.jp") is None
    actions = satori_sandbox.state.requests_for("action")
    assert actions and actions[0].form_dict()["action[name]"] == doctor.MARKER_TAG
    # Only the client was used: no outbox, mirror or history rows.
    assert not Customer.objects.exists()
    assert not SyncState.objects.exists()
    assert not SyncLog.objects.exists()


@pytest.mark.parametrize(
    ("flags", "step", "operation"),
    [
        (["--deny", "action"], "write.action", "action"),
        (["--deny", "delete"], "write.delete", "delete"),
        (["--deny", "bulk_upsert"], "write.bulk_upload", "bulk_upload"),
        (["--deny", "create"], "write.upsert", "upsert"),
    ],
)
def test_a_denied_operation_names_the_permission_rule_item(flags, step, operation):
    with cli_sandbox(*flags).start() as server, use_sandbox(server):
        code, out, _err = run("--write-test", "doctor@example.jp")
    assert code == 1
    (line,) = lines(out, step)
    assert "[FAIL]" in line and "a permission" in line
    fix = out.split(line, 1)[1].splitlines()[1]
    assert fix.lstrip().startswith("Fix:") and rule_item(operation) in fix
    assert not Customer.objects.exists() and not SyncState.objects.exists()
    # A test customer the doctor could not delete is named, so a person can remove it.
    left = lines(out, "write.left_behind")
    assert bool(left) == (operation == "delete")
    if left:
        assert "doctor@example.jp" in left[0] and "satori_doctor" in left[0]


def test_own_only_names_the_rule_item_and_its_note_and_never_deletes_their_customer():
    with cli_sandbox("--own-only").start() as server, use_sandbox(server):
        server.seed_customer("theirs@example.jp", last_name="他人")
        with translation.override("ja"):
            code, out, _err = run("--write-test", "theirs@example.jp")
        theirs = server.state.customer("theirs@example.jp")
        deletes = server.state.requests_for("delete")
    assert code == 1
    (line,) = lines(out, "write.upsert")
    fix = out.split(line, 1)[1].splitlines()[1]
    assert "カスタマー情報の編集" in fix and "新規登録の実行" in fix and "自分のみ" in fix
    assert "[未実行]" in lines(out, "write.delete")[0]  # skipped, in Japanese
    assert theirs is not None and theirs.fields["last_name"] == "他人" and not deletes


def test_the_write_test_needs_an_address():
    code, _out, err = run("--write-test", "not an address")
    assert code == 2 and "--write-test" in err


# --------------------------------------------------------------------------- snippet


def test_the_snippet_is_python_with_status_codes_as_integers():
    report = doctor.Report()
    report.suggest("ANSWER_STATUS_CLASSES", {"422": "not_found"})
    report.suggest("ANSWER_STATUS_CLASSES", {"410": "not_found"})
    report.suggest("DELETE_IDENTITY", "email")
    code = doctor.snippet(report.suggested)
    namespace = {"SATORI": {"BASE_URL": "x"}}
    exec(code, namespace)  # noqa: S102 - our own output, checked to be valid settings code
    assert namespace["SATORI"] == {
        "BASE_URL": "x",
        "ANSWER_STATUS_CLASSES": {422: "not_found", 410: "not_found"},
        "DELETE_IDENTITY": "email",
    }
    assert doctor.snippet({}) == ""


def test_every_operation_has_a_translated_rule_item():
    assert set(RULE_ITEMS) == {
        "upsert",
        "registration",
        "delete",
        "action",
        "bulk_upload",
        "bulk_status",
    }
    with translation.override("ja"):
        assert rule_item("action") == "カスタマーのユーザー定義アクション"
    assert rule_item("delete") == "Delete customers (カスタマーの削除)"


# --------------------------------------------------------------------------- admin page


def staff(client: Client, *codenames: str) -> User:
    user = User.objects.create_user("ops", password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(
            Permission.objects.get(codename=codename, content_type__app_label="django_satori")
        )
    client.login(username="ops", password="pw")
    return user


def test_the_page_needs_the_permission_and_is_linked_from_the_app_index(client):
    staff(client, "view_customer")
    assert client.get(reverse(PAGE)).status_code == 403
    assert client.post(reverse(PAGE)).status_code == 403
    index = client.get(reverse("admin:app_list", kwargs={"app_label": "django_satori"}))
    assert reverse(PAGE) not in index.content.decode()
    User.objects.get(username="ops").user_permissions.add(
        Permission.objects.get(codename="run_diagnosis")
    )
    assert client.get(reverse(PAGE)).status_code == 200
    index = client.get(reverse("admin:app_list", kwargs={"app_label": "django_satori"}))
    assert reverse(PAGE) in index.content.decode()
    dashboard = client.get(reverse("admin:django_satori_dashboard"))
    assert reverse(PAGE) in dashboard.content.decode()


def test_running_from_the_page_is_a_csrf_checked_post_and_the_result_is_kept(satori_sandbox):
    client = Client(enforce_csrf_checks=True)
    staff(client, "run_diagnosis")
    page = client.get(reverse(PAGE))
    assert "No diagnosis yet." in page.content.decode()
    assert client.post(reverse(PAGE)).status_code == 403  # no CSRF token
    assert not Diagnosis.objects.exists()
    token = page.cookies["csrftoken"].value
    answer = client.post(reverse(PAGE), {"csrfmiddlewaretoken": token})
    assert answer.status_code == 302
    kept = Diagnosis.objects.get()
    assert kept.source == "admin" and kept.started_by.username == "ops" and kept.live
    html = client.get(reverse(PAGE)).content.decode()
    assert "SATORI accepted the keys" in html and "Run by ops." in html
    assert len(satori_sandbox.state.requests_for("bulk_status")) == 1


def test_the_page_shows_the_last_diagnosis_in_japanese_without_keys(client, satori_sandbox):
    staff(client, "run_diagnosis")
    satori_sandbox.configure(deny_operations=["bulk_status"])
    run("--write-test", "ja@example.jp")
    run()  # the last one only is kept
    assert Diagnosis.objects.count() == 1
    html = client.get(reverse(PAGE), HTTP_ACCEPT_LANGUAGE="ja").content.decode()
    for text in ("SATORI接続診断", "カスタマーステータスの一括取得", "診断を実行"):
        assert text in html, text
    english = client.get(reverse(PAGE), HTTP_ACCEPT_LANGUAGE="en").content.decode()
    assert "Bulk retrieval of customer status" in english

    for name in AUTH_KEYS:
        assert settings.SATORI[name] not in html + english


def test_a_suggestion_is_shown_as_a_snippet_on_the_page(client):
    staff(client, "run_diagnosis")
    report = doctor.Report(live=True)
    report.add(doctor.Check("probe", doctor.WARN, doctor.Text("%(t)s", t="seen 422")))
    report.suggest("ANSWER_STATUS_CLASSES", {"422": "not_found"})
    report.save(source="command")
    html = client.get(reverse(PAGE)).content.decode()
    assert "&quot;ANSWER_STATUS_CLASSES&quot;: {422: &quot;not_found&quot;}" in html


# --------------------------------------------------------------------------- another SATORI


class OtherSatori(http.server.BaseHTTPRequestHandler):
    """A stand-in that answers where our defaults guess otherwise: an unknown process
    code gets 422, upserts return no hashcode, deletes answer an unknown customer 400."""

    deleted: ClassVar[set[str]] = set()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, body: dict[str, Any], code: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
        if query.get("process_code") == "job-1":
            payload = {"process_status": "finished", "succeeded_rows": [{"row_number": 2}]}
            self._answer({"status": 200, "message": "OK", **payload})
        else:
            self._answer({"status": 422, "message": "process_code is invalid"}, 422)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode("latin-1")))
        if self.path.endswith("/bulk_customers/upsert.json"):
            self._answer({"status": 200, "message": "OK", "process_code": "job-1"})
        elif self.path.endswith("/customer/delete.json"):
            email = form.get("customer[email]", "")
            if email in self.deleted:
                self._answer({"status": 400, "message": "customer not found: " + email}, 400)
            else:
                self.deleted.add(email)
                self._answer({"status": 200, "message": "deleted"})
        else:
            self._answer({"status": 200, "message": "OK"})


@pytest.fixture
def other_satori():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtherSatori)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    OtherSatori.deleted = set()
    try:
        with satori(BASE_URL=f"http://127.0.0.1:{server.server_address[1]}"):
            yield
    finally:
        server.shutdown()
        server.server_close()


def test_what_satori_answers_otherwise_becomes_a_snippet_to_paste(other_satori):
    _code, out, _err = run("-v", "2", "--write-test", "doctor@example.jp")
    assert "[WARN] probe:" in out and "status 422 (we expect 404)" in out
    assert "[WARN] write.upsert:" in out and "no hashcode" in out
    assert "[WARN] write.delete_unknown:" in out
    snippet = out.split("Paste into your settings:\n", 1)[1].split("\n\n", 1)[0]
    namespace: dict[str, Any] = {"SATORI": {}}
    exec(snippet, namespace)  # noqa: S102 - our own output, checked to be valid settings code
    suggested = namespace["SATORI"]
    assert suggested["ANSWER_STATUS_CLASSES"] == {422: "not_found"}
    assert suggested["DELETE_IDENTITY"] == "email"
    ((pattern, kind),) = suggested["ANSWER_MESSAGE_CLASSES"]
    assert kind == "not_found" and re.fullmatch(pattern, "customer not found: another@example.jp")
    # What it suggests is accepted by the system checks as it stands.
    with override_settings(SATORI={**settings.SATORI, **suggested}):
        assert [m.id for m in run_checks() if m.id.startswith("django_satori")] == []
    assert Diagnosis.objects.get().suggested["DELETE_IDENTITY"] == "email"


def test_an_upsert_whose_answer_was_lost_is_still_cleaned_up(satori_sandbox):
    satori_sandbox.configure(deny_operations=["bulk_upsert"])
    satori_sandbox.faults.fail_first(1, "lost_answer", operations=["upsert"])
    _code, out, _err = run("--write-test", "lost@example.jp")
    assert "[FAIL] write.upsert:" in out and "[SKIP] write.action:" in out
    assert "[OK] write.delete:" in out.replace("[OK]  ", "[OK]")
    assert satori_sandbox.state.requests_for("delete")
    assert satori_sandbox.state.customer("lost@example.jp") is None
