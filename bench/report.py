"""Turns the records of a run into bench/RESULTS.md (and the raw runs beside it as JSON).

Everything above the notes marker is regenerated on every run; the notes
below it (analysis, profiles, before/after) are kept as they are.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

NOTES_MARKER = "<!-- notes: everything below this line is kept by bench.run -->"

#: Targets of the issue: (label, comparison, threshold).
#: Save overhead by model: a connected model (issue #18: <= 1.5x) and Customer (<= 1.3x).
SAVE_TARGETS = {"member": 1.5, "customer": 1.3}
SYNC_TARGET = 0.8
EXPORT_PLAIN_TARGET = 0.8
EXPORT_IE_TARGET = 7.0
EXPORT_MEMORY_TARGET = 1.3
COALESCE_TARGET = 10
#: Variant names of the prototypes (bench/proposals.py) -> proposal; mirrors bench.run.
SAVE_PROPOSALS: dict[str, str] = {}  # applied: single_statement_mark, batched_publish
EXPORT_PROPOSALS: dict[str, str] = {}  # applied in bulk.py: claim per part, int fast path
COALESCE_PROPOSALS = {"debounce": "debounce"}


def median(records: Iterable[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _select(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _mib(kib: float) -> str:
    return "n/a" if kib != kib else f"{kib / 1024:,.0f} MiB"  # nan: not recorded


def _seconds(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f} s"  # nan: not recorded


def _rate(value: float) -> str:
    return f"{value:,.0f}/s"


def _ok(met: bool) -> str:
    return "met" if met else "**missed**"


def _machine(versions: dict[str, dict[str, Any]], redis: str) -> list[str]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = ""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    try:
        redis_version = (
            subprocess.run([redis, "--version"], capture_output=True, text=True, check=False)
            .stdout.split(" v=")[1]
            .split()[0]
        )
    except (OSError, IndexError):
        redis_version = "?"
    any_db = next(iter(versions.values()), {})
    lines = [
        f"- CPU: {model or platform.processor()}, {os.cpu_count()} cores",
        f"- Memory: {memory}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        f"- Python {any_db.get('python', platform.python_version())}, "
        f"Django {any_db.get('django', '?')}, Celery {any_db.get('celery', '?')}, "
        f"requests {any_db.get('requests', '?')}, "
        f"django-import-export {any_db.get('django-import-export', 'not installed')}",
        f"- Redis {redis_version} (broker)",
    ]
    for name, info in versions.items():
        extra = f", {info['driver']}" if info.get("driver") else ""
        lines.append(f"- {name}: {info.get('database', '?')}{extra}")
    lines.append(
        "- Neither database makes durable commits: SQLite's file is in /dev/shm and the "
        "throwaway PostgreSQL runs with fsync and synchronous_commit off "
        "(tests/services.py). A durable commit adds the same fixed cost to both sides "
        "of every save comparison, so these ratios are the unfavourable case."
    )
    return lines


def _git() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # The report itself does not count: a --merge run starts from a rewritten one.
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(top,exclude)bench/RESULTS.md",
                ":(top,exclude)bench/RESULTS.json",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _export(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    rows_out: list[list[str]] = []
    lines = [
        "## 1. Bulk CSV export",
        "",
        "All customers (each with two or three tags and two custom fields) to CSV with the "
        "SATORI bulk columns. `satori` is `bulk.start_bulk_job` + `bulk.run_job` (row "
        "checks, parts of 10,000 rows, outbox rows claimed, files saved to the storage; "
        "the upload left out); `plain` is `csv.writer` over `values_list(...).iterator()`; "
        "`import-export` is a django-import-export `ModelResource` with the same columns, "
        "`export(queryset).csv`. Peak memory is the peak RSS (`ru_maxrss`) of a fresh "
        'process per run; "before" is its RSS just before the export started.',
        "",
    ]
    dbs = sorted({r["db"] for r in records})
    sizes = sorted({int(r["case"]) for r in records})
    peaks: dict[tuple[str, str, int], float] = {}
    for db in dbs:
        for size in sizes:
            by = {
                v: _select(records, db=db, case=str(size), variant=v)
                for v in ("satori", "plain", "import_export", "satori_no_claim", *EXPORT_PROPOSALS)
            }
            if not by["satori"]:
                continue
            plain_rate = median(by["plain"], "per_second")
            ie_rate = median(by["import_export"], "per_second")
            for variant, runs in by.items():
                if not runs:
                    continue
                rate = median(runs, "per_second")
                peaks[(db, variant, size)] = median(runs, "peak_rss_kib")
                label = (
                    f"satori + proposal {EXPORT_PROPOSALS[variant]}"
                    if variant in EXPORT_PROPOSALS
                    else "satori, dry run (nothing claimed)"
                    if variant == "satori_no_claim"
                    else variant.replace("_", "-")
                )
                rows_out.append(
                    [
                        db,
                        f"{size:,}",
                        label,
                        str(len(runs)),
                        f"{median(runs, 'seconds'):.2f} s",
                        _seconds(median(runs, "cpu_seconds")),
                        _rate(rate),
                        f"{rate / plain_rate:.2f}x" if by["plain"] else "",
                        f"{rate / ie_rate:.1f}x" if by["import_export"] else "",
                        _mib(median(runs, "peak_rss_kib")),
                        _mib(median(runs, "base_rss_kib")),
                    ]
                )
            satori_rate = median(by["satori"], "per_second")
            if by["plain"]:
                ratio = satori_rate / plain_rate
                summary.append(
                    [
                        f"export rows/s vs plain, {db}, {size:,}",
                        f">= {EXPORT_PLAIN_TARGET}x",
                        f"{ratio:.2f}x",
                        _ok(ratio >= EXPORT_PLAIN_TARGET),
                    ]
                )
            if by["import_export"]:
                ratio = satori_rate / ie_rate
                summary.append(
                    [
                        f"export rows/s vs django-import-export, {db}, {size:,}",
                        f">= {EXPORT_IE_TARGET:.0f}x",
                        f"{ratio:.1f}x",
                        _ok(ratio >= EXPORT_IE_TARGET),
                    ]
                )
    for db in dbs:
        small, big = peaks.get((db, "satori", 100_000)), peaks.get((db, "satori", 1_000_000))
        if small and big:
            ratio = big / small
            summary.append(
                [
                    f"export peak memory 1M / 100k, {db}",
                    f"<= {EXPORT_MEMORY_TARGET}x",
                    f"{ratio:.2f}x ({_mib(big)} / {_mib(small)})",
                    _ok(ratio <= EXPORT_MEMORY_TARGET),
                ]
            )
    lines += _table(
        [
            "database",
            "rows",
            "exporter",
            "runs",
            "time (median)",
            "CPU",
            "rows/s",
            "vs plain",
            "vs import-export",
            "peak RSS",
            "RSS before",
        ],
        rows_out,
    )
    return [*lines, ""]


def _saves(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 2. Save overhead",
        "",
        "10,000 `save()` calls, each in autocommit mode (its own transaction, as in a web "
        "request), each of a different object that was synced before: with sync on every "
        "save writes the outbox row and, after commit, publishes a push task to Redis. "
        "`member` is `tests.testapp.Member`, connected through `SATORI['MAPPINGS']`: its "
        "save also updates the mirrored Customer. Sync off is `SATORI['SYNC_ENABLED'] = "
        "False`. Ratio = time with sync on / time with sync off; the CPU-time ratio compares "
        "the saving process's own CPU time (it leaves out waiting for Redis and the "
        "database server, and most of the disturbance from other work on the machine).",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        for model in ("customer", "member"):
            off = _select(records, db=db, case=model, variant="sync_off")
            for variant in ("sync_on", *SAVE_PROPOSALS):
                on = _select(records, db=db, case=model, variant=variant)
                if not off or not on:
                    continue
                ratio = median(on, "seconds") / median(off, "seconds")
                per_off = median(off, "seconds") / median(off, "count") * 1000
                per_on = median(on, "seconds") / median(on, "count") * 1000
                cpu_ratio = median(on, "cpu_seconds") / median(off, "cpu_seconds")
                label = (
                    model
                    if variant == "sync_on"
                    else f"{model} + proposal {SAVE_PROPOSALS[variant]}"
                )
                rows_out.append(
                    [
                        db,
                        label,
                        str(len(off)),
                        _rate(median(off, "per_second")),
                        f"{per_off:.2f} ms",
                        _rate(median(on, "per_second")),
                        f"{per_on:.2f} ms",
                        f"+{per_on - per_off:.2f} ms",
                        f"{ratio:.2f}x",
                        f"{cpu_ratio:.2f}x",
                    ]
                )
                if variant == "sync_on":
                    summary.append(
                        [
                            f"save overhead, {model}, {db}",
                            f"<= {SAVE_TARGETS[model]}x",
                            f"{ratio:.2f}x",
                            _ok(ratio <= SAVE_TARGETS[model]),
                        ]
                    )
    lines += _table(
        [
            "database",
            "model",
            "runs",
            "sync off",
            "per save",
            "sync on",
            "per save",
            "added",
            "ratio",
            "CPU-time ratio",
        ],
        rows_out,
    )
    return [*lines, ""]


def _sync(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 3. Sync throughput (single-customer API)",
        "",
        "10,000 pending customers to synced through one real Celery worker (prefork pool) "
        "and the sandbox in its own process (`python -m django_satori.sandbox`), rate "
        "limit off, bulk routing off; timed from `mark_for_sync()` until the last outbox "
        "row is synced (the pushes travel as `push_many` messages of up to 100 ids). "
        "Against a bare `requests.Session` loop posting the same request "
        "bodies (built beforehand with the client's own functions) to the same sandbox. "
        "Each worker concurrency is compared with its own interleaved bare runs.",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        for case in sorted({r["case"] for r in records if r["db"] == db}):
            bare = _select(records, db=db, case=case, variant="bare")
            engine = _select(records, db=db, case=case, variant="engine")
            if not bare or not engine:
                continue
            concurrency = engine[0].get("concurrency", 1)
            ratio = median(engine, "per_second") / median(bare, "per_second")
            rows_out.append(
                [
                    db,
                    str(concurrency),
                    str(len(engine)),
                    f"{median(bare, 'seconds'):.1f} s",
                    _rate(median(bare, "per_second")),
                    f"{median(engine, 'seconds'):.1f} s",
                    _rate(median(engine, "per_second")),
                    f"{ratio:.2f}x",
                    f"{median(engine, 'calls_logged'):,.0f}",
                ]
            )
            summary.append(
                [
                    f"sync throughput vs bare requests loop, {db}, worker concurrency "
                    f"{concurrency}",
                    f">= {SYNC_TARGET}x",
                    f"{ratio:.2f}x",
                    _ok(ratio >= SYNC_TARGET),
                ]
            )
    lines += _table(
        [
            "database",
            "worker concurrency",
            "runs",
            "bare loop",
            "bare rate",
            "worker",
            "worker rate",
            "ratio",
            "calls made",
        ],
        rows_out,
    )
    return [*lines, ""]


def _bulk(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 4. A backlog of 100,000 pending customers through bulk uploads",
        "",
        "`mark_for_sync()` of 100,000 customers with the default `BULK_THRESHOLD`; the "
        "sweep it queues routes the backlog to one automatic bulk job (10 parts), run by "
        "the same single worker (concurrency 1) against the sandbox, whose jobs take its "
        "default 1 s to process. Timed until every outbox row is synced and the job "
        "finished. HTTP calls are the SATORI API requests the sandbox recorded (uploads and "
        "status checks). Default settings (`SWEEP_AFTER_SECONDS` 60 s: rows marked by "
        "`mark_for_sync()` count as never dispatched, so its sweep takes them at once).",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        runs = _select(records, db=db, group="bulk")
        if not runs:
            continue
        ops: dict[str, list[int]] = {}
        for run in runs:
            for op, n in run["calls_by_operation"].items():
                ops.setdefault(op, []).append(n)
        by_op = ", ".join(f"{op} {statistics.median(v):.0f}" for op, v in sorted(ops.items()))
        rows_out.append(
            [
                db,
                str(len(runs)),
                f"{median(runs, 'count'):,.0f}",
                f"{median(runs, 'seconds'):.1f} s",
                _rate(median(runs, "per_second")),
                f"{median(runs, 'calls'):.0f} ({by_op})",
                f"{median(runs, 'parts'):.0f}",
            ]
        )
        summary.append(
            [
                f"100,000 via bulk, {db}",
                "time and calls reported",
                f"{median(runs, 'seconds'):.1f} s, {median(runs, 'calls'):.0f} calls",
                "reported",
            ]
        )
    lines += _table(
        ["database", "runs", "customers", "time to all synced", "rate", "HTTP calls", "parts"],
        rows_out,
    )
    return [*lines, ""]


def _coalesce(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 5. Coalescing",
        "",
        "1,000 saves spread round-robin over 10 customers as fast as the loop goes, with "
        "the default `COALESCE_SECONDS`, the rate limit off (its budget would outlive a run), "
        "one worker and the sandbox; calls are counted by "
        "the sandbox after every push has settled and one more window has passed.",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        for variant in ("engine", *COALESCE_PROPOSALS):
            runs = _select(records, db=db, group="coalesce", variant=variant)
            if not runs:
                continue
            worst = max(r["calls"] for r in runs)
            label = db if variant == "engine" else f"{db} + proposal {variant}"
            rows_out.append(
                [
                    label,
                    str(len(runs)),
                    f"{median(runs, 'seconds'):.2f} s",
                    f"{runs[0]['coalesce_seconds']:g} s",
                    " / ".join(f"{r['settle_seconds']:.1f} s" for r in runs),
                    f"{median(runs, 'calls'):.0f}",
                    str(worst),
                    "yes" if all(r["sandbox_has_last_values"] for r in runs) else "NO",
                ]
            )
            if variant == "engine":
                summary.append(
                    [
                        f"coalescing: calls for 1,000 saves of 10 customers, {db}",
                        f"<= {COALESCE_TARGET}",
                        f"{worst} (worst run)",
                        _ok(worst <= COALESCE_TARGET),
                    ]
                )
    lines += _table(
        [
            "database",
            "runs",
            "burst took",
            "window",
            "then all synced after (each run)",
            "calls (median)",
            "calls (worst)",
            "SATORI has the last values",
        ],
        rows_out,
    )
    return [*lines, ""]


IMPORT_LABELS = {
    "satori": "satori_import",
    "plain": "plain: csv.reader + bulk_create",
    "plain_states": "plain + SyncState rows",
}


def _import(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    sizes = sorted({int(r["case"]) for r in records})
    mib = {size: median(_select(records, case=str(size)), "bytes") / 2**20 for size in sizes}
    files = ", ".join(f"{size:,} rows: {mib[size]:,.1f} MiB" for size in sizes)
    lines = [
        "## 6. Importing SATORI's admin export (Shift_JIS)",
        "",
        "The customer CSV of SATORI's admin screen as the import tests write it "
        "(`tests/importfiles.py`): cp932, Japanese headers, CRLF, a two-line memo on every "
        f"tenth row, 19 columns of which 17 are read ({files}). Every run starts from empty "
        "tables, so every row creates a customer (a first import). `satori_import` is "
        "`manage.py satori_import FILE` with its default options (encoding detected, "
        "batches of 1,000 rows per transaction): each row is checked and converted "
        "(e-mail normalised, dates, delivery permission, tags, lengths), each batch's "
        "addresses and hashcodes are looked up, and each row writes a Customer, its "
        "SyncState (hashcode, `remote_values`, `in_satori`) and an ImportedCustomer row "
        "(`executemany` INSERTs on SQLite, COPY on PostgreSQL), then ANALYZE. The practical "
        "limit, `plain`, is `csv.reader` over the same file opened as cp932 and "
        "`Customer.objects.bulk_create` of the same values, 1,000 rows per transaction, "
        "converting only what storing needs (dates, tags, 許可/拒否, custom fields) and "
        "checking nothing; `plain + SyncState rows` also `bulk_create`s each customer's "
        "SyncState with the values the import stores there, so it writes the two tables "
        "the import fills, without its checks, lookups, ImportedCustomer rows and ANALYZE. "
        "`bulk_create` prepares every value of every row through the ORM, which the "
        "import's own SQL (`django_satori/rawsql.py`) avoids, so the baselines are the "
        "practical limit of the plain Django way, not a ceiling for the import. Ratio = "
        "rows/s of the row's importer / rows/s of the baseline. Peak memory is the "
        'peak RSS of a fresh process per run; "before" is its RSS just before the '
        "import started. There is no target for the import.",
        "",
    ]
    rows_out: list[list[str]] = []
    for db in sorted({r["db"] for r in records}):
        for size in sizes:
            by = {v: _select(records, db=db, case=str(size), variant=v) for v in IMPORT_LABELS}
            plain_rate = median(by["plain"], "per_second")
            states_rate = median(by["plain_states"], "per_second")
            for variant, runs in by.items():
                if not runs:
                    continue
                rate = median(runs, "per_second")
                rows_out.append(
                    [
                        db,
                        f"{size:,}",
                        IMPORT_LABELS[variant],
                        str(len(runs)),
                        _seconds(median(runs, "seconds")),
                        _seconds(median(runs, "cpu_seconds")),
                        _rate(rate),
                        f"{rate / plain_rate:.2f}x" if by["plain"] else "",
                        f"{rate / states_rate:.2f}x" if by["plain_states"] else "",
                        _mib(median(runs, "peak_rss_kib")),
                        _mib(median(runs, "base_rss_kib")),
                    ]
                )
            if by["satori"]:
                rate = median(by["satori"], "per_second")
                peak = _mib(median(by["satori"], "peak_rss_kib"))
                versus = [
                    f"{rate / plain_rate:.2f}x of plain" if by["plain"] else "",
                    f"{rate / states_rate:.2f}x of plain + SyncState rows"
                    if by["plain_states"]
                    else "",
                ]
                summary.append(
                    [
                        f"import of a Shift_JIS export, {db}, {size:,} rows",
                        "no target; reported",
                        ", ".join([_rate(rate), *filter(None, versus), f"peak RSS {peak}"]),
                        "reported",
                    ]
                )
    lines += _table(
        [
            "database",
            "rows",
            "importer",
            "runs",
            "time (median)",
            "CPU",
            "rows/s",
            "vs plain",
            "vs plain + SyncState rows",
            "peak RSS",
            "RSS before",
        ],
        rows_out,
    )
    return [*lines, ""]


def _breakdown(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 2b. Where a save with sync on spends its time",
        "",
        "Each step of a save with sync on, alone, 1,000 calls per run in one process "
        "(`bench/breakdown.py`, with `--proposals`); CPU is that process's own CPU time, "
        "wall includes waiting for the database server and Redis.",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        runs = _select(records, db=db)
        for step in runs[0]["steps"]:
            cpu = statistics.median(r["steps"][step]["cpu_us"] for r in runs)
            wall = statistics.median(r["steps"][step]["wall_us"] for r in runs)
            rows_out.append([db, step, str(len(runs)), f"{cpu:,.0f} µs", f"{wall:,.0f} µs"])
    lines += _table(["database", "step", "runs", "CPU per call", "wall per call"], rows_out)
    return [*lines, ""]


def _push_breakdown(records: list[dict[str, Any]], summary: list[list[str]]) -> list[str]:
    lines = [
        "## 3b. Where a push spends its time",
        "",
        "`sync.push_batch()` called in one process for 1,000 pending customers in batches "
        "of 100 (as `push_many` messages carry them; no Celery), against the same sandbox, "
        "each step timed by wrapping the function `push_batch` calls (`bench/breakdown.py`, "
        "with `--proposals`); figures per customer. CPU is that thread's CPU time.",
        "",
    ]
    rows_out = []
    for db in sorted({r["db"] for r in records}):
        runs = _select(records, db=db)
        for step in runs[0]["steps"]:
            cpu = statistics.median(r["steps"][step]["cpu_us"] for r in runs)
            wall = statistics.median(r["steps"][step]["wall_us"] for r in runs)
            rows_out.append([db, step, str(len(runs)), f"{cpu:,.0f} µs", f"{wall:,.0f} µs"])
    lines += _table(["database", "step", "runs", "CPU per push", "wall per push"], rows_out)
    return [*lines, ""]


SECTIONS: list[tuple[str, Callable[[list[dict[str, Any]], list[list[str]]], list[str]]]] = [
    ("export", _export),
    ("saves", _saves),
    ("breakdown", _breakdown),
    ("sync", _sync),
    ("push_breakdown", _push_breakdown),
    ("bulk", _bulk),
    ("coalesce", _coalesce),
    ("import", _import),
]


def _kept_notes(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    return text.split(NOTES_MARKER, 1)[1] if NOTES_MARKER in text else ""


def merged(path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` plus the previous run's records of figures this run did not measure."""
    try:
        previous = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["records"]
    except (OSError, ValueError, KeyError):
        return records
    fresh = {(r["group"], r["db"], r["case"], r["variant"]) for r in records}
    kept = [r for r in previous if (r["group"], r["db"], r["case"], r["variant"]) not in fresh]
    return kept + records


def write(
    path: Path,
    records: list[dict[str, Any]],
    *,
    versions: dict[str, dict[str, Any]],
    command: str,
    elapsed: float,
    notes: list[str],
    redis: str,
) -> None:
    summary: list[list[str]] = []
    body: list[str] = []
    for group, render in SECTIONS:
        chosen = [r for r in records if r["group"] == group]
        if chosen:
            body += render(chosen, summary)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commands = sorted({r.get("command", command) for r in records} - {command})
    earlier = (
        (
            "; figures it did not measure come from earlier runs: "
            + ", ".join(f"`{c}`" for c in commands)
        )
        if commands
        else ""
    )
    lines = [
        "# Benchmark results",
        "",
        f"Made by `{command}` (`make bench` runs `python -m bench.run`) on {when} at commit "
        f"{_git()}; the run took {elapsed / 60:.1f} minutes{earlier}. Every figure is the "
        "median of the runs shown; the runs of a comparison alternate in the same "
        f"invocation. Raw runs, with the command of each: `{path.with_suffix('.json').name}`.",
        "",
        "## Machine",
        "",
        *_machine(versions, redis),
        "",
    ]
    loads = [r["load"] for r in records if "load" in r]
    if loads:
        lines += [
            f"Load average (1 min) when the runs started: median "
            f"{statistics.median(loads):.1f}, highest {max(loads):.1f} on "
            f"{os.cpu_count()} cores (per run in the JSON). "
            "Other work on the machine shows up in wall times first; CPU times are "
            "given beside them where the measured work runs in one process.",
            "",
        ]
    if notes:
        lines += ["Notes from this run:", "", *(f"- {n}" for n in notes), ""]
    lines += ["## Targets", "", *_table(["figure", "target", "measured", ""], summary), ""]
    lines += body
    lines += [NOTES_MARKER]
    kept = _kept_notes(path)
    text = "\n".join(lines) + (kept if kept else "\n")
    path.write_text(text, encoding="utf-8")
    path.with_suffix(".json").write_text(
        json.dumps({"command": command, "versions": versions, "records": records}, indent=1) + "\n",
        encoding="utf-8",
    )
