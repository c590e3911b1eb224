"""Keep the four API keys and customers' personal data out of logs and summaries.

Two different jobs:

* **Secrets** (the four SATORI keys) are removed everywhere, always. They
  travel as form fields, and for ``status.json`` in the query string, so any
  text that might have seen a request (a URL, an HTML error page echoing it,
  a third-party log line) is passed through :func:`scrub`.
* **Personal data** (e-mail, names, phones, address, memo, custom values) is
  replaced by a length marker when ``SATORI["REDACT_PERSONAL_DATA"]`` is on,
  so request/response summaries can be logged and stored in ``SyncLog``.

Request forms are redacted by an allow-list (unknown keys count as personal);
response data by a deny-list plus an e-mail pattern, because SATORI's reply
is mostly status text whose keys we do not control.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

from .conf import AUTH_KEYS, SatoriSettings, get_settings
from .schema import CUSTOM_PREFIX

#: Wire names of the four keys (top-level form fields / query parameters).
AUTH_FIELDS: tuple[str, ...] = tuple(key.lower() for key in AUTH_KEYS)
MASK = "********"

#: Customer items and bookkeeping fields whose values describe the operation,
#: not the person, so they stay readable in summaries.
NON_PERSONAL_FIELDS: frozenset[str] = frozenset(
    {
        "identity_type",
        "hashcode",
        "lead_company_name",
        "department",
        "collection_route",
        "collection_date",
        "delivery_permission",
        "append_tags",
        "delete_tags",
        "process_code",
        "customer_csv_file",
    }
)

#: Keys whose values are personal wherever they show up in a reply.
PERSONAL_FIELDS: frozenset[str] = frozenset(
    {
        "email",
        "last_name",
        "first_name",
        "last_name_reading",
        "first_name_reading",
        "phone_number",
        "mobile_phone_number",
        "address",
        "memo",
    }
)

_BRACKETED = re.compile(r"^[A-Za-z0-9_]+\[([^\]]+)\]$")
# What redact_text treats as an address: a run of local-part characters, "@",
# then two or more dot-separated labels. As the plain pattern, a long run of
# local-part characters without an "@" costs quadratic time: the search tries
# every start position in the run and rescans it to its end each time. Here a
# match may only start where a run starts (the lookbehind) and the run is
# possessive, so each run is scanned once. ("@" is in neither character set,
# so no backtracking is given up that could have found a match.)
_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]"
_ADDRESS_HERE = re.compile(_LOCAL + r"++@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)+")
_ADDRESS = re.compile(r"(?<!" + _LOCAL + ")" + _ADDRESS_HERE.pattern)
#: Characters that can follow an address and start the next one's local part.
_LOCAL_NOT_LABEL = frozenset(".!#$%&'*+/=?^_`{|}~")
_AUTH_IN_QUERY = re.compile(
    r"(?P<name>" + "|".join(AUTH_FIELDS) + r")(?P<sep>=|%3D|%3d)(?P<value>[^&\s\"'<>#]*)"
)
#: Deeper structures than this are cut; SATORI replies are two or three levels deep.
_MAX_DEPTH = 32


def redaction_marker(value: Any) -> str:
    """What a personal value looks like in a summary: only its length survives."""
    text = "" if value is None else str(value)
    return f"<redacted {len(text)} chars>" if text else text


def field_name(key: str) -> str:
    """``customer[last_name]`` -> ``last_name``; other keys are returned as they are."""
    match = _BRACKETED.match(key)
    return match.group(1) if match and key.startswith("customer[") else key


def is_personal_key(key: str, visible: Iterable[str] = ()) -> bool:
    """Allow-list test for request fields: anything not known to be harmless is personal."""
    if key in visible:
        return False
    name = field_name(key)
    if name.startswith(CUSTOM_PREFIX):
        return True
    return name not in NON_PERSONAL_FIELDS


def redact_form(
    pairs: Iterable[tuple[str, Any]] | Mapping[str, Any],
    redact_personal: bool,
    *,
    visible: Iterable[str] = (),
) -> dict[str, str]:
    """Summary of a request form: keys masked always, personal values when asked.

    ``visible`` names extra wire keys that are safe to show (for example the
    configured parameter name of an action's title).
    """
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    visible = frozenset(visible)
    summary: dict[str, str] = {}
    for key, value in items:
        text = "" if value is None else str(value)
        if key in AUTH_FIELDS:
            summary[key] = MASK
        elif redact_personal and is_personal_key(key, visible):
            summary[key] = redaction_marker(text)
        else:
            summary[key] = text
    return summary


class SecretNeedles:
    """The key values to search for, in an object that never shows them.

    Error trackers (Sentry by default) record the local variables of every
    frame a traceback passes through: containers item by item, other objects
    by ``repr()`` or their ``__dict__``. ``parse_response`` and the client hold
    the needles in locals and attributes when they raise, so this is not a
    tuple (a tracker would list its items) and has slots instead of a
    ``__dict__``. It iterates like the tuple it used to be.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: tuple[str, ...] = tuple(values)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SecretNeedles):
            return self._values == other._values
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"<{len(self)} secret needles>"

    __str__ = __repr__


def secret_needles(conf: SatoriSettings | None = None) -> SecretNeedles:
    """Every spelling of the four key values that could end up in text.

    Besides the raw value we look for its form- and URL-encoded forms, since
    a URL or an echoed request body carries the encoded one. Longest first,
    so a key that contains another key is replaced whole.
    """
    conf = conf if conf is not None else get_settings()
    needles: set[str] = set()
    for key in AUTH_KEYS:
        value = getattr(conf, key, "")
        if not isinstance(value, str) or not value:
            continue
        needles.update({value, quote_plus(value, safe=""), quote(value, safe="")})
    return SecretNeedles(sorted(needles, key=len, reverse=True))


def scrub_query(text: str) -> str:
    """Mask ``user_key=...`` style parameters in any URL-ish text, whatever their values."""
    return _AUTH_IN_QUERY.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)


def scrub(text: Any, conf: SatoriSettings | Iterable[str] | None = None) -> str:
    """Remove the four key values (raw or percent-encoded) from arbitrary text.

    ``conf`` is the settings to take the keys from (default: the current ones)
    or an iterable of ready-made needles from :func:`secret_needles`.
    """
    result = "" if text is None else str(text)
    needles = (
        secret_needles(conf)
        if conf is None or isinstance(conf, SatoriSettings)
        else conf
        if isinstance(conf, SecretNeedles)
        else SecretNeedles(conf)
    )
    for needle in needles:
        if needle:
            result = result.replace(needle, MASK)
    return scrub_query(result)


def redact_text(text: str) -> str:
    """Replace e-mail addresses in free text (SATORI error messages, failed rows).

    Finds exactly what ``[local]+@label(.label)+`` finds, in time linear in the
    length of ``text`` (see ``_ADDRESS``); only the rare address that starts
    right where the previous one ended needs a second, anchored look.
    """
    if "@" not in text:
        return text
    pieces: list[str] = []
    done = 0  # text[:done] is already in pieces
    search, here = _ADDRESS.search, _ADDRESS_HERE.match
    while True:
        # A run of local-part characters cut short by the previous address is
        # not at a "run start", so _ADDRESS would skip it: try it first.
        hit = here(text, done) if done and text[done : done + 1] in _LOCAL_NOT_LABEL else None
        hit = hit or search(text, done)
        if hit is None:
            break
        start, done_before, done = hit.start(), done, hit.end()
        pieces.append(text[done_before:start])
        pieces.append(f"<redacted {done - start} chars>")  # as redaction_marker()
    pieces.append(text[done:])
    return "".join(pieces)


def for_log(text: str, conf: SatoriSettings) -> str:
    """SATORI's free text as a log line may show it: addresses redacted unless
    ``REDACT_PERSONAL_DATA`` is False. (Stored errors keep SATORI's words.)"""
    return redact_text(text) if conf.REDACT_PERSONAL_DATA else text


def scrub_data(
    data: Any,
    needles: Iterable[str],
    *,
    redact_personal: bool = False,
    _depth: int = 0,
    _personal: bool = False,
) -> Any:
    """A JSON-like copy of ``data`` without key values (and personal data if asked).

    Dict keys are scrubbed too. Everything below a personal key (``email``,
    ``memo``, ``custom:*``...) is redacted, however it is nested. Structures
    deeper than a SATORI reply ever is are cut short, so hostile input cannot
    exhaust the stack.
    """
    needles = needles if isinstance(needles, SecretNeedles) else SecretNeedles(needles)
    if _depth > _MAX_DEPTH:
        return "<too deeply nested>"
    if isinstance(data, Mapping):
        copied: dict[str, Any] = {}
        for key, value in data.items():
            clean_key = scrub(key, needles)
            copied[clean_key] = scrub_data(
                value,
                needles,
                redact_personal=redact_personal,
                _depth=_depth + 1,
                _personal=_personal or (redact_personal and _is_personal_reply_key(clean_key)),
            )
        return copied
    if isinstance(data, list | tuple):
        return [
            scrub_data(
                item,
                needles,
                redact_personal=redact_personal,
                _depth=_depth + 1,
                _personal=_personal,
            )
            for item in data
        ]
    if data is None or isinstance(data, bool):
        return data
    if _personal:
        return redaction_marker(scrub(data, needles))
    if isinstance(data, int | float):
        return data
    text = scrub(data if isinstance(data, str) else repr(data), needles)
    return redact_text(text) if redact_personal else text


def _is_personal_reply_key(key: str) -> bool:
    name = field_name(key)
    return name in PERSONAL_FIELDS or name.startswith(CUSTOM_PREFIX)


def summarize_response(data: Any, conf: SatoriSettings) -> Any:
    """What may be logged or stored of a parsed SATORI reply."""
    return scrub_data(data, secret_needles(conf), redact_personal=conf.REDACT_PERSONAL_DATA)


class QueryStringScrubber(logging.Filter):
    """Mask API keys in records of loggers we do not own.

    urllib3 logs every request line at DEBUG, including the query string, and
    ``status.json`` carries the keys there. This filter rewrites such records
    before any handler sees them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken record is the logging module's problem, not ours
            return True
        cleaned = scrub_query(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = ()
        return True


_FILTERED_LOGGERS = ("urllib3.connectionpool", "urllib3.connection", "requests")


def install_log_filters() -> None:
    """Attach :class:`QueryStringScrubber` to the HTTP libraries' loggers (idempotent)."""
    for name in _FILTERED_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, QueryStringScrubber) for f in log.filters):
            log.addFilter(QueryStringScrubber())
