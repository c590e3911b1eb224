"""Errors raised by django-satori.

Every error carries what SATORI said (``status``, ``message`` and the parsed
``response``) so callers can show it as-is; none of them ever carries the API
keys, because messages are built only from SATORI's reply or our own text.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext as _

from .permissions import operation_for_endpoint, refusal_text


class SatoriError(Exception):
    """Base class: something went wrong talking to SATORI (or before it)."""

    #: Whether sending the same request again later may succeed.
    retryable: bool = False
    #: The request may have reached SATORI, but its answer did not reach us (a read
    #: timeout, a connection dropped after sending): SATORI may have applied it.
    answer_lost: bool = False
    #: When no reply came: the kind of transport failure (the requests or OS error's
    #: class name, e.g. ``SSLError``, ``ConnectTimeout``; ``deadline`` for the overall
    #: time limit). ``satori_doctor`` tells a TLS problem from a timeout with it.
    transport: str | None = None
    #: Set by the client when the error came from a call: the endpoint name and
    #: redacted request/response summaries (safe to log and store).
    endpoint: str | None = None
    request_summary: dict[str, str] | None = None
    response_summary: Any = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        response: Any = None,
        http_status: int | None = None,
        field: str | None = None,
    ) -> None:
        message = _storable(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.response = response
        self.http_status = http_status
        self.field = None if field is None else _storable(field)

    def __str__(self) -> str:
        # Stored as the last error shown in the admin: worded in the active language.
        try:
            status_text, field_text = _("SATORI status %(status)s"), _("field %(field)r")
        except ImproperlyConfigured:  # no settings yet: str() of an error must still work
            status_text, field_text = "SATORI status %(status)s", "field %(field)r"
        parts = []
        if self.status is not None:
            parts.append(status_text % {"status": self.status})
        if self.field:
            parts.append(field_text % {"field": self.field})
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status={self.status!r}, field={self.field!r})"
        )


def _storable(text: str) -> str:
    """``text`` with NUL and lone surrogates written as escapes.

    An error's text and field end up in the database (last_error, row errors)
    and in logs, which take neither; a bad value quoted in a message or a bad
    custom field key must not make storing the error fail in turn.
    """
    text = str(text)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class SatoriConfigurationError(SatoriError):
    """Settings are missing or wrong (for example an empty API key)."""


class SatoriAuthenticationError(SatoriError):
    """SATORI refused the keys. Not retryable: a person must fix the settings."""


class SatoriPermissionError(SatoriAuthenticationError):
    """The key's user lacks a permission for this customer or operation.

    SATORI's "own records only" rule means valid keys can be refused for some
    customers (those created by another user or key), so this is reported per
    customer and never retried.

    Shown as a permission problem naming the rule item to enable (from the
    endpoint the client notes on the error), not as a problem with a field:
    SATORI's message names the customer's identity, which is not what is wrong.
    """

    def __str__(self) -> str:
        try:
            text = refusal_text(operation_for_endpoint(self.endpoint), self.message)
            status_text = _("SATORI status %(status)s")
        except ImproperlyConfigured:  # no settings yet: str() of an error must still work
            text, status_text = self.message, "SATORI status %(status)s"
        if self.status is None:
            return text
        return f"{status_text % {'status': self.status}}: {text}"


class SatoriValidationError(SatoriError, ValueError):
    """A value was refused, locally before sending or by SATORI. Names the field."""


class SatoriNotFoundError(SatoriError):
    """SATORI does not know the customer or the bulk process code."""


class SatoriTransientError(SatoriError):
    """A network error, timeout, 5xx, 429 or non-JSON reply: retry later."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class SatoriRateLimitError(SatoriTransientError):
    """SATORI (or our own shared rate limit) asked us to slow down."""


class SatoriTimeoutError(SatoriTransientError):
    """A call ran past its overall time limit (``TOTAL_TIMEOUT`` or
    ``BULK_UPLOAD_TIMEOUT``), however slowly the reply was trickling in."""


class SatoriResponseTooLargeError(SatoriTransientError):
    """A reply was longer than ``MAX_RESPONSE_BYTES`` and was abandoned unread."""
