"""What the sandbox accepts: one customer's items, checked strictly.

The messages imitate SATORI's (Japanese, naming the parameter) with an English
gloss. They are the fake server's wire text, not our UI, so they are not
marked for translation.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from django_satori.schema import (
    CUSTOM_PREFIX,
    DELIVERY_PERMISSIONS,
    EMAIL_MAX_LENGTH,
    IDENTITY_TYPES,
    STANDARD_FIELDS,
)

from .config import ANSWER_KINDS, SandboxConfig

#: Items kept in ``Customer.fields`` (identity and tag operations are handled apart).
PLAIN_FIELDS: tuple[str, ...] = tuple(
    name
    for name in STANDARD_FIELDS
    if name not in ("email", "hashcode", "append_tags", "delete_tags")
)
#: Items ``registration`` may change even when they already have a value.
REGISTRATION_OVERWRITES: frozenset[str] = frozenset({"delivery_permission"})

# No normalisation on purpose: a client that sends " A@x.jp" or full-width
# characters has a bug the sandbox should show.
_LOCAL_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_INTEGER_RE = re.compile(r"^-?\d+$")
_CUSTOM_ID_RE = re.compile(r"^[A-Za-z0-9_]+$")


class SandboxError(Exception):
    """A refusal: HTTP status and JSON ``status`` are both ``status``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def answered_as(self, codes: Mapping[str, int]) -> SandboxError:
        """This refusal with the status ``codes`` (kind -> code, see ANSWER_KINDS) gives it."""
        for kind, default in ANSWER_KINDS.items():
            if self.status == default and kind in codes:
                return SandboxError(codes[kind], self.message, self.headers)
        return self


def bad(name: str, text: str) -> SandboxError:
    return SandboxError(400, f"{name}: {text}")


@dataclass
class CustomerInput:
    """One customer's validated, non-empty items."""

    identity_type: str
    email: str = ""
    hashcode: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    custom: dict[str, str] = field(default_factory=dict)
    append_tags: list[str] = field(default_factory=list)
    delete_tags: list[str] = field(default_factory=list)

    @property
    def identity(self) -> str:
        return self.email if self.identity_type == "email" else self.hashcode


def check_email(name: str, value: str) -> str:
    if not value.isascii():
        raise bad(name, "メールアドレスは半角文字で入力してください (e-mail must be ASCII)")
    if len(value) > EMAIL_MAX_LENGTH:
        raise bad(
            name,
            f"メールアドレスは{EMAIL_MAX_LENGTH}文字以内で入力してください "
            f"(e-mail longer than {EMAIL_MAX_LENGTH} characters)",
        )
    local, at, domain = value.rpartition("@")
    if not at or len(local) > 64 or not _LOCAL_RE.match(local) or not _DOMAIN_RE.match(domain):
        raise bad(name, "メールアドレスの形式が正しくありません (invalid e-mail address)")
    return value


def check_date(name: str, value: str) -> str:
    if _DATE_RE.match(value):
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            pass
        else:
            return value
    raise bad(name, "日付は YYYY-MM-DD 形式で入力してください (date must be YYYY-MM-DD)")


def check_datetime(name: str, value: str, date_format: str = "%Y-%m-%d %H:%M:%S") -> str:
    if date_format != "%Y-%m-%d %H:%M:%S":
        try:
            dt.datetime.strptime(value, date_format)
        except ValueError:
            raise bad(
                name, f"日時の形式が正しくありません (date-time must be {date_format})"
            ) from None
        return value
    if _DATETIME_RE.match(value):
        try:
            dt.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            pass
        else:
            return value
    raise bad(
        name,
        "日時は YYYY-MM-DD HH:MM:SS 形式で入力してください (date-time must be YYYY-MM-DD HH:MM:SS)",
    )


def check_url(name: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise bad(name, "URLの形式が正しくありません (URL must be absolute http(s))")
    return value


def check_text(name: str, value: str) -> str:
    if "\x00" in value:
        raise bad(name, "使用できない文字が含まれています (NUL character)")
    return value


def split_tags(name: str, value: str, separator: str) -> list[str]:
    check_text(name, value)
    tags: list[str] = []
    for tag in value.split(separator):
        tag = tag.strip()
        if tag and tag not in tags:
            tags.append(tag)
    return tags


def check_custom(name: str, identifier: str, value: str, config: SandboxConfig) -> str:
    check_text(name, value)
    if not _CUSTOM_ID_RE.match(identifier):
        raise bad(name, "カスタム項目の識別名が正しくありません (invalid custom field identifier)")
    if config.custom_fields is None:
        return value
    definition = config.custom_fields.get(identifier)
    if definition is None:
        raise bad(name, "存在しないカスタム項目です (unknown custom field)")
    if definition.kind == "integer" and not _INTEGER_RE.match(value):
        raise bad(name, "整数で入力してください (integer expected)")
    if definition.kind == "date":
        check_date(name, value)
    if definition.kind == "select" and definition.choices and value not in definition.choices:
        raise bad(name, "選択肢にない値です (not one of: " + ", ".join(definition.choices) + ")")
    return value


def is_known_item(key: str, config: SandboxConfig | None = None) -> bool:
    if key.startswith(CUSTOM_PREFIX):
        return True
    return key in STANDARD_FIELDS or (config is not None and key in config.extra_items)


def check_extra_item(name: str, key: str, value: str, config: SandboxConfig) -> str:
    item = config.extra_items[key]
    check_text(name, value)
    if item.kind == "integer" and not _INTEGER_RE.match(value):
        raise bad(name, "整数で入力してください (integer expected)")
    if item.kind == "date":
        check_date(name, value)
    if item.max_length is not None and len(value) > item.max_length:
        raise bad(
            name,
            f"{item.max_length}文字以内で入力してください "
            f"(longer than {item.max_length} characters)",
        )
    return value


def check_header_item(name: str, key: str, config: SandboxConfig) -> None:
    """Refuse an unknown item name (used for bulk CSV headers)."""
    if key.startswith(CUSTOM_PREFIX):
        identifier = key[len(CUSTOM_PREFIX) :]
        if not _CUSTOM_ID_RE.match(identifier) or (
            config.custom_fields is not None and identifier not in config.custom_fields
        ):
            raise bad(name, "存在しないカスタム項目です (unknown custom field)")
    elif key not in STANDARD_FIELDS and key not in config.extra_items:
        raise bad(name, "不明な項目です (unknown parameter)")


def parse_customer(
    items: Mapping[str, str],
    identity_type: str,
    config: SandboxConfig,
    *,
    label: Callable[[str], str],
    identity_only: bool = False,
    require_collection_route: bool = False,
) -> CustomerInput:
    """Validate one customer's items; ``label`` turns an item key into its wire name.

    Empty values mean "not given": SATORI never clears a value for them.
    """
    if identity_type not in IDENTITY_TYPES:
        raise bad(
            label("identity_type"),
            "email または hashcode を指定してください (must be email or hashcode)",
        )
    if identity_type == "hashcode" and not config.hashcode_identity:
        raise bad(
            label("identity_type"),
            "hashcode は指定できません (identity_type hashcode is not accepted)",
        )
    data = CustomerInput(identity_type=identity_type)
    for key, value in items.items():
        name = label(key)
        if not is_known_item(key, config):
            raise bad(name, "不明な項目です (unknown parameter)")
        if identity_only and key not in ("email", "hashcode"):
            raise bad(name, "この操作では指定できません (not accepted by this operation)")
        if value == "":
            continue
        if key == "email":
            data.email = check_email(name, value)
        elif key == "hashcode":
            data.hashcode = check_text(name, value)
        elif key == "append_tags":
            data.append_tags = split_tags(name, value, config.tag_separator)
        elif key == "delete_tags":
            data.delete_tags = split_tags(name, value, config.tag_separator)
        elif key.startswith(CUSTOM_PREFIX):
            data.custom[key[len(CUSTOM_PREFIX) :]] = check_custom(
                name, key[len(CUSTOM_PREFIX) :], value, config
            )
        elif key in config.extra_items and key not in STANDARD_FIELDS:
            data.fields[key] = check_extra_item(name, key, value, config)
        elif key == "collection_date":
            data.fields[key] = check_date(name, value)
        elif key == "delivery_permission":
            if value not in DELIVERY_PERMISSIONS:
                raise bad(
                    name, "approval または reject を指定してください (must be approval or reject)"
                )
            data.fields[key] = value
        else:
            data.fields[key] = check_text(name, value)
    if identity_type == "email":
        if not data.email:
            raise bad(label("email"), "必須項目です (required when identity_type is email)")
        if data.hashcode:
            raise bad(
                label("hashcode"),
                "identity_type が email の場合は指定できません "
                "(not accepted when identity_type is email)",
            )
    elif not data.hashcode:
        raise bad(label("hashcode"), "必須項目です (required when identity_type is hashcode)")
    overlap = set(data.append_tags) & set(data.delete_tags)
    if overlap:
        raise bad(
            label("delete_tags"),
            "append_tags と同じタグが指定されています "
            "(same tag in append_tags: " + ", ".join(sorted(overlap)) + ")",
        )
    if require_collection_route and not data.fields.get("collection_route"):
        raise bad(label("collection_route"), "必須項目です (collection_route is required)")
    return data
