"""The sandbox's home page: what it holds, from the redacted snapshot only.

Written for the people who watch a demo or debug a test: times in Japan time
(SATORI's own screens show JST), the newest first, every action a customer
received, and the options as a table. The page reloads itself.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from html import escape
from typing import Any

from .i18n import _

RECENT_REQUESTS = 50
RECENT_ACTIONS = 100
#: Seconds between reloads of the page.
REFRESH_SECONDS = 5
#: Japan has no daylight saving time, so a fixed offset is exact (and needs no tzdata).
JST = dt.timezone(dt.timedelta(hours=9), "JST")


def japan_time(value: str | None) -> str:
    """An ISO timestamp of the snapshot as ``2026-12-08 02:36:49`` in Japan time."""
    if not value:
        return ""
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(JST).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def language(accept_language: str | None) -> Iterator[None]:
    """Render in the browser's language when Django (and so its catalogs) is there.

    Stand-alone (``python -m django_satori.sandbox``) the page stays in English.
    """
    chosen = None
    try:
        from django.conf import settings
        from django.utils import translation
        from django.utils.translation.trans_real import parse_accept_lang_header

        if settings.configured and accept_language:
            for code, _quality in parse_accept_lang_header(accept_language):
                if code == "*":
                    break
                try:
                    chosen = translation.get_supported_language_variant(code)
                    break
                except LookupError:
                    continue
    except Exception:  # Django missing or not set up: English it is
        chosen = None
    if chosen is None:
        yield
        return
    with translation.override(chosen):
        yield


def _table(
    headers: list[str],
    rows: list[list[str]],
    empty: str,
    table_id: str,
    keep_whole: tuple[int, ...] = (),
) -> str:
    """``keep_whole``: columns (times, methods) never broken over lines."""
    if not rows:
        return f"<p class=empty id={table_id}-empty>{escape(empty)}</p>"
    head = "".join(f'<th scope="col">{escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=whole>{escape(cell)}</td>"
            if n in keep_whole
            else f"<td>{escape(cell)}</td>"
            for n, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table id={table_id}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _config_value(value: Any, nested: bool = False) -> str:
    if value is None:
        return _("(not set)")
    if isinstance(value, bool):
        return _("yes") if value else _("no")
    if isinstance(value, Mapping):
        if not value:
            return _("(none)")
        if nested:  # a custom field's definition: on its one line
            return "(" + "; ".join(f"{k}: {_config_value(v, True)}" for k, v in value.items()) + ")"
        return "\n".join(f"{k}: {_config_value(v, True)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else _("(none)")
    return str(value)


def _config_rows(settings: Mapping[str, Any]) -> list[list[str]]:
    described = {
        "keys": _("API keys"),
        "custom_fields": _("Declared custom fields (not set: any identifier is accepted)"),
        "bulk_processing_seconds": _("Seconds a bulk job stays processing"),
        "process_code_ttl": _("Seconds a process code stays valid"),
        "tag_separator": _("Tag separator"),
        "action_path": _("Action API path"),
        "action_params": _("Action API parameter names"),
        "envelope": _("Bulk API envelope"),
        "own_only": _("Only customers created with these keys can be changed"),
        "deny_operations": _("Refused operations"),
        "refused_columns": _("Bulk CSV columns refused"),
        "answer_status": _("Status codes used for refusals, by kind"),
        "email_case_sensitive": _("E-mail addresses compared with case"),
        "hashcode_identity": _("Customers can be named by hashcode"),
        "action_identity_params": _("Action API identity parameter names"),
        "action_date_format": _("Action date format"),
        "action_refuse_date": _("Action calls with a date are refused"),
        "action_required_params": _("Parameters every action call must carry"),
        "extra_items": _("Further standard items accepted"),
    }
    return [[described.get(key, key), key, _config_value(value)] for key, value in settings.items()]


def render(
    snapshot: dict[str, Any], settings: dict[str, Any], accept_language: str | None = None
) -> str:
    with language(accept_language):
        return _render(snapshot, settings)


def _render(snapshot: dict[str, Any], settings: dict[str, Any]) -> str:
    newest_first = sorted(
        snapshot["customers"],
        key=lambda c: c["updated_at"] or c["created_at"] or "",
        reverse=True,
    )
    customers = [
        [
            c["email"],
            c["hashcode"],
            " ".join(v for v in (c["fields"].get("last_name"), c["fields"].get("first_name")) if v),
            ", ".join(
                f"{k}={v}" for k, v in c["fields"].items() if k not in ("last_name", "first_name")
            ),
            ", ".join(c["tags"]),
            ", ".join(f"{k}={v}" for k, v in c["custom"].items()),
            ", ".join(a["name"] for a in reversed(c["actions"])),
            c["created_by"],
            japan_time(c["updated_at"]),
        ]
        for c in newest_first
    ]
    every_action = sorted(
        ((a, c["email"]) for c in snapshot["customers"] for a in c["actions"]),
        key=lambda pair: pair[0]["received_at"] or "",
        reverse=True,
    )
    actions = [
        [
            japan_time(a["received_at"]),
            email,
            a["name"],
            a["content"] or "",
            a["url"] or "",
            a["date"] or "",
        ]
        for a, email in every_action[:RECENT_ACTIONS]
    ]
    jobs = [
        [
            j["process_code"],
            j["operation"],
            j["process_status"],
            str(j["rows"]),
            str(len(j["succeeded_rows"])),
            "; ".join(f"{r['row_number']}: {r['message']}" for r in j["failed_rows"]),
            japan_time(j["submitted_at"]),
        ]
        for j in sorted(snapshot["jobs"], key=lambda j: j["submitted_at"] or "", reverse=True)
    ]
    requests = [
        [
            japan_time(r["received_at"]),
            r["method"],
            r["path"],
            "" if r["status"] is None else str(r["status"]),
            r["fault"] or "",
            " ".join(f"{k}={v}" for k, v in r["form"] or r["query"])[:400],
        ]
        for r in reversed(snapshot["requests"][-RECENT_REQUESTS:])
    ]
    # Labels are built outside the f-string so makemessages can find them.
    title = escape(_("SATORI sandbox"))
    intro = escape(_("A fake SATORI for tests and demos. Nothing here leaves this machine."))
    now = dt.datetime.now(JST).strftime("%Y-%m-%d %H:%M:%S")
    updated = escape(
        _(
            "Shown at %(time)s, Japan time (JST). Newest first. "
            "This page reloads every %(seconds)d seconds."
        )
        % {"time": now, "seconds": REFRESH_SECONDS}
    )
    reload_label = escape(_("Reload now"))
    faults_label = escape(_("Injected faults"))
    faults = escape(", ".join(f"{k}: {v}" for k, v in snapshot["faults_by_kind"].items()))
    customers_label = escape(_("Customers"))
    actions_label = escape(_("Actions"))
    jobs_label = escape(_("Bulk jobs"))
    requests_label = escape(_("Recent requests"))
    config_label = escape(_("Configuration"))
    time_header = _("Time (JST)")
    customer_table = _table(
        [
            _("E-mail"),
            _("Hashcode"),
            _("Name"),
            _("Fields"),
            _("Tags"),
            _("Custom fields"),
            _("Actions"),
            _("Created by"),
            _("Updated (JST)"),
        ],
        customers,
        _("No customers yet."),
        "customers",
        keep_whole=(8,),
    )
    action_table = _table(
        [time_header, _("E-mail"), _("Action name"), _("Content"), _("URL"), _("Date")],
        actions,
        _("No actions yet."),
        "actions",
        keep_whole=(0,),
    )
    job_table = _table(
        [
            _("Process code"),
            _("Operation"),
            _("Status"),
            _("Rows"),
            _("Succeeded"),
            _("Failed rows"),
            _("Submitted (JST)"),
        ],
        jobs,
        _("No bulk jobs."),
        "jobs",
        keep_whole=(6,),
    )
    request_table = _table(
        [time_header, _("Method"), _("Path"), _("Status"), _("Fault"), _("Parameters")],
        requests,
        _("No requests yet."),
        "requests",
        keep_whole=(0, 1, 3),
    )
    config_table = _table(
        [_("Option"), _("Identifier"), _("Value")], _config_rows(settings), "", "configuration"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>{title}</title>
<style>
body {{ font-family: system-ui, "Hiragino Sans", "Noto Sans JP", sans-serif; margin: 1.5rem;
        color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left;
          vertical-align: top; overflow-wrap: anywhere; white-space: pre-line; }}
/* A column is at least as wide as its heading: short values stay on one line. */
th {{ background: #f3f3f3; white-space: nowrap; }}
td.whole {{ white-space: nowrap; overflow-wrap: normal; }}
#configuration td:nth-child(2) {{ font-family: monospace; }}
.empty {{ color: #777; }}
.status {{ color: #555; }}
</style></head><body>
<h1>{title}</h1>
<p>{intro}</p>
<p class=status id=refresh-status>{updated} <a href="/">{reload_label}</a></p>
<p>{faults_label}: {snapshot["faults_injected"]} {faults}</p>
<h2>{customers_label} ({len(customers)})</h2>
{customer_table}
<h2>{actions_label} ({len(every_action)})</h2>
{action_table}
<h2>{jobs_label} ({len(jobs)})</h2>
{job_table}
<h2>{requests_label}</h2>
{request_table}
<h2>{config_label}</h2>
{config_table}
</body></html>
"""
