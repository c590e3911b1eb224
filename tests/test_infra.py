"""The test infrastructure itself: throwaway services, worker subprocesses, database passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from tests import services
from tests.celery_app import probe
from tests.conftest import REPO_ROOT, CeleryWorker, WorkerFactory


def _reports(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- Redis


def test_redis_stops_and_restarts_empty_on_the_same_port(
    redis_server: services.RedisServer,
) -> None:
    port = redis_server.port
    assert redis_server.command("SET", "canary", "1") == b"+OK"

    redis_server.stop()
    assert not redis_server.ping()
    assert not services.port_open(port)

    redis_server.start()
    assert redis_server.port == port
    assert redis_server.ping()
    # Nothing persists: a restarted broker has lost whatever was queued.
    assert redis_server.command("EXISTS", "canary") == b":0"


def test_redis_survives_a_hard_kill_and_restart(redis_server: services.RedisServer) -> None:
    redis_server.stop(hard=True)
    assert not redis_server.ping()
    redis_server.start()
    assert redis_server.ping()


def test_a_second_handle_controls_the_same_server(redis_server: services.RedisServer) -> None:
    # This is how the pytest process controls the Redis that `tests.services run` owns.
    other = services.RedisServer.attach(redis_server.workdir)
    assert other.url == redis_server.url
    other.stop()
    assert not redis_server.ping()
    other.start()
    assert redis_server.ping()


# -------------------------------------------------------------------- Celery worker


def test_worker_answers_control_ping_and_can_be_killed_and_restarted(
    celery_worker: WorkerFactory,
) -> None:
    worker = celery_worker()
    assert worker.ping()

    worker.kill()
    assert not worker.is_running()
    assert not worker.ping(timeout=0.5)

    worker.start()
    assert worker.ping()
    assert worker.supervise() and worker.restarts == 0  # running: left alone
    worker.kill()
    assert worker.supervise() and worker.restarts == 1  # exited: started again
    assert worker.ping()
    assert worker.stop() == 0  # warm shutdown exits cleanly


def test_worker_uses_the_test_database_and_the_given_satori_settings(
    celery_worker: WorkerFactory, tmp_path: Path
) -> None:
    get_user_model().objects.create(username="seen-by-the-worker")
    report = tmp_path / "probe.jsonl"
    worker = celery_worker({"BASE_URL": "http://127.0.0.1:9/satori", "MAX_ATTEMPTS": 3})

    probe.delay(str(report))
    worker.wait_until(lambda: _reports(report))

    (seen,) = _reports(report)
    assert seen["vendor"] == connection.vendor
    assert seen["database"] == str(connection.settings_dict["NAME"])
    assert seen["usernames"] == ["seen-by-the-worker"]
    assert seen["satori_base_url"] == "http://127.0.0.1:9/satori"
    assert seen["satori_max_attempts"] == 3


def test_worker_gets_satori_changes_made_by_the_test(
    celery_worker: WorkerFactory, settings: object, tmp_path: Path
) -> None:
    # What the sandbox fixture does: point BASE_URL at itself in this process only.
    settings.SATORI = {**settings.SATORI, "BASE_URL": "http://127.0.0.1:8/changed"}  # type: ignore[attr-defined]
    report = tmp_path / "probe.jsonl"
    worker = celery_worker()

    probe.delay(str(report))
    worker.wait_until(lambda: _reports(report))

    assert _reports(report)[0]["satori_base_url"] == "http://127.0.0.1:8/changed"


@pytest.mark.slow
def test_task_of_a_killed_worker_is_delivered_again(
    celery_worker: WorkerFactory, tmp_path: Path
) -> None:
    # acks_late + reject_on_worker_lost + a short visibility timeout: a task whose
    # worker died mid-run comes back to the next worker.
    fast_restore = {"DJANGO_SATORI_TEST_VISIBILITY_TIMEOUT": "2"}
    report = tmp_path / "probe.jsonl"
    first: CeleryWorker = celery_worker(env=fast_restore)

    probe.delay(str(report), hold_first_attempt=60)
    first.wait_until(lambda: _reports(report))
    first.kill()

    second = celery_worker(env=fast_restore)
    reports = second.wait_until(lambda: len(_reports(report)) >= 2 and _reports(report), 30)
    assert [r["attempt"] for r in reports] == [1, 2]


# ------------------------------------------------------------------------ databases


def test_database_pass_matches_the_environment(db: None) -> None:
    url = os.environ.get(services.DATABASE_URL_ENV, "")
    if url.startswith(("postgres://", "postgresql://")):
        assert connection.vendor == "postgresql"
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            assert cursor.fetchone()[0].startswith("test_")
    else:
        assert connection.vendor == "sqlite"
        # A file, so that worker subprocesses can share it.
        assert Path(str(connection.settings_dict["NAME"])).is_file()


@pytest.mark.postgres
def test_postgres_marker_runs_only_on_postgresql(db: None) -> None:
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('server_version_num')::int")
        assert cursor.fetchone()[0] >= 120000


# ------------------------------------------------------------------ services runner


def _run_services(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.services", "run", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _require(binary_found: object, what: str) -> None:
    if not binary_found:
        if services.in_ci():
            pytest.fail(f"{what} is required under CI=true")
        pytest.skip(f"{what} not installed")


@pytest.mark.integration
def test_services_run_exports_redis_and_propagates_failure() -> None:
    _require(services.find_redis_server(), "redis-server")
    show = "import os; print('BROKER=' + os.environ['CELERY_BROKER_URL'])"
    ok = _run_services("--no-postgres", "--", sys.executable, "-c", show)
    assert ok.returncode == 0, ok.stderr
    assert "BROKER=redis://127.0.0.1:" in ok.stdout

    failing = _run_services("--no-postgres", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert failing.returncode == 1
    assert "FAILED (exit 3)" in failing.stderr


@pytest.mark.integration
def test_services_run_adds_a_postgresql_pass() -> None:
    _require(services.find_postgres_bindir(), "PostgreSQL server binaries")
    code = "import os, sys; print(os.environ.get('DJANGO_SATORI_TEST_DATABASE_URL'), sys.argv[1:])"
    result = _run_services("--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    sqlite_line, pg_line = result.stdout.strip().splitlines()
    assert sqlite_line == "None []"
    assert pg_line.startswith("postgres://postgres@127.0.0.1:")
    assert pg_line.endswith("['-m', 'database and not browser']")


@pytest.mark.integration
def test_services_run_fails_loudly_in_ci_without_binaries(tmp_path: Path) -> None:
    # An empty PATH hides redis-server; CI=true must turn that into an error.
    result = _run_services(
        "--no-postgres",
        "--",
        sys.executable,
        "-c",
        "pass",
        env={"CI": "true", "PATH": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "required (CI=true)" in result.stderr
