"""README.md's quick start, followed the way a new user would, so it cannot rot.

A fresh virtualenv, ``pip install`` of this checkout, ``django-admin
startproject``, the settings and Celery snippets copied from README.md, the
sandbox started as the README says, ``migrate``, and the README's first-sync
snippet run in ``manage.py shell``, with ``celery -A mysite worker -B`` running
on the throwaway Redis of the test suite (tests/conftest.py ``redis_server``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"


def readme_block(marker: str) -> str:
    """The fenced block right after ``<!-- quickstart:<marker> -->`` in README.md."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- quickstart:{marker} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"README.md has no quickstart:{marker} block"
    return match.group(1)


def readme_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in readme_block("env").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"]:
            for word in words[1:]:
                name, _sep, value = word.partition("=")
                env[name] = value
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, check=False, **kwargs
    )  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_readme_blocks_are_there() -> None:
    """Cheap: the markers the slow test depends on are still in README.md."""
    env = readme_env()
    assert set(env) >= {
        "SATORI_USER_KEY",
        "SATORI_USER_SECRET",
        "SATORI_COMPANY_KEY",
        "SATORI_COMPANY_SECRET",
        "SATORI_BASE_URL",
    }
    for marker in ("settings", "celery", "first-sync"):
        compile(readme_block(marker), f"README.md:{marker}", "exec")
    assert "python -m django_satori.sandbox --port 8765" in README.read_text(encoding="utf-8")


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh virtualenv with this checkout installed as a user would install it."""
    path = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(path)])
    run(
        [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{REPO_ROOT}[redis]"],
        cwd=tmp_path,
    )
    return path


@pytest.fixture
def sandbox(venv: Path, tmp_path: Path) -> Iterator[str]:
    """``python -m django_satori.sandbox --port <free>``, from the new virtualenv."""
    port = free_port()
    log = (tmp_path / "sandbox.log").open("w")
    process = subprocess.Popen(
        [str(venv / "bin" / "python"), "-m", "django_satori.sandbox", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/_sandbox/state", timeout=2).read()  # noqa: S310
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "sandbox.log").read_text()
                assert time.monotonic() < deadline, "the sandbox did not start"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_readme_quick_start(venv: Path, sandbox: str, redis_server: Any, tmp_path: Path) -> None:
    python = str(venv / "bin" / "python")
    run([str(venv / "bin" / "django-admin"), "startproject", "mysite"], cwd=tmp_path)
    project = tmp_path / "mysite"
    settings = project / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + "\n" + readme_block("settings"), encoding="utf-8")
    (project / "mysite" / "celery.py").write_text(readme_block("celery"), encoding="utf-8")
    init = project / "mysite" / "__init__.py"
    init.write_text(init.read_text() + "from .celery import app as celery_app\n")

    # A new user's shell: none of our settings, and no PYTHONSAFEPATH (tox sets it),
    # which would stop manage.py from finding the project next to it.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SATORI_", "CELERY_", "DJANGO_")) and name != "PYTHONSAFEPATH"
    }
    env.update(readme_env())
    env["SATORI_BASE_URL"] = sandbox  # the README's port 8765 may be taken here
    env["CELERY_BROKER_URL"] = redis_server.url
    env["PYTHONPATH"] = ""

    run([python, "manage.py", "check", "--fail-level", "WARNING"], cwd=project, env=env)
    run([python, "manage.py", "migrate"], cwd=project, env=env)
    worker_log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(venv / "bin" / "celery"), "-A", "mysite", "worker", "-B", "-l", "info"],
        cwd=project,
        env=env,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        shell = run(
            [python, "manage.py", "shell", "-c", readme_block("first-sync")], cwd=project, env=env
        )
        received = wait_for_customer(sandbox, readme_block("first-sync"))
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(5)
        worker_log.close()
    assert received is not None, shell.stdout + shell.stderr + (tmp_path / "worker.log").read_text()
    assert received["fields"]["last_name"] == "山田"
    assert received["fields"]["delivery_permission"] == "approval"
    assert received["tags"] == ["資料請求"]


def wait_for_customer(sandbox: str, snippet: str, timeout: float = 60) -> dict[str, Any] | None:
    """The customer the snippet created, once the sandbox has it."""
    email = re.search(r'email="([^"]+)"', snippet)
    assert email, "the first-sync snippet names no e-mail address"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{sandbox}/_sandbox/state", timeout=5) as answer:  # noqa: S310
            state = json.load(answer)
        for customer in state["customers"]:
            if customer["email"] == email.group(1):
                return dict(customer)
        time.sleep(0.5)
    return None
