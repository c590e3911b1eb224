"""The local mirror of SATORI customers and everything needed to sync it.

Data path: ``Customer.save()`` marks its :class:`SyncState` (the outbox row)
pending in the same transaction -> after commit a task is queued -> the task
claims the row, sends the customer's current data with the client -> SATORI's
answer is written back to the same row and to :class:`SyncLog`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, router, transaction
from django.utils import timezone
from django.utils.translation import gettext, pgettext_lazy
from django.utils.translation import gettext_lazy as _

from .conf import get_settings
from .exceptions import SatoriValidationError
from .schema import (
    EMAIL_MAX_LENGTH,
    check_tags,
    clean_customer,
    normalize_email,
    refuse_unencodable,
)


class SyncStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    SENDING = "sending", _("Sending")
    IN_BULK = "in_bulk", _("In a bulk job")
    SYNCED = "synced", _("Synced")
    DELETED = "deleted", _("Deleted in SATORI")
    FAILED = "failed", _("Failed")
    DRY_RUN = "dry_run", _("Dry run (not sent)")
    NOT_IN_SATORI = "not_in_satori", _("Not in SATORI")
    STOPPED = "stopped", _("Sync stopped")


class Operation(models.TextChoices):
    UPSERT = "upsert", _("Send customer")
    DELETE = "delete", _("Delete customer")
    NONE = "none", _("Nothing to do")


class DeliveryPermission(models.TextChoices):
    APPROVAL = "approval", _("Allowed (approval)")
    REJECT = "reject", _("Refused (reject)")


class Customer(models.Model):
    """A customer as SATORI should see it. Field names follow SATORI's API keys."""

    email = models.CharField(_("e-mail address"), max_length=EMAIL_MAX_LENGTH, unique=True)
    # SATORI's own item names need a context: "last name" or "company" in Django's or
    # the project's catalog (姓, 会社) would otherwise win over ours (苗字, 会社名).
    last_name = models.CharField(
        pgettext_lazy("satori item", "last name"), max_length=255, blank=True
    )
    first_name = models.CharField(
        pgettext_lazy("satori item", "first name"), max_length=255, blank=True
    )
    last_name_reading = models.CharField(
        pgettext_lazy("satori item", "last name (reading)"), max_length=255, blank=True
    )
    first_name_reading = models.CharField(
        pgettext_lazy("satori item", "first name (reading)"), max_length=255, blank=True
    )
    lead_company_name = models.CharField(
        pgettext_lazy("satori item", "company"), max_length=255, blank=True
    )
    department = models.CharField(_("department"), max_length=255, blank=True)
    phone_number = models.CharField(_("phone number"), max_length=64, blank=True)
    mobile_phone_number = models.CharField(_("mobile phone number"), max_length=64, blank=True)
    address = models.CharField(_("address"), max_length=512, blank=True)
    memo = models.TextField(_("memo"), blank=True)
    collection_route = models.CharField(_("collection route"), max_length=255, blank=True)
    collection_date = models.DateField(_("collection date"), null=True, blank=True)
    delivery_permission = models.CharField(
        _("e-mail delivery permission"),
        max_length=16,
        choices=DeliveryPermission.choices,
        blank=True,
    )
    tags = models.JSONField(_("tags"), default=list, blank=True)
    #: ``{"custom:<identifier>": value}`` for SATORI custom fields.
    custom_fields = models.JSONField(_("custom fields"), default=dict, blank=True)

    #: The project object this customer mirrors ("app_label.model" and its pk).
    source_model = models.CharField(_("source model"), max_length=100, blank=True, default="")
    source_pk = models.CharField(_("source object id"), max_length=64, blank=True, default="")

    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    #: The e-mail as loaded from the database, to follow a change in SATORI.
    _loaded_email: str | None = None

    class Meta:
        verbose_name = _("SATORI customer")
        verbose_name_plural = _("SATORI customers")
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["source_model", "source_pk"],
                condition=~models.Q(source_model=""),
                name="django_satori_customer_unique_source",
            )
        ]
        permissions = [
            ("sync_customer", _("Can send customers to SATORI")),
            ("bulk_customer", _("Can start bulk CSV jobs")),
        ]

    def __str__(self) -> str:
        return self.email

    def save(self, *args: Any, **kwargs: Any) -> None:
        self.refuse_invalid()
        # One transaction for the row and its outbox entry (written by the post_save
        # receiver, sync.sources): the intent to sync is committed exactly when the
        # change is, or not at all.
        with transaction.atomic(using=kwargs.get("using") or router.db_for_write(Customer)):
            super().save(*args, **kwargs)

    def refuse_invalid(self) -> None:
        """What ``save()`` refuses, naming the field (:class:`SatoriValidationError`):
        an address SATORI cannot take, tags of the wrong shape, NUL or a lone surrogate.
        Normalises ``email`` and ``tags`` on the way."""
        self.email = normalize_email(self.email)
        self.tags = check_tags(self.tags, get_settings().TAG_SEPARATOR)
        for _model_field, problem in self._unencodable():
            raise problem

    def _unencodable(self) -> Iterator[tuple[str, SatoriValidationError]]:
        return unencodable(
            (field.name, getattr(self, field.attname)) for field in self._meta.concrete_fields
        )

    def clean(self) -> None:
        """Form validation (admin, ModelForms): SATORI's rules, reported on the field."""
        errors: dict[str, list[str]] = {}
        try:
            self.email = normalize_email(self.email)
        except SatoriValidationError as exc:
            errors["email"] = [exc.message]
        try:
            check_tags(self.tags, get_settings().TAG_SEPARATOR)
        except SatoriValidationError as exc:
            errors["tags"] = [exc.message]
        if not isinstance(self.custom_fields, dict):
            errors["custom_fields"] = [
                gettext('Custom fields must be an object such as {"custom:plan": "gold"}.')
            ]
        else:
            try:
                clean_customer(
                    self.custom_fields,
                    custom_fields=get_settings().CUSTOM_FIELDS,
                    require_email=False,
                )
            except SatoriValidationError as exc:
                errors["custom_fields"] = [f"{exc.field}: {exc.message}"]
        for model_field, problem in self._unencodable():
            if model_field == "custom_fields":
                errors["custom_fields"] = [f"{problem.field}: {problem.message}"]
            else:
                errors.setdefault(model_field, [problem.message])
        if errors:
            raise ValidationError(errors)

    @classmethod
    def from_db(cls, *args: Any, **kwargs: Any) -> Customer:  # type: ignore[override]
        instance = super().from_db(*args, **kwargs)
        # Remembered so a changed e-mail can be followed in SATORI (see sync.outbox.record_change).
        instance._loaded_email = instance.__dict__.get("email")
        return instance

    @property
    def hashcode(self) -> str:
        state = getattr(self, "sync_state", None)
        return state.hashcode if state else ""


def refuse_invalid_values(values: dict[str, Any]) -> None:
    """:meth:`Customer.refuse_invalid` for Customer field values not in a model
    instance (a connected object's, checked at its save); normalises ``values``."""
    values["email"] = normalize_email(values["email"])
    if "tags" in values:
        values["tags"] = check_tags(values["tags"], get_settings().TAG_SEPARATOR)
    for _model_field, problem in unencodable(values.items()):
        raise problem


def unencodable(
    values: Iterable[tuple[str, Any]],
) -> Iterator[tuple[str, SatoriValidationError]]:
    """(Customer field, error naming the SATORI key) for values with NUL or a lone surrogate.

    PostgreSQL refuses NUL in text and JSON with a DataError that names no field,
    SQLite stores it and the push fails later; a lone surrogate fails in the driver
    with a bare UnicodeEncodeError: both are refused before, alike.
    """
    for name, value in values:
        if name == "custom_fields" and isinstance(value, dict):
            for key, item in value.items():
                try:
                    refuse_unencodable(str(key), str(key))
                    refuse_unencodable(str(item), str(key))
                except SatoriValidationError as exc:
                    yield name, exc
        elif name == "tags" and isinstance(value, list):
            for tag in value:
                try:
                    refuse_unencodable(str(tag), "append_tags")
                except SatoriValidationError as exc:
                    yield name, exc
                    break
        elif isinstance(value, str):
            try:
                refuse_unencodable(value, name)
            except SatoriValidationError as exc:
                yield name, exc


class SyncState(models.Model):
    """One row per SATORI customer identity (e-mail): the outbox and the sync state.

    A change to a customer marks this row pending (``version`` + 1) in the
    change's own transaction, so the intent can never be lost. It outlives the
    customer so that ``delete.json`` can still be called after a local delete.
    """

    email = models.CharField(_("e-mail address"), max_length=EMAIL_MAX_LENGTH, unique=True)
    customer = models.OneToOneField(
        Customer,
        verbose_name=_("customer"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="sync_state",
    )
    operation = models.CharField(
        _("operation"), max_length=16, choices=Operation.choices, default=Operation.UPSERT
    )
    status = models.CharField(
        _("sync status"),
        max_length=16,
        choices=SyncStatus.choices,
        default=SyncStatus.PENDING,
    )
    version = models.PositiveBigIntegerField(_("version"), default=1)
    synced_version = models.PositiveBigIntegerField(_("synced version"), default=0)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True)
    last_error_at = models.DateTimeField(_("last error at"), null=True, blank=True)
    last_synced_at = models.DateTimeField(_("last synced"), null=True, blank=True)
    #: SHA-256 of the payload SATORI last accepted; unchanged data is not sent again.
    fingerprint = models.CharField(_("fingerprint"), max_length=64, blank=True)
    #: Tags SATORI got from us, so a tag removed locally becomes ``delete_tags``.
    sent_tags = models.JSONField(_("tags sent"), default=list, blank=True)
    hashcode = models.CharField(_("SATORI hashcode"), max_length=128, blank=True)
    #: Known to exist in SATORI (created by us or imported from SATORI's export).
    in_satori = models.BooleanField(_("known in SATORI"), default=False)
    #: A bulk part sent this customer, but it cannot remove tags: SATORI still has
    #: tags Django dropped, which only a single push (``delete_tags``) removes. Such a
    #: row is pending and is never put into another bulk part until that push.
    removal_pending = models.BooleanField(_("tag removal pending"), default=False)
    #: The e-mail SATORI has for this customer when it was changed locally.
    previous_email = models.CharField(_("previous e-mail"), max_length=EMAIL_MAX_LENGTH, blank=True)

    not_before = models.DateTimeField(_("not before"), null=True, blank=True)
    dispatched_at = models.DateTimeField(_("task queued at"), null=True, blank=True)
    lease_until = models.DateTimeField(_("claimed until"), null=True, blank=True)
    lease_token = models.CharField(max_length=32, blank=True)

    bulk_part = models.ForeignKey(
        "BulkPart",
        verbose_name=_("bulk part"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    bulk_version = models.PositiveBigIntegerField(default=0)

    #: Last-known values in SATORI (from an admin CSV export import), wire keys.
    remote_values = models.JSONField(_("values in SATORI"), default=dict, blank=True)
    remote_seen_at = models.DateTimeField(_("seen in SATORI export"), null=True, blank=True)

    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("sync state")
        verbose_name_plural = _("sync states (outbox)")
        ordering = ["-updated_at"]
        # Every save and every claim updates status and not_before, and an UPDATE of an
        # indexed column writes a new entry into every index of the table: keep them
        # few. (status, not_before) serves the status lookups too; plain Index() has
        # no PostgreSQL "_like" twin, which nothing here needs.
        indexes = [
            models.Index(fields=["status", "not_before"], name="django_sato_status_nb"),
            models.Index(fields=["hashcode"], name="django_sato_hashcode"),
        ]

    def __str__(self) -> str:
        return f"{self.email} ({self.get_status_display()})"


class ActionStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    SENDING = "sending", _("Sending")
    SENT = "sent", _("Sent")
    FAILED = "failed", _("Failed")
    DRY_RUN = "dry_run", _("Dry run (not sent)")


class CustomerAction(models.Model):
    """A user-defined action for a customer's timeline; itself an outbox row."""

    email = models.CharField(_("e-mail address"), max_length=EMAIL_MAX_LENGTH, db_index=True)
    customer = models.ForeignKey(
        Customer,
        verbose_name=_("customer"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="actions",
    )
    name = models.CharField(_("action name"), max_length=255)
    content = models.TextField(_("content"), blank=True)
    url = models.URLField(_("URL"), max_length=1000, blank=True)
    occurred_at = models.DateTimeField(_("occurred at"))
    status = models.CharField(
        _("status"),
        max_length=16,
        choices=ActionStatus.choices,
        default=ActionStatus.PENDING,
        db_index=True,
    )
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True)
    not_before = models.DateTimeField(_("not before"), null=True, blank=True)
    dispatched_at = models.DateTimeField(_("task queued at"), null=True, blank=True)
    lease_until = models.DateTimeField(_("claimed until"), null=True, blank=True)
    sent_at = models.DateTimeField(_("sent"), null=True, blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        verbose_name = _("customer action")
        verbose_name_plural = _("customer actions")
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.get_status_display()})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # A lone surrogate in the name or content (text from a JSON body) would
        # fail in the database driver with a UnicodeEncodeError naming nothing.
        for field in ("email", "name", "content", "url"):
            refuse_unencodable(str(getattr(self, field)), field)
        super().save(*args, **kwargs)


class SyncLog(models.Model):
    """One call to SATORI (or one decision not to call): the sync history.

    Request and response summaries never hold the API keys; personal values
    are replaced by their length unless ``REDACT_PERSONAL_DATA`` is False.
    """

    class Outcome(models.TextChoices):
        OK = "ok", _("Succeeded")
        RETRY = "retry", _("Will retry")
        FAILED = "failed", _("Failed")
        SKIPPED = "skipped", _("Not sent")
        DRY_RUN = "dry_run", _("Dry run")

    # Set when the entry is made, not when it is written: a batch writes its entries together.
    created_at = models.DateTimeField(
        _("time"), default=timezone.now, editable=False, db_index=True
    )
    email = models.CharField(
        _("e-mail address"), max_length=EMAIL_MAX_LENGTH, blank=True, db_index=True
    )
    endpoint = models.CharField(_("endpoint"), max_length=100)
    outcome = models.CharField(_("outcome"), max_length=16, choices=Outcome.choices)
    satori_status = models.IntegerField(_("SATORI status"), null=True, blank=True)
    attempt = models.PositiveIntegerField(_("attempt"), default=0)
    duration_ms = models.PositiveIntegerField(_("duration (ms)"), default=0)
    request_summary = models.JSONField(_("request"), default=dict, blank=True)
    response_summary = models.JSONField(_("response"), default=dict, blank=True)
    message = models.TextField(_("message"), blank=True)

    class Meta:
        verbose_name = _("sync log entry")
        verbose_name_plural = _("sync log")
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.get_outcome_display()}"


class BulkMode(models.TextChoices):
    UPSERT = "upsert", _("Upsert (create or update)")
    REGISTRATION = "registration", _("Registration (create, fill blanks)")


class BulkState(models.TextChoices):
    CREATED = "created", _("Created")
    EXPORTING = "exporting", _("Writing CSV")
    UPLOADING = "uploading", _("Uploading")
    PROCESSING = "processing", _("Processing in SATORI")
    FINISHED = "finished", _("Finished")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


class BulkJob(models.Model):
    """A bulk CSV upload of a selection of customers, split into parts of 10,000 rows."""

    mode = models.CharField(_("mode"), max_length=16, choices=BulkMode.choices)
    identity_type = models.CharField(_("identity type"), max_length=16, default="email")
    state = models.CharField(
        _("state"),
        max_length=16,
        choices=BulkState.choices,
        default=BulkState.CREATED,
        db_index=True,
    )
    #: The selection, kept as a pickled ``Query`` of Customer (never a list of pks).
    query = models.BinaryField(null=True, blank=True, editable=False)
    description = models.CharField(_("selection"), max_length=255, blank=True)
    #: Started by the sweep for a backlog of pending customers, not by a person.
    automatic = models.BooleanField(_("automatic"), default=False)
    #: Only write the CSV parts (to check them); nothing is uploaded or claimed.
    dry_run = models.BooleanField(_("dry run"), default=False)
    #: Rows per part; empty means SATORI['BULK_CHUNK_SIZE'].
    chunk_size = models.PositiveIntegerField(_("rows per part"), null=True, blank=True)
    row_count = models.PositiveIntegerField(_("rows"), default=0)
    invalid_count = models.PositiveIntegerField(_("left out (invalid)"), default=0)
    #: Selected but not put in a file: being sent singly, or in another bulk job.
    skipped_count = models.PositiveIntegerField(_("left out (busy)"), default=0)
    succeeded_count = models.PositiveIntegerField(_("succeeded"), default=0)
    failed_count = models.PositiveIntegerField(_("failed"), default=0)
    part_count = models.PositiveIntegerField(_("parts"), default=0)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("started by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    error = models.TextField(_("error"), blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    last_polled_at = models.DateTimeField(_("last status check"), null=True, blank=True)

    class Meta:
        verbose_name = _("bulk job")
        verbose_name_plural = _("bulk jobs")
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"#{self.pk} {self.get_mode_display()} ({self.get_state_display()})"


class BulkPart(models.Model):
    """One SATORI upload (at most 10,000 rows) of a :class:`BulkJob`."""

    job = models.ForeignKey(
        BulkJob, verbose_name=_("job"), on_delete=models.CASCADE, related_name="parts"
    )
    number = models.PositiveIntegerField(_("part"))
    state = models.CharField(
        _("state"),
        max_length=16,
        choices=BulkState.choices,
        default=BulkState.CREATED,
        db_index=True,
    )
    csv_file = models.FileField(
        _("CSV file"), upload_to="django_satori/bulk/", max_length=255, blank=True
    )
    row_count = models.PositiveIntegerField(_("rows"), default=0)
    succeeded_count = models.PositiveIntegerField(_("succeeded"), default=0)
    failed_count = models.PositiveIntegerField(_("failed"), default=0)
    process_code = models.CharField(_("process code"), max_length=128, blank=True)
    upload_attempts = models.PositiveIntegerField(_("upload attempts"), default=0)
    #: Uploads whose answer was lost: SATORI may have the file (SATORI['BULK_RESEND_UNANSWERED']).
    unanswered_uploads = models.PositiveSmallIntegerField(_("unanswered uploads"), default=0)
    #: An upload's answer was lost and BULK_RESEND_UNANSWERED is "never": the part waits
    #: for a person to re-send it or give up (the job's page has both buttons).
    held = models.BooleanField(_("waiting for a decision"), default=False)
    poll_count = models.PositiveIntegerField(_("status checks"), default=0)
    next_poll_at = models.DateTimeField(_("next status check"), null=True, blank=True)
    uploaded_at = models.DateTimeField(_("uploaded"), null=True, blank=True)
    last_polled_at = models.DateTimeField(_("last status check"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    error = models.TextField(_("error"), blank=True)

    class Meta:
        verbose_name = _("bulk part")
        verbose_name_plural = _("bulk parts")
        ordering = ["job", "number"]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="django_satori_part_unique")
        ]

    def __str__(self) -> str:
        return f"{self.job_id}/{self.number}"


class BulkRowError(models.Model):
    """A row SATORI refused, or one left out before upload because it was invalid."""

    job = models.ForeignKey(
        BulkJob, verbose_name=_("job"), on_delete=models.CASCADE, related_name="row_errors"
    )
    part = models.ForeignKey(
        BulkPart,
        verbose_name=_("part"),
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="row_errors",
    )
    #: SATORI's row number (the header is row 1); empty for rows left out locally.
    row_number = models.PositiveIntegerField(_("row"), null=True, blank=True)
    email = models.CharField(_("e-mail address"), max_length=EMAIL_MAX_LENGTH, blank=True)
    customer = models.ForeignKey(
        Customer,
        verbose_name=_("customer"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    field = models.CharField(_("field"), max_length=100, blank=True)
    message = models.TextField(_("message"))
    before_upload = models.BooleanField(_("left out before upload"), default=False)

    class Meta:
        verbose_name = _("bulk row error")
        verbose_name_plural = _("bulk row errors")
        ordering = ["job", "part", "row_number"]

    def __str__(self) -> str:
        return f"{self.email}: {self.message}"


class ImportRunStatus(models.TextChoices):
    RUNNING = "running", _("Running")
    FINISHED = "finished", _("Finished")
    FAILED = "failed", _("Failed")


class ImportRun(models.Model):
    """One import of SATORI's admin customer CSV export, and what it did.

    Only real imports are kept; a dry run writes nothing, not even this row.
    """

    #: How many skipped rows are kept on the run; the command prints all of them.
    MAX_STORED_SKIPS = 1000

    filename = models.CharField(_("file"), max_length=255, blank=True)
    encoding = models.CharField(_("encoding"), max_length=16, blank=True)
    status = models.CharField(
        _("status"), max_length=16, choices=ImportRunStatus.choices, default=ImportRunStatus.RUNNING
    )
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("started by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    #: Also the ``remote_seen_at`` written for every row of this run.
    started_at = models.DateTimeField(_("started"))
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)
    rows = models.PositiveIntegerField(_("rows read"), default=0)
    created_count = models.PositiveIntegerField(_("customers created"), default=0)
    linked_count = models.PositiveIntegerField(_("customers linked"), default=0)
    refreshed_count = models.PositiveIntegerField(_("customers refreshed"), default=0)
    skipped_count = models.PositiveIntegerField(_("rows skipped"), default=0)
    #: Header names that were not understood (ignored), and undeclared custom fields.
    unknown_columns = models.JSONField(_("ignored columns"), default=list, blank=True)
    #: ``[{"line": 12, "email": "...", "reason": "..."}]``, the first MAX_STORED_SKIPS.
    skipped_rows = models.JSONField(_("skipped rows"), default=list, blank=True)
    message = models.TextField(_("message"), blank=True)

    class Meta:
        verbose_name = _("SATORI export import")
        verbose_name_plural = _("SATORI export imports")
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"#{self.pk} {self.filename} ({self.get_status_display()})"


class ImportedCustomer(models.Model):
    """A local customer that exists only because an import created it from SATORI's export.

    Such a customer, while no project object is connected to it, is what the
    reconciliation report calls "only in SATORI".
    """

    customer = models.OneToOneField(
        Customer,
        verbose_name=_("customer"),
        primary_key=True,
        on_delete=models.CASCADE,
        related_name="satori_import",
    )
    run = models.ForeignKey(
        ImportRun,
        verbose_name=_("import"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="created_customers",
    )

    class Meta:
        verbose_name = _("customer created by an import")
        verbose_name_plural = _("customers created by an import")

    def __str__(self) -> str:
        return str(self.customer_id)


class Diagnosis(models.Model):
    """The last run of ``satori_doctor`` (command or admin page); older runs are deleted.

    ``checks`` holds each check's outcome with its texts as message ids and
    parameters, so the admin shows them in the reader's language.
    """

    created_at = models.DateTimeField(_("run at"), default=timezone.now)
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        verbose_name=_("run by"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    #: "command" or "admin".
    source = models.CharField(_("run from"), max_length=16, blank=True)
    ok = models.BooleanField(_("everything sync needs works"), default=False)
    live = models.BooleanField(_("live probe"), default=False)
    write_test = models.BooleanField(_("write test"), default=False)
    #: ``[{"id", "level", "message": {"msgid", "params"}, "fix": ..., "details": {...}}]``
    checks = models.JSONField(_("checks"), default=list, blank=True)
    #: Settings that differ from what was observed: ``{"SETTING": value}``.
    suggested = models.JSONField(_("suggested settings"), default=dict, blank=True)

    class Meta:
        verbose_name = _("SATORI connection diagnosis")
        verbose_name_plural = _("SATORI connection diagnoses")
        ordering = ["-id"]
        default_permissions = ()
        permissions = [("run_diagnosis", _("Can run the SATORI connection diagnosis"))]

    def __str__(self) -> str:
        return f"#{self.pk} {self.created_at:%Y-%m-%d %H:%M}"


class SourceChange(models.Model):
    """A save of a connected object (``SATORI['MAPPINGS']``) that its mirror has not taken yet.

    The save writes only this row (one INSERT, in the save's transaction); a
    worker builds the mirrored :class:`Customer` from the object as it is then,
    and deletes the rows it covered. A row with an ``error`` could not be taken
    (say, another object already uses the address): it stays until the object
    is saved again or an operator retries it from the admin.
    """

    source_model = models.CharField(_("source model"), max_length=100)
    source_pk = models.CharField(_("source object id"), max_length=64)
    #: The address the save gave (an action for it waits until the mirror is built).
    email = models.CharField(
        _("e-mail address"), max_length=EMAIL_MAX_LENGTH, blank=True, default=""
    )
    created_at = models.DateTimeField(_("saved at"), default=timezone.now)
    #: Set by the sweep when it queues a change whose message was lost.
    dispatched_at = models.DateTimeField(_("queued again at"), null=True, blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    error = models.TextField(_("error"), blank=True, default="")

    class Meta:
        verbose_name = _("connected object change")
        verbose_name_plural = _("connected object changes")
        ordering = ["id"]
        indexes = [
            models.Index(fields=["source_model", "source_pk"], name="django_satori_change_source")
        ]
        default_permissions = ("view", "change", "delete")

    def __str__(self) -> str:
        return f"{self.source_model} {self.source_pk}"
