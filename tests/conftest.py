"""Fixtures for tests that need real services: Redis, Celery worker subprocesses, PostgreSQL.

* ``redis_server``: a running throwaway Redis (:class:`tests.services.RedisServer`)
  that a test may ``stop()`` / ``start()`` on the same port; it is running and
  empty again before the next test.
* ``celery_worker``: a factory starting real ``celery worker`` subprocesses on
  that broker and on the current test database; see :class:`CeleryWorker`.
* ``@pytest.mark.postgres`` (or the ``postgres_only`` fixture): skip on SQLite.

Without Redis installed these tests skip locally and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
from celery import Celery
from django.conf import settings
from django.db import connection

from django_satori.sync import dispatch
from tests import services
from tests import settings as test_settings
from tests.celery_app import app as celery_app

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = Path(os.environ.get("DJANGO_SATORI_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")


def database_vendor() -> str:
    engine = settings.DATABASES["default"]["ENGINE"]
    return "postgresql" if "postgresql" in engine else engine.rsplit(".", 1)[-1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    broker = "attached to tests.services" if os.environ.get(services.REDIS_DIR_ENV) else "own"
    return [f"django-satori: database={database_vendor()}, redis={broker}"]


_DB_FIXTURES = frozenset(
    {"db", "transactional_db", "django_db_reset_sequences", "django_db_serialized_rollback",
     "admin_client", "admin_user", "django_user_model", "live_server", "celery_worker"}
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    on_postgres = database_vendor() == "postgresql"
    skip_pg = pytest.mark.skip(
        reason="needs PostgreSQL: set DJANGO_SATORI_TEST_DATABASE_URL (make test does)"
    )
    for item in items:
        if not on_postgres and item.get_closest_marker("postgres"):
            item.add_marker(skip_pg)
        # So that `-m "not integration"` leaves out everything needing a broker.
        fixtures = getattr(item, "fixturenames", ())
        if "celery_worker" in fixtures or "redis_server" in fixtures:
            item.add_marker(pytest.mark.integration)
        # So that the PostgreSQL pass can leave out what cannot differ between databases.
        if item.get_closest_marker("django_db") or _DB_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.database)


@pytest.fixture
def postgres_only() -> None:
    """Skip the requesting test unless the suite runs on PostgreSQL."""
    if database_vendor() != "postgresql":
        pytest.skip("needs PostgreSQL: set DJANGO_SATORI_TEST_DATABASE_URL (make test does)")


# --------------------------------------------------------------------------- Redis


def _point_celery_at(url: str) -> None:
    """Make this process publish to ``url``, dropping connections to the old broker."""
    settings.CELERY_BROKER_URL = url
    os.environ["CELERY_BROKER_URL"] = os.environ["REDIS_URL"] = url
    celery_app.conf.broker_url = url
    if celery_app._pool is not None:
        celery_app._pool.force_close_all()
        celery_app._pool = None
    celery_app.amqp._producer_pool = None


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[services.RedisServer]:
    attached = os.environ.get(services.REDIS_DIR_ENV)
    if attached:
        # `python -m tests.services run` owns it; we may stop and restart it (a
        # restarted server dies with this process; `run` starts it again if needed).
        server = services.RedisServer.attach(attached)
        server.start()
        yield server
        return
    try:
        server = services.start_redis()
    except services.ServiceUnavailable as exc:
        if services.in_ci():
            pytest.fail(f"Redis is required under CI=true: {exc}")
        pytest.skip(f"no Redis here: {exc}")
    saved = {k: os.environ.get(k) for k in ("CELERY_BROKER_URL", "REDIS_URL")}
    previous = settings.CELERY_BROKER_URL
    _point_celery_at(server.url)
    try:
        yield server
    finally:
        _point_celery_at(previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.cleanup()


@pytest.fixture
def redis_server(_redis_session: services.RedisServer) -> Iterator[services.RedisServer]:
    """The session's throwaway Redis, running and empty; the test may stop/start it."""
    server = _redis_session
    server.start()
    server.flushall()
    yield server
    # A test that stopped the broker must not break the next one.
    server.start()
    server.flushall()


# -------------------------------------------------------------------- Celery worker


class CeleryWorker:
    """A real ``celery worker`` subprocess running ``tests.celery_app``.

    It can be stopped (warm shutdown), killed (SIGKILL, as when a host dies) and
    started again under the same name; every start appends to the same log file.
    """

    def __init__(
        self,
        *,
        hostname: str,
        env: Mapping[str, str],
        log_path: Path,
        broker_url: str,
        pool: str = "threads",
        concurrency: int = 1,
        queues: str = "celery",
    ) -> None:
        self.hostname = hostname
        self.env = dict(env)
        self.log_path = log_path
        self.broker_url = broker_url
        self.argv = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker",
            f"--pool={pool}", "-c", str(concurrency), "-l", "info",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-Q", queues, "-n", hostname,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._log_offset = 0
        self._control: Celery | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True, timeout: float = 90.0) -> CeleryWorker:
        if self.is_running():
            raise RuntimeError(f"worker {self.hostname} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"\n===== start: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Own process group: kill() reaches pool children too, and a Ctrl-C
            # aimed at pytest does not reach the worker first.
            self.proc = subprocess.Popen(
                # A killed pytest cannot stop its workers: they die with it instead.
                services.dies_with_parent(self.argv, "KILL"),
                cwd=REPO_ROOT,  # `-m` puts it on sys.path (tox adds it with a .pth instead)
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def supervise(self) -> bool:
        """Start the worker again if it exited, as systemd's ``Restart=always`` would.

        celery/kombu 5.x with redis-py can exit when Redis goes away (docs/operations.md
        says production runs the worker under a supervisor). Always True, so it can be
        passed as ``alive=`` to a wait; ``restarts`` counts what it did.
        """
        if self.proc is not None and not self.is_running():
            self.restarts += 1
            self.start()
        return True

    def log_text(self, *, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._log_offset if since_start else 0 :].decode(errors="replace")

    def _log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text(since_start=True).splitlines()[-lines:])
        return f"--- worker log ({self.log_path}) ---\n{tail}"

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until the worker consumes from the broker (its log says "ready.")."""
        ready = re.compile(re.escape(self.hostname) + r" ready\.")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.search(self.log_text(since_start=True)):
                return
            if not self.is_running():
                raise AssertionError(f"worker {self.hostname} exited early\n{self._log_tail()}")
            time.sleep(0.05)
        raise AssertionError(
            f"worker {self.hostname} not ready after {timeout}s\n{self._log_tail()}"
        )

    def ping(self, timeout: float = 2.0) -> bool:
        """Whether this worker answers a broadcast control ping through the broker."""
        if self._control is None:
            self._control = Celery("django_satori_test_control", broker=self.broker_url,
                                   set_as_current=False)  # fmt: skip
        replies = self._control.control.ping(destination=[self.hostname], timeout=timeout)
        return any(self.hostname in reply for reply in replies)

    def wait_until(
        self, predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1
    ) -> Any:
        """Poll ``predicate`` until truthy; fail early, with the log, if the worker died."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if not self.is_running():
                raise AssertionError(f"worker {self.hostname} is not running\n{self._log_tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s\n{self._log_tail()}")
            time.sleep(interval)

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the worker: its unacknowledged task stays with the broker."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int | None:
        """Warm shutdown (SIGTERM, running tasks finish); SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self._control is not None:
            self._control.close()
            self._control = None

    def __repr__(self) -> str:
        return f"<CeleryWorker {self.hostname} pid={self.pid} running={self.is_running()}>"


class WorkerFactory(Protocol):
    def __call__(
        self,
        satori: Mapping[str, Any] | None = ...,
        *,
        pool: str = ...,
        concurrency: int = ...,
        queues: str = ...,
        start: bool = ...,
        env: Mapping[str, str] | None = ...,
    ) -> CeleryWorker: ...


def _satori_for_worker(overrides: Mapping[str, Any] | None) -> str:
    """What the worker must merge into its SATORI: what this test changed, plus ``overrides``.

    The sandbox fixture and ``settings`` overrides change ``settings.SATORI`` in
    this process only; the worker learns of them through this JSON.
    """
    base = test_settings.SATORI
    current = dict(settings.SATORI)
    changed = {key: value for key, value in current.items() if base.get(key) != value}
    changed.update(overrides or {})
    try:
        return json.dumps(changed)
    except TypeError as exc:
        raise TypeError(f"SATORI values given to a worker must be JSON: {exc}") from None


def _secrets_in(text: str, satori_json: str) -> list[str]:
    """Which credential names have a value (base, test-changed or given) present in ``text``."""
    sources = (test_settings.SATORI, json.loads(satori_json), settings.SATORI)
    keys = ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET")
    return [key for key in keys if any(src.get(key) and str(src[key]) in text for src in sources)]


@pytest.fixture
def celery_worker(
    request: pytest.FixtureRequest,
    redis_server: services.RedisServer,
    transactional_db: None,
) -> Iterator[WorkerFactory]:
    """Start real worker subprocesses: ``worker = celery_worker({"MAX_ATTEMPTS": 2})``.

    The worker uses this test's database (so the test is transactional: the
    worker only sees committed rows) and a SATORI that includes whatever this
    test changed in ``settings.SATORI`` (e.g. the sandbox URL) plus ``satori``.
    Workers are stopped after the test; their logs stay in test-artifacts/workers/,
    and a log containing a SATORI key or secret fails the test.
    """
    workers: list[tuple[CeleryWorker, str]] = []
    safe_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[-120:]

    def factory(
        satori: Mapping[str, Any] | None = None,
        *,
        pool: str = "threads",
        concurrency: int = 1,
        queues: str = "celery",
        start: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> CeleryWorker:
        db_name = str(connection.settings_dict["NAME"])
        if connection.vendor == "sqlite" and (db_name == ":memory:" or "mode=memory" in db_name):
            pytest.fail("a worker subprocess cannot open an in-memory SQLite test database")
        satori_json = _satori_for_worker(satori)
        number = len(workers) + 1
        worker_env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DJANGO_SATORI_WORKER_DB_NAME": db_name,
            "DJANGO_SATORI_TEST_SATORI": satori_json,
            "CELERY_BROKER_URL": redis_server.url,
            "REDIS_URL": redis_server.url,
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        worker = CeleryWorker(
            hostname=f"w{number}-{uuid.uuid4().hex[:8]}@django-satori-tests",
            env=worker_env,
            log_path=ARTIFACTS_DIR / "workers" / f"{database_vendor()}-{safe_id}-{number}.log",
            broker_url=redis_server.url,
            pool=pool,
            concurrency=concurrency,
            queues=queues,
        )
        worker.log_path.unlink(missing_ok=True)
        workers.append((worker, satori_json))
        print(f"celery worker {worker.hostname}: log in {worker.log_path}")
        if start:
            worker.start()
        return worker

    yield factory

    leaks: list[str] = []
    for worker, satori_json in workers:
        worker.close()
        found = _secrets_in(worker.log_text(), satori_json)
        if found:
            leaks.append(f"{worker.log_path}: {', '.join(found)}")
    if leaks:
        pytest.fail("SATORI credentials appear in worker logs: " + "; ".join(leaks))


@pytest.fixture(autouse=True)
def _broker_not_paused() -> Iterator[None]:
    """Each test starts with publishing on: a broker outage in one test pauses
    publishing for a few seconds (dispatch.BROKER_PAUSE_SECONDS) in this process."""
    from django_satori import sync

    dispatch.resume()
    yield
    # Saves hand their dispatches to a publisher thread: let it finish this
    # test's messages so they do not land in the next test.
    sync.wait_for_dispatch()
    dispatch.resume()


@pytest.fixture(autouse=True)
def _language_given_back() -> Iterator[None]:
    """Each test starts in the project's language. A request through the test client
    with ``Accept-Language: ja`` leaves Japanese active in this thread (LocaleMiddleware
    activates it and nothing deactivates it), and later tests read Japanese messages."""
    from django.utils import translation

    translation.deactivate()
    yield
    translation.deactivate()
