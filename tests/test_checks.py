"""System checks on settings.SATORI: stable ids, naming the setting at fault."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.test import override_settings

from django_satori.checks import check_settings
from django_satori.conf import get_settings

VALID = {
    "USER_KEY": "k1",
    "USER_SECRET": "s1",
    "COMPANY_KEY": "k2",
    "COMPANY_SECRET": "s2",
    "RATE_LIMIT_PER_MINUTE": None,  # the tests' cache is per-process (that is W001)
}


def ids(**satori):
    with override_settings(SATORI=satori):
        return sorted(m.id for m in check_settings())


def messages(**satori):
    with override_settings(SATORI=satori):
        return check_settings()


def test_valid_settings_pass():
    assert ids(**VALID) == []


@pytest.mark.parametrize("key", ["USER_KEY", "USER_SECRET", "COMPANY_KEY", "COMPANY_SECRET"])
def test_missing_or_empty_keys_are_e001_naming_the_key(key):
    for value in (None, "", "   "):
        satori = (
            {**VALID, key: value}
            if value is not None
            else {k: v for k, v in VALID.items() if k != key}
        )
        found = messages(**satori)
        assert [m.id for m in found] == ["django_satori.E001"]
        assert key in found[0].msg


def test_missing_keys_never_print_the_other_key_values():
    found = messages(**{**VALID, "USER_KEY": ""})
    text = " ".join(f"{m.msg} {m.hint} {m.obj}" for m in found)
    assert "s1" not in text.split() and "k2" not in text


def test_unknown_setting_name_is_e002_with_a_suggestion():
    (message,) = messages(**VALID, RATE_LIMIT_PER_MINUTES=10)
    assert message.id == "django_satori.E002"
    assert "RATE_LIMIT_PER_MINUTES" in message.msg
    assert "RATE_LIMIT_PER_MINUTE" in message.hint


def test_plain_http_base_url_outside_debug_is_e003():
    assert ids(**VALID, BASE_URL="http://api.satr.jp") == ["django_satori.E003"]
    assert ids(**VALID, BASE_URL="ftp://api.satr.jp") == ["django_satori.E003"]
    assert ids(**VALID, BASE_URL="https://api.satr.jp") == []


def test_plain_http_is_allowed_in_debug_and_to_the_local_sandbox():
    with override_settings(DEBUG=True):
        assert ids(**VALID, BASE_URL="http://sandbox.internal:8765") == []
    assert ids(**VALID, BASE_URL="http://127.0.0.1:8765") == []
    assert ids(**VALID, BASE_URL="http://localhost:8765") == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TIMEOUT", "10"),
        ("SYNC_ENABLED", "yes"),
        ("COALESCE_SECONDS", "30"),
        ("MAX_ATTEMPTS", True),
        ("MAPPINGS", []),
        ("BULK_CHUNK_SIZE", 20_000),
        ("PUSH_ENDPOINT", "post"),
        ("TIMEOUT", -1),
        ("TAG_SEPARATOR", ""),
        ("BULK_FILE_RETENTION_DAYS", 0),
        ("LOG_RETENTION_DAYS", -1),
        ("LOG_RETENTION_DAYS", "90"),
        ("LOG_DELETE_BATCH", 0),
        ("STATUS_CACHE", "nowhere"),
    ],
)
def test_bad_types_and_values_are_e004(key, value):
    found = messages(**VALID, **{key: value})
    assert [m.id for m in found] == ["django_satori.E004"]
    assert key in found[0].msg


def test_satori_must_be_a_dict():
    with override_settings(SATORI=["USER_KEY"]):
        assert [m.id for m in check_settings()] == ["django_satori.E004"]


def test_bad_mappings_are_e005():
    found = messages(**VALID, MAPPINGS={"nope.Model": {"email": "email"}})
    assert [m.id for m in found] == ["django_satori.E005"]
    found = messages(
        **VALID, MAPPINGS={"testapp.Member": {"email": "email", "fields": {"colour": "x"}}}
    )
    assert [m.id for m in found] == ["django_satori.E005"] and "colour" in found[0].msg
    found = messages(
        **VALID, MAPPINGS={"testapp.Member": {"email": "email", "fields": {"custom:x": "plan"}}}
    )
    assert [m.id for m in found] == ["django_satori.E005"]


def test_bad_custom_fields_are_e006():
    assert ids(**VALID, CUSTOM_FIELDS={"plan": "colour"}) == ["django_satori.E006"]
    assert ids(**VALID, CUSTOM_FIELDS={"custom:plan": "text"}) == ["django_satori.E006"]
    assert ids(**VALID, CUSTOM_FIELDS={"s": {"type": "select"}}) == ["django_satori.E006"]
    assert ids(**VALID, CUSTOM_FIELDS={"s": {"type": "select", "choices": ["a"]}}) == []


def test_per_process_rate_limit_cache_is_w001():
    assert ids(**{**VALID, "RATE_LIMIT_PER_MINUTE": 30}) == ["django_satori.W001"]
    assert ids(**VALID) == []


def test_dry_run_is_w002():
    assert ids(**VALID, DRY_RUN=True) == ["django_satori.W002"]


def test_accessor_follows_override_settings_and_hides_secrets():
    with override_settings(
        SATORI={**VALID, "TIMEOUT": [3, 20], "ACTION_PARAMS": {"name": "action[title]"}}
    ):
        conf = get_settings()
        assert conf.TIMEOUT == (3, 20)
        assert conf.ACTION_PARAMS["name"] == "action[title]"
        assert conf.ACTION_PARAMS["date"] == "action[date]"
        assert "s1" not in repr(conf) and "k1" not in repr(conf)
    assert settings.SATORI["USER_KEY"] == get_settings().USER_KEY


def test_the_test_settings_pass_the_checks():
    assert [m.id for m in check_settings()] == []


def test_every_mapping_mistake_is_its_own_e005():
    found = messages(
        **VALID,
        MAPPINGS={
            "testapp.Member": {
                "email": "email",
                "fields": {"colour": "x", "custom:nope": "plan"},
                "on_delete": "sometimes",
            },
            "nope.Model": {"email": "email"},
        },
    )
    assert [m.id for m in found] == ["django_satori.E005"] * 4
    text = "\n".join(m.msg for m in found)
    for mistake in ("'colour'", "'custom:nope'", "on_delete", "'nope.Model'"):
        assert mistake in text


def _manage(*args: str, tmp_path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings_bad_mappings",
        "DJANGO_SATORI_TEST_SQLITE": str(tmp_path / "db.sqlite3"),
    }
    env.pop("DJANGO_SATORI_TEST_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_mapping_typo_does_not_stop_migrate_and_check_lists_every_mistake(tmp_path):
    """It used to raise at start-up: every command stopped, migrate included, at the
    first mistake."""
    migrated = _manage("migrate", "--noinput", tmp_path=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert "django_satori.E005" in migrated.stderr  # shown, as warnings
    checked = _manage("check", tmp_path=tmp_path)
    assert checked.returncode != 0
    assert checked.stderr.count("django_satori.E005") == 4, checked.stderr
    assert "Traceback" not in checked.stderr
