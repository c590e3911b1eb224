"""The example project and ``make demo``'s script, run as a user runs them.

Each test uses its own database, runtime folder and ports, so it never touches
a developer's ``example_project/db.sqlite3`` or a running demo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(REPO_ROOT / "example_project" / "manage.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def example_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment: nothing of the test suite's own settings leaks in."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SATORI_", "CELERY_", "DJANGO_", "DEMO_", "SANDBOX_"))
        and name not in ("DATABASE_URL", "CACHE_URL")
    }
    env.update(
        EXAMPLE_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        PYTHONUNBUFFERED="1",
        LANGUAGE_CODE="en",
        LANG="C.UTF-8",
        **extra,
    )
    return env


def manage(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, MANAGE, *args],
        cwd=REPO_ROOT,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def our_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (our tmp folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in cmdline or marker.encode() in environ:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_seed_demo_is_idempotent_and_shows_failures(tmp_path: Path) -> None:
    manage(tmp_path, "migrate", "--verbosity", "0")
    first = manage(tmp_path, "seed_demo")
    again = manage(tmp_path, "seed_demo")
    assert "45 members and 5 leads created" in first
    assert "0 members and 0 leads created" in again
    # What the mapping made of the members: SATORI items, and the planted mistakes.
    script = (
        "import json; from django_satori.models import Customer, SyncState\n"
        "c = Customer.objects.get(source_model='members.member', "
        "email='taro.sato00@sample-shoji.example.jp')\n"
        "print(json.dumps({'customers': Customer.objects.count(),"
        " 'pending': SyncState.objects.filter(status='pending').count(),"
        " 'sample': [c.last_name, c.first_name, c.last_name_reading, c.lead_company_name,"
        " c.collection_route, c.custom_fields.get('custom:plan'), c.delivery_permission],"
        " 'gold': sum(x.custom_fields.get('custom:plan') == 'gold'"
        " for x in Customer.objects.all()),"
        " 'no_route': Customer.objects.filter(collection_route='').count()}))"
    )
    result = json.loads(manage(tmp_path, "shell", "-c", script).strip().splitlines()[-1])
    # 45 members, one withdrawn (not synced), plus 5 leads typed in directly.
    assert result["customers"] == 49
    assert result["pending"] == 49
    last, first_name, reading, company, route, plan, permission = result["sample"]
    assert (last, first_name, reading) == ("佐藤", "太郎", "サトウ")
    assert company == "株式会社サンプル商事"
    assert route and plan in ("free", "standard", "premium")
    assert permission in ("approval", "reject")
    assert result["gold"] == 3
    assert result["no_route"] == 2
    # One member and one lead gone: the summary counts each noun for its own number.
    manage(
        tmp_path,
        "shell",
        "-c",
        "from example_project.members.models import Member\n"
        "from django_satori.models import Customer\n"
        "Member.objects.filter(email='taro.sato00@sample-shoji.example.jp').delete()\n"
        "Customer.objects.filter(source_model='').order_by('email').first().delete()\n",
    )
    assert manage(tmp_path, "seed_demo").strip() == (
        "Demo data: 1 member and 1 lead created (45 members and 49 SATORI customers in all)."
    )
    japanese = manage(
        tmp_path,
        "shell",
        "-c",
        "from django.core.management import call_command\n"
        "from django.utils import translation\n"
        "with translation.override('ja'):\n"
        "    call_command('seed_demo')\n",
    )
    assert japanese.strip().splitlines()[-1] == (
        "デモデータ: 会員 0 件とリード 0 件を作成しました "
        "(合計: 会員 45 件、SATORI カスタマー 49 件)。"
    )


#: The members admin's "Send the selected members to SATORI again" action, posted
#: through the example project's real admin (URLs, LocaleMiddleware, its catalog).
MEMBER_ACTION = """
import json
from django.contrib.auth.models import User
from django.contrib.messages import get_messages
from django.test import Client
from django.test.utils import setup_test_environment
from django.utils import translation
from example_project.members.models import Member

setup_test_environment()  # the test client's host, "testserver", is allowed
root = User.objects.create_superuser("root", password="pw")
ids = [str(pk) for pk in Member.objects.filter(is_active=True).order_by("pk")
       .values_list("pk", flat=True)]
said = []
for count, language in ((1, "en"), (3, "en"), (3, "ja")):
    client = Client(HTTP_ACCEPT_LANGUAGE=language)
    client.force_login(root)
    with translation.override(language):
        response = client.post("/admin/members/member/", {
            "action": "mark_for_sync", "_selected_action": ids[:count], "index": "0"})
    assert response.status_code == 302, response.status_code
    said += [str(message) for message in get_messages(response.wsgi_request)]
print(json.dumps(said, ensure_ascii=False))
"""


def test_the_member_admin_action_counts_the_members_marked(tmp_path: Path) -> None:
    manage(tmp_path, "migrate", "--verbosity", "0")
    manage(tmp_path, "seed_demo")
    said = json.loads(manage(tmp_path, "shell", "-c", MEMBER_ACTION).strip().splitlines()[-1])
    assert said == [
        "1 member was marked for sync.",
        "3 members were marked for sync.",
        "3 件の会員を送信待ちにしました。",
    ]


#: A staff user who may only view members, then one who may change them, in the
#: example project's real admin; then the admin and sign-up forms given addresses
#: and text SATORI cannot take. Prints what each saw, as JSON.
MEMBER_ADMIN_GUARDS = """
import json
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.test.utils import setup_test_environment
from django.utils import translation
from django_satori import apply_source_changes
from django_satori.models import SyncState
from example_project.members.forms import MemberAdminForm, SignupForm
from example_project.members.models import Member

setup_test_environment()
member = Member.objects.create(email="m@example.jp", family_name="山田", given_name="太郎")
apply_source_changes()  # no worker here: build its SATORI customer now
version = lambda: SyncState.objects.get(email="m@example.jp").version
out = {}
for name, codenames in (("viewer", ["view_member"]), ("changer", ["view_member", "change_member"])):
    user = User.objects.create_user(name, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    page = client.get("/admin/members/member/").content.decode()
    before = version()
    client.post("/admin/members/member/", {
        "action": "mark_for_sync", "_selected_action": [str(member.pk)], "index": "0"})
    out[name] = {"sees": "mark_for_sync" in page, "marked": version() > before}

root = User.objects.create_superuser("root", password="pw")
client = Client()
client.force_login(root)
member_data = {"family_name": "F", "given_name": "G", "plan": "free",
               "joined_on": "2025-01-01", "is_active": "on"}
signup_data = {"document": "overview", "family_name": "F", "given_name": "G", "plan": "free"}
for language in ("en", "ja"):
    seen = out[language] = {}
    for email in ("user@bücher.de", "ユーザー@例え.jp", "user＠example.com"):
        response = client.post("/admin/members/member/add/", {**member_data, "email": email},
                               HTTP_ACCEPT_LANGUAGE=language)
        seen[email] = response.status_code
    with translation.override(language):
        form = MemberAdminForm(data={**member_data, "email": "user@bücher.de"})
        seen["admin_email"] = form.errors.get("email") if not form.is_valid() else None
        form = MemberAdminForm(data={**member_data, "email": "s@example.jp",
                                     "family_name": "山\\ud800"})
        seen["admin_surrogate"] = form.errors.get("family_name") if not form.is_valid() else None
        form = SignupForm(data={**signup_data, "email": "user@bücher.de"})
        seen["signup_email"] = form.errors.get("email") if not form.is_valid() else None
        form = SignupForm(data={**signup_data, "email": "s@example.jp", "company": "\\udfff"})
        seen["signup_surrogate"] = form.errors.get("company") if not form.is_valid() else None
out["members"] = sorted(Member.objects.values_list("email", flat=True))
print(json.dumps(out, ensure_ascii=False))
"""


def test_member_admin_guards_view_only_staff_and_unsendable_values(tmp_path: Path) -> None:
    manage(tmp_path, "migrate", "--verbosity", "0")
    seen = json.loads(manage(tmp_path, "shell", "-c", MEMBER_ADMIN_GUARDS).strip().splitlines()[-1])
    # Sending to SATORI needs the change permission: a viewer neither sees nor runs it.
    assert seen["viewer"] == {"sees": False, "marked": False}
    assert seen["changer"] == {"sees": True, "marked": True}
    for language, ascii_only, surrogate in (
        ("en", "half-width (ASCII) characters only", "lone surrogate"),
        ("ja", "半角英数字と記号（ASCII）のみ", "サロゲート"),
    ):
        said = seen[language]
        # A form error, never a 500: the IDN address used to fail in the sync.
        assert said["user@bücher.de"] == said["ユーザー@例え.jp"] == 200, said
        assert said["user＠example.com"] == 200, said
        for key in ("admin_email", "signup_email"):
            assert ascii_only in said[key][0] and "user@xn--bcher-kva.de" in said[key][0], said
        for key in ("admin_surrogate", "signup_surrogate"):
            assert surrogate in said[key][0], said
    assert seen["members"] == ["m@example.jp"]


#: ``run_check`` (what ``demo --check`` runs) in the example project's own process
#: (importing example_project here would make its Celery app the current one),
#: against a stand-in for the site and the sandbox: the sign-up is taken, never delivered.
DEMO_CHECK = """
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import django

django.setup()
from django.utils import translation

from example_project import demo


class NeverArrives(BaseHTTPRequestHandler):
    def send(self, status, body=b"", **headers):
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/signup/":
            self.send(200, b'<input name="csrfmiddlewaretoken" value="token">')
        else:  # /_sandbox/state: no customer yet
            self.send(200, b'{"customers": []}')

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send(302, Location="/thanks/")

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), NeverArrives)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
for timeout, language in ((1.5, "en"), (0, "en"), (0, "ja")):
    with translation.override(language):
        assert not demo.run_check(demo_port=port, sandbox_url=f"http://127.0.0.1:{port}",
                                  timeout=timeout)
server.shutdown()
"""


def test_demo_check_says_how_many_seconds_it_waited(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DEMO_CHECK],
        cwd=REPO_ROOT,
        env=example_env(tmp_path, DJANGO_SETTINGS_MODULE="example_project.settings"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    waited = [
        line
        for line in result.stdout.splitlines()
        if "did not reach the sandbox" in line or "以内に" in line
    ]
    assert waited == [
        "The customer did not reach the sandbox within 1 second.",
        "The customer did not reach the sandbox within 0 seconds.",
        "0 秒以内にカスタマーがサンドボックスに届きませんでした。",
    ]


def test_demo_refuses_the_real_satori_with_sandbox_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "example_project.demo"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=example_env(tmp_path, SATORI_BASE_URL="https://api.satr.jp"),
    )
    assert result.returncode == 2
    assert "SATORI_" in result.stderr
    assert not (tmp_path / "db.sqlite3").exists(), "nothing may be prepared before the refusal"


@pytest.mark.slow
def test_demo_check_signs_up_and_reaches_the_sandbox(tmp_path: Path) -> None:
    """``python -m example_project.demo --check``: everything starts, a sign-up over
    HTTP reaches the sandbox through the worker, and everything stops again."""
    env = example_env(
        tmp_path,
        DEMO_PORT=str(free_port()),
        SANDBOX_PORT=str(free_port()),
        DEMO_ADMIN_PASSWORD="check-only-password",
    )
    result = subprocess.run(
        [sys.executable, "-m", "example_project.demo", "--check", "--timeout", "120"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    logs = "".join(
        f"\n--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
        for log in sorted((tmp_path / "var" / "log").glob("*.log"))
    )
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "OK: the customer and its action reached the sandbox." in result.stdout
    # Ctrl-C / the end of --check leaves nothing running: no orphaned worker or server.
    assert our_processes(str(tmp_path)) == []
