"""Everything the sandbox remembers, behind one lock.

Customers are keyed by lower-cased e-mail (the sandbox matches case
insensitively but stores what was sent). Every request to a SATORI endpoint
is recorded with its raw bytes so tests can assert on what a client sent; the
JSON and HTML views go through :func:`redact_request`, never the raw record.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from .config import AUTH_FIELDS, REDACTED, SandboxConfig
from .rules import PLAIN_FIELDS, REGISTRATION_OVERWRITES, CustomerInput, SandboxError, bad

#: Requests kept for inspection; older ones are dropped so a long demo stays small.
MAX_RECORDED_REQUESTS = 5000


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


@dataclass
class Action:
    name: str
    content: str = ""
    url: str = ""
    date: str = ""
    created_by: str = ""
    received_at: float = field(default_factory=time.time)


@dataclass
class Customer:
    email: str
    hashcode: str
    fields: dict[str, str] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    custom: dict[str, str] = field(default_factory=dict)
    created_by: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    actions: list[Action] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<Customer {self.email} {self.hashcode}>"

    def as_dict(self, redact_owner: Callable[[str], str] = str) -> dict[str, Any]:
        return {
            "email": self.email,
            "hashcode": self.hashcode,
            "fields": dict(self.fields),
            "tags": sorted(self.tags),
            "custom": dict(self.custom),
            "created_by": redact_owner(self.created_by),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "actions": [
                {
                    "name": a.name,
                    "content": a.content,
                    "url": a.url,
                    "date": a.date,
                    "created_by": redact_owner(a.created_by),
                    "received_at": _iso(a.received_at),
                }
                for a in self.actions
            ],
        }


@dataclass
class BulkJob:
    process_code: str
    operation: str  # "registration" or "upsert"
    identity_type: str
    header: list[str]
    rows: list[tuple[int, list[str]]]  # (row_number counting the header as 1, cells)
    created_by: str
    config: SandboxConfig  # the rules in force when the file was accepted
    submitted_at: float
    ready_at: float
    finished_at: float | None = None
    succeeded_rows: list[dict[str, Any]] = field(default_factory=list)
    failed_rows: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<BulkJob {self.process_code} {self.operation} {self.process_status}>"

    @property
    def process_status(self) -> str:
        return "processing" if self.finished_at is None else "finished"

    def result(self) -> dict[str, Any]:
        return {
            "process_code": self.process_code,
            "process_status": self.process_status,
            "succeeded_rows": list(self.succeeded_rows),
            "failed_rows": list(self.failed_rows),
        }


@dataclass(repr=False)
class RecordedFile:
    name: str
    filename: str | None
    content_type: str
    content: bytes


@dataclass(repr=False)
class RecordedRequest:
    """One request as received. Raw: holds the keys that were sent; never display it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: list[tuple[str, str]]
    body: bytes
    form: list[tuple[str, str]] = field(default_factory=list)
    files: list[RecordedFile] = field(default_factory=list)
    operation: str | None = None
    received_at: float = field(default_factory=time.time)
    status: int | None = None  # HTTP status answered; None when the connection was dropped
    fault: str | None = None

    def __repr__(self) -> str:
        return f"<RecordedRequest {self.method} {self.path} -> {self.status}>"

    def form_dict(self) -> dict[str, str]:
        return dict(self.form)


def redact_request(request: RecordedRequest, configured: Iterable[str]) -> dict[str, Any]:
    """A display copy: auth fields show ``********``; any key value is scrubbed from text.

    Keys sent by the client are scrubbed too, even wrong ones: a developer may
    have pointed real keys at the sandbox by mistake.
    """
    secret_values = {v for v in configured if v}
    secret_values |= {v for k, v in (*request.form, *request.query) if k in AUTH_FIELDS and v}

    def scrub(text: str) -> str:
        for value in sorted(secret_values, key=len, reverse=True):
            for form in {value, quote_plus(value), quote(value, safe="")}:
                text = text.replace(form, REDACTED)
        return text

    def pairs(items: list[tuple[str, str]]) -> list[list[str]]:
        return [[k, REDACTED if k in AUTH_FIELDS else scrub(v)] for k, v in items]

    return {
        "method": request.method,
        "path": request.path,
        "operation": request.operation,
        "query": pairs(request.query),
        "headers": [[k, scrub(v)] for k, v in request.headers],
        "body": scrub(request.body.decode("utf-8", "replace")),
        "form": pairs(request.form),
        "files": [
            {
                "name": f.name,
                "filename": f.filename,
                "content_type": f.content_type,
                "size": len(f.content),
                "content": scrub(f.content.decode("utf-8", "replace")),
            }
            for f in request.files
        ],
        "received_at": _iso(request.received_at),
        "status": request.status,
        "fault": request.fault,
    }


class SandboxState:
    """Customers, bulk jobs, recorded requests and fault counters."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.customers: dict[str, Customer] = {}
        self.jobs: dict[str, BulkJob] = {}
        self.requests: list[RecordedRequest] = []
        self.faults_injected = 0
        self.faults_by_kind: dict[str, int] = {}
        self._hash_index: dict[str, str] = {}
        #: Set from the config by the server: addresses differing in case are two customers.
        self.email_case_sensitive = False

    def key(self, email: str) -> str:
        """Where a customer with this address is kept (SATORI's case rule is unknown)."""
        return email if self.email_case_sensitive else email.lower()

    def reset(self) -> None:
        with self.lock:
            self.customers.clear()
            self.jobs.clear()
            self.requests.clear()
            self.faults_injected = 0
            self.faults_by_kind.clear()
            self._hash_index = {}

    # -- lookups ---------------------------------------------------------------

    def customer(self, email: str) -> Customer | None:
        """The customer with this e-mail (any case unless case-sensitive), or None."""
        with self.lock:
            return self.customers.get(self.key(email))

    def by_hashcode(self, hashcode: str) -> Customer | None:
        with self.lock:
            # A cache, checked on every hit and rebuilt on a miss, because tests
            # may edit ``customers`` directly.
            key = self._hash_index.get(hashcode)
            found = self.customers.get(key) if key is not None else None
            if found is not None and found.hashcode == hashcode:
                return found
            self._hash_index = {c.hashcode: k for k, c in self.customers.items()}
            key = self._hash_index.get(hashcode)
            return self.customers.get(key) if key is not None else None

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.operation == operation]

    def _find(self, data: CustomerInput, label: Callable[[str], str]) -> Customer | None:
        if data.identity_type == "email":
            return self.customers.get(self.key(data.email))
        found = self.by_hashcode(data.hashcode)
        if found is None:
            raise _not_found(label("hashcode"))
        return found

    # -- writes ----------------------------------------------------------------

    def record(self, request: RecordedRequest) -> None:
        with self.lock:
            self.requests.append(request)
            del self.requests[:-MAX_RECORDED_REQUESTS]

    def count_fault(self, kind: str) -> None:
        with self.lock:
            self.faults_injected += 1
            self.faults_by_kind[kind] = self.faults_by_kind.get(kind, 0) + 1

    def seed_customer(
        self,
        email: str,
        *,
        created_by: str = "another-user",
        hashcode: str | None = None,
        tags: Iterable[str] = (),
        custom: Mapping[str, str] | None = None,
        **fields: str,
    ) -> Customer:
        """Add a customer directly, by default as if another SATORI user created it."""
        unknown = set(fields) - set(PLAIN_FIELDS)
        if unknown:
            raise ValueError(f"unknown customer field(s): {', '.join(sorted(unknown))}")
        with self.lock:
            if self.key(email) in self.customers:
                raise ValueError("a customer with this e-mail already exists")
            customer = Customer(
                email=email,
                hashcode=hashcode or new_hashcode(),
                fields={k: v for k, v in fields.items() if v},
                tags=set(tags),
                custom=dict(custom or {}),
                created_by=created_by,
            )
            self.customers[self.key(email)] = customer
            return customer

    def write_customer(
        self,
        operation: str,
        data: CustomerInput,
        user_key: str,
        config: SandboxConfig,
        *,
        label: Callable[[str], str],
    ) -> Customer:
        """Apply ``registration`` or ``upsert``; every check happens before any change."""
        with self.lock:
            existing = self._find(data, label)
            now = time.time()
            if existing is None:
                check_allowed(config, "create")
                customer = Customer(
                    email=data.email,
                    hashcode=new_hashcode(),
                    fields=dict(data.fields),
                    tags=set(data.append_tags),
                    custom=dict(data.custom),
                    created_by=user_key,
                    created_at=now,
                    updated_at=now,
                )
                self.customers[self.key(data.email)] = customer
                return customer
            _check_owner(config, existing, user_key, label(data.identity_type))
            check_allowed(config, "edit")
            overwrite = operation == "upsert"
            new_email = existing.email
            if overwrite and data.email and self.key(data.email) != self.key(existing.email):
                other = self.customers.get(self.key(data.email))
                if other is not None and other is not existing:
                    raise bad(
                        label("email"),
                        "このメールアドレスは既に登録されています "
                        "(e-mail already used by another customer)",
                    )
                new_email = data.email
            # Checks are done: from here on the customer changes.
            for key, value in data.fields.items():
                if overwrite or key in REGISTRATION_OVERWRITES or not existing.fields.get(key):
                    existing.fields[key] = value
            for key, value in data.custom.items():
                if overwrite or not existing.custom.get(key):
                    existing.custom[key] = value
            existing.tags.update(data.append_tags)
            if overwrite:
                # registration "can only add tags" (SATORI's v3 rule, assumed for v4)
                existing.tags.difference_update(data.delete_tags)
            if new_email != existing.email:
                del self.customers[self.key(existing.email)]
                existing.email = new_email
                self.customers[self.key(new_email)] = existing
            existing.updated_at = now
            return existing

    def delete_customer(
        self,
        data: CustomerInput,
        user_key: str,
        config: SandboxConfig,
        *,
        label: Callable[[str], str],
    ) -> Customer:
        with self.lock:
            existing = self._find(data, label)
            if existing is None:
                raise _not_found(label(data.identity_type))
            _check_owner(config, existing, user_key, label(data.identity_type))
            del self.customers[self.key(existing.email)]
            return existing

    def add_action(
        self,
        data: CustomerInput,
        action: Action,
        config: SandboxConfig,
        *,
        label: Callable[[str], str],
    ) -> Customer:
        with self.lock:
            existing = self._find(data, label)
            if existing is None:
                raise _not_found(label(data.identity_type))
            _check_owner(config, existing, action.created_by, label(data.identity_type))
            existing.actions.append(action)
            return existing

    # -- bulk jobs -------------------------------------------------------------

    def add_job(self, job: BulkJob) -> None:
        with self.lock:
            self.jobs[job.process_code] = job

    def finish_due_jobs(self, now: float | None = None, *, force: bool = False) -> int:
        """Apply the rows of every job whose processing time is over, oldest first."""
        from .bulk import apply_job  # bulk imports this module

        now = time.time() if now is None else now
        done = 0
        with self.lock:
            for job in sorted(self.jobs.values(), key=lambda j: j.submitted_at):
                if job.finished_at is None and (force or job.ready_at <= now):
                    apply_job(self, job)
                    job.finished_at = now
                    done += 1
        return done

    def get_job(self, process_code: str, ttl: float, now: float | None = None) -> BulkJob | None:
        """The job, or None if unknown or expired (``ttl`` seconds after finishing)."""
        now = time.time() if now is None else now
        with self.lock:
            self.finish_due_jobs(now)
            job = self.jobs.get(process_code)
            if job is not None and job.finished_at is not None and job.finished_at + ttl <= now:
                del self.jobs[process_code]
                return None
            return job

    def forget_process_codes(self) -> int:
        """Simulate a SATORI restart: finish running work, then lose every process code."""
        with self.lock:
            self.finish_due_jobs(force=True)
            count = len(self.jobs)
            self.jobs.clear()
            return count

    # -- views -----------------------------------------------------------------

    def snapshot(self, secrets_: Collection[str], *, requests: int | None = None) -> dict[str, Any]:
        """A JSON-able, redacted view (``secrets_``: the configured key values)."""

        def owner(value: str) -> str:
            return REDACTED if value in secrets_ else value

        with self.lock:
            recorded = self.requests if requests is None else self.requests[-requests:]
            return {
                "customers": [c.as_dict(owner) for c in self.customers.values()],
                "jobs": [
                    {
                        **job.result(),
                        "operation": job.operation,
                        "identity_type": job.identity_type,
                        "rows": len(job.rows),
                        "created_by": owner(job.created_by),
                        "submitted_at": _iso(job.submitted_at),
                        "finished_at": _iso(job.finished_at),
                    }
                    for job in self.jobs.values()
                ],
                "requests": [redact_request(r, secrets_) for r in recorded],
                "faults_injected": self.faults_injected,
                "faults_by_kind": dict(self.faults_by_kind),
            }


def new_hashcode() -> str:
    return secrets.token_hex(16)


def _not_found(name: str) -> SandboxError:
    return SandboxError(404, f"{name}: カスタマーが見つかりません (customer not found)")


def check_allowed(config: SandboxConfig, operation: str) -> None:
    if operation in config.deny_operations:
        raise SandboxError(
            403, f"{operation}: この操作を行う権限がありません (permission denied for {operation})"
        )


def _check_owner(config: SandboxConfig, customer: Customer, user_key: str, name: str) -> None:
    if config.own_only and customer.created_by != user_key:
        raise SandboxError(
            403,
            f"{name}: 他のユーザーが登録したカスタマーは操作できません "
            '(permission rule "own records only": created by another user or API key)',
        )
