from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DjangoSatoriConfig(AppConfig):
    name = "django_satori"
    label = "django_satori"
    verbose_name = _("SATORI")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported once the models are loaded: they register the system checks and
        # connect the receivers that record changes.
        from . import checks  # noqa: F401
        from .sync import connect_signals

        connect_signals()
