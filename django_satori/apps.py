from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class DjangoSatoriConfig(AppConfig):
    name = "django_satori"
    label = "django_satori"
    verbose_name = _("SATORI")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, conf, sync  # noqa: F401  (registers checks and signal receivers)

        sync.connect_signals()
