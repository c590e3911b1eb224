"""Run as a separate process: update customers many times, each save its own transaction.

``python -m tests.concurrent_writer [--members] WRITER_ID ROUNDS EMAIL [EMAIL ...]`` with the
worker environment (DJANGO_SATORI_WORKER_DB_NAME etc.) so it writes to the
test database. Used by the concurrency tests on PostgreSQL.
"""

from __future__ import annotations

import os
import random
import sys

import django


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    from django.db import transaction

    from django_satori.models import Customer

    members = argv[0] == "--members"
    if members:
        argv = argv[1:]
    writer, rounds, emails = argv[0], int(argv[1]), argv[2:]
    rng = random.Random(writer)
    if members:
        _update_members(writer, rounds, emails, rng)
        return
    for i in range(rounds):
        email = rng.choice(emails)
        with transaction.atomic():
            customer = Customer.objects.select_for_update().get(email=email)
            customer.memo = f"writer {writer} round {i}"
            customer.department = f"dept-{writer}-{i}"
            customer.save()


def _update_members(writer: str, rounds: int, emails: list[str], rng: random.Random) -> None:
    """Connected objects: each save (autocommit, as a web request without
    ATOMIC_REQUESTS) records a change; the worker builds the mirror from it."""
    from tests.testapp.models import Member

    for i in range(rounds):
        member = Member.objects.get(email=rng.choice(emails))
        member.given_name = f"writer {writer} round {i}"
        member.company = f"company-{writer}-{i}"
        member.tags = " ".join(rng.sample(["vip", "newsletter", "seminar", "trial"], k=2))
        member.save()


if __name__ == "__main__":
    main(sys.argv[1:])
