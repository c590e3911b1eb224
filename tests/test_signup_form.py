"""The example project's sign-up form (資料請求), with Django's test client.

The example project has its own settings and apps, so the checks run in a
``manage.py shell`` of it on a throwaway database (like test_example_project.py);
test_browser_pages.py submits the same form in chromium.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_example_project import MANAGE, REPO_ROOT, example_env, manage

SCRIPT = r"""
import json, re
from django.test import Client
from example_project.members.forms import SignupForm
from example_project.members.models import Member

FORM = {
    "document": "pricing", "family_name": "山田", "given_name": "太郎",
    "plan": "free", "newsletter": "on",
}
out = {}
for language in ("ja", "en"):
    html = Client(HTTP_ACCEPT_LANGUAGE=language).get("/signup/").content.decode()
    out["required_" + language] = sorted(
        re.findall(r'<div class="field" id="field-(\w+)">\s*<label[^>]*>[^<]*'
                   r'<span class="required-mark">([^<]*)</span>', html)
    )
    note = re.search(r'<p class="helptext" id="required-note">(.*?)</p>', html)
    out["note_" + language] = note and note.group(1)

FULL_WIDTH = "　Ｔａｒｏ．Ｙａｍａｄａ＠Ｅｘａｍｐｌｅ．ＪＰ "  # as a Japanese IME types it
response = Client().post("/signup/", {**FORM, "email": FULL_WIDTH})
out["status"] = response.status_code
out["members"] = list(Member.objects.values_list("email", flat=True))

def errors(email, language="en"):
    from django.utils import translation
    with translation.override(language):
        form = SignupForm({**FORM, "email": email})
        return form.errors.get("email", [])

out["errors"] = {
    "kanji": errors("山田@example.jp"),
    "kanji_ja": errors("山田@example.jp", "ja"),
    "not_an_address": errors("taro"),
    "empty": errors(""),
}
print("RESULT " + json.dumps(out, ensure_ascii=False))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path: Path = tmp_path_factory.mktemp("signup")
    manage(tmp_path, "migrate", "--verbosity", "0")
    run = subprocess.run(
        [sys.executable, MANAGE, "shell", "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=example_env(tmp_path, ALLOWED_HOSTS="testserver"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return dict(json.loads(line.removeprefix("RESULT ")))


def test_a_full_width_address_is_normalised_on_submit(result):
    assert result["status"] == 302
    assert result["members"] == ["taro.yamada@example.jp"]


def test_addresses_satori_would_refuse_are_refused_in_its_words(result):
    assert result["errors"] == {
        "kanji": ["The e-mail address must use half-width (ASCII) characters only."],
        "kanji_ja": ["メールアドレスには半角英数字と記号（ASCII）のみ使用できます。"],
        "not_an_address": ["This is not a valid e-mail address."],
        "empty": ["This field is required."],
    }


def test_required_fields_are_marked(result):
    required = ["document", "email", "family_name", "given_name", "plan"]
    assert result["required_ja"] == [[name, "必須"] for name in required]
    assert result["required_en"] == [[name, "Required"] for name in required]
    assert result["note_ja"] == "「必須」の項目は必ず入力してください。"
    assert result["note_en"] == "Items marked “Required” must be filled in."
