"""``python -m example_project.demo`` (``make demo``): the whole thing on a laptop.

Migrates SQLite, creates an admin user, seeds demo members, then starts the
bundled SATORI sandbox, a Celery worker with beat, and the development server,
and prints where to click. Ctrl-C (or SIGTERM) stops everything it started.

Environment: ``DEMO_PORT`` (8000), ``SANDBOX_PORT`` (8765), ``DEMO_ADMIN_PASSWORD``,
and everything example_project/settings.py reads (``CELERY_BROKER_URL``,
``SATORI_*``, ``DATABASE_URL``...). With the four real SATORI keys and
``SATORI_BASE_URL=https://api.satr.jp`` no sandbox is started and the demo
talks to SATORI (demo data is then not seeded unless ``--seed`` is given).

``--check`` starts everything, signs up once over HTTP, waits until that
customer and its action reached the sandbox, stops, and exits 0 or 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import signal
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse

from django.utils.translation import gettext as _
from django.utils.translation import ngettext

REPO_ROOT = Path(__file__).resolve().parent.parent
MANAGE = str(REPO_ROOT / "example_project" / "manage.py")
SANDBOX_KEYS = (
    "sandbox-user-key",
    "sandbox-user-secret",
    "sandbox-company-key",
    "sandbox-company-secret",
)


class Stop(Exception):
    """Ctrl-C or SIGTERM: stop everything and leave."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop()


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _setup_django(sandbox_port: int, check: bool) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    os.environ.setdefault("SATORI_BASE_URL", f"http://127.0.0.1:{sandbox_port}")
    if check:
        # The check signs up right after seeding ~50 customers; SATORI's
        # conservative default of 30 calls a minute would make it wait a minute.
        os.environ.setdefault("SATORI_RATE_LIMIT_PER_MINUTE", "600")
    import django

    django.setup()


def _admin_password(var_dir: Path) -> str:
    """The same password on every run: DEMO_ADMIN_PASSWORD, or one made up once."""
    given = os.environ.get("DEMO_ADMIN_PASSWORD")
    if given:
        return given
    path = var_dir / "admin-password.txt"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    password = secrets.token_urlsafe(9)
    var_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password


def prepare(*, use_sandbox: bool, seed: bool, var_dir: Path) -> str:
    """Migrate, create the admin user and seed. Returns the admin password."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction

    call_command("migrate", interactive=False, verbosity=0)
    password = _admin_password(var_dir)
    user_model = get_user_model()
    admin, _created = user_model.objects.get_or_create(
        username="admin", defaults={"email": "admin@example.com"}
    )
    admin.is_staff = admin.is_superuser = admin.is_active = True
    admin.set_password(password)  # so the printed login always works
    admin.save()
    if use_sandbox:
        with transaction.atomic():
            _forget_previous_sandbox()
    if seed:
        call_command("seed_demo")
    return password


def _forget_previous_sandbox() -> None:
    """The sandbox keeps its customers in memory, so each run starts it empty.

    Customers synced in an earlier run are therefore sent again; their record of
    what SATORI last accepted is cleared, or they would be skipped as unchanged.
    """
    import django_satori
    from django_satori.models import Customer, SyncState, SyncStatus
    from example_project.members.models import Member

    if not SyncState.objects.exclude(fingerprint="", in_satori=False).exists():
        return
    SyncState.objects.update(
        fingerprint="", in_satori=False, hashcode="", sent_tags=[], previous_email=""
    )
    django_satori.mark_for_sync(Member.objects.all())
    django_satori.mark_for_sync(
        Customer.objects.filter(source_model="").exclude(sync_state__status=SyncStatus.STOPPED)
    )
    print(_("The sandbox starts empty: customers from the last run are sent to it again."))


def _children_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    return env


def start_all(*, use_sandbox: bool, sandbox_port: int, demo_port: int, var_dir: Path) -> list[Any]:
    """Start sandbox, worker + beat and web server; return them in start order."""
    from example_project import runner

    env = _children_env({})
    logs = var_dir / "log"
    python = sys.executable
    started: list[runner.Child] = []

    def start(name: str, argv: list[str]) -> runner.Child:
        child = runner.Child(name, argv, log_path=logs / f"{name}.log", cwd=REPO_ROOT, env=env)
        started.append(child)
        return child

    def fail(child: runner.Child) -> None:
        raise RuntimeError(
            _("%(name)s did not start. The end of %(log)s:")
            % {"name": child.name, "log": child.log_path}
            + "\n"
            + child.log_tail()
        )

    try:
        if use_sandbox:
            sandbox = start(
                "sandbox", [python, MANAGE, "satori_sandbox", "--port", str(sandbox_port)]
            )
            if not runner.wait_until(
                runner.http_ok(f"http://127.0.0.1:{sandbox_port}/"), child=sandbox, timeout=30
            ):
                fail(sandbox)
        worker = start(
            "celery",
            [
                python,
                "-m",
                "celery",
                "-A",
                "example_project",
                "worker",
                "--beat",
                "--loglevel",
                "INFO",
                "--concurrency",
                "2",
                "--without-mingle",
                "--without-gossip",
                "--schedule",
                str(var_dir / "celerybeat-schedule"),
            ],
        )
        web = start("web", [python, MANAGE, "runserver", f"127.0.0.1:{demo_port}", "--noreload"])
        if not runner.wait_until(
            runner.http_ok(f"http://127.0.0.1:{demo_port}/"), child=web, timeout=60
        ):
            fail(web)
        if not runner.wait_until(runner.log_contains(worker, " ready."), child=worker, timeout=60):
            fail(worker)
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(children: list[Any]) -> None:
    # Web first (no new work), then the worker (finishes what it holds), then the sandbox.
    for child in reversed(children):
        child.stop()


def print_banner(*, demo_port: int, sandbox_url: str | None, password: str, var_dir: Path) -> None:
    site = f"http://127.0.0.1:{demo_port}"
    lines = [
        "",
        _("The django-satori demo is running."),
        "",
        "  " + _("Sign-up form:") + f"      {site}/signup/",
        "  "
        + _("Admin:")
        + f"             {site}/admin/   "
        + _("(user: %(user)s, password: %(password)s)") % {"user": "admin", "password": password},
        "  " + _("SATORI customers:") + f"  {site}/admin/django_satori/customer/",
    ]
    if sandbox_url:
        lines.append(
            "  "
            + _("SATORI sandbox:")
            + f"    {sandbox_url}/   "
            + _("(what SATORI received; JSON at /_sandbox/state)")
        )
    else:
        lines.append(
            "  "
            + _("Talking to the real SATORI at %(url)s")
            % {"url": os.environ.get("SATORI_BASE_URL", "")}
        )
    lines += [
        "  " + _("Logs:") + f"              {var_dir / 'log'}",
        "",
        _("Press Ctrl-C to stop everything."),
        "",
    ]
    print("\n".join(lines), flush=True)


def run_check(*, demo_port: int, sandbox_url: str, timeout: float) -> bool:
    """Sign up once through the form and wait for the customer and its action."""
    import requests

    site = f"http://127.0.0.1:{demo_port}"
    email = f"check-{uuid.uuid4().hex[:10]}@example.jp"
    with requests.Session() as http:
        form = http.get(f"{site}/signup/", timeout=10)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        if form.status_code != 200 or token is None:
            print(
                _("The sign-up form did not load (HTTP %(status)s).") % {"status": form.status_code}
            )
            return False
        answer = http.post(
            f"{site}/signup/",
            timeout=30,
            allow_redirects=False,
            data={
                "csrfmiddlewaretoken": token.group(1),
                "document": "pricing",
                "family_name": "確認",
                "given_name": "太郎",
                "email": email,
                "company": "株式会社チェック",
                "plan": "standard",
                "interests": ["セミナー"],
                "newsletter": "on",
            },
            headers={"Referer": f"{site}/signup/"},
        )
    if answer.status_code != 302:
        print(_("The sign-up was not accepted (HTTP %(status)s).") % {"status": answer.status_code})
        return False
    print(_("Signed up %(email)s; waiting for it in the sandbox...") % {"email": email}, flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = requests.get(f"{sandbox_url}/_sandbox/state", timeout=10).json()
        for customer in state.get("customers", []):
            if customer.get("email") == email and customer.get("actions"):
                print(_("OK: the customer and its action reached the sandbox."), flush=True)
                return True
        time.sleep(1)
    seconds = int(timeout)  # as %d shows it, so the noun agrees with the number
    print(
        ngettext(
            "The customer did not reach the sandbox within %(seconds)d second.",
            "The customer did not reach the sandbox within %(seconds)d seconds.",
            seconds,
        )
        % {"seconds": seconds}
    )
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m example_project.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="start, sign up once, wait for it in the sandbox, stop"
    )
    parser.add_argument(
        "--seed", action="store_true", help="seed demo data even when talking to the real SATORI"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds --check waits for the sign-up to arrive",
    )
    args = parser.parse_args(argv)

    demo_port = int(os.environ.get("DEMO_PORT", "8000"))
    sandbox_port = int(os.environ.get("SANDBOX_PORT", "8765"))
    _setup_django(sandbox_port, args.check)
    from django.conf import settings
    from django.utils import translation

    from django_satori.conf import AUTH_KEYS, get_settings
    from example_project import runner

    # Console messages follow the terminal's language, not the site's.
    translation.activate("ja" if os.environ.get("LANG", "").startswith("ja") else "en")
    conf = get_settings()
    var_dir = Path(settings.VAR_DIR)
    use_sandbox = _is_loopback(conf.BASE_URL)
    if use_sandbox:
        sandbox_port = urlparse(conf.BASE_URL).port or sandbox_port
    elif tuple(getattr(conf, key) for key in AUTH_KEYS) == SANDBOX_KEYS:
        print(
            _(
                "SATORI_BASE_URL points at %(url)s but the SATORI_* keys are the "
                "sandbox's: set the four real keys."
            )
            % {"url": conf.BASE_URL},
            file=sys.stderr,
        )
        return 2
    if args.check and not use_sandbox:
        print(_("--check only runs against the sandbox."), file=sys.stderr)
        return 2
    busy = [
        port
        for port in ([demo_port] + ([sandbox_port] if use_sandbox else []))
        if not runner.port_is_free("127.0.0.1", port)
    ]
    if busy:
        print(
            _(
                "Port(s) %(ports)s already in use: stop what uses them, or set DEMO_PORT / "
                "SANDBOX_PORT."
            )
            % {"ports": ", ".join(map(str, busy))},
            file=sys.stderr,
        )
        return 2

    password = prepare(use_sandbox=use_sandbox, seed=use_sandbox or args.seed, var_dir=var_dir)
    previous = {
        signum: signal.signal(signum, _on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    children: list[runner.Child] = []
    try:
        print(_("Starting the sandbox, the Celery worker and the web server..."), flush=True)
        children = start_all(
            use_sandbox=use_sandbox, sandbox_port=sandbox_port, demo_port=demo_port, var_dir=var_dir
        )
        sandbox_url = f"http://127.0.0.1:{sandbox_port}" if use_sandbox else None
        if args.check:
            assert sandbox_url is not None
            return (
                0
                if run_check(demo_port=demo_port, sandbox_url=sandbox_url, timeout=args.timeout)
                else 1
            )
        print_banner(
            demo_port=demo_port, sandbox_url=sandbox_url, password=password, var_dir=var_dir
        )
        while True:
            for child in children:
                code = child.exited()
                if code is not None:
                    print(
                        _("%(name)s stopped unexpectedly (exit code %(code)s). The end of %(log)s:")
                        % {"name": child.name, "code": code, "log": child.log_path},
                        file=sys.stderr,
                    )
                    print(child.log_tail(), file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except Stop:
        return 0
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not interrupt the shutdown half-way.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        if children:
            print(_("Stopping..."), flush=True)
        stop_all(children)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
