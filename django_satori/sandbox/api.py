"""The SATORI endpoints: from parsed parameters to the JSON answer.

Order of checks for every endpoint: duplicate parameters, the four keys (401,
never echoing a value), the operation's permission (403), unknown parameters
and values (400), then the customer or job (404).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from django_satori.schema import IDENTITY_TYPES

from .bulk import FILE_FIELD, new_job, parse_csv
from .config import AUTH_FIELDS, SandboxConfig
from .forms import MULTIPART
from .rules import SandboxError, bad, check_datetime, check_text, check_url, parse_customer
from .state import Action, RecordedFile, SandboxState, check_allowed

SINGLE_PREFIX = "/api/v4/public/customer/"
BULK_PREFIX = "/api/v4/public/bulk_customers/"
#: (method, path) of the fixed endpoints; the action path comes from the config.
ROUTES: dict[str, tuple[str, str]] = {
    SINGLE_PREFIX + "registration.json": ("POST", "registration"),
    SINGLE_PREFIX + "upsert.json": ("POST", "upsert"),
    SINGLE_PREFIX + "delete.json": ("POST", "delete"),
    BULK_PREFIX + "registration.json": ("POST", "bulk_registration"),
    BULK_PREFIX + "upsert.json": ("POST", "bulk_upsert"),
    BULK_PREFIX + "status.json": ("GET", "bulk_status"),
}
_INNER_RE = re.compile(r"^customer\[([^\[\]]+)\]$")


@dataclass
class ApiRequest:
    operation: str
    params: list[tuple[str, str]]  # the form for POST, the query for GET
    media_type: str = ""
    files: list[RecordedFile] = field(default_factory=list)


def route(method: str, path: str, config: SandboxConfig) -> str:
    """The operation for this request, or a 404/405 SandboxError."""
    expected = ROUTES.get(path)
    if expected is None and path == config.action_path:
        expected = ("POST", "action")
    if expected is None:
        raise SandboxError(404, f"{path}: 存在しないURLです (no such endpoint)")
    if method != expected[0]:
        raise SandboxError(
            405,
            f"{path}: {expected[0]} で送信してください (method {method} not allowed)",
            headers={"Allow": expected[0]},
        )
    return expected[1]


def envelope(kind: str, status: int, message: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Wrap a bulk payload the way SATORI's examples disagree about (see the config)."""
    if kind == "message":
        return {"status": status, "message": dict(payload)}
    if kind == "top":
        return {"status": status, "message": message, **payload}
    return {"status": status, "message": message, "body": dict(payload)}


def _wrap(key: str) -> str:
    return f"customer[{key}]"


def _unique(pairs: list[tuple[str, str]]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise bad(name, "パラメータが重複しています (duplicate parameter)")
        params[name] = value
    return params


def _authenticate(params: Mapping[str, str], config: SandboxConfig) -> str:
    if not config.keys.matches(params):
        raise SandboxError(
            401,
            "認証に失敗しました。user_key, user_secret, company_key, "
            "company_secret を確認してください (authentication failed)",
        )
    return params["user_key"]


def handle(request: ApiRequest, config: SandboxConfig, state: SandboxState) -> dict[str, Any]:
    """Answer one SATORI request (raises SandboxError for refusals). HTTP status is 200."""
    params = _unique(request.params)
    user_key = _authenticate(params, config)
    check_allowed(config, request.operation)
    rest = {k: v for k, v in params.items() if k not in AUTH_FIELDS}
    if request.operation in ("registration", "upsert", "delete"):
        return _single(request.operation, rest, user_key, config, state)
    if request.operation == "action":
        return _action(rest, user_key, config, state)
    if request.operation == "bulk_status":
        return _status(rest, config, state)
    return _bulk(request, rest, user_key, config, state)


def _customer_items(
    rest: Mapping[str, str], allowed: Mapping[str, str] | None = None
) -> tuple[str, dict[str, str], dict[str, str]]:
    """Split parameters into identity_type, ``customer[...]`` items and ``allowed`` extras."""
    identity_type = ""
    items: dict[str, str] = {}
    extras: dict[str, str] = {}
    for name, value in rest.items():
        if allowed and name in allowed:
            extras[allowed[name]] = value
            continue
        match = _INNER_RE.match(name)
        if match is None:
            raise bad(name, "不明なパラメータです (unknown parameter)")
        if match.group(1) == "identity_type":
            identity_type = value
        else:
            items[match.group(1)] = value
    if not identity_type:
        raise bad("customer[identity_type]", "必須項目です (required)")
    return identity_type, items, extras


def _single(
    operation: str,
    rest: Mapping[str, str],
    user_key: str,
    config: SandboxConfig,
    state: SandboxState,
) -> dict[str, Any]:
    identity_type, items, _ = _customer_items(rest)
    data = parse_customer(
        items, identity_type, config, label=_wrap, identity_only=operation == "delete"
    )
    if operation == "delete":
        customer = state.delete_customer(data, user_key, config, label=_wrap)
    else:
        customer = state.write_customer(operation, data, user_key, config, label=_wrap)
    return {"status": 200, "message": {"customer[hashcode]": customer.hashcode}}


def _action(
    rest: Mapping[str, str], user_key: str, config: SandboxConfig, state: SandboxState
) -> dict[str, Any]:
    wires = dict(config.action_params)
    names = {w: n for n, w in wires.items()}
    ids = dict(config.action_identity_params)
    identity_names = {w: n for n, w in ids.items()}
    required = dict(config.action_required_params)
    identity_type = ""
    items: dict[str, str] = {}
    values: dict[str, str] = {}
    for name, value in rest.items():
        if identity_names.get(name) == "identity_type":
            identity_type = value
        elif name in identity_names:
            items[identity_names[name]] = value
        elif name in names and not (names[name] == "date" and config.action_refuse_date):
            values[names[name]] = value
        elif name in required:
            if value != required[name]:
                raise bad(name, f"値が正しくありません (expected {required[name]!r})")
        else:
            raise bad(name, "不明なパラメータです (unknown parameter)")
    if not identity_type:
        raise bad(ids["identity_type"], "必須項目です (required)")
    for name in required:
        if name not in rest:
            raise bad(name, "必須項目です (required)")

    def label(key: str) -> str:
        return ids.get(key, _wrap(key))

    data = parse_customer(items, identity_type, config, label=label, identity_only=True)
    if not values.get("name"):
        raise bad(wires["name"], "必須項目です (required)")
    action = Action(
        name=check_text(wires["name"], values["name"]),
        content=check_text(wires["content"], values.get("content", "")),
        url=check_url(wires["url"], values["url"]) if values.get("url") else "",
        date=check_datetime(wires["date"], values["date"], config.action_date_format)
        if values.get("date")
        else "",
        created_by=user_key,
    )
    customer = state.add_action(data, action, config, label=label)
    return {"status": 200, "message": {"customer[hashcode]": customer.hashcode}}


def _bulk(
    request: ApiRequest,
    rest: Mapping[str, str],
    user_key: str,
    config: SandboxConfig,
    state: SandboxState,
) -> dict[str, Any]:
    if request.media_type != MULTIPART:
        raise SandboxError(
            400, f"{MULTIPART} で送信してください (the bulk API needs a {MULTIPART} upload)"
        )
    for name in rest:
        if name == FILE_FIELD:
            raise bad(name, "ファイルとして送信してください (must be a file part with a filename)")
        if name != "identity_type":
            raise bad(name, "不明なパラメータです (unknown parameter)")
    identity_type = rest.get("identity_type", "")
    if identity_type not in IDENTITY_TYPES:
        raise bad(
            "identity_type",
            "email または hashcode を指定してください (required: email or hashcode)",
        )
    uploads = [f for f in request.files if f.name == FILE_FIELD]
    for upload in request.files:
        if upload.name != FILE_FIELD:
            raise bad(upload.name, "不明なファイルです (unknown file field)")
    if len(uploads) != 1:
        raise bad(FILE_FIELD, "ファイルを1つ指定してください (exactly one file is required)")
    header, rows = parse_csv(uploads[0].content, identity_type, config)
    operation = request.operation.removeprefix("bulk_")
    job = new_job(
        operation, identity_type, header, rows, user_key, config, process_code=secrets.token_hex(12)
    )
    state.add_job(job)
    if config.bulk_processing_seconds == 0:
        state.finish_due_jobs()
    return envelope(config.envelope, 202, "Accepted", {"process_code": job.process_code})


def _status(rest: Mapping[str, str], config: SandboxConfig, state: SandboxState) -> dict[str, Any]:
    for name in rest:
        if name != "process_code":
            raise bad(name, "不明なパラメータです (unknown parameter)")
    code = rest.get("process_code", "")
    if not code:
        raise bad("process_code", "必須項目です (required)")
    job = state.get_job(code, config.process_code_ttl)
    if job is None:
        raise SandboxError(
            404, "process_code: 処理が見つかりません (unknown or expired process code)"
        )
    return envelope(config.envelope, 200, "OK", job.result())
