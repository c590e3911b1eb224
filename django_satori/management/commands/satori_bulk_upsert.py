"""``manage.py satori_bulk_upsert``: send a selection of customers through the bulk CSV API.

Upsert creates customers SATORI does not know and overwrites the values of
those it knows (empty cells keep SATORI's value). See ``_bulk.py`` for the
options and exit codes.
"""

from __future__ import annotations

from django.utils.translation import gettext as _

from django_satori.models import BulkMode

from ._bulk import BulkCommand


class Command(BulkCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Create or update a selection of customers in SATORI through the bulk CSV API."
    )
    mode = BulkMode.UPSERT
