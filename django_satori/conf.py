"""The ``SATORI`` settings dict, read from Django settings.

The app never reads the environment: the project does (for example with
django-environ) and puts the values into ``settings.SATORI``. The accessor
:func:`get_settings` returns a typed, frozen view that follows
``override_settings`` because it is rebuilt whenever ``SATORI`` changes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed
from django.dispatch import receiver

AUTH_KEYS = ("USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET")

DEFAULT_ACTION_PARAMS: dict[str, str] = {
    "name": "action[name]",
    "content": "action[content]",
    "url": "action[url]",
    "date": "action[date]",
}

DEFAULT_ACTION_IDENTITY_PARAMS: dict[str, str] = {
    "identity_type": "customer[identity_type]",
    "email": "customer[email]",
    "hashcode": "customer[hashcode]",
}
DEFAULT_ACTION_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

#: How SATORI's answers are classified by status (ANSWER_STATUS_CLASSES merges over this);
#: codes not listed: 5xx transient, other 4xx validation.
ANSWER_CLASSES: tuple[str, ...] = (
    "authentication",
    "permission",
    "not_found",
    "validation",
    "transient",
    "slow_down",
)
DEFAULT_ANSWER_STATUS_CLASSES: dict[int, str] = {
    401: "authentication",
    403: "permission",
    404: "not_found",
    408: "transient",
    425: "transient",
    429: "slow_down",
}
EXTRA_ITEM_TYPES: tuple[str, ...] = ("text", "integer", "date")

DEFAULT_DELIVERY_PERMISSION_LABELS: dict[str, str] = {
    "許可": "approval",
    "拒否": "reject",
    "approval": "approval",
    "reject": "reject",
}


# Slots, so the object has no ``__dict__``: error trackers that walk frame
# locals through ``vars()`` see only the repr below, never the four keys.
@dataclass(frozen=True, slots=True)
class SatoriSettings:
    """Typed view of ``settings.SATORI``; see docs/configuration.md for each key."""

    USER_KEY: str = ""
    USER_SECRET: str = ""
    COMPANY_KEY: str = ""
    COMPANY_SECRET: str = ""
    BASE_URL: str = "https://api.satr.jp"
    #: Seconds for connect and for read, or a ``(connect, read)`` pair.
    TIMEOUT: float | tuple[float, float] = 10.0
    #: Seconds one call may take in all (connect, send, wait and read the reply).
    TOTAL_TIMEOUT: float = 30.0
    #: The same for a bulk CSV upload, which sends up to 10,000 rows.
    BULK_UPLOAD_TIMEOUT: float = 300.0
    #: Upload attempts of one bulk part (network errors, timeouts, 5xx) before it fails.
    BULK_UPLOAD_ATTEMPTS: int = 4
    #: A reply longer than this many bytes is abandoned unread.
    MAX_RESPONSE_BYTES: int = 10 * 1024 * 1024

    # Sync engine
    SYNC_ENABLED: bool = True
    DRY_RUN: bool = False
    #: False: only push customers known to exist in SATORI (imported, or created by us).
    CREATE_UNKNOWN: bool = True
    #: "upsert" (overwrite) or "registration" (create, or fill blanks only).
    PUSH_ENDPOINT: str = "upsert"
    #: Single-customer calls per minute, shared by all workers; None disables the limit.
    RATE_LIMIT_PER_MINUTE: int | None = 30
    #: Django cache alias used for the shared rate limit.
    RATE_LIMIT_CACHE: str = "default"
    #: Saves of one customer within this many seconds give one call.
    COALESCE_SECONDS: float = 2.0
    #: More pending customers than this are sent through the bulk CSV API.
    BULK_THRESHOLD: int = 200
    MAX_ATTEMPTS: int = 8
    RETRY_BACKOFF_SECONDS: float = 5.0
    RETRY_BACKOFF_MAX_SECONDS: float = 900.0
    #: How long a worker holds a customer while sending; a killed worker's claim expires.
    LEASE_SECONDS: float = 120.0
    #: Pending work older than this without progress is dispatched again by the sweep.
    SWEEP_AFTER_SECONDS: float = 60.0
    #: {"app_label.Model": {...}}: project models connected to Customer (docs/connecting-models.md).
    MAPPINGS: Mapping[str, Any] = field(default_factory=dict)
    #: {"identifier": "text" | "integer" | "date" | {"type": "select", "choices": [...]}}
    CUSTOM_FIELDS: Mapping[str, Any] = field(default_factory=dict)
    #: How several tags are joined in ``append_tags`` / ``delete_tags`` (unverified).
    TAG_SEPARATOR: str = ","
    #: Send e-mail addresses in lower case (SATORI's case rules are unknown).
    EMAIL_LOWERCASE: bool = True
    #: "hashcode" (when known) or "email": how deletes and e-mail changes name the customer.
    DELETE_IDENTITY: str = "hashcode"
    #: {"key": {"type": "text" | "integer" | "date", "max_length": N}}: standard items
    #: SATORI accepts that the app does not know (役職, FAX, ...).
    EXTRA_STANDARD_ITEMS: Mapping[str, Any] = field(default_factory=dict)
    #: {status code: class}, merged over DEFAULT_ANSWER_STATUS_CLASSES.
    ANSWER_STATUS_CLASSES: Mapping[int, str] = field(default_factory=dict)
    #: [[regex, class], ...] tried on SATORI's message before the status decides.
    ANSWER_MESSAGE_CLASSES: Sequence[Sequence[str]] = field(default_factory=list)

    # Bulk CSV API
    BULK_CHUNK_SIZE: int = 10_000
    BULK_DEFAULT_COLLECTION_ROUTE: str = ""
    #: "filled": the columns at least one row of the part fills (plus email and
    #: collection_route); or an explicit list of column names.
    BULK_CSV_COLUMNS: str | Sequence[str] = "filled"
    BULK_POLL_INTERVAL_SECONDS: float = 5.0
    BULK_POLL_MAX_INTERVAL_SECONDS: float = 120.0
    BULK_DEADLINE_SECONDS: float = 6 * 3600.0
    #: An upload whose answer was lost (SATORI may have the file): "once" sends it once
    #: more after BULK_RESEND_WAIT_SECONDS; "never" holds the part for a person to decide.
    BULK_RESEND_UNANSWERED: str = "once"
    BULK_RESEND_WAIT_SECONDS: float = 300.0
    #: Storage alias for the parts' CSV files. Unless STORAGES defines this alias, it is a
    #: private directory (BULK_FILES_DIR) that no URL serves; see docs/security.md.
    BULK_STORAGE: str = "django_satori_bulk"
    #: The private directory; empty: ``django_satori_private`` next to MEDIA_ROOT (or in BASE_DIR).
    BULK_FILES_DIR: str | os.PathLike[str] = ""
    #: Days a finished job's CSV files are kept (for download); None keeps them.
    BULK_FILE_RETENTION_DAYS: float | None = 7
    BULK_EXPORT_ITERATOR_CHUNK: int = 2000

    # Action API (path and parameter names are unverified, hence configurable)
    ACTION_PATH: str = "/api/v4/public/customer/add_action.json"
    ACTION_PARAMS: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTION_PARAMS))
    ACTION_TIMEZONE: str = "Asia/Tokyo"
    #: Wire names of the customer identity in an action call.
    ACTION_IDENTITY_PARAMS: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_ACTION_IDENTITY_PARAMS)
    )
    ACTION_DATE_FORMAT: str = DEFAULT_ACTION_DATE_FORMAT
    #: False: the action call carries no date (SATORI then uses the time it receives it).
    ACTION_SEND_DATE: bool = True
    #: Fixed extra form fields of every action call (never one of the four keys).
    ACTION_EXTRA_PARAMS: Mapping[str, str] = field(default_factory=dict)

    # Logs and the admin
    REDACT_PERSONAL_DATA: bool = True
    #: Days SyncLog entries are kept; None keeps them for ever.
    LOG_RETENTION_DAYS: float | None = 90
    #: Rows deleted per statement when old SyncLog entries go (short locks).
    LOG_DELETE_BATCH: int = 1000

    # Monitoring (satori_status)
    #: Cache alias where the sweep notes when it last ran; shared by workers and commands.
    STATUS_CACHE: str = "default"

    # Importing SATORI's admin CSV export
    DELIVERY_PERMISSION_LABELS: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_DELIVERY_PERMISSION_LABELS)
    )

    @property
    def has_credentials(self) -> bool:
        return all(getattr(self, key) for key in AUTH_KEYS)

    def __repr__(self) -> str:
        # Secrets never appear in reprs (tracebacks with locals, debug pages).
        shown = {
            f.name: (
                "********"
                if f.name in AUTH_KEYS and getattr(self, f.name)
                else getattr(self, f.name)
            )
            for f in dataclasses.fields(self)
        }
        return f"SatoriSettings({shown!r})"


def answer_status_classes(conf: SatoriSettings) -> dict[int, str]:
    """The status classification in force: the defaults with ANSWER_STATUS_CLASSES over them."""
    classes = dict(DEFAULT_ANSWER_STATUS_CLASSES)
    if isinstance(conf.ANSWER_STATUS_CLASSES, Mapping):
        for code, kind in conf.ANSWER_STATUS_CLASSES.items():
            # Accept "403" too: settings read from JSON or the environment have string keys.
            if str(code).strip().isdigit():
                classes[int(str(code).strip())] = str(kind)
    return classes


SETTING_NAMES: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SatoriSettings))


def raw_settings() -> dict[str, Any]:
    value = getattr(django_settings, "SATORI", None) or {}
    return dict(value) if isinstance(value, Mapping) else {}


@lru_cache(maxsize=1)
def get_settings() -> SatoriSettings:
    """Return the current settings; unknown names are ignored here (checks report them)."""
    raw = raw_settings()
    known = {key: value for key, value in raw.items() if key in SETTING_NAMES}
    if isinstance(known.get("TIMEOUT"), list):
        known["TIMEOUT"] = tuple(known["TIMEOUT"])
    if "ACTION_PARAMS" in known and isinstance(known["ACTION_PARAMS"], Mapping):
        known["ACTION_PARAMS"] = {**DEFAULT_ACTION_PARAMS, **known["ACTION_PARAMS"]}
    if "ACTION_IDENTITY_PARAMS" in known and isinstance(known["ACTION_IDENTITY_PARAMS"], Mapping):
        known["ACTION_IDENTITY_PARAMS"] = {
            **DEFAULT_ACTION_IDENTITY_PARAMS,
            **known["ACTION_IDENTITY_PARAMS"],
        }
    return SatoriSettings(**known)


@receiver(setting_changed)
def _reset_settings(*, setting: str, **kwargs: Any) -> None:
    if setting == "SATORI":
        get_settings.cache_clear()
