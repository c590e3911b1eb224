"""Run the benchmarks and write bench/RESULTS.md: ``python -m bench.run [--full]``.

Needs the bench extra (``pip install -e ".[bench]"``: django-import-export and
pyinstrument) and ``redis-server``; PostgreSQL's server binaries are used when
installed (Debian: ``apt-get install redis-server postgresql``). Both servers
are throwaway ones started here with tests/services.py and removed afterwards.

Groups (``--only``): ``saves``, ``export`` (SQLite and PostgreSQL; with
``--proposals`` also ``breakdown``, the steps of a save one by one), and
``sync``, ``coalesce``, ``bulk`` (with one real worker and the sandbox process,
on PostgreSQL, or on SQLite where PostgreSQL cannot start; ``--sync-databases``),
and ``import`` (``satori_import`` of a Shift_JIS admin export beside a plain
``csv.reader`` + ``bulk_create``; SQLite and PostgreSQL; with ``--full`` or
``--only import``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests import services

from . import report
from .procs import BenchError, Context, Database, Sandbox, Worker, running
from .report import COALESCE_PROPOSALS, EXPORT_PROPOSALS, SAVE_PROPOSALS
from .settings import CUSTOM_FIELDS, SANDBOX_KEYS

GROUPS = ("saves", "breakdown", "sync", "push_breakdown", "coalesce", "export", "bulk", "import")
#: Not in the default run (it stays under ten minutes): with --full, or named in --only.
FULL_GROUPS = ("import",)
DEFAULT_GROUPS = tuple(g for g in GROUPS if g not in FULL_GROUPS)
#: Groups that need the worker and the sandbox: run on --sync-databases.
SYNC_GROUPS = ("sync", "push_breakdown", "coalesce", "bulk")
SAVE_COUNT = 10_000
SYNC_COUNT = 10_000
EXPORT_ROWS = (100_000,)
EXPORT_ROWS_FULL = (100_000, 1_000_000)
EXPORT_VARIANTS = ("satori", "plain", "import_export")
#: Diagnostic exporters, only run when named in --export-variants.
EXPORT_DIAGNOSTICS = ("satori_no_claim",)
BULK_COUNT = 100_000
#: Also with --full: 1,000,000 rows would add about 20 minutes (measured at 100,000: 9-10 s a
#: run for the import and plain, 20-30 s for plain_states), and the import's flat memory is
#: covered by tests/test_importing.py::test_memory_stays_flat_as_the_file_grows.
IMPORT_ROWS = (100_000,)
#: satori_import, and the practical limit without and with the outbox rows (bench/importing.py).
IMPORT_VARIANTS = ("satori", "plain", "plain_states")
#: The generated export has a date custom field too (as in the import tests' settings).
IMPORT_SATORI = {"CUSTOM_FIELDS": {**CUSTOM_FIELDS, "birthday": "date"}}
COALESCE_SAVES, COALESCE_CUSTOMERS = 1000, 10
#: Single pushes without the rate limit and without bulk routing (the issue's setup).
SYNC_SATORI = {"RATE_LIMIT_PER_MINUTE": None, "BULK_THRESHOLD": 1_000_000_000}
#: Coalescing with its defaults, but without the rate limit: the worker's budget of 30
#: calls a minute outlives a run, so a third run within the minute waited for it (a
#: "retry" and a minute to settle), which is not what the group measures.
COALESCE_SATORI = {"RATE_LIMIT_PER_MINUTE": None}
#: The bulk path with the default settings: the sweep that mark_for_sync() queues routes
#: the backlog at once (mark_for_sync leaves dispatched_at empty).
BULK_SATORI: dict[str, Any] = {}


def _say(message: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, options: argparse.Namespace, ctx: Context) -> None:
        self.options = options
        self.ctx = ctx
        self.records: list[dict[str, Any]] = []
        #: What each database holds now, so a group can reuse the previous one's data.
        self.seeded: dict[str, tuple[int, int]] = {}
        self.notes: list[str] = []
        self.raw_path = ctx.workdir / "results.json"

    def record(
        self, group: str, db: Database, case: str, variant: str, run: int, result: dict[str, Any]
    ) -> None:
        entry = {
            "group": group,
            "db": db.vendor,
            "case": case,
            "variant": variant,
            "run": run,
            **result,
        }
        self.records.append(entry)
        self.raw_path.write_text(json.dumps(self.records, indent=1))
        shown = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in result.items()
            if k in ("seconds", "per_second", "peak_rss_kib", "calls", "rows")
        }
        _say(f"{group}/{db.vendor}/{case}/{variant} run {run}: {shown}")

    def pairs(self, variants: Sequence[str]) -> list[tuple[int, str]]:
        """Runs interleaved, the order reversed every other run, so drift hits all alike."""
        order: list[tuple[int, str]] = []
        for run in range(1, self.options.runs + 1):
            seq = list(variants) if run % 2 else list(reversed(variants))
            order.extend((run, v) for v in seq)
        return order

    def seed(self, db: Database, customers: int, members: int = 0) -> None:
        """Load ``customers`` plain customers and ``members`` Members unless already there."""
        if self.seeded.get(db.vendor) == (customers, members):
            return
        _say(f"seeding {db.vendor}: {customers:,} customers, {members:,} members")
        self.ctx.child(db, "seed", {"customers": customers, "members": members, "sql": True})
        self.seeded[db.vendor] = (customers, members)

    # -- groups ------------------------------------------------------------------

    def saves(self, db: Database) -> None:
        _say(f"saves on {db.vendor}: seeding")
        count = self.size(SAVE_COUNT)
        self.seed(db, count, count)
        variants = (
            ("sync_off", "sync_on", *SAVE_PROPOSALS)
            if self.options.proposals
            else ("sync_off", "sync_on")
        )
        for model in ("customer", "member"):
            for run, variant in self.pairs(variants):
                satori = {"SYNC_ENABLED": variant != "sync_off"}
                params: dict[str, Any] = {
                    "model": model,
                    "count": count,
                    "tag": f"{variant}-{run}",
                    "proposal": SAVE_PROPOSALS.get(variant, ""),
                }
                if self.options.profile and run == 1:
                    params["profile"] = str(
                        self.profile_path(f"saves-{db.vendor}-{model}-{variant}.txt")
                    )
                result = self.ctx.child(db, "saves", params, satori=satori)
                self.record("saves", db, model, variant, run, result)

    def breakdown(self, db: Database) -> None:
        if not self.options.proposals:
            return
        self.seed(db, self.size(SAVE_COUNT), self.size(SAVE_COUNT))
        for run in range(1, self.options.runs + 1):
            count = min(1000, self.size(SAVE_COUNT) - 1)
            result = self.ctx.child(db, "save_breakdown", {"count": count})
            self.record("breakdown", db, "steps", "steps", run, result)

    def export(self, db: Database) -> None:
        sizes = EXPORT_ROWS_FULL if self.options.full else EXPORT_ROWS
        for rows in (self.size(n) for n in sizes):
            self.seed(db, rows)
            variants: tuple[str, ...] = EXPORT_VARIANTS
            if self.options.proposals:
                variants = (*variants, *EXPORT_PROPOSALS)
            if self.options.export_variants:
                variants = tuple(
                    v
                    for v in self.options.export_variants.split(",")
                    if v in (*EXPORT_VARIANTS, *EXPORT_DIAGNOSTICS, *EXPORT_PROPOSALS)
                )
            if rows > 100_000 and not self.options.import_export_full:
                # Minutes per run, and the comparison with it is made at 100,000.
                variants = tuple(v for v in variants if v != "import_export")
            for run, variant in self.pairs(variants):
                params: dict[str, Any] = {
                    "variant": "satori" if variant in EXPORT_PROPOSALS else variant,
                    "rows": rows,
                    "outdir": str(self.ctx.workdir / "export"),
                    "proposal": EXPORT_PROPOSALS.get(variant, ""),
                }
                if self.options.profile and run == 1:
                    params["profile"] = str(
                        self.profile_path(f"export-{db.vendor}-{rows}-{variant}.txt")
                    )
                result = self.ctx.child(db, "export", params)
                self.record("export", db, str(rows), variant, run, result)

    def with_worker(
        self,
        db: Database,
        body: Callable[[str], None],
        satori: dict[str, Any] | None = None,
        concurrency: int = 1,
    ) -> None:
        sandbox = Sandbox(self.ctx, SANDBOX_KEYS, CUSTOM_FIELDS)
        with running(sandbox):
            merged = {"BASE_URL": sandbox.url, **(satori or {})}
            worker = Worker(
                self.ctx, db, merged, name=f"bench-c{concurrency}", concurrency=concurrency
            )
            with running(worker):
                body(sandbox.url)

    def sync(self, db: Database) -> None:
        count = self.size(SYNC_COUNT)
        # The saves' data set has exactly these plain customers (and Members beside them).
        if self.seeded.get(db.vendor, (0, 0))[0] != count:
            self.seed(db, count)
        for concurrency in self.options.worker_concurrency:

            def body(url: str, concurrency: int = concurrency) -> None:
                for run, variant in self.pairs(("bare", "engine")):
                    task = "sync_bare" if variant == "bare" else "sync_engine"
                    result = self.ctx.child(
                        db,
                        task,
                        {"count": count, "sandbox": url},
                        satori={**SYNC_SATORI, "BASE_URL": url},
                    )
                    self.record(
                        "sync",
                        db,
                        f"c{concurrency}",
                        variant,
                        run,
                        {**result, "concurrency": concurrency},
                    )

            self.with_worker(db, body, SYNC_SATORI, concurrency=concurrency)

    def push_breakdown(self, db: Database) -> None:
        if not self.options.proposals:
            return
        count = min(1000, self.size(SYNC_COUNT))
        if self.seeded.get(db.vendor, (0, 0))[0] < count:
            self.seed(db, count)
        sandbox = Sandbox(self.ctx, SANDBOX_KEYS, CUSTOM_FIELDS)
        with running(sandbox):
            for run in range(1, self.options.runs + 1):
                result = self.ctx.child(
                    db,
                    "push_breakdown",
                    {"count": count, "sandbox": sandbox.url},
                    satori={**SYNC_SATORI, "BASE_URL": sandbox.url},
                )
                self.record("push_breakdown", db, "steps", "steps", run, result)

    def coalesce(self, db: Database) -> None:
        if self.seeded.get(db.vendor, (0, 0))[0] < COALESCE_CUSTOMERS:
            self.seed(db, COALESCE_CUSTOMERS)

        variants = ("engine", *COALESCE_PROPOSALS) if self.options.proposals else ("engine",)

        def body(url: str) -> None:
            for run, variant in self.pairs(variants):
                result = self.ctx.child(
                    db,
                    "coalesce",
                    {
                        "saves": COALESCE_SAVES,
                        "customers": COALESCE_CUSTOMERS,
                        "sandbox": url,
                        "proposal": COALESCE_PROPOSALS.get(variant, ""),
                    },
                    satori={**COALESCE_SATORI, "BASE_URL": url},
                )
                self.record("coalesce", db, "coalesce", variant, run, result)

        self.with_worker(db, body, COALESCE_SATORI)

    def bulk(self, db: Database) -> None:
        count = self.size(BULK_COUNT)
        self.seed(db, count)

        def body(url: str) -> None:
            for run in range(1, self.options.runs + 1):
                result = self.ctx.child(
                    db,
                    "bulk_sync",
                    {"count": count, "sandbox": url},
                    satori={**BULK_SATORI, "BASE_URL": url},
                )
                self.record("bulk", db, "bulk", "engine", run, result)

        self.with_worker(db, body, BULK_SATORI)

    def import_(self, db: Database) -> None:
        for rows in (self.size(n) for n in IMPORT_ROWS):
            path = self.ctx.workdir / "import" / f"export-{rows}.cp932.csv"
            if not path.exists():
                _say(f"writing the {rows:,}-row Shift_JIS export")
                self.ctx.child(db, "import_file", {"path": str(path), "rows": rows})
            # Every run empties the tables: the data set of the other groups is gone.
            self.seeded.pop(db.vendor, None)
            for run, variant in self.pairs(IMPORT_VARIANTS):
                params: dict[str, Any] = {"variant": variant, "path": str(path), "rows": rows}
                if self.options.profile and run == 1:
                    params["profile"] = str(
                        self.profile_path(f"import-{db.vendor}-{rows}-{variant}.txt")
                    )
                result = self.ctx.child(db, "import", params, satori=IMPORT_SATORI)
                self.record("import", db, str(rows), variant, run, result)

    def size(self, count: int) -> int:
        return max(10, int(count * self.options.scale))

    def profile_path(self, name: str) -> Path:
        path = Path(self.options.profile)
        path.mkdir(parents=True, exist_ok=True)
        return path / name


def _databases(
    ctx: Context, wanted: Sequence[str], stack: list[Any], notes: list[str]
) -> dict[str, Database]:
    found: dict[str, Database] = {}
    if "sqlite" in wanted:
        # Like the test suite: in RAM where there is /dev/shm, so neither database
        # pays for durable commits (the throwaway PostgreSQL runs with fsync off).
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else ctx.workdir
        path = Path(tempfile.mkdtemp(prefix="django-satori-bench-", dir=base)) / "bench.sqlite3"
        stack.append(lambda: shutil.rmtree(path.parent, ignore_errors=True))
        found["sqlite"] = Database("sqlite", {"BENCH_SQLITE_PATH": str(path)})
    if "postgresql" in wanted:
        try:
            server = services.start_postgres("django_satori_bench")
        except services.ServiceUnavailable as exc:
            notes.append(f"PostgreSQL could not be started here, so it was left out: {exc}")
            _say(f"NOTICE: no PostgreSQL: {exc}")
        else:
            stack.append(server.cleanup)
            found["postgresql"] = Database("postgresql", {"BENCH_DATABASE_URL": server.url})
    return found


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="also export 1,000,000 customers and run the import group (adds about half an hour)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per figure; the median is reported (default 3, minimum 3)",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated groups (default: {', '.join(DEFAULT_GROUPS)}; "
        f"with --full also {', '.join(FULL_GROUPS)}; all: "
        f"{', '.join(GROUPS)})",
    )
    parser.add_argument(
        "--databases",
        default="sqlite,postgresql",
        help="databases for saves and export (default sqlite,postgresql)",
    )
    parser.add_argument(
        "--sync-databases",
        default="",
        help="databases for sync, coalesce and bulk (default: postgresql, "
        "or sqlite without PostgreSQL)",
    )
    parser.add_argument(
        "--worker-concurrency",
        default="1",
        help="concurrency of the one worker in the sync throughput runs, "
        "comma-separated for several (default: 1; e.g. 1,2 also measures "
        "two processes, about 1.5 minutes more)",
    )
    parser.add_argument(
        "--import-export-full",
        action="store_true",
        help="with --full, also run django-import-export on 1,000,000 rows (slow: minutes per run)",
    )
    parser.add_argument(
        "--output",
        default=str(Path(__file__).with_name("RESULTS.md")),
        help="the Markdown report to write (default bench/RESULTS.md)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every size by this (to try the harness quickly; the report states it)",
    )
    parser.add_argument(
        "--proposals",
        action="store_true",
        help="also measure the prototypes of proposed fixes (bench/proposals.py) "
        "beside the code as it is",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the figures of the existing report that this run does not "
        "measure (e.g. add --full export figures to a default run)",
    )
    parser.add_argument(
        "--export-variants",
        default="",
        help="only these exporters (comma-separated: satori, plain, "
        "import_export, satori_no_claim: the same job as a dry run)",
    )
    parser.add_argument(
        "--logs", default="", help="copy the worker and sandbox logs to this directory at the end"
    )
    parser.add_argument(
        "--profile",
        default="",
        help="directory for pyinstrument profiles of the first run of each case",
    )
    options = parser.parse_args(argv)
    if options.runs < 3:
        parser.error("--runs must be at least 3: every figure is a median of three or more")
    options.worker_concurrency = sorted({int(c) for c in options.worker_concurrency.split(",")})
    if not options.only:
        options.only = ",".join((*DEFAULT_GROUPS, *FULL_GROUPS) if options.full else DEFAULT_GROUPS)
    unknown = set(options.only.split(",")) - set(GROUPS)
    if unknown:
        parser.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    groups = [g for g in GROUPS if g in options.only.split(",")]
    started = time.time()
    cleanups: list[Callable[[], Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="django-satori-bench-"))
    (workdir / "logs").mkdir()
    try:
        redis = services.start_redis()
    except services.ServiceUnavailable as exc:
        print(f"bench: Redis is required: {exc}", file=sys.stderr)
        return 2
    cleanups.append(redis.cleanup)
    ctx = Context(broker_url=redis.url, workdir=workdir, logdir=workdir / "logs")
    runner = Runner(options, ctx)
    if options.scale != 1:
        runner.notes.append(
            f"Sizes scaled by {options.scale:g} (--scale): a trial run, "
            "not the sizes the targets are about."
        )
    failed = False
    try:
        wanted = options.databases.split(",")
        sync_wanted = [d for d in options.sync_databases.split(",") if d]
        dbs = _databases(ctx, sorted(set(wanted) | set(sync_wanted)), cleanups, runner.notes)
        if not sync_wanted:
            sync_wanted = ["postgresql"] if "postgresql" in dbs else ["sqlite"]
            if sync_wanted[0] not in dbs:
                dbs.update(_databases(ctx, sync_wanted, cleanups, runner.notes))
        for db in dbs.values():
            ctx.child(db, "migrate")
        versions = {name: ctx.child(db, "versions") for name, db in dbs.items()}
        for group in groups:
            targets = sync_wanted if group in SYNC_GROUPS else wanted
            for name in targets:
                if name in dbs:
                    # "import" is a keyword: its method is import_.
                    getattr(runner, "import_" if group == "import" else group)(dbs[name])
    except (BenchError, KeyboardInterrupt) as exc:
        failed = True
        _say(f"FAILED: {exc}")
        keep = Path(options.output).with_suffix(".partial.json")
        keep.write_text(json.dumps(runner.records, indent=1))
        _say(f"partial results in {keep}; logs kept in {ctx.logdir}")
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        if options.logs:
            shutil.copytree(ctx.logdir, options.logs, dirs_exist_ok=True)
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1
    command = "python -m bench.run" + (" " + shlex.join(argv) if argv else "")
    records = [{**r, "command": command} for r in runner.records]
    if options.merge:
        records = report.merged(Path(options.output), records)
    report.write(
        Path(options.output),
        records,
        versions=versions,
        command=command,
        elapsed=time.time() - started,
        notes=runner.notes,
        redis=redis.binary,
    )
    _say(f"done in {time.time() - started:.0f}s; wrote {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
