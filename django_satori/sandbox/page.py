"""The sandbox's home page: what it holds, from the redacted snapshot only."""

from __future__ import annotations

from html import escape
from typing import Any

from .i18n import _

RECENT_REQUESTS = 50


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f"<p class=empty>{escape(empty)}</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(snapshot: dict[str, Any], settings: dict[str, Any]) -> str:
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
            str(len(c["actions"])),
            c["created_by"],
            c["updated_at"] or "",
        ]
        for c in snapshot["customers"]
    ]
    jobs = [
        [
            j["process_code"],
            j["operation"],
            j["process_status"],
            str(j["rows"]),
            str(len(j["succeeded_rows"])),
            "; ".join(f"{r['row_number']}: {r['message']}" for r in j["failed_rows"]),
            j["submitted_at"] or "",
        ]
        for j in snapshot["jobs"]
    ]
    requests = [
        [
            r["received_at"] or "",
            r["method"],
            r["path"],
            "" if r["status"] is None else str(r["status"]),
            r["fault"] or "",
            " ".join(f"{k}={v}" for k, v in r["form"] or r["query"])[:400],
        ]
        for r in reversed(snapshot["requests"][-RECENT_REQUESTS:])
    ]
    options = ", ".join(f"{k}={v}" for k, v in settings.items())
    # Labels are built outside the f-string so makemessages can find them.
    title = escape(_("SATORI sandbox"))
    intro = escape(_("A fake SATORI for tests and demos. Nothing here leaves this machine."))
    faults_label = escape(_("Injected faults"))
    faults = escape(", ".join(f"{k}: {v}" for k, v in snapshot["faults_by_kind"].items()))
    customers_label = escape(_("Customers"))
    jobs_label = escape(_("Bulk jobs"))
    requests_label = escape(_("Recent requests"))
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
            _("Updated"),
        ],
        customers,
        _("No customers yet."),
    )
    job_table = _table(
        [
            _("Process code"),
            _("Operation"),
            _("Status"),
            _("Rows"),
            _("Succeeded"),
            _("Failed rows"),
            _("Submitted"),
        ],
        jobs,
        _("No bulk jobs."),
    )
    request_table = _table(
        [_("Received"), _("Method"), _("Path"), _("Status"), _("Fault"), _("Parameters")],
        requests,
        _("No requests yet."),
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5rem; font-size: 0.85rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left;
          vertical-align: top; word-break: break-all; }}
th {{ background: #f3f3f3; }}
.empty {{ color: #777; }}
</style></head><body>
<h1>{title}</h1>
<p>{intro}</p>
<p><small>{escape(options)}</small></p>
<p>{faults_label}: {snapshot["faults_injected"]} {faults}</p>
<h2>{customers_label} ({len(customers)})</h2>
{customer_table}
<h2>{jobs_label} ({len(jobs)})</h2>
{job_table}
<h2>{requests_label}</h2>
{request_table}
</body></html>
"""
