"""A rate limit on single-customer calls shared by every worker on every machine.

Celery's own ``rate_limit`` counts per worker process; SATORI's policy is
about the account, so the count lives in a Django cache that all workers
share (Redis, Memcached or the database cache in production). Fixed windows
of one minute: simple, cheap (one ``incr``) and good enough for "a handful
of calls a minute".
"""

from __future__ import annotations

import random
import time

from django.core.cache import caches

from .conf import SatoriSettings

_WINDOW = 60


def acquire(conf: SatoriSettings, now: float | None = None) -> float:
    """Take one call from the budget. Returns 0 if allowed, else seconds to wait."""
    limit = conf.RATE_LIMIT_PER_MINUTE
    if limit is None:
        return 0.0
    now = time.time() if now is None else now
    window = int(now // _WINDOW)
    key = f"django_satori:ratelimit:{window}"
    cache = caches[conf.RATE_LIMIT_CACHE]
    cache.add(key, 0, timeout=_WINDOW * 2)
    try:
        count = cache.incr(key)
    except ValueError:  # evicted between add and incr: start the window again
        cache.add(key, 1, timeout=_WINDOW * 2)
        count = 1
    if count <= limit:
        return 0.0
    # Spread the waiting calls over the next window instead of waking them together.
    return (window + 1) * _WINDOW - now + random.uniform(0, _WINDOW / 2)
