"""Where bulk CSV files live, what they are called, who may read them, when they go.

A part's CSV holds every uploaded customer's personal data, so:

* it is written to a storage of its own (``SATORI['BULK_STORAGE']``), by
  default a :class:`PrivateFileSystemStorage` under ``SATORI['BULK_FILES_DIR']``
  that no URL points to (never ``MEDIA_ROOT``, which projects usually serve);
* its name carries a random token, so a leaked or guessed URL pattern
  (``job-1-part-1.csv``) does not lead to it even where the storage is public;
* people read it only through the admin (:func:`people_csv`, with cells that a
  spreadsheet would run as formulas neutralised); the file SATORI gets is
  never altered;
* it is deleted ``BULK_FILE_RETENTION_DAYS`` after its job ended
  (:func:`delete_expired`, run by the cleanup task and ``satori_cleanup``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.core.files import File
from django.core.files.storage import FileSystemStorage, Storage, storages
from django.db.models import Q
from django.utils import timezone

from .conf import SatoriSettings, get_settings
from .models import BulkPart, BulkState

log = logging.getLogger("django_satori.bulk")

#: The storage alias used unless ``STORAGES`` defines it: the private directory.
PRIVATE_ALIAS = "django_satori_bulk"
#: Folder of the part files inside the storage.
FOLDER = "django_satori/bulk"
#: Name of the default private directory, next to ``MEDIA_ROOT`` (never inside it).
DEFAULT_DIR_NAME = "django_satori_private"
#: Bytes of randomness in a file name: 144 bits, like a session key or better.
TOKEN_BYTES = 18
#: A part's file is kept while its job or the part itself may still read it.
_LIVE_PART_STATES = (BulkState.EXPORTING, BulkState.UPLOADING, BulkState.PROCESSING)
_ENDED_JOB_STATES = (BulkState.FINISHED, BulkState.FAILED, BulkState.CANCELLED)
#: A spreadsheet runs a cell starting with one of these as a formula (CSV injection).
#: The full-width forms are what a Japanese input method types; treated alike.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "＝", "＋", "－", "＠")
#: Bytes handed to the response at a time when streaming a download.
STREAM_CHUNK = 64 * 1024


class PrivateFileSystemStorage(FileSystemStorage):
    """A directory that no URL serves: ``url()`` refuses instead of pointing at MEDIA_URL.

    ``FileSystemStorage(base_url=None)`` still falls back to ``MEDIA_URL``, so a
    template calling ``.url`` would print a public-looking link; this one cannot.
    """

    @property
    def base_url(self) -> None:  # type: ignore[override]
        return None

    def url(self, name: str | None) -> str:
        raise ValueError("Bulk CSV files have no URL; they are downloaded through the admin.")


def private_dir(conf: SatoriSettings | None = None) -> str:
    """The default storage's directory: ``BULK_FILES_DIR``, else ``django_satori_private``
    next to ``MEDIA_ROOT`` (never inside it), else in ``BASE_DIR`` (as startproject sets it).
    """
    conf = conf or get_settings()
    if conf.BULK_FILES_DIR:
        return os.path.abspath(os.fspath(conf.BULK_FILES_DIR))
    media_root = os.fspath(getattr(django_settings, "MEDIA_ROOT", "") or "")
    if media_root:
        parent = os.path.dirname(os.path.abspath(media_root.rstrip("/\\")))
        return os.path.join(parent, DEFAULT_DIR_NAME)
    base_dir = getattr(django_settings, "BASE_DIR", None)
    if isinstance(base_dir, (str, os.PathLike)) and os.fspath(base_dir):
        return os.path.join(os.path.abspath(os.fspath(base_dir)), DEFAULT_DIR_NAME)
    # Relative to the working directory, web and worker could write to different places.
    raise ImproperlyConfigured(
        "Set SATORI['BULK_FILES_DIR'] (or MEDIA_ROOT): bulk CSV files need a private "
        "directory shared by the web process and the workers."
    )


def bulk_storage(conf: SatoriSettings | None = None) -> Storage:
    """The storage bulk files are written to and read from."""
    conf = conf or get_settings()
    alias = conf.BULK_STORAGE
    if alias == PRIVATE_ALIAS and alias not in storages.backends:
        # Group-readable so a web process in the workers' group can serve the admin download.
        return PrivateFileSystemStorage(
            location=private_dir(conf),
            file_permissions_mode=0o640,
            directory_permissions_mode=0o750,
        )
    return storages[alias]


def new_part_name(job_id: int, number: int) -> str:
    """A part's file name: job and part for people, a random token against guessing."""
    return f"{FOLDER}/job-{job_id}-part-{number}-{secrets.token_urlsafe(TOKEN_BYTES)}.csv"


def save_part(conf: SatoriSettings, job_id: int, number: int, content: File) -> str:
    """Store a finished part; returns the name to keep in ``BulkPart.csv_file``."""
    return bulk_storage(conf).save(new_part_name(job_id, number), content)


def delete_files(names: Iterable[str], conf: SatoriSettings | None = None) -> int:
    """Delete these files from the bulk storage; returns how many were deleted."""
    storage = bulk_storage(conf)
    deleted = 0
    for name in names:
        if not name:
            continue
        try:
            storage.delete(name)
        except OSError:
            log.warning("Could not delete the bulk file of a part.", exc_info=True)
            continue
        deleted += 1
    return deleted


# --------------------------------------------------------------------------
# The download for people
# --------------------------------------------------------------------------


def neutralise(cell: str) -> str:
    """``cell`` as text a spreadsheet shows instead of running (OWASP's CSV injection advice)."""
    return "'" + cell if cell.startswith(FORMULA_PREFIXES) else cell


def people_csv(name: str, conf: SatoriSettings | None = None) -> Iterator[bytes]:
    """Stream a stored part as CSV for a spreadsheet: formula-like cells neutralised.

    UTF-8 with a BOM, which Excel needs to read Japanese text; CRLF line ends.
    Opens the file at once, so a missing file raises ``OSError`` before any byte
    is sent; the file is closed when the stream ends or is abandoned.
    """
    fileobj = bulk_storage(conf).open(name, "rb")
    return _people_rows(fileobj)


def _people_rows(fileobj: Any) -> Iterator[bytes]:
    try:
        reader = csv.reader(io.TextIOWrapper(fileobj, encoding="utf-8", newline=""))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        yield b"\xef\xbb\xbf"
        for cells in reader:
            writer.writerow([neutralise(cell) for cell in cells])
            if out.tell() >= STREAM_CHUNK:
                yield out.getvalue().encode("utf-8")
                out.seek(0)
                out.truncate()
        if out.tell():
            yield out.getvalue().encode("utf-8")
    finally:
        fileobj.close()


# --------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FileCleanup:
    #: Parts whose file was deleted (their ``csv_file`` is now empty).
    parts: int
    #: Files no part refers to any more (a job deleted outside the admin, an interrupted export).
    orphans: int


def expired_parts(cutoff: dt.datetime) -> Any:
    """Parts with a file whose job ended before ``cutoff``.

    A job's ``finished_at`` is set only once none of its parts runs any more (a
    cancelled job waits for its uploaded parts), and a part still running is
    left out as well: SATORI's results are matched against its file.
    """
    return (
        BulkPart.objects.filter(
            job__state__in=_ENDED_JOB_STATES,
            job__finished_at__isnull=False,
            job__finished_at__lt=cutoff,
        )
        .exclude(csv_file="")
        .exclude(state__in=_LIVE_PART_STATES)
    )


def delete_expired(
    days: float | None = None,
    *,
    now: dt.datetime | None = None,
    conf: SatoriSettings | None = None,
    dry_run: bool = False,
) -> FileCleanup:
    """Delete the files of jobs that ended more than ``days`` ago (default: the setting).

    With the retention setting None and no ``days``, nothing is deleted.
    """
    conf = conf or get_settings()
    days = conf.BULK_FILE_RETENTION_DAYS if days is None else days
    if days is None:
        return FileCleanup(0, 0)
    cutoff = (now or timezone.now()) - dt.timedelta(days=float(days))
    parts = list(expired_parts(cutoff).values_list("pk", "csv_file"))
    if dry_run:
        return FileCleanup(len(parts), len(_orphans(cutoff, conf)))
    storage = bulk_storage(conf)
    done = 0
    for pk, name in parts:
        try:
            storage.delete(name)
        except OSError:
            log.warning("Could not delete the bulk file of part %s.", pk, exc_info=True)
            continue
        # Compared with the name read: an export writing this part again keeps its new file.
        done += BulkPart.objects.filter(pk=pk, csv_file=name).update(csv_file="")
    orphans = _orphans(cutoff, conf)
    return FileCleanup(done, delete_files(orphans, conf))


def _orphans(cutoff: dt.datetime, conf: SatoriSettings) -> list[str]:
    """Files in the folder that no part names and that were last written before ``cutoff``."""
    storage = bulk_storage(conf)
    try:
        _dirs, files = storage.listdir(FOLDER)
    except (FileNotFoundError, NotImplementedError):
        return []
    referenced = set(
        BulkPart.objects.exclude(csv_file="")
        .filter(Q(csv_file__startswith=FOLDER + "/"))
        .values_list("csv_file", flat=True)
    )
    old = []
    for filename in files:
        name = f"{FOLDER}/{filename}"
        if name in referenced:
            continue
        # The modification time keeps a file an export has just saved, before the
        # part row names it, out of reach.
        with contextlib.suppress(OSError, NotImplementedError):
            if storage.get_modified_time(name) < cutoff:
                old.append(name)
    return old
