"""Acceptance run: a large bulk job on the example project's SQLite, as a new user runs it.

    python -m tests.acceptance.sqlite_bulk --runs 10 --rows 25000

Each run starts from an empty directory: the example project on SQLite, its
bundled sandbox, one Celery worker ``-c 2 -B`` (prefork, beat embedded, the
file broker: the project's defaults), then ``satori_bulk_upsert --all`` and
``satori_bulk_status`` once a second until the job ends. A run passes when the
job finishes with every row synced and the worker's log has no "database is
locked". Prints one line per run and a summary; exits 1 if any run failed.
Not part of ``make test`` (ten runs take several minutes); docs/reliability.md
keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from example_project import runner
from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]
MANAGE = str(REPO / "example_project" / "manage.py")
SEED = """
import django; django.setup()
from django_satori.models import Customer
n = int({rows})
Customer.objects.bulk_create(
    [Customer(email=f"user{{i}}@example.jp", last_name="山田", collection_route="web",
              tags=["a", "b"]) for i in range(n)],
    batch_size=2000,
)
"""
RESULT = """
import django, json; django.setup()
from django_satori.models import BulkJob, SyncState
job = BulkJob.objects.order_by("-pk").first()
print(json.dumps({"state": job.state if job else None,
    "rows": job.row_count if job else 0, "ok": job.succeeded_count if job else 0,
    "error": job.error if job else "",
    "synced": SyncState.objects.filter(status="synced").count()}))
"""


def one_run(number: int, rows: int, timeout: float, keep: bool) -> dict[str, object]:
    var = Path(tempfile.mkdtemp(prefix=f"satori-accept-{number}-"))
    sandbox_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "EXAMPLE_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'db.sqlite3'}",
        "SATORI_BASE_URL": f"http://127.0.0.1:{sandbox_port}",
        "PYTHONPATH": str(REPO),
    }
    python = sys.executable

    def manage(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, MANAGE, *args], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=600, check=False,
        )  # fmt: skip

    started: list[runner.Child] = []
    result: dict[str, object] = {"run": number}
    try:
        migrated = manage("migrate", "--noinput")
        assert migrated.returncode == 0, migrated.stderr
        subprocess.run(
            [python, "-c", SEED.format(rows=rows)], env=env, cwd=REPO, check=True, timeout=600
        )
        sandbox = runner.Child(
            "sandbox", [python, MANAGE, "satori_sandbox", "--port", str(sandbox_port)],
            log_path=var / "log" / "sandbox.log", cwd=REPO, env=env,
        )  # fmt: skip
        started.append(sandbox)
        assert runner.wait_until(
            runner.http_ok(f"http://127.0.0.1:{sandbox_port}/"), child=sandbox, timeout=30
        ), sandbox.log_tail()
        worker = runner.Child(
            "celery",
            [python, "-m", "celery", "-A", "example_project", "worker", "--beat",
             "--loglevel", "INFO", "--concurrency", "2", "--without-mingle",
             "--without-gossip", "--schedule", str(var / "celerybeat-schedule")],
            log_path=var / "log" / "celery.log", cwd=REPO, env=env,
        )  # fmt: skip
        started.append(worker)
        assert runner.wait_until(
            runner.log_contains(worker, " ready."), child=worker, timeout=60
        ), worker.log_tail()
        began = time.monotonic()
        queued = manage("satori_bulk_upsert", "--all")
        assert queued.returncode == 0, queued.stderr
        # The status command once a second, beside the worker, as an operator would.
        stop = threading.Event()
        polls: list[int] = []

        def poll() -> None:
            while not stop.is_set():
                polls.append(manage("satori_bulk_status").returncode)
                stop.wait(1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            while time.monotonic() - began < timeout:
                state = json.loads(manage_python(python, env, RESULT))
                if state["state"] in ("finished", "failed", "cancelled"):
                    break
                time.sleep(2)
        finally:
            stop.set()
            poller.join(60)
        result.update(state)
        result["seconds"] = round(time.monotonic() - began, 1)
        result["polls"] = len(polls)
        result["failed_polls"] = sum(1 for code in polls if code)
        log = (var / "log" / "celery.log").read_text(errors="replace")
        result["locked"] = log.count("database is locked")
        result["passed"] = (
            state["state"] == "finished"
            and state["ok"] == rows
            and state["synced"] == rows
            and not result["locked"]
            and not result["failed_polls"]
        )
    except (AssertionError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        result.update(passed=False, error=str(detail)[-500:])
    finally:
        for child in reversed(started):
            child.stop()
        if not keep and result.get("passed"):
            shutil.rmtree(var, ignore_errors=True)
        else:
            result["dir"] = str(var)
    return result


def manage_python(python: str, env: dict[str, str], code: str) -> str:
    done = subprocess.run(
        [python, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True,
        timeout=120,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25_000)
    parser.add_argument("--timeout", type=float, default=900, help="seconds a run may take")
    parser.add_argument("--keep", action="store_true", help="keep every run's directory")
    args = parser.parse_args()
    results = []
    for number in range(1, args.runs + 1):
        result = one_run(number, args.rows, args.timeout, args.keep)
        results.append(result)
        print(json.dumps(result, ensure_ascii=False), flush=True)
    passed = sum(bool(r.get("passed")) for r in results)
    seconds = sorted(float(r.get("seconds", 0)) for r in results if r.get("passed"))
    median = seconds[len(seconds) // 2] if seconds else 0
    print(f"{passed} of {len(results)} runs finished; median {median:.0f} s a run")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
