"""The processes a benchmark run starts: children, the sandbox, a Celery worker.

Standard library only, and no Django here: the driving process must not
carry a database connection or any memory into the figures it collects.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .child import RESULT_PREFIX

REPO_ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT = 3600.0


class BenchError(RuntimeError):
    """A child, the worker or the sandbox failed; the message carries its output."""


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Database:
    """Where one database's benchmarks run: ``vendor`` and the environment naming it."""

    vendor: str  # "sqlite" or "postgresql"
    env: dict[str, str]


@dataclass
class Context:
    """What every process of a run shares: broker, media directory, log directory."""

    broker_url: str
    workdir: Path
    logdir: Path
    satori: dict[str, Any] = field(default_factory=dict)

    def environment(self, db: Database, satori: Mapping[str, Any] | None = None) -> dict[str, str]:
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("BENCH_DATABASE_URL", "BENCH_SQLITE_PATH", "DJANGO_SETTINGS_MODULE")
        }
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "bench.settings",
                "PYTHONPATH": pythonpath,
                "PYTHONUNBUFFERED": "1",
                "CELERY_BROKER_URL": self.broker_url,
                "BENCH_MEDIA_ROOT": str(self.workdir / "media"),
                "BENCH_SATORI": json.dumps({**self.satori, **(satori or {})}),
                **db.env,
            }
        )
        return env

    def child(
        self,
        db: Database,
        task: str,
        params: Mapping[str, Any] | None = None,
        *,
        satori: Mapping[str, Any] | None = None,
        timeout: float = CHILD_TIMEOUT,
    ) -> dict[str, Any]:
        """Run ``python -m bench.child`` and return its result dict."""
        argv = [sys.executable, "-m", "bench.child", task, json.dumps(dict(params or {}))]
        # Other work on the machine disturbs wall times: each result says how busy it was.
        load = os.getloadavg()[0]
        try:
            proc = subprocess.run(
                argv,
                cwd=REPO_ROOT,
                env=self.environment(db, satori),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{task} on {db.vendor} timed out after {timeout:.0f}s") from exc
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith(RESULT_PREFIX):
                if proc.returncode == 0:
                    return {
                        **json.loads(line[len(RESULT_PREFIX) :]),
                        "load": load,
                        "load_after": os.getloadavg()[0],
                    }
                break
        raise BenchError(
            f"{task} on {db.vendor} failed (exit {proc.returncode}):\n"
            f"{_tail(proc.stdout)}\n{_tail(proc.stderr)}"
        )


class Sandbox:
    """``python -m django_satori.sandbox`` in its own process, on a free port."""

    def __init__(self, ctx: Context, keys: Mapping[str, str], custom_fields: Mapping[str, str]):
        self.argv = [sys.executable, "-m", "django_satori.sandbox", "--port", "0", "--quiet"]
        for name, value in keys.items():
            self.argv += ["--" + name.replace("_", "-"), value]
        for identifier, kind in custom_fields.items():
            self.argv += ["--custom-field", f"{identifier}:{kind}"]
        self.log_path = ctx.logdir / "sandbox.log"
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> Sandbox:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            match = re.search(r"(http://[\d.]+:\d+)", line)
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                break
        raise BenchError(f"the sandbox did not start; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Worker:
    """One ``celery worker`` (prefork pool, concurrency 1: Celery's default pool)."""

    def __init__(
        self,
        ctx: Context,
        db: Database,
        satori: Mapping[str, Any],
        name: str,
        pool: str = "prefork",
        concurrency: int = 1,
    ):
        self.hostname = f"{name}@django-satori-bench"
        self.env = ctx.environment(db, satori)
        self.argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.celery_app",
            "worker",
            f"--pool={pool}",
            "-c",
            str(concurrency),
            "-l",
            "info",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            self.hostname,
        ]
        self.log_path = ctx.logdir / f"worker-{db.vendor}-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        self.log_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        ready = re.compile(re.escape(self.hostname) + r" ready\.")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.search(self.log_path.read_text(errors="replace")):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"worker not ready:\n{_tail(self.log_path.read_text(errors='replace'))}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextlib.contextmanager
def running(*procs: Sandbox | Worker) -> Iterator[None]:
    started: list[Sandbox | Worker] = []
    try:
        for proc in procs:
            proc.start()
            started.append(proc)
        yield
    finally:
        for proc in reversed(started):
            proc.stop()
