"""The only way onto the broker: pushes, actions, the sweep and bulk steps alike.

Every message carries ids only. A publish that fails (the broker is down)
pauses publishing in this process for :data:`BROKER_PAUSE_SECONDS`, so a save
does not wait for its own failed attempt during an outage; nothing is lost,
because the work is in the database and the sweep queues it again.

After-commit dispatches of pushes and of connected object changes go through a
per-process publisher thread (:class:`_Publisher`), which sends the ids that
gathered as one ``push_many`` (or ``apply_source_changes``) message: building a
Celery message was a large part of what sync added to a save.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import threading
import time
from typing import Any

from django.db import transaction

log = logging.getLogger("django_satori.sync")

#: One quick retry, then give up: the row is safe in the outbox and the sweep
#: sends it later, so a save must not hang while the broker is down.
PUBLISH_RETRY = {"max_retries": 1, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.3}
#: After a failed publish, skip publishing for this long (per process).
BROKER_PAUSE_SECONDS = 5.0
#: Most outbox ids in one ``push_many`` message. A worker sends them one after
#: another, so this bounds how long one message keeps a worker busy.
DISPATCH_BATCH = 100
#: How long the publisher thread lets ids gather before sending them. Pushes
#: wait ``COALESCE_SECONDS`` anyway, so nobody sees these milliseconds.
DISPATCH_LINGER_SECONDS = 0.05
#: At interpreter exit, wait this long for queued ids to reach the broker.
DISPATCH_EXIT_WAIT_SECONDS = 5.0

_paused_until = 0.0
#: The tasks the publisher thread sends, by name.
PUSH, SOURCE_CHANGES = "push_many", "apply_source_changes"


def _task(name: str) -> Any:
    # The one deliberate import inside a function in the sync engine: tasks.py
    # imports the engine (push, bulk, sweep) to run it, and the engine reaches the
    # task objects only here, when it publishes. Importing tasks at the top would
    # close that circle.
    from .. import tasks

    return getattr(tasks, name)


def broker_paused() -> bool:
    """True while publishing is paused after a failed publish in this process."""
    return time.monotonic() < _paused_until


def resume() -> None:
    """End the pause now (tests and scripts that know the broker is back)."""
    global _paused_until
    _paused_until = 0.0


def publish(task_name: str, args: tuple[Any, ...], countdown: float = 0, *, what: str) -> bool:
    """Queue ``task_name(*args)``; False (logged) if the broker could not take it."""
    global _paused_until
    if broker_paused():
        return False
    try:
        _task(task_name).apply_async(
            args, countdown=max(0.0, countdown), retry_policy=PUBLISH_RETRY
        )
    except Exception:  # the broker is down; the database keeps the work for the sweep
        _paused_until = time.monotonic() + BROKER_PAUSE_SECONDS
        log.warning("Could not queue %s; the periodic sweep will send it.", what, exc_info=True)
        return False
    return True


def dispatch_many(state_ids: list[int], countdown: float = 0) -> int:
    """Queue pushes for ``state_ids``, ``DISPATCH_BATCH`` to a message; returns how many
    were queued (none while the broker is down: the sweep sends them later)."""
    queued = 0
    for start in range(0, len(state_ids), DISPATCH_BATCH):
        ids = state_ids[start : start + DISPATCH_BATCH]
        if publish(PUSH, (ids,), countdown, what=f"the push of {len(ids)} sync state(s)"):
            queued += len(ids)
    return queued


def dispatch_on_commit(state_id: int, countdown: float) -> None:
    """Push ``state_id`` once the caller's transaction commits (through the publisher)."""
    transaction.on_commit(lambda: _publisher.put(PUSH, state_id, countdown))


def dispatch_source_changes(change_ids: list[int]) -> int:
    """Queue ``apply_source_changes`` for ``change_ids``, ``DISPATCH_BATCH`` to a message;
    returns how many were queued."""
    queued = 0
    for start in range(0, len(change_ids), DISPATCH_BATCH):
        ids = change_ids[start : start + DISPATCH_BATCH]
        if publish(
            SOURCE_CHANGES, (ids,), what=f"the mirror update of {len(ids)} connected object(s)"
        ):
            queued += len(ids)
    return queued


def dispatch_source_change_on_commit(change_id: int, using: str | None = None) -> None:
    """Apply the connected object change ``change_id`` once the caller's transaction
    commits (through the publisher)."""
    transaction.on_commit(lambda: _publisher.put(SOURCE_CHANGES, change_id, 0.0), using=using)


def dispatch_many_on_commit(state_ids: list[int]) -> None:
    if state_ids:
        transaction.on_commit(functools.partial(dispatch_many, list(state_ids)))


def dispatch_action(action_id: int, countdown: float = 0) -> bool:
    return publish("send_action", (action_id,), countdown, what=f"SATORI action {action_id}")


def dispatch_sweep() -> bool:
    return publish("sweep", (), what="the sweep")


def dispatch_bulk_run(job_id: int) -> bool:
    return publish("run_bulk_job", (job_id,), what=f"bulk job {job_id}")


def dispatch_bulk_upload(part_id: int, countdown: float = 0) -> bool:
    return publish("upload_bulk_part", (part_id,), countdown, what=f"upload of bulk part {part_id}")


def dispatch_bulk_poll(part_id: int, countdown: float = 0) -> bool:
    return publish(
        "poll_bulk_part", (part_id,), countdown, what=f"status check of bulk part {part_id}"
    )


def wait_for_dispatch(timeout: float = 10.0) -> bool:
    """Wait until this process has handed every after-commit dispatch to the broker.

    Saves return before their push task is queued (a thread queues it a few
    milliseconds later). Scripts and tests that need the message in the broker
    call this; it returns False if ``timeout`` passed first.
    """
    return _publisher.wait(timeout)


class _Publisher:
    """Hands after-commit dispatches to the broker from one thread per process.

    The request only queues the id here; the thread sends the ids that gathered
    meanwhile as one ``push_many`` message. Ids still queued when a process
    dies are not lost: their rows are pending in the outbox, and the sweep
    dispatches them, as after a broker outage. In Celery's eager mode the
    dispatch happens at once, in the caller.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, int, float]] = queue.SimpleQueue()
        self._unsent = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, task_name: str, row_id: int, countdown: float) -> None:
        if _eager() or not threads_run():
            _send(task_name, [row_id], countdown)
            return
        with self._changed:
            self._unsent += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="django-satori-publisher"
                )
                self._thread.start()
        self._queue.put((task_name, row_id, countdown))

    def wait(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._unsent == 0, timeout)

    def forget(self) -> None:
        """In a forked child: the parent's queue, lock and thread are the parent's."""
        self.__init__()  # type: ignore[misc]

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            self._take_queued(batch)
            if len(batch) < DISPATCH_BATCH:
                # Let more gather; with a backlog the batch is already full and
                # goes at once, so the thread keeps up with any rate of saves.
                time.sleep(DISPATCH_LINGER_SECONDS)
                self._take_queued(batch)
            try:
                grouped: dict[tuple[str, float], list[int]] = {}
                for task_name, row_id, countdown in batch:
                    grouped.setdefault((task_name, countdown), []).append(row_id)
                for (task_name, countdown), ids in grouped.items():
                    _send(task_name, ids, countdown)
            except Exception:  # keep the thread alive; the sweep sends what was missed
                log.exception("Could not queue SATORI work; the periodic sweep will queue it.")
            finally:
                with self._changed:
                    self._unsent -= len(batch)
                    self._changed.notify_all()

    def _take_queued(self, batch: list[tuple[str, int, float]]) -> None:
        while len(batch) < DISPATCH_BATCH:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return


def _send(task_name: str, ids: list[int], countdown: float) -> None:
    if task_name == SOURCE_CHANGES:
        dispatch_source_changes(ids)
    else:
        dispatch_many(ids, countdown)


_publisher = _Publisher()
os.register_at_fork(after_in_child=_publisher.forget)
atexit.register(lambda: _publisher.wait(DISPATCH_EXIT_WAIT_SECONDS))


@functools.cache
def threads_run() -> bool:
    """False under uWSGI without threads, where a background thread only runs while a
    request is being handled: ids could wait there for the sweep. Publish inline then."""
    try:
        import uwsgi  # an optional module, importable only inside a uWSGI worker
    except ImportError:
        return True
    options = getattr(uwsgi, "opt", {})
    enabled = options.get("enable-threads") not in (None, False, b"false", b"0", "false", "0")
    threads = options.get("threads")
    return enabled or (threads is not None and int(threads) > 1)


def _eager() -> bool:
    # Read at every dispatch (tests switch eager mode on and off), from the settings
    # object found once: finding it through the task's app proxy cost as much again.
    return bool(_celery_conf().get("task_always_eager"))


@functools.cache
def _celery_conf() -> Any:
    return _task(PUSH).app.conf
