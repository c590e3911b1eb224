"""Is this project ready to sync with SATORI? The diagnosis behind ``manage.py
satori_doctor`` and the admin page SATORI接続診断.

:func:`diagnose` returns a :class:`Report`: one :class:`Check` per finding
(``ok``, ``warn``, ``fail`` or ``skip``, with the fix), and the settings whose
default disagrees with what SATORI was seen to answer. The command and the
admin page only render it.

* Offline checks: the system checks, the broker, the caches, a worker, the
  sweep in the beat schedule, and the sandbox's keys aimed at another host.
* The live probe (by default): one ``status.json`` for a process code that
  cannot exist. It changes nothing; its answer tells accepted keys from
  refused ones, SATORI from a proxy's page, and a network, TLS or time-out
  failure.
* The write test (only with an address): upsert, action, a one-row bulk
  upsert polled to its end, delete, and a second delete to see how SATORI
  answers for an unknown customer. It talks to SATORI through the client
  alone: no Customer, SyncState or outbox row is written.

Texts are kept as message ids with parameters (:class:`Text`), so a stored
diagnosis is shown in the language of whoever reads it. Nothing here ever
holds a key in a text: SATORI's words come scrubbed from the client, and
every text is scrubbed once more when rendered.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from celery import current_app
from django.conf import settings as django_settings
from django.core.cache import caches
from django.core.checks import ERROR, WARNING, run_checks
from django.utils import timezone
from django.utils.translation import gettext as translate_marked
from django.utils.translation import gettext_noop

from . import status as sync_status
from .beat import BEAT_SCHEDULE
from .bulk_csv import header as bulk_header
from .checks import is_loopback
from .client import SatoriClient
from .conf import AUTH_KEYS, SatoriSettings, get_settings
from .exceptions import (
    SatoriAuthenticationError,
    SatoriConfigurationError,
    SatoriError,
    SatoriNotFoundError,
    SatoriPermissionError,
    SatoriRateLimitError,
    SatoriValidationError,
)
from .models import Diagnosis
from .permissions import OWN_ONLY_NOTE, RULE_ITEMS
from .redaction import scrub, secret_needles
from .sandbox.config import SandboxKeys
from .schema import normalize_email

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
LEVELS = (OK, WARN, FAIL, SKIP)

#: status.json is asked about this code: SATORI never issues one like it.
PROBE_PROCESS_CODE = "django-satori-doctor-probe-0000"
#: The write test's customer carries this tag (and last name) in SATORI until it is deleted.
MARKER_TAG = "satori_doctor"
#: How long the write test waits for its one-row bulk job to finish.
BULK_WAIT_SECONDS = 120.0
#: A sweep run older than this, with the sweep in the schedule, suggests beat is not running.
SWEEP_STALE_SECONDS = 300.0
SWEEP_TASK = str(BEAT_SCHEDULE["django-satori-sweep"]["task"])
#: Caches that live inside one process: workers never share what they count there.
PER_PROCESS_CACHES = ("LocMemCache", "DummyCache")
#: Brokers that live inside one process: a worker elsewhere never sees the tasks.
PER_PROCESS_BROKERS = ("memory",)
#: Extra seconds a broker connection gets before it counts as unreachable.
CONNECT_GRACE_SECONDS = 2.0

_KEY_SETTINGS = ", ".join(f"SATORI['{name}']" for name in AUTH_KEYS)


# --------------------------------------------------------------------------- results


class Text:
    """A message id and its parameters; ``str()`` words it in the active language.

    A parameter may itself be a :class:`Text` (a rule item inside a sentence).
    """

    __slots__ = ("msgid", "params")

    def __init__(self, msgid: str, **params: Any) -> None:
        self.msgid = msgid
        self.params = params

    def __str__(self) -> str:
        # The ids were marked with gettext_noop where each Text is written.
        text = translate_marked(self.msgid)
        if not self.params:
            return text
        return text % {k: str(v) if isinstance(v, Text) else v for k, v in self.params.items()}

    def __repr__(self) -> str:
        return f"Text({self.msgid!r})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "msgid": self.msgid,
            "params": {
                k: v.as_dict() if isinstance(v, Text) else v for k, v in self.params.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Any) -> Text:
        if not isinstance(data, Mapping) or not isinstance(data.get("msgid"), str):
            return cls("%(text)s", text=str(data))
        given = data.get("params")
        params: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        return cls(
            data["msgid"],
            **{
                str(k): cls.from_dict(v) if isinstance(v, Mapping) else v for k, v in params.items()
            },
        )


@dataclass
class Check:
    """One finding. ``details`` holds what was seen (HTTP status, JSON shape, ...), never keys."""

    id: str
    level: str
    message: Text
    fix: Text | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "level": self.level,
            "message": self.message.as_dict(),
            "fix": self.fix.as_dict() if self.fix is not None else None,
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Check:
        fix = data.get("fix")
        details = data.get("details")
        return cls(
            id=str(data.get("id", "")),
            level=str(data.get("level", FAIL)),
            message=Text.from_dict(data.get("message")),
            fix=Text.from_dict(fix) if fix else None,
            details=dict(details) if isinstance(details, Mapping) else {},
        )


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    #: ``{"SETTING": value}``: what SATORI was seen to need, where it differs from the default.
    suggested: dict[str, Any] = field(default_factory=dict)
    live: bool = False
    write_test: bool = False

    @property
    def ok(self) -> bool:
        """Everything sync needs works: no check failed."""
        return not any(check.level == FAIL for check in self.checks)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def suggest(self, setting: str, value: Any) -> None:
        current = self.suggested.get(setting)
        if isinstance(current, dict) and isinstance(value, dict):
            self.suggested[setting] = {**current, **value}
        elif isinstance(current, list) and isinstance(value, list):
            self.suggested[setting] = current + [item for item in value if item not in current]
        else:
            self.suggested[setting] = value

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "live": self.live,
            "write_test": self.write_test,
            "checks": [check.as_dict() for check in self.checks],
            "suggested": self.suggested,
        }

    def save(self, *, user: Any = None, source: str = "command") -> Diagnosis:
        """Keep this diagnosis as the last one (older ones are deleted)."""
        diagnosis = Diagnosis.objects.create(
            started_by=user if getattr(user, "pk", None) else None,
            source=source,
            ok=self.ok,
            live=self.live,
            write_test=self.write_test,
            checks=[check.as_dict() for check in self.checks],
            suggested=self.suggested,
        )
        Diagnosis.objects.exclude(pk=diagnosis.pk).delete()
        return diagnosis

    @classmethod
    def from_diagnosis(cls, diagnosis: Diagnosis) -> Report:
        checks = diagnosis.checks if isinstance(diagnosis.checks, list) else []
        return cls(
            checks=[Check.from_dict(c) for c in checks if isinstance(c, Mapping)],
            suggested=dict(diagnosis.suggested or {}),
            live=diagnosis.live,
            write_test=diagnosis.write_test,
        )


def render(text: Text | None, conf: SatoriSettings | None = None) -> str:
    """``text`` in the active language, with the keys scrubbed once more."""
    if text is None:
        return ""
    return scrub(str(text), secret_needles(conf or get_settings()))


def snippet(suggested: Mapping[str, Any]) -> str:
    """The suggested settings as Python to paste into the settings module; "" if none."""
    if not suggested:
        return ""
    lines = ["SATORI = {", "    **SATORI,"]
    for name, value in suggested.items():
        if name == "ANSWER_STATUS_CLASSES" and isinstance(value, Mapping):
            # Stored as JSON, whose keys are strings; the setting's are status codes.
            value = {int(k) if str(k).isdigit() else k: v for k, v in value.items()}
        lines.append(f"    {_python(name)}: {_python(value)},")
    lines.append("}")
    return "\n".join(lines)


def _python(value: Any) -> str:
    """``value`` as Python source, strings in double quotes (as formatters write settings)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a Python string
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python(k)}: {_python(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    return repr(value)  # numbers, True, False, None


def shape(data: Any, depth: int = 0) -> str:
    """The structure of a JSON reply, without its values: ``{message: str, status: int}``."""
    if isinstance(data, Mapping):
        if depth >= 3:
            return "{…}"
        keys = sorted(str(k) for k in data)[:12]
        return "{" + ", ".join(f"{k}: {shape(data[k], depth + 1)}" for k in keys) + "}"
    if isinstance(data, list):
        return f"[{shape(data[0], depth + 1)}, …]" if data else "[]"
    if data is None:
        return "null"
    return {bool: "bool", int: "int", float: "number", str: "str"}.get(type(data), "value")


# --------------------------------------------------------------------------- the run


def diagnose(
    *,
    live: bool = True,
    write_email: str | None = None,
    ping_timeout: float = 2.0,
    conf: SatoriSettings | None = None,
) -> Report:
    """Run the offline checks, then (``live``) the probe and (an address) the write test."""
    conf = conf or get_settings()
    report = Report(live=live, write_test=bool(write_email))
    check_settings(report, conf)
    check_broker(report)
    check_caches(report, conf)
    check_worker(report, ping_timeout)
    check_beat(report)
    check_sandbox_keys(report, conf)
    if not live and not write_email:
        return report
    if not conf.has_credentials:
        report.add(
            Check(
                "probe",
                SKIP,
                Text(gettext_noop("Not asked: the keys are not all set.")),
                Text(gettext_noop("Set %(keys)s first."), keys=_KEY_SETTINGS),
            )
        )
        return report
    with SatoriClient(conf) as client:
        keys_ok = probe(report, client) if live else True
        if write_email and keys_ok:
            WriteTest(report, client, normalize_email(write_email), conf).run()
        elif write_email:
            report.add(
                Check("write", SKIP, Text(gettext_noop("Not tried: the live probe failed.")))
            )
    return report


# --------------------------------------------------------------------------- offline


def check_settings(report: Report, conf: SatoriSettings) -> None:
    found = [m for m in run_checks() if str(m.id or "").startswith("django_satori.")]
    for message in found:
        report.add(
            Check(
                "settings",
                FAIL if message.level >= ERROR else WARN if message.level >= WARNING else OK,
                Text(gettext_noop("%(id)s: %(message)s"), id=message.id, message=message.msg),
                Text("%(text)s", text=message.hint) if message.hint else None,
            )
        )
    if not conf.SYNC_ENABLED:
        report.add(
            Check(
                "settings",
                WARN,
                Text(gettext_noop("SATORI['SYNC_ENABLED'] is off: no change is recorded or sent.")),
                Text(gettext_noop("Remove SYNC_ENABLED (or set it to True) to sync.")),
            )
        )
    if not found and conf.SYNC_ENABLED:
        report.add(
            Check(
                "settings",
                OK,
                Text(gettext_noop("The system checks find nothing wrong in settings.SATORI.")),
            )
        )


def _in_thread(work: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """``(finished, result or exception)``: a broker that hangs never holds the diagnosis."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except Exception as exc:  # reported by its class name: its text may hold a URL
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="satori-doctor", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None
    return True, outcome.get("error", outcome.get("result"))


def _eager() -> bool:
    return bool(current_app.conf.task_always_eager)


def check_broker(report: Report) -> None:
    if _eager():
        report.add(
            Check(
                "broker",
                WARN,
                Text(gettext_noop("Tasks run inside the web process (CELERY_TASK_ALWAYS_EAGER).")),
                Text(gettext_noop("In production, run a broker (Redis or RabbitMQ) and a worker.")),
            )
        )
        return
    timeout = float(current_app.conf.broker_connection_timeout or 4.0)

    def connect() -> str:
        with current_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1)
            return str(connection.transport.driver_type or connection.transport_cls)

    finished, result = _in_thread(connect, timeout + CONNECT_GRACE_SECONDS)
    fix = Text(
        gettext_noop(
            "Check CELERY_BROKER_URL and that the broker (Redis, RabbitMQ) runs and "
            "accepts this machine."
        )
    )
    if not finished:
        report.add(
            Check(
                "broker",
                FAIL,
                Text(gettext_noop("The broker did not answer within %(s)s seconds."), s=timeout),
                fix,
            )
        )
    elif isinstance(result, BaseException):
        report.add(
            Check(
                "broker",
                FAIL,
                Text(
                    gettext_noop("The broker cannot be reached (%(error)s)."),
                    error=type(result).__name__,
                ),
                fix,
            )
        )
    elif result in PER_PROCESS_BROKERS:
        report.add(
            Check(
                "broker",
                FAIL,
                Text(
                    gettext_noop(
                        "The broker (%(transport)s) lives inside this process: "
                        "a worker never sees its tasks."
                    ),
                    transport=result,
                ),
                Text(gettext_noop("Point CELERY_BROKER_URL at Redis or RabbitMQ.")),
            )
        )
    else:
        report.add(
            Check(
                "broker",
                OK,
                Text(gettext_noop("The broker answers (%(transport)s)."), transport=result),
            )
        )


def check_caches(report: Report, conf: SatoriSettings) -> None:
    uses: dict[str, list[str]] = {}
    if conf.RATE_LIMIT_PER_MINUTE is not None:
        uses.setdefault(str(conf.RATE_LIMIT_CACHE), []).append("RATE_LIMIT_CACHE")
    uses.setdefault(str(conf.STATUS_CACHE), []).append("STATUS_CACHE")
    for alias, names in uses.items():
        setting = " / ".join(f"SATORI['{name}']" for name in names)
        if alias not in getattr(django_settings, "CACHES", {}):
            report.add(
                Check(
                    "cache",
                    FAIL,
                    Text(
                        gettext_noop(
                            "%(setting)s names the cache %(alias)r, which is not in CACHES."
                        ),
                        setting=setting,
                        alias=alias,
                    ),
                    Text(gettext_noop("Add it to CACHES or name another alias.")),
                )
            )
            continue
        cache = caches[alias]
        backend = type(cache).__name__
        details = {"alias": alias, "backend": backend}
        if backend in PER_PROCESS_CACHES:
            rate = "RATE_LIMIT_CACHE" in names
            report.add(
                Check(
                    "cache",
                    FAIL if rate else WARN,
                    Text(
                        gettext_noop(
                            "The cache %(alias)r (%(backend)s, used by %(setting)s) is not shared "
                            "between processes."
                        ),
                        alias=alias,
                        backend=backend,
                        setting=setting,
                    ),
                    Text(
                        gettext_noop(
                            "Use Redis, Memcached or the database cache: the rate limit is "
                            "counted across all workers there."
                        )
                        if rate
                        else gettext_noop(
                            "Use a shared cache, or satori_status never sees the workers' sweep."
                        )
                    ),
                    details,
                )
            )
            continue
        key = f"django_satori:doctor:{uuid.uuid4().hex}"
        try:
            cache.set(key, "1", 30)
            kept = cache.get(key) == "1"
            cache.delete(key)
        except Exception as exc:  # a cache server that is down: its text may hold its URL
            report.add(
                Check(
                    "cache",
                    FAIL,
                    Text(
                        gettext_noop(
                            "The cache %(alias)r (%(backend)s) cannot be used (%(error)s)."
                        ),
                        alias=alias,
                        backend=backend,
                        error=type(exc).__name__,
                    ),
                    Text(
                        gettext_noop("Check that the cache server runs and accepts this machine.")
                    ),
                    details,
                )
            )
            continue
        report.add(
            Check(
                "cache",
                OK if kept else FAIL,
                Text(
                    gettext_noop("The cache %(alias)r (%(backend)s) is shared and works.")
                    if kept
                    else gettext_noop("The cache %(alias)r (%(backend)s) does not keep values."),
                    alias=alias,
                    backend=backend,
                ),
                None if kept else Text(gettext_noop("Check the cache's settings in CACHES.")),
                details,
            )
        )


def check_worker(report: Report, timeout: float) -> None:
    if _eager():
        report.add(
            Check(
                "worker",
                SKIP,
                Text(gettext_noop("Not asked: tasks run inside the web process.")),
            )
        )
        return
    workers, error = sync_status.ping_workers(timeout)
    if workers:
        report.add(
            Check(
                "worker",
                OK,
                Text(
                    gettext_noop("Workers answered the ping: %(names)s."), names=", ".join(workers)
                ),
            )
        )
        return
    swept = sync_status.last_sweep()
    age = (timezone.now() - swept).total_seconds() if swept else None
    if age is not None and age <= SWEEP_STALE_SECONDS:
        # Some transports (the demo's filesystem broker) carry tasks but not pings.
        report.add(
            Check(
                "worker",
                WARN,
                Text(
                    gettext_noop(
                        "No worker answered the ping, but the sweep ran %(n)d seconds ago: "
                        "a worker runs, and this broker may not carry pings."
                    ),
                    n=round(age),
                ),
                Text(gettext_noop("Use Redis or RabbitMQ in production, which answer pings.")),
            )
        )
        return
    report.add(
        Check(
            "worker",
            FAIL,
            Text(
                gettext_noop("No Celery worker answered the ping within %(s)s seconds."),
                s=f"{timeout:g}",
            )
            if not error
            else Text(gettext_noop("No Celery worker answered (%(error)s)."), error=error),
            Text(
                gettext_noop(
                    "Start a worker with beat, e.g. `celery -A mysite worker -B` "
                    "(or a worker and a separate `celery -A mysite beat`)."
                )
            ),
        )
    )


def check_beat(report: Report) -> None:
    schedule = current_app.conf.beat_schedule or {}
    scheduled = any(
        isinstance(entry, Mapping) and entry.get("task") == SWEEP_TASK
        for entry in schedule.values()
    )
    swept = sync_status.last_sweep()
    age = (timezone.now() - swept).total_seconds() if swept else None
    details = {"last_sweep_seconds": None if age is None else round(age)}
    if age is not None and age <= SWEEP_STALE_SECONDS:
        report.add(
            Check(
                "beat",
                OK,
                Text(gettext_noop("The sweep ran %(n)d seconds ago."), n=round(age)),
                details=details,
            )
        )
    elif scheduled and age is None:
        report.add(
            Check(
                "beat",
                OK,
                Text(gettext_noop("The sweep is in the beat schedule (no run recorded yet).")),
                details=details,
            )
        )
    elif scheduled:
        report.add(
            Check(
                "beat",
                WARN,
                Text(
                    gettext_noop(
                        "The sweep is in the beat schedule, but its last run was %(n)d seconds ago."
                    ),
                    n=round(age or 0),
                ),
                Text(gettext_noop("Is celery beat running (`celery -A mysite beat`, or -B)?")),
                details,
            )
        )
    else:
        report.add(
            Check(
                "beat",
                FAIL,
                Text(gettext_noop("The sweep is not in the beat schedule and has not run lately.")),
                Text(
                    gettext_noop(
                        "Add `from django_satori.beat import BEAT_SCHEDULE` and "
                        "`CELERY_BEAT_SCHEDULE = {**BEAT_SCHEDULE}` to the settings, and run beat."
                    )
                ),
                details,
            )
        )


def check_sandbox_keys(report: Report, conf: SatoriSettings) -> None:
    published = set(SandboxKeys().values())
    sandbox = [
        name
        for name in AUTH_KEYS
        if isinstance(getattr(conf, name), str)
        and (getattr(conf, name) in published or getattr(conf, name).startswith("sandbox-"))
    ]
    host = urlsplit(str(conf.BASE_URL or "")).hostname or ""
    details = {"host": host}
    if sandbox and not is_loopback(host):
        report.add(
            Check(
                "sandbox_keys",
                FAIL,
                Text(
                    gettext_noop(
                        "%(names)s hold the sandbox's published keys, but SATORI['BASE_URL'] "
                        "points at %(host)s."
                    ),
                    names=", ".join(sandbox),
                    host=host,
                ),
                Text(
                    gettext_noop(
                        "Set the four keys from SATORI's admin screen, or point BASE_URL at "
                        "the sandbox."
                    )
                ),
                details,
            )
        )
    elif is_loopback(host):
        report.add(
            Check(
                "sandbox_keys",
                OK,
                Text(
                    gettext_noop("SATORI['BASE_URL'] is on this machine (%(host)s): a sandbox."),
                    host=host,
                ),
                details=details,
            )
        )
    else:
        report.add(
            Check(
                "sandbox_keys",
                OK,
                Text(
                    gettext_noop("SATORI['BASE_URL'] points at %(host)s, with keys of your own."),
                    host=host,
                ),
                details=details,
            )
        )


# --------------------------------------------------------------------------- live probe


def _seen(error: SatoriError | None = None, **extra: Any) -> dict[str, Any]:
    """What a call saw, for ``details``: statuses, the reply's shape, never values."""
    seen: dict[str, Any] = {}
    if error is not None:
        seen.update(
            error=type(error).__name__,
            status=error.status,
            http_status=error.http_status,
        )
        if error.transport:
            seen["transport"] = error.transport
        if error.response is not None:
            seen["shape"] = shape(error.response)
    seen.update(extra)
    return {k: v for k, v in seen.items() if v is not None}


def _keys_fix() -> Text:
    return Text(
        gettext_noop(
            "Check %(keys)s: copy them again from SATORI's admin screen (no spaces), "
            "all four from the same SATORI user and company."
        ),
        keys=_KEY_SETTINGS,
    )


def _not_json(error: SatoriError) -> bool:
    return error.http_status is not None and error.response is None


def probe(report: Report, client: SatoriClient) -> bool:
    """Ask status.json about a process code that cannot exist. True: the keys were accepted."""
    try:
        status = client.bulk_status(PROBE_PROCESS_CODE)
    except SatoriError as error:
        return _probe_refused(report, error)
    report.add(
        Check(
            "probe",
            WARN,
            Text(
                gettext_noop(
                    "Keys accepted, but SATORI answered a process code that cannot exist with "
                    "success (status %(status)s)."
                ),
                status=status.status,
            ),
            Text(
                gettext_noop(
                    "A bulk job SATORI has forgotten would be polled until "
                    "SATORI['BULK_DEADLINE_SECONDS']."
                )
            ),
            _seen(
                status=status.status,
                http_status=status.http_status,
                shape=shape(status.response),
                elapsed_ms=round(status.elapsed_ms),
            ),
        )
    )
    return True


def _probe_refused(report: Report, error: SatoriError) -> bool:
    seen = _seen(error)
    if isinstance(error, SatoriNotFoundError):
        report.add(
            Check(
                "probe",
                OK,
                Text(
                    gettext_noop(
                        "SATORI accepted the keys (an unknown process code got status %(status)s, "
                        "as expected)."
                    ),
                    status=error.status,
                ),
                details=seen,
            )
        )
        return True
    if isinstance(error, SatoriPermissionError):
        report.add(
            Check(
                "probe",
                FAIL,
                Text(
                    gettext_noop(
                        "SATORI refused the status query (status %(status)s): the key's user "
                        "lacks the permission-rule item %(rule)s."
                    ),
                    status=error.status,
                    rule=Text(RULE_ITEMS["bulk_status"]),
                ),
                Text(
                    gettext_noop(
                        "Enable that item in the permission rule of the keys' SATORI user. "
                        "If it is enabled, %(keys_fix)s"
                    ),
                    keys_fix=_keys_fix(),
                ),
                seen,
            )
        )
        return True
    if isinstance(error, SatoriAuthenticationError) and not _not_json(error):
        report.add(
            Check(
                "probe",
                FAIL,
                Text(
                    gettext_noop("SATORI refused the keys (status %(status)s): %(message)s"),
                    status=error.status,
                    message=error.message,
                ),
                _keys_fix(),
                seen,
            )
        )
        return False
    if isinstance(error, SatoriValidationError) and not _not_json(error):
        # The keys passed; SATORI words "unknown code" another way than we expect.
        report.add(
            Check(
                "probe",
                WARN,
                Text(
                    gettext_noop(
                        "SATORI accepted the keys, but answered an unknown process code with "
                        "status %(status)s (we expect 404): %(message)s"
                    ),
                    status=error.status,
                    message=error.message,
                ),
                Text(
                    gettext_noop("Paste the suggested settings below, so it counts as not found.")
                ),
                seen,
            )
        )
        _suggest_not_found(report, error)
        return True
    if isinstance(error, SatoriRateLimitError):
        report.add(
            Check(
                "probe",
                WARN,
                Text(
                    gettext_noop("SATORI asked us to slow down (status %(status)s)."),
                    status=error.status,
                ),
                Text(gettext_noop("Run the diagnosis again in a minute.")),
                seen,
            )
        )
        return False
    report.add(_unreachable("probe", error, seen))
    return False


def _unreachable(check_id: str, error: SatoriError, seen: dict[str, Any]) -> Check:
    """No SATORI answer: a proxy's page, a redirect, TLS, the network, or time."""
    base_url_fix = Text(
        gettext_noop(
            "Check SATORI['BASE_URL'] (https://api.satr.jp) and any proxy or firewall "
            "between this machine and SATORI."
        )
    )
    transport = error.transport or ""
    if isinstance(error, SatoriConfigurationError) and not error.http_status and not transport:
        # Refused before sending: nothing reached SATORI.
        message = Text(
            gettext_noop("Nothing was sent: %(message)s"),
            message=error.message,
        )
        fix = Text(gettext_noop("Fix the setting it names (see also the settings checks above)."))
        return Check(check_id, FAIL, message, fix, seen)
    if _not_json(error) or (isinstance(error, SatoriConfigurationError) and error.http_status):
        message = Text(
            gettext_noop(
                "Something other than SATORI answered (HTTP %(code)s, not SATORI's JSON): "
                "%(message)s"
            ),
            code=error.http_status,
            message=error.message,
        )
        return Check(check_id, FAIL, message, base_url_fix, seen)
    if "SSL" in transport:
        message = Text(
            gettext_noop("The TLS connection to SATORI failed (%(kind)s)."), kind=transport
        )
        fix = Text(
            gettext_noop(
                "Check the machine's CA certificates and any proxy that intercepts TLS; "
                "the host must be SATORI's."
            )
        )
        return Check(check_id, FAIL, message, fix, seen)
    if transport == "deadline" or "Timeout" in transport:
        message = Text(gettext_noop("SATORI did not answer in time (%(kind)s)."), kind=transport)
        fix = Text(
            gettext_noop(
                "Check the network path to SATORI (firewall, proxy); SATORI['TIMEOUT'] and "
                "SATORI['TOTAL_TIMEOUT'] bound the wait."
            )
        )
        return Check(check_id, FAIL, message, fix, seen)
    if transport and transport != "too_large":
        message = Text(gettext_noop("Could not reach SATORI (%(kind)s)."), kind=transport)
        return Check(check_id, FAIL, message, base_url_fix, seen)
    message = Text(
        gettext_noop("SATORI's answer was not usable (%(error)s): %(message)s"),
        error=type(error).__name__,
        message=error.message,
    )
    return Check(check_id, FAIL, message, base_url_fix, seen)


def _suggest_not_found(report: Report, error: SatoriError, identity: str = "") -> None:
    """How to make SATORI's way of saying "unknown" count as not found."""
    if error.status is None:
        return
    if error.status != 400:
        report.suggest("ANSWER_STATUS_CLASSES", {str(error.status): "not_found"})
    elif error.message:
        # 400 also means a refused value: only this message is "not found". The
        # customer it names stands for any customer.
        pattern = re.escape(error.message[:80])
        if identity:
            pattern = pattern.replace(re.escape(identity), ".+")
        report.suggest("ANSWER_MESSAGE_CLASSES", [[pattern, "not_found"]])


# --------------------------------------------------------------------------- write test


class WriteTest:
    """Create, act on, bulk-upsert and delete one test customer, step by step."""

    def __init__(
        self, report: Report, client: SatoriClient, email: str, conf: SatoriSettings
    ) -> None:
        self.report = report
        self.client = client
        self.email = email
        self.conf = conf
        self.hashcode: str | None = None
        #: Whether this run created or changed the customer (only then is it deleted).
        self.wrote = False

    def run(self) -> None:
        upserted = self.upsert()
        if upserted:
            self.action()
        else:
            self._skip("write.action", Text(gettext_noop("Not tried: the upsert failed.")))
        self.bulk()
        if self.wrote:
            self.delete()
        else:
            # Never delete a customer this run did not write: it may be someone's real one.
            self._skip("write.delete", Text(gettext_noop("Not tried: nothing was written.")))

    # -- steps

    def upsert(self) -> bool:
        try:
            result = self.client.upsert_customer(
                {"email": self.email, "last_name": MARKER_TAG, "append_tags": [MARKER_TAG]}
            )
        except SatoriError as error:
            # SATORI may have applied a call whose answer was lost: clean up after it too.
            self.wrote = self.wrote or error.answer_lost
            self._refused("write.upsert", error, ("upsert", "registration"), own_only=True)
            return False
        self.wrote = True
        self.hashcode = result.hashcode
        seen = _seen(
            status=result.status,
            http_status=result.http_status,
            shape=shape(result.response),
        )
        if result.hashcode is None:
            self.report.add(
                Check(
                    "write.upsert",
                    WARN,
                    Text(
                        gettext_noop(
                            "Upsert accepted (status %(status)s), but SATORI sent no hashcode."
                        ),
                        status=result.status,
                    ),
                    Text(gettext_noop("Deletes and e-mail changes must then go by e-mail.")),
                    seen,
                )
            )
            self.report.suggest("DELETE_IDENTITY", "email")
        else:
            self._accepted("write.upsert", result.status, result.message, seen)
        return True

    def action(self) -> None:
        try:
            result = self.client.add_action(
                email=self.email, name=MARKER_TAG, content="satori_doctor write test"
            )
        except SatoriError as error:
            if isinstance(error, SatoriNotFoundError | SatoriValidationError):
                self.report.add(
                    Check(
                        "write.action",
                        FAIL,
                        Text(
                            gettext_noop(
                                "SATORI refused the action (status %(status)s): %(message)s"
                            ),
                            status=error.status,
                            message=error.message,
                        ),
                        Text(
                            gettext_noop(
                                "Our action call is a guess: check SATORI['ACTION_PATH'], "
                                "'ACTION_IDENTITY_PARAMS', 'ACTION_PARAMS', 'ACTION_DATE_FORMAT', "
                                "'ACTION_SEND_DATE' and 'ACTION_EXTRA_PARAMS' against SATORI's "
                                "help article."
                            )
                        ),
                        _seen(error, field=error.field),
                    )
                )
                return
            self._refused("write.action", error, ("action",), own_only=True)
            return
        self._accepted(
            "write.action",
            result.status,
            result.message,
            _seen(
                status=result.status, http_status=result.http_status, shape=shape(result.response)
            ),
        )

    def bulk(self) -> None:
        route = self.conf.BULK_DEFAULT_COLLECTION_ROUTE or MARKER_TAG
        columns = ["email", "last_name", "collection_route", "append_tags"]
        row = [self.email, MARKER_TAG, route, MARKER_TAG]
        data = (",".join(columns) + "\n" + ",".join(_csv_cell(c) for c in row) + "\n").encode()
        try:
            upload = self.client.bulk_upsert(data, filename="satori_doctor.csv")
        except SatoriError as error:
            self.wrote = self.wrote or error.answer_lost
            if (
                isinstance(error, SatoriValidationError)
                and error.field in columns
                and error.field != "email"
            ):
                self.report.suggest(
                    "BULK_CSV_COLUMNS",
                    [c for c in bulk_header(self.conf) if c != error.field],
                )
            self._refused("write.bulk_upload", error, ("bulk_upload",))
            self._skip("write.bulk_status", Text(gettext_noop("Not tried: the upload failed.")))
            return
        self._accepted(
            "write.bulk_upload",
            upload.status,
            upload.message,
            _seen(
                status=upload.status, http_status=upload.http_status, shape=shape(upload.response)
            ),
        )
        self.poll(upload.process_code)

    def poll(self, process_code: str) -> None:
        deadline = time.monotonic() + BULK_WAIT_SECONDS
        wait = 1.0
        while True:
            try:
                state = self.client.bulk_status(process_code)
            except SatoriError as error:
                self._refused("write.bulk_status", error, ("bulk_status",))
                return
            if state.finished or time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
            wait = min(wait * 1.5, 10.0)
        seen = _seen(
            status=state.status,
            http_status=state.http_status,
            shape=shape(state.response),
            process_status=state.process_status,
            succeeded=len(state.succeeded_rows),
            failed=len(state.failed_rows),
        )
        if not state.finished:
            self.report.add(
                Check(
                    "write.bulk_status",
                    WARN,
                    Text(
                        gettext_noop(
                            "The bulk job had not finished after %(s)d seconds "
                            "(process_status %(state)r)."
                        ),
                        s=BULK_WAIT_SECONDS,
                        state=state.process_status,
                    ),
                    Text(gettext_noop("SATORI may be busy; the sync polls far longer.")),
                    seen,
                )
            )
            self.wrote = True  # it may still apply the row: delete the customer anyway
            return
        if state.failed_rows:
            self.report.add(
                Check(
                    "write.bulk_status",
                    FAIL,
                    Text(
                        gettext_noop("SATORI refused the bulk row: %(message)s"),
                        message=state.failed_rows[0].message,
                    ),
                    Text(
                        gettext_noop("If it names a permission, enable %(rule)s. %(note)s"),
                        rule=Text(RULE_ITEMS["bulk_upload"]),
                        note=Text(OWN_ONLY_NOTE),
                    ),
                    seen,
                )
            )
            return
        self.wrote = True
        self.report.add(
            Check(
                "write.bulk_status",
                OK,
                Text(
                    gettext_noop("The bulk job finished: %(n)d row applied (status %(status)s)."),
                    n=len(state.succeeded_rows),
                    status=state.status,
                ),
                details=seen,
            )
        )

    def delete(self) -> None:
        by_email = self.hashcode is None
        try:
            result = (
                self.client.delete_customer(email=self.email)
                if by_email
                else self.client.delete_customer(hashcode=self.hashcode)
            )
        except SatoriError as error:
            if by_email or not isinstance(error, SatoriNotFoundError | SatoriValidationError):
                self._refused("write.delete", error, ("delete",), own_only=True)
                self._left_behind()
                return
            try:  # SATORI may not take a hashcode for deletes: try the e-mail.
                result = self.client.delete_customer(email=self.email)
            except SatoriError as second:
                self._refused("write.delete", second, ("delete",), own_only=True)
                self._left_behind()
                return
            self.report.add(
                Check(
                    "write.delete",
                    WARN,
                    Text(
                        gettext_noop(
                            "SATORI refused the delete by hashcode (status %(status)s) but "
                            "took it by e-mail."
                        ),
                        status=error.status,
                    ),
                    Text(gettext_noop("Paste the suggested settings below.")),
                    _seen(error),
                )
            )
            self.report.suggest("DELETE_IDENTITY", "email")
        else:
            self._accepted(
                "write.delete",
                result.status,
                result.message,
                _seen(status=result.status, http_status=result.http_status, by_email=by_email),
            )
        self.delete_unknown()

    def _left_behind(self) -> None:
        # The operator gave this address for the test: naming it is what lets them find it.
        self.report.add(
            Check(
                "write.left_behind",
                WARN,
                Text(
                    gettext_noop("The test customer %(email)s (tag %(tag)s) is still in SATORI."),
                    email=self.email,
                    tag=MARKER_TAG,
                ),
                Text(
                    gettext_noop(
                        "Delete it in SATORI's customer screen, or run the write test again "
                        "once the delete is allowed."
                    )
                ),
            )
        )

    def delete_unknown(self) -> None:
        """Delete the same customer again: how does SATORI say "unknown customer"?"""
        try:
            result = self.client.delete_customer(email=self.email)
        except SatoriNotFoundError as error:
            self.report.add(
                Check(
                    "write.delete_unknown",
                    OK,
                    Text(
                        gettext_noop(
                            "A delete of a customer no longer there got status %(status)s "
                            "(not found), as expected."
                        ),
                        status=error.status,
                    ),
                    details=_seen(error),
                )
            )
            return
        except SatoriValidationError as error:
            self.report.add(
                Check(
                    "write.delete_unknown",
                    WARN,
                    Text(
                        gettext_noop(
                            "A delete of a customer no longer there got status %(status)s "
                            "(we expect 404): %(message)s"
                        ),
                        status=error.status,
                        message=error.message,
                    ),
                    Text(
                        gettext_noop(
                            "Paste the suggested settings below, or such deletes fail instead "
                            "of counting as done."
                        )
                    ),
                    _seen(error),
                )
            )
            _suggest_not_found(self.report, error, self.email)
            return
        except SatoriError as error:
            self._refused("write.delete_unknown", error, ("delete",))
            return
        self.report.add(
            Check(
                "write.delete_unknown",
                OK,
                Text(
                    gettext_noop(
                        "A delete of a customer no longer there was answered with success "
                        "(status %(status)s)."
                    ),
                    status=result.status,
                ),
                details=_seen(status=result.status, http_status=result.http_status),
            )
        )

    # -- reporting

    def _accepted(self, check_id: str, status: int, message: Any, seen: dict[str, Any]) -> None:
        text = message if isinstance(message, str) else shape(message)
        self.report.add(
            Check(
                check_id,
                OK,
                Text(
                    gettext_noop("Accepted (status %(status)s): %(message)s"),
                    status=status,
                    message=text,
                ),
                details=seen,
            )
        )

    def _refused(
        self,
        check_id: str,
        error: SatoriError,
        operations: tuple[str, ...],
        *,
        own_only: bool = False,
    ) -> None:
        seen = _seen(error, field=error.field)
        if isinstance(error, SatoriPermissionError):
            rules = [Text(RULE_ITEMS[op]) for op in operations]
            fix = Text(
                gettext_noop("Enable %(rule)s in the permission rule of the keys' SATORI user."),
                rule=rules[0],
            )
            if len(rules) > 1:
                fix = Text(
                    gettext_noop(
                        "Enable %(rule)s (and %(other)s for a customer not yet in SATORI) in "
                        "the permission rule of the keys' SATORI user."
                    ),
                    rule=rules[0],
                    other=rules[1],
                )
            if own_only:
                fix = Text("%(fix)s %(note)s", fix=fix, note=Text(OWN_ONLY_NOTE))
            self.report.add(
                Check(
                    check_id,
                    FAIL,
                    Text(
                        gettext_noop(
                            "SATORI refused it (status %(status)s, a permission): %(message)s"
                        ),
                        status=error.status,
                        message=error.message,
                    ),
                    fix,
                    seen,
                )
            )
            return
        if error.http_status is None or _not_json(error):
            self.report.add(_unreachable(check_id, error, seen))
            return
        self.report.add(
            Check(
                check_id,
                FAIL,
                Text(
                    gettext_noop("SATORI refused it (status %(status)s): %(message)s"),
                    status=error.status,
                    message=error.message,
                ),
                Text(
                    gettext_noop("See SATORI's message; docs/satori-facts.md lists what we guess.")
                ),
                seen,
            )
        )

    def _skip(self, check_id: str, message: Text) -> None:
        self.report.add(Check(check_id, SKIP, message))


def _csv_cell(value: str) -> str:
    if any(c in value for c in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value
