"""``manage.py satori_sandbox``: the SATORI sandbox, accepting this project's settings.

Keys, custom fields, the tag separator and the action path/parameters default
to ``settings.SATORI`` so the project, pointed at the printed URL through
``SATORI["BASE_URL"]``, works against it unchanged.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.translation import gettext as _

from django_satori.conf import AUTH_KEYS, get_settings
from django_satori.sandbox.cli import add_arguments, build_server, serve
from django_satori.sandbox.config import SandboxKeys


class Command(BaseCommand):
    help = _(  # a str: argparse cannot print a lazy description (--help)
        "Run a strict fake SATORI API on this machine, accepting the keys and custom "
        "fields in settings.SATORI. Point SATORI['BASE_URL'] at the printed URL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        add_arguments(parser)

    def handle(self, *args: Any, **options: Any) -> None:
        current = get_settings()
        defaults: dict[str, Any] = {
            "custom_fields": dict(current.CUSTOM_FIELDS),
            "tag_separator": current.TAG_SEPARATOR,
            "action_path": current.ACTION_PATH,
            "action_params": dict(current.ACTION_PARAMS),
        }
        if current.has_credentials:
            defaults["keys"] = SandboxKeys(*(getattr(current, name) for name in AUTH_KEYS))
        else:
            self.stderr.write(
                _(
                    "settings.SATORI has no complete set of keys: the sandbox "
                    "accepts its default keys (sandbox-user-key, ...)."
                )
            )
        try:
            server = build_server(options, defaults)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from None

        def write(text: str) -> None:
            # Flushed at once: scripts wait for the URL line before using the server.
            self.stdout.write(text, ending="")
            self.stdout.flush()

        serve(server, write, quiet=options["quiet"])
