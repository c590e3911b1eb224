"""Request bodies: urlencoded and multipart/form-data, decoded strictly as UTF-8.

Standard library only (``cgi`` is gone in Python 3.13): multipart is parsed
with the e-mail package, which understands MIME the same way.
"""

from __future__ import annotations

import email.policy
from email.message import Message
from email.parser import BytesParser
from urllib.parse import parse_qsl

from .rules import SandboxError
from .state import RecordedFile

URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
MAX_FIELDS = 2000


def content_type(header: str | None) -> tuple[str, str | None]:
    """``(media type, charset)`` of a Content-Type header value."""
    message = Message()
    message["content-type"] = header or ""
    charset = message.get_param("charset")
    return message.get_content_type() if header else "", (
        str(charset).lower() if isinstance(charset, str) else None
    )


def parse_query(query: str) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            query,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_FIELDS,
        )
    except UnicodeDecodeError:
        raise SandboxError(
            400, "パラメータの文字コードはUTF-8にしてください (parameters must be UTF-8)"
        ) from None
    except ValueError as exc:
        raise SandboxError(
            400, f"パラメータの形式が正しくありません (malformed parameters: {str(exc)[:80]})"
        ) from None


def parse_body(
    header: str | None, body: bytes
) -> tuple[str, list[tuple[str, str]], list[RecordedFile]]:
    """Return ``(media type, form pairs, files)``; raise a 400 SandboxError if unreadable."""
    media, charset = content_type(header)
    if charset not in (None, "utf-8", "utf8"):
        raise SandboxError(
            400,
            f"Content-Type: 文字コードはUTF-8にしてください (charset must be UTF-8, got {charset})",
        )
    if media == URLENCODED:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SandboxError(
                400, "パラメータの文字コードはUTF-8にしてください (parameters must be UTF-8)"
            ) from None
        return media, parse_query(text), []
    if media == MULTIPART:
        pairs, files = _parse_multipart(header or "", body)
        return media, pairs, files
    raise SandboxError(
        400,
        f"Content-Type: {URLENCODED} または {MULTIPART} で送信してください "
        f"(unsupported Content-Type {media or '(none)'!r})",
    )


def _parse_multipart(header: str, body: bytes) -> tuple[list[tuple[str, str]], list[RecordedFile]]:
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + header.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        raise SandboxError(
            400, "multipart/form-data の形式が正しくありません (malformed multipart body)"
        )
    pairs: list[tuple[str, str]] = []
    files: list[RecordedFile] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_content_disposition() != "form-data" or not isinstance(name, str):
            raise SandboxError(
                400,
                "multipart/form-data の各パートには name が必要です "
                "(every part needs Content-Disposition: form-data; name=...)",
            )
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            files.append(RecordedFile(name, filename, part.get_content_type(), data))
            continue
        try:
            pairs.append((name, data.decode("utf-8")))
        except UnicodeDecodeError:
            raise SandboxError(
                400, f"{name}: 文字コードはUTF-8にしてください (value must be UTF-8)"
            ) from None
        if len(pairs) > MAX_FIELDS:
            raise SandboxError(400, "パラメータが多すぎます (too many fields)")
    return pairs, files
