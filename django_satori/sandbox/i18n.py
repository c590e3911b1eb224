"""gettext that also works when Django is not configured.

The sandbox runs stand-alone (``python -m django_satori.sandbox``), where
calling Django's gettext would raise; there the English text is returned.
"""

from __future__ import annotations


def _(message: str) -> str:
    try:
        from django.conf import settings
        from django.core.exceptions import AppRegistryNotReady, ImproperlyConfigured
    except ImportError:
        return message
    try:
        if not settings.configured:
            return message
        from django.utils.translation import gettext

        return gettext(message)
    except (AppRegistryNotReady, ImproperlyConfigured):
        return message


gettext = _
