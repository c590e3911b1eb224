"""SATORI's permission-rule items (権限ルール) that each API operation needs.

Since 2025-10-21 SATORI applies the key owner's permission rules to API
calls. A refusal names no rule, so we name the item the key's owner must
enable, with the labels of SATORI's help article on permission rules.
"""

from __future__ import annotations

from django.utils.translation import gettext as translate_marked
from django.utils.translation import gettext_noop

#: operation -> the rule item, as labelled in SATORI's screen (the Japanese label
#: stays in the English text: SATORI's screen shows only that one). Message ids:
#: stored diagnoses keep them and word them when shown.
RULE_ITEMS: dict[str, str] = {
    "upsert": gettext_noop("Edit customer information (カスタマー情報の編集)"),
    "registration": gettext_noop("Register new customers (新規登録の実行)"),
    "delete": gettext_noop("Delete customers (カスタマーの削除)"),
    "action": gettext_noop("Customer user-defined actions (カスタマーのユーザー定義アクション)"),
    "bulk_upload": gettext_noop("Bulk registration of customers (カスタマーの一括登録)"),
    "bulk_status": gettext_noop(
        "Bulk retrieval of customer status (カスタマーステータスの一括取得)"
    ),
}

#: SATORI's note on a rule limited to 「自分のみ」 (own records only).
OWN_ONLY_NOTE = gettext_noop(
    "A rule set to 「自分のみ」 (own records only) lets the key edit or delete only the "
    "customers it registered itself."
)


def rule_item(operation: str) -> str:
    """The rule item ``operation`` needs, in the active language (KeyError if unknown)."""
    return translate_marked(RULE_ITEMS[operation])  # marked with gettext_noop above
