"""Signals django-satori sends, for projects that want to take part in a push.

``before_push``: sent in the worker just before a customer is sent, with
``customer``, ``payload`` (a dict of SATORI keys, which receivers may change
in place) and ``endpoint``. A receiver that returns ``False`` vetoes the push:
nothing is sent and the customer shows "Sync stopped" with the reason.

``after_push``: sent after SATORI accepted a push or delete and its answer was
written to the sync state, with ``email``, ``customer`` (None for deletes),
``endpoint`` and ``result``. A receiver that raises is logged; the push stays done.

``push_failed``: sent when a push or delete failed, with ``email``,
``customer``, ``endpoint``, ``error`` and ``final`` (False while it will be
retried).
"""

from django.dispatch import Signal

before_push = Signal()
after_push = Signal()
push_failed = Signal()
