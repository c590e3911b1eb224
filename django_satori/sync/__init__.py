"""The sync engine, in the order a change travels (one module a step):

1. :mod:`~django_satori.sync.sources`: a save or delete of ``Customer`` or of a
   connected model starts it (and :func:`mark_for_sync` after bulk writes). A
   connected model's save records a change; after commit a worker builds its
   mirrored ``Customer`` (:func:`apply_source_changes`).
2. :mod:`~django_satori.sync.outbox`: the change marks the customer's
   ``SyncState`` row pending in the same transaction. The only writer of that table.
3. :mod:`~django_satori.sync.dispatch`: after commit, the row's id goes to the
   broker (the only code that publishes).
4. :mod:`~django_satori.sync.pushing`: a worker claims the row, sends the current
   data to SATORI and writes the answer back through the outbox.
5. :mod:`~django_satori.sync.history`: every call is recorded in ``SyncLog``.

:mod:`~django_satori.sync.actions` sends user-defined actions the same way.
Above the engine, :mod:`django_satori.sweep` is the safety net and
:mod:`django_satori.bulk` the bulk CSV jobs.
"""

from __future__ import annotations

from .actions import add_action, send_action
from .dispatch import dispatch_action, dispatch_many, wait_for_dispatch
from .outbox import backoff, pending_counts
from .pushing import PushOutcome, PushResult, build_payload, fingerprint, push, push_batch
from .sources import apply_source_changes, connect_signals, mark_for_sync, retry_source_changes

__all__ = [
    "PushOutcome",
    "PushResult",
    "add_action",
    "apply_source_changes",
    "backoff",
    "build_payload",
    "connect_signals",
    "dispatch_action",
    "dispatch_many",
    "fingerprint",
    "mark_for_sync",
    "pending_counts",
    "push",
    "push_batch",
    "retry_source_changes",
    "send_action",
    "wait_for_dispatch",
]
