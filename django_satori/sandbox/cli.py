"""Command-line options shared by ``python -m django_satori.sandbox`` and
``manage.py satori_sandbox`` (which fills the defaults from the project's settings).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .config import (
    ANSWER_KINDS,
    DEFAULT_ACTION_DATE_FORMAT,
    DEFAULT_ACTION_PATH,
    ENVELOPES,
    OPERATIONS,
    SandboxKeys,
)
from .faults import FAULT_KINDS
from .i18n import _

KEY_OPTIONS = ("user_key", "user_secret", "company_key", "company_secret")


def _custom_field(text: str) -> tuple[str, Any]:
    """``plan:text``, ``age:integer``, ``birthday:date``, ``status:select:gold,silver``."""
    identifier, sep, rest = text.partition(":")
    kind, _sep, choices = rest.partition(":")
    if not identifier or not sep or not kind:
        raise argparse.ArgumentTypeError(
            _("expected IDENTIFIER:TYPE or IDENTIFIER:select:CHOICE,CHOICE, got %(value)r")
            % {"value": text}
        )
    if kind == "select":
        return identifier, {"type": "select", "choices": [c for c in choices.split(",") if c]}
    return identifier, kind


def _action_param(text: str) -> tuple[str, str]:
    name, sep, wire = text.partition("=")
    if not sep or not name or not wire:
        raise argparse.ArgumentTypeError(
            _("expected NAME=PARAMETER, got %(value)r") % {"value": text}
        )
    return name, wire


def _answer_status(text: str) -> tuple[str, int]:
    kind, sep, code = text.partition("=")
    if not sep or kind not in ANSWER_KINDS or not code.strip().isdigit():
        raise argparse.ArgumentTypeError(
            _("expected KIND=CODE with KIND one of %(kinds)s, got %(value)r")
            % {"kinds": ", ".join(ANSWER_KINDS), "value": text}
        )
    return kind, int(code)


def _extra_item(text: str) -> tuple[str, dict[str, Any]]:
    """``position:text:50``, ``fax:text``, ``employees:integer``."""
    key, _sep, rest = text.partition(":")
    kind, _sep, length = rest.partition(":")
    if not key or (length and not length.isdigit()):
        raise argparse.ArgumentTypeError(
            _("expected KEY:TYPE or KEY:TYPE:MAX_LENGTH, got %(value)r") % {"value": text}
        )
    return key, {"type": kind or "text", "max_length": int(length) if length else None}


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options; those left unset are None so each caller can supply its own defaults."""
    parser.add_argument("--host", default=None, help=_("Address to listen on (default 127.0.0.1)."))
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=_("Port to listen on (default 8765; 0 picks a free port)."),
    )
    for name in KEY_OPTIONS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar="VALUE",
            help=_("Accepted %(name)s.") % {"name": name},
        )
    parser.add_argument(
        "--custom-field",
        dest="custom_fields",
        action="append",
        type=_custom_field,
        metavar="ID:TYPE",
        help=_(
            "Declare a custom field (text, integer, date, "
            "select:CHOICE,CHOICE). Repeat for more. Without any, every "
            "custom:<identifier> is accepted as text."
        ),
    )
    parser.add_argument(
        "--processing-seconds",
        type=float,
        default=None,
        help=_("Seconds a bulk job stays 'processing' (default 1.0)."),
    )
    parser.add_argument(
        "--process-code-ttl",
        type=float,
        default=None,
        help=_("Seconds a finished bulk job can still be queried (default 3600)."),
    )
    parser.add_argument(
        "--tag-separator",
        default=None,
        help=_("Separator between tags in append_tags/delete_tags (default ',')."),
    )
    parser.add_argument("--action-path", default=None, help=_("Path of the add_action endpoint."))
    parser.add_argument(
        "--action-param",
        dest="action_params",
        action="append",
        type=_action_param,
        metavar="NAME=PARAMETER",
        help=_("Wire name of an action parameter (name, content, url, date)."),
    )
    parser.add_argument(
        "--envelope",
        choices=ENVELOPES,
        default=None,
        help=_("Where bulk answers put their payload (default body)."),
    )
    parser.add_argument(
        "--own-only",
        action="store_true",
        default=False,
        help=_(
            "Permission rule 'own records only': refuse changes to customers created by other keys."
        ),
    )
    parser.add_argument(
        "--deny",
        type=_comma_list,
        default=None,
        metavar="OPS",
        help=_("Comma-separated operations to refuse with 403 (%(ops)s).")
        % {"ops": ", ".join(OPERATIONS)},
    )
    parser.add_argument(
        "--refuse-column",
        dest="refused_columns",
        action="append",
        default=None,
        metavar="NAME",
        help=_("Refuse bulk CSV files with this column (400 naming it). Repeat for more."),
    )
    parser.add_argument(
        "--answer-status",
        dest="answer_status",
        action="append",
        type=_answer_status,
        default=None,
        metavar="KIND=CODE",
        help=_(
            "Answer refusals of KIND (%(kinds)s) with this status code instead. Repeat for more."
        )
        % {"kinds": ", ".join(ANSWER_KINDS)},
    )
    parser.add_argument(
        "--email-case-sensitive",
        action="store_true",
        default=False,
        help=_("Addresses that differ only in case are different customers."),
    )
    parser.add_argument(
        "--no-hashcode-identity",
        action="store_true",
        default=False,
        help=_("Refuse identity_type=hashcode (customers are named by e-mail only)."),
    )
    parser.add_argument(
        "--action-identity-param",
        dest="action_identity_params",
        action="append",
        type=_action_param,
        metavar="NAME=PARAMETER",
        help=_("Wire name of an action's identity parameter (identity_type, email, hashcode)."),
    )
    parser.add_argument(
        "--action-date-format",
        default=None,
        metavar="FORMAT",
        help=_("strftime format the action date must have (default %%Y-%%m-%%d %%H:%%M:%%S)."),
    )
    parser.add_argument(
        "--action-refuse-date",
        action="store_true",
        default=False,
        help=_("Refuse the action's date parameter as unknown."),
    )
    parser.add_argument(
        "--action-require-param",
        dest="action_required_params",
        action="append",
        type=_action_param,
        metavar="NAME=VALUE",
        help=_("A fixed field every action call must carry with this value. Repeat for more."),
    )
    parser.add_argument(
        "--extra-item",
        dest="extra_items",
        action="append",
        type=_extra_item,
        metavar="KEY:TYPE[:MAX]",
        help=_(
            "Accept a further standard customer item (text, integer, date; optional maximum "
            "length). Repeat for more."
        ),
    )
    parser.add_argument(
        "--fail-first",
        type=int,
        default=0,
        metavar="N",
        help=_("Fail the first N SATORI requests."),
    )
    parser.add_argument(
        "--fail-kind",
        choices=FAULT_KINDS,
        default="500",
        help=_("Fault used by --fail-first (default 500)."),
    )
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help=_("Fail this fraction of SATORI requests at random."),
    )
    parser.add_argument(
        "--fail-kinds",
        type=_comma_list,
        default=None,
        metavar="KINDS",
        help=_("Comma-separated faults drawn by --fail-rate (%(kinds)s).")
        % {"kinds": ", ".join(FAULT_KINDS)},
    )
    parser.add_argument(
        "--fail-seed", type=int, default=None, help=_("Random seed for --fail-rate.")
    )
    parser.add_argument(
        "--fail-operations",
        type=_comma_list,
        default=None,
        metavar="OPS",
        help=_("Only inject faults into these operations."),
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help=_("Seconds to wait before answering each SATORI request."),
    )
    parser.add_argument(
        "--retry-after", type=int, default=1, help=_("Retry-After value sent with 429 (default 1).")
    )
    parser.add_argument(
        "--timeout-seconds",
        type=float,
        default=15.0,
        help=_("How long a 'timeout' fault holds the request (default 15)."),
    )
    parser.add_argument(
        "--dribble-seconds",
        type=float,
        default=1.0,
        help=_("Seconds between two bytes of a 'dribble' fault's reply (default 1)."),
    )
    parser.add_argument(
        "--oversized-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help=_("Size in bytes of an 'oversized' fault's reply (default 16 MiB)."),
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        default=False,
        help=_("Allow listening on a non-loopback address."),
    )
    parser.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=None,
        metavar="NAME",
        help=_(
            "Also answer requests for this host name (loopback names and the listening "
            "address always work). Repeat for more."
        ),
    )
    parser.add_argument(
        "--quiet", action="store_true", default=False, help=_("Do not log each request.")
    )


def build_server(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Any:
    """A configured, not yet started SandboxServer. ``defaults`` fill unset options."""
    from .server import SandboxServer

    defaults = dict(defaults or {})

    def pick(name: str, fallback: Any) -> Any:
        value = options.get(name)
        if value is not None:
            return value
        return defaults.get(name, fallback)

    base_keys = defaults.get("keys") or SandboxKeys()
    keys = SandboxKeys(**{name: pick(name, getattr(base_keys, name)) for name in KEY_OPTIONS})
    custom = options.get("custom_fields")
    action_params = options.get("action_params")
    server = SandboxServer(
        pick("host", "127.0.0.1"),
        pick("port", 8765),
        keys=keys,
        custom_fields=dict(custom) if custom else defaults.get("custom_fields"),
        bulk_processing_seconds=pick("processing_seconds", 1.0),
        process_code_ttl=pick("process_code_ttl", 3600.0),
        tag_separator=pick("tag_separator", ","),
        action_path=pick("action_path", DEFAULT_ACTION_PATH),
        action_params={**dict(defaults.get("action_params") or {}), **dict(action_params or ())},
        envelope=pick("envelope", "body"),
        own_only=bool(options.get("own_only")),
        deny_operations=options.get("deny") or (),
        allow_remote=bool(options.get("allow_remote")),
        allowed_hosts=options.get("allowed_hosts") or (),
        refused_columns=frozenset(options.get("refused_columns") or ()),
        answer_status=dict(options.get("answer_status") or ()),
        email_case_sensitive=bool(options.get("email_case_sensitive")),
        hashcode_identity=not options.get("no_hashcode_identity"),
        action_identity_params={
            **dict(defaults.get("action_identity_params") or {}),
            **dict(options.get("action_identity_params") or ()),
        },
        action_date_format=pick("action_date_format", DEFAULT_ACTION_DATE_FORMAT),
        action_refuse_date=bool(options.get("action_refuse_date")),
        action_required_params=dict(options.get("action_required_params") or ()),
        extra_items={
            **dict(defaults.get("extra_items") or {}),
            **dict(options.get("extra_items") or ()),
        },
    )
    faults = server.faults
    faults.delay = float(options.get("delay") or 0.0)
    faults.retry_after = int(options.get("retry_after") or 1)
    faults.timeout_seconds = float(options.get("timeout_seconds") or 15.0)
    faults.dribble_seconds = float(options.get("dribble_seconds") or 1.0)
    faults.oversized_bytes = int(options.get("oversized_bytes") or 16 * 1024 * 1024)
    operations = options.get("fail_operations")
    if options.get("fail_first"):
        faults.fail_first(
            int(options["fail_first"]), options.get("fail_kind") or "500", operations=operations
        )
    if options.get("fail_rate"):
        faults.set_random(
            float(options["fail_rate"]),
            options.get("fail_kinds") or ["500"],
            options.get("fail_seed"),
            operations=operations,
        )
    return server


def serve(server: Any, write: Callable[[str], Any], *, quiet: bool = False) -> int:
    """Run until Ctrl-C or SIGTERM; the first line written is the URL."""
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        logging.getLogger("django_satori.sandbox").setLevel(logging.INFO)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_args: stop.set())
    server.start()
    try:
        write(_("SATORI sandbox running at %(url)s") % {"url": server.url} + "\n")
        write(
            _("Press Ctrl-C to stop. Inspect it at %(url)s/ and %(url)s/_sandbox/state")
            % {"url": server.url}
            + "\n"
        )
        while not stop.wait(0.2):
            pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    write(_("SATORI sandbox stopped.") + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m django_satori.sandbox",
        description=_("Run a strict fake SATORI API on this machine."),
    )
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        server = build_server(options)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return serve(server, write, quiet=options["quiet"])
