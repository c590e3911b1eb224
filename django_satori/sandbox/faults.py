"""Fault injection for the SATORI endpoints (never the control endpoints).

A fault is chosen before the request is processed, so a failed call never
changes the sandbox's customers or jobs, just as a client must assume it may
or may not have when the reply is lost (see the "timeout" and "drop" kinds).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .config import OPERATIONS
from .i18n import _

#: "500"/"503": JSON error; "429": with ``Retry-After``; "timeout": answer only
#: after ``timeout_seconds``; "drop": close the connection without a reply;
#: "html": HTTP 502 with an HTML page, as a proxy in front of SATORI would send;
#: "html_403": HTTP 403 with an HTML page, as a proxy or firewall refusing the request would;
#: "dribble": a JSON 503 whose body comes one byte every ``dribble_seconds``
#: (each read is quick, the whole reply is not); "oversized": a JSON 503 of
#: ``oversized_bytes`` bytes. Neither processes the request. "lost_answer": the
#: request IS processed, then the connection is closed without a reply (an answer
#: lost after SATORI applied the call).
FAULT_KINDS: tuple[str, ...] = (
    "500",
    "503",
    "429",
    "timeout",
    "drop",
    "html",
    "html_403",
    "dribble",
    "oversized",
    "lost_answer",
)


def _kind(kind: Any) -> str:
    kind = str(kind)
    if kind not in FAULT_KINDS:
        raise ValueError(
            _("Unknown fault kind %(kind)r; known: %(kinds)s.")
            % {"kind": kind, "kinds": ", ".join(FAULT_KINDS)}
        )
    return kind


def _ops(operations: Iterable[str] | None) -> frozenset[str] | None:
    if operations is None:
        return None
    ops = frozenset(operations)
    unknown = ops - set(OPERATIONS)
    if unknown:
        raise ValueError(_("Unknown operation(s) %(ops)s.") % {"ops": ", ".join(sorted(unknown))})
    return ops


class Faults:
    """What goes wrong, and when. Thread-safe; attributes may be set directly.

    ``operations`` (endpoint names such as "upsert" or "bulk_status") limits a
    rule to some endpoints; None means every SATORI endpoint.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._queue: list[list[Any]] = []  # [kind, remaining, operations]
            self._rate = 0.0
            self._kinds: tuple[str, ...] = ("500",)
            self._random_ops: frozenset[str] | None = None
            self._rng = random.Random()
            #: Seconds every SATORI request waits before it is handled.
            self.delay = 0.0
            #: Value of the ``Retry-After`` header sent with "429".
            self.retry_after = 1
            #: How long a "timeout" fault holds the request before answering.
            self.timeout_seconds = 15.0
            #: Seconds between two bytes of a "dribble" reply's body.
            self.dribble_seconds = 1.0
            #: Size in bytes of an "oversized" reply (above the client's default cap).
            self.oversized_bytes = 16 * 1024 * 1024

    def fail_first(
        self, n: int, kind: str = "500", *, operations: Iterable[str] | None = None
    ) -> None:
        """Make the next ``n`` matching requests fail with ``kind`` (queued after earlier ones)."""
        if int(n) < 0:
            raise ValueError(_("n must not be negative."))
        entry = [_kind(kind), int(n), _ops(operations)]
        with self._lock:
            if entry[1]:
                self._queue.append(entry)

    def set_random(
        self,
        rate: float,
        kinds: Iterable[str] = ("500",),
        seed: int | None = None,
        *,
        operations: Iterable[str] | None = None,
    ) -> None:
        """Fail a ``rate`` fraction of requests with a kind drawn from ``kinds``."""
        rate = float(rate)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(_("rate must be between 0 and 1."))
        checked = tuple(_kind(k) for k in kinds)
        if not checked:
            raise ValueError(_("kinds must not be empty."))
        with self._lock:
            self._rate = rate
            self._kinds = checked
            self._random_ops = _ops(operations)
            self._rng = random.Random(seed)

    def pick(self, operation: str) -> str | None:
        """The fault for this request, if any (consumes a queued one)."""
        with self._lock:
            for entry in self._queue:
                if entry[2] is None or operation in entry[2]:
                    entry[1] -= 1
                    if entry[1] <= 0:
                        self._queue.remove(entry)
                    return str(entry[0])
            if (
                self._rate
                and (self._random_ops is None or operation in self._random_ops)
                and self._rng.random() < self._rate
            ):
                return self._rng.choice(self._kinds)
        return None

    def configure(self, data: Mapping[str, Any]) -> None:
        """Apply the JSON accepted by ``POST /_sandbox/faults`` (ValueError if wrong).

        Keys: ``clear`` (bool, applied first), ``fail_first`` + ``kind``,
        ``rate`` + ``kinds`` + ``seed``, ``operations``, ``delay``,
        ``retry_after``, ``timeout_seconds``, ``dribble_seconds``,
        ``oversized_bytes``.
        """
        known = {
            "clear",
            "fail_first",
            "kind",
            "rate",
            "kinds",
            "seed",
            "operations",
            "delay",
            "retry_after",
            "timeout_seconds",
            "dribble_seconds",
            "oversized_bytes",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                _("Unknown fault option(s): %(names)s.") % {"names": ", ".join(sorted(unknown))}
            )
        try:
            if data.get("clear"):
                self.clear()
            operations = data.get("operations")
            if "fail_first" in data:
                self.fail_first(
                    int(data["fail_first"]), data.get("kind", "500"), operations=operations
                )
            if "rate" in data:
                kinds = data.get("kinds", ["500"])
                if isinstance(kinds, str):
                    kinds = kinds.split(",")
                seed = data.get("seed")
                self.set_random(
                    float(data["rate"]),
                    kinds,
                    None if seed is None else int(seed),
                    operations=operations,
                )
            for name in ("delay", "timeout_seconds", "dribble_seconds"):
                if name in data:
                    value = float(data[name])
                    if value < 0:
                        raise ValueError(name)
                    setattr(self, name, value)
            if "retry_after" in data:
                self.retry_after = max(0, int(data["retry_after"]))
            if "oversized_bytes" in data:
                size = int(data["oversized_bytes"])
                if size < 1:
                    raise ValueError("oversized_bytes")
                self.oversized_bytes = size
        except (TypeError, ValueError) as exc:
            raise ValueError(str(exc)) from None

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "queued": [
                    {
                        "kind": kind,
                        "remaining": remaining,
                        "operations": sorted(ops) if ops is not None else None,
                    }
                    for kind, remaining, ops in self._queue
                ],
                "rate": self._rate,
                "kinds": list(self._kinds),
                "random_operations": sorted(self._random_ops)
                if self._random_ops is not None
                else None,
                "delay": self.delay,
                "retry_after": self.retry_after,
                "timeout_seconds": self.timeout_seconds,
                "dribble_seconds": self.dribble_seconds,
                "oversized_bytes": self.oversized_bytes,
            }
