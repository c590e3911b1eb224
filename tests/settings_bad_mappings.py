"""tests.settings with three mistakes in MAPPINGS (test_checks runs commands with it)."""

from tests.settings import *  # noqa: F403
from tests.settings import SATORI

SATORI = {
    **SATORI,
    "MAPPINGS": {
        "testapp.Member": {
            "email": "email",
            "fields": {"colour": "x", "custom:nope": "plan"},
            "on_delete": "sometimes",
        },
        "nope.Model": {"email": "email"},
    },
}
