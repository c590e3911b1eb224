"""``manage.py satori_bulk_register``: register a selection of customers in bulk.

Registration creates customers and, for those SATORI already has, only
fills values that are empty there. See ``_bulk.py`` for the options.
"""

from __future__ import annotations

from django.utils.translation import gettext as _

from django_satori.models import BulkMode

from ._bulk import BulkCommand


class Command(BulkCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Register a selection of customers in SATORI through the bulk CSV API (new "
        "customers are created; existing ones only get their empty values filled)."
    )
    mode = BulkMode.REGISTRATION
